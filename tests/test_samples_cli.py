"""Every sample and command-line entry point, run for real as subprocesses.

Each child process is killed and reaped in a ``finally`` block, and every wait is bounded.
"""

from __future__ import annotations

import importlib.util
import io
import os
import queue
import re
import signal
import time
from pathlib import Path
from typing import Any, List

import pytest
from helpers import CHILD_WAIT, ROOT, Child, child, read_terminal, run_python

import morsock
from morsock.demo import run_demo

SAMPLES = sorted((ROOT / "samples").glob("*.py"))
WAIT = CHILD_WAIT
run = run_python


def wait_for_file(path: Path, proc: Child, timeout: float = WAIT) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.proc.poll() is not None:
            pytest.fail(f"server exited with {proc.proc.returncode}: {proc.out}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path} not written within {timeout} s")
        time.sleep(0.02)  # polling for the file, with a deadline
    return path.read_text().strip()


# -- --help everywhere ---------------------------------------------------------------------

@pytest.mark.parametrize("script", SAMPLES + [ROOT / "docs" / "make_screenshot.py"],
                         ids=lambda p: p.name)
def test_every_sample_has_help(script: Path) -> None:
    result = run([str(script), "--help"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")


def test_the_expected_samples_exist() -> None:
    names = {p.name for p in SAMPLES}
    assert {"echo_server.py", "echo_client.py", "tk_server.py", "tk_client.py",
            "chat.py"} <= names


@pytest.mark.parametrize("command", [[], ["server"], ["client"], ["demo"]],
                         ids=["main", "server", "client", "demo"])
def test_every_cli_command_has_help(command: List[str]) -> None:
    result = run(["-m", "morsock", *command, "--help"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m morsock")


# -- echo_server.py / echo_client.py ------------------------------------------------------

def test_echo_server_and_client_round_trip() -> None:
    with child(["samples/echo_server.py", "--host", "127.0.0.1", "--port", "0",
                "--stats-interval", "0.2"]) as server:
        port = server.expect(r"^echo server listening on 127\.0\.0\.1:(\d+) \(DISABLED\)")[1]
        result = run(["samples/echo_client.py", "--port", port, "--count", "3"])
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[1:4] == ["Echo: Message 1", "Echo: Message 2", "Echo: Message 3"]
        assert "3/3 answered" in lines[4]
        stdin = run(["samples/echo_client.py", "--port", port], input="one\ntwo\n")
        assert stdin.returncode == 0, stdin.stderr
        assert stdin.stdout.splitlines()[1:3] == ["Echo: one", "Echo: two"]
        server.expect(r"^\[stats\] clients 0 \| connections 2 \| received 5 msg")
        assert server.stop(signal.SIGINT) == 0
    output = "".join(server.out)
    assert "+ client #1 connected from 127.0.0.1:" in output
    assert "- client #2 disconnected" in output
    assert output.rstrip().endswith("server stopped")


@pytest.mark.parametrize("profile", ["AUTHENTICATED", "MORMOT"])
def test_echo_samples_encrypted(profile: str) -> None:
    crypto = ["--key", "sample key", "--mode", "GCM", "--profile", profile]
    with child(["samples/echo_server.py", "--host", "127.0.0.1", "--port", "0", *crypto,
                "--stats-interval", "0"]) as server:
        port = server.expect(r"listening on 127\.0\.0\.1:(\d+) \(AES-256-GCM")[1]
        result = run(["samples/echo_client.py", "--port", port, *crypto, "secret", "words"])
        assert result.returncode == 0, result.stderr
        assert "(AES-256-GCM" in result.stdout.splitlines()[0]
        assert result.stdout.splitlines()[1:3] == ["Echo: secret", "Echo: words"]
        # the stats count the two application messages, not the handshake frames
        assert "[stats] sent 2 msg | received 2 replies | 2/2 answered" in result.stdout
        wrong = run(["samples/echo_client.py", "--port", port, "--key", "wrong key",
                     "--mode", "GCM", "--profile", profile, "--timeout", "3", "x"])
        assert wrong.returncode == 1
        assert "Echo: x" not in wrong.stdout
        assert server.stop(signal.SIGTERM) == 0


def test_echo_client_reports_a_refused_connection() -> None:
    import socket
    with socket.socket() as idle:
        idle.bind(("127.0.0.1", 0))  # bound, not listening
        result = run(["samples/echo_client.py", "--port", str(idle.getsockname()[1]), "x"])
    assert result.returncode == 1
    assert "cannot connect" in result.stderr


# -- chat.py ---------------------------------------------------------------------------------

def load_chat() -> Any:
    spec = importlib.util.spec_from_file_location("sample_chat", ROOT / "samples" / "chat.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chat_sample_between_a_console_client_and_another_client() -> None:
    chat = load_chat()
    room = chat.ChatServer("127.0.0.1", 0, key="chat key", verbose=False)
    room.start()
    heard: "queue.Queue[str]" = queue.Queue()
    bob = morsock.Client("127.0.0.1", room.server.port, encryption_key="chat key",
                         on_handle_command=lambda c, d: heard.put(d.decode()))
    try:
        bob.connect()
        bob.send_data("/nick bob", encrypted=True)
        assert heard.get(timeout=WAIT) == "* welcome bob; /who lists who is here"
        # alice is the sample's console client, reading stdin until its end.
        alice = run(["samples/chat.py", "client", "--port", str(room.server.port),
                     "--key", "chat key", "--name", "alice"],
                    input="hello everyone\n/who\n/nick al\n")
        assert alice.returncode == 0, alice.stderr
        assert alice.stdout.splitlines() == [
            "* welcome alice; /who lists who is here", "* here: alice, bob",
            "* you are now al", "* bye al"]
        got = [heard.get(timeout=WAIT) for _ in range(4)]
        assert got == ["* alice joined", "[alice] hello everyone", "* alice is now al",
                       "* al left"]
    finally:
        bob.disconnect()
        room.stop()


def test_chat_client_keeps_its_nick_after_a_reconnect() -> None:
    import subprocess
    chat = load_chat()
    room = chat.ChatServer("127.0.0.1", 0, verbose=False)
    room.start()
    alice = Child(["samples/chat.py", "client", "--port", str(room.server.port),
                   "--name", "alice"], stdin=subprocess.PIPE)
    try:
        alice.expect(r"^\* welcome alice")
        assert alice.proc.stdin is not None
        alice.proc.stdin.write("/nick al\n")
        alice.proc.stdin.flush()
        alice.expect(r"^\* you are now al$")
        assert room.server.disconnect_all_clients() == 1  # the server drops the client
        alice.expect(r"^\* connection lost, reconnecting")
        alice.expect(r"^\* welcome al;")  # the reconnection announced the new nick
        names = [room.nick(c) for c in room.server.clients.values()]
        assert names == ["al"]
        alice.proc.stdin.close()
        assert alice.proc.wait(WAIT) == 0
    finally:
        alice.close()
        room.stop()


def test_chat_server_process_relays_between_clients() -> None:
    with child(["samples/chat.py", "server", "--host", "127.0.0.1", "--port", "0"]) as server:
        port = server.expect(r"^chat server listening on 127\.0\.0\.1:(\d+)")[1]
        heard: "queue.Queue[str]" = queue.Queue()
        with morsock.Client("127.0.0.1", int(port),
                            on_handle_command=lambda c, d: heard.put(d.decode())) as carol:
            carol.send_data("/nick carol")
            assert heard.get(timeout=WAIT).startswith("* welcome carol")
            dave = run(["samples/chat.py", "client", "--port", port, "--name", "dave"],
                       input="hi carol\n")
            assert dave.returncode == 0, dave.stderr
            assert [heard.get(timeout=WAIT) for _ in range(3)] == [
                "* dave joined", "[dave] hi carol", "* dave left"]
        assert server.stop(signal.SIGINT) == 0
    assert "chat server stopped" in "".join(server.out)


# -- python -m morsock server / client ----------------------------------------------------

def test_cli_server_and_client_round_trip(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    with child(["-m", "morsock", "server", "--host", "127.0.0.1", "--port", "0",
                "--port-file", str(port_file), "--prefix", "re: ", "--key", "cli key",
                "--status", "off"]) as server:
        port = wait_for_file(port_file, server)
        args = ["-m", "morsock", "client", "--port", port]
        result = run([*args, "one", "two words"])
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == ["re: one", "re: two words"]
        stdin = run(args, input="first\nsecond\n")
        assert stdin.stdout.splitlines() == ["re: first", "re: second"], stdin.stderr
        encrypted = run([*args, "--key", "cli key", "--encrypted", "hidden"])
        assert encrypted.returncode == 0, encrypted.stderr
        assert encrypted.stdout.splitlines() == ["re: hidden"]
        no_key = run([*args, "--encrypted", "x"])
        assert no_key.returncode == 2 and "--encrypted needs --key" in no_key.stderr
        assert server.stop(signal.SIGTERM) == 0
        assert server.proc.stderr is not None
        assert server.proc.stderr.read() == ""  # --status off: nothing on stderr


def test_cli_client_reports_a_refused_connection() -> None:
    import socket
    with socket.socket() as idle:
        idle.bind(("127.0.0.1", 0))
        result = run(["-m", "morsock", "client", "--port", str(idle.getsockname()[1]), "x"])
    assert result.returncode == 1
    assert "error:" in result.stderr


def test_cli_server_shows_a_live_status_line_on_a_terminal(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    master, slave = os.openpty()
    try:
        with child(["-m", "morsock", "server", "--host", "127.0.0.1", "--port", "0",
                    "--port-file", str(port_file)], stderr=slave) as server:
            os.close(slave)
            slave = -1
            port = wait_for_file(port_file, server)
            assert run(["-m", "morsock", "client", "--port", port, "ping"]).returncode == 0
            seen = read_terminal(
                master, r"clients +\d+ \| +\d+ msg/s \| +[\d.]+ MB/s \| up +\d+ s")
            server.expect(rf"^morsock server listening on 127\.0\.0\.1:{port}; .*; "
                          r"Ctrl\+C to stop$")  # the banner: on stdout
            assert "\r" in seen  # the line is rewritten in place
            assert server.stop(signal.SIGINT) == 0
    finally:
        if slave != -1:
            os.close(slave)
        os.close(master)


# -- python -m morsock demo ------------------------------------------------------------------

def test_cli_demo_passes_and_reports_every_step() -> None:
    started = time.monotonic()
    result = run(["-m", "morsock", "demo"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.monotonic() - started < 30
    lines = result.stdout.splitlines()
    assert lines[0].startswith("morsock ") and "demo" in lines[0]
    steps = [line for line in lines if re.match(r"^\d\. ", line)]
    assert len(steps) == 7
    assert all(" OK " in line for line in steps), steps
    for topic in ("plain echo", "AUTHENTICATED", "MORMOT", "broadcast", "reconnect",
                  "threads", "statistics"):
        assert any(topic in line for line in steps), topic
    assert re.match(r"^morsock demo: all 7 steps OK \([\d.]+ s\)$", lines[-1])
    assert result.stderr == ""
    # the broadcast line's numbers add up: every connected client is accounted for
    counts = re.search(r"broadcast to all (\d+) connected clients \((\d+) from the earlier "
                       r"steps \+ (\d+) new\); each of the (\d+) new ones received it",
                       result.stdout)
    assert counts is not None, result.stdout
    total, earlier, new, received = map(int, counts.groups())
    assert total == earlier + new and new == received


def test_cli_demo_quiet_prints_only_the_verdict() -> None:
    result = run(["-m", "morsock", "demo", "--quiet"])
    assert result.returncode == 0
    assert re.match(r"^morsock demo: all 7 steps OK \([\d.]+ s\)\n$", result.stdout)


def test_demo_in_process_cleans_up_every_thread() -> None:
    # the autouse leak fixture fails this test if a thread or a socket is left behind
    out = io.StringIO()
    assert run_demo(out=out) == 0
    assert len(re.findall(r"^\d\. .* OK  ", out.getvalue(), re.M)) == 7


def test_demo_reports_a_failed_step(monkeypatch: pytest.MonkeyPatch) -> None:
    from morsock import demo

    def broken(self: Any) -> str:
        raise AssertionError("simulated failure")

    monkeypatch.setattr(demo._Tour, "broadcast", broken)
    out = io.StringIO()
    assert run_demo(out=out) == 1
    text = out.getvalue()
    assert "4. broadcast" in text and "FAILED  AssertionError: simulated failure" in text
    assert text.splitlines()[-1].startswith("morsock demo: 1 of 7 steps FAILED")
