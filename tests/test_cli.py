"""``python -m morsock server|client`` as a user meets it: run as real subprocesses (stdout
and stderr are pipes, not a terminal, unless a test opens a pty) against 127.0.0.1.

Every child is killed and reaped in a ``finally`` block; every wait is bounded.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, ContextManager, Iterator, List

import pytest
from helpers import CHILD_ENV, CHILD_WAIT, ROOT, Child, read_terminal, run_python, scaled
from helpers import child as run_child

import morsock
from morsock.protocol import HEADER_SIZE

WAIT = CHILD_WAIT

BANNER = r"^morsock server listening on 127\.0\.0\.1:(\d+); "
SUMMARY = (r"^morsock server stopped after \d\d:\d\d:\d\d: (\d+) client\(s\) served, "
           r"(\d+) message\(s\) received \(([^)]*)\), (\d+) sent \(([^)]*)\)$")


def run(args: List[str], **kwargs: Any) -> "subprocess.CompletedProcess[str]":
    """``python -m morsock ARGS`` to its end."""
    return run_python(["-m", "morsock", *args], **kwargs)


def child(args: List[str], **kwargs: Any) -> ContextManager[Child]:
    """``python -m morsock ARGS`` running (closed when the block ends)."""
    return run_child(["-m", "morsock", *args], **kwargs)


def server_args(*extra: str) -> List[str]:
    return ["server", "--host", "127.0.0.1", "--port", "0", *extra]


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate for 127.0.0.1 (cert.pem, with its key in key.pem)."""
    d = tmp_path_factory.mktemp("cli-pki")
    result = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "key.pem", "-out", "cert.pem",
         "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
        cwd=d, capture_output=True, text=True, timeout=scaled(60))
    assert result.returncode == 0, result.stderr
    return d


# -- the banner ----------------------------------------------------------------------------

@pytest.mark.parametrize("extra, says", [
    ([], "TLS off; per-message encryption off (no --key)"),
    (["--key", "k"], "TLS off; per-message encryption AES-256-CBC (AUTHENTICATED)"),
    (["--key", "k", "--mode", "gcm", "--key-size", "128", "--profile", "mormot"],
     "TLS off; per-message encryption AES-128-GCM (MORMOT)"),
], ids=["plain", "authenticated", "mormot"])
def test_banner_says_where_it_listens_without_a_terminal(extra: List[str], says: str) -> None:
    with child(server_args(*extra)) as server:
        match = server.expect(BANNER + "(.*)$")
        assert match[2] == says
        port = int(match[1])
        assert port != 0
        with morsock.Client("127.0.0.1", port, encryption_key=extra[1] if extra else "",
                            encryption_mode=extra[3] if len(extra) > 2 else "CBC",
                            encryption_key_size=int(extra[5]) if len(extra) > 2 else 256,
                            encryption_profile=extra[7] if len(extra) > 2
                            else "AUTHENTICATED") as client:
            assert client.request(b"up", timeout=WAIT, encrypted=bool(extra)) == b"up"
        code, out, err = server.interrupt()
    assert code == 0, err
    assert "DISABLED" not in out
    assert "Traceback" not in err


def test_banner_of_a_tls_server_shows_tls_and_encryption_apart(cert: Path) -> None:
    tls = ["--certfile", str(cert / "cert.pem"), "--keyfile", str(cert / "key.pem")]
    with child(server_args(*tls)) as server:
        assert server.expect(BANNER + "(.*)$")[2] == \
            "TLS on; per-message encryption off (no --key)"
        assert server.interrupt()[0] == 0
    with child(server_args(*tls, "--key", "k", "--cafile", str(cert / "cert.pem"))) as server:
        match = server.expect(BANNER + "(.*)$")
        assert match[2] == ("TLS on (client certificates verified when presented); "
                            "per-message encryption AES-256-CBC (AUTHENTICATED)")
        reply = run(["client", "--port", match[1], "--cafile", str(cert / "cert.pem"),
                     "--key", "k", "--encrypted", "over tls"])
        assert (reply.returncode, reply.stdout, reply.stderr) == (0, "over tls\n", "")
        code, out, _ = server.interrupt()
    assert code == 0 and "DISABLED" not in out


# -- Ctrl+C ----------------------------------------------------------------------------------

def test_sigint_stops_the_server_with_a_summary_and_no_traceback() -> None:
    with child(server_args("--prefix", "re: ")) as server:
        port = int(server.expect(BANNER)[1])
        payloads = [b"one", b"two", b"three"]
        for payload in payloads[:2]:
            with morsock.Client("127.0.0.1", port) as client:
                assert client.request(payload, timeout=WAIT) == b"re: " + payload
        with morsock.Client("127.0.0.1", port) as client:
            assert client.request(payloads[2], timeout=WAIT) == b"re: three"
            # the server counts the client's close asynchronously: a fourth round trip
            # on a live connection proves the earlier ones were all counted
            assert client.request(b"four", timeout=WAIT) == b"re: four"
        code, out, err = server.interrupt()
    assert code == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    last = out.splitlines()[-1]
    match = re.match(SUMMARY, last)
    assert match, out
    received = sum(len(p) + HEADER_SIZE for p in (*payloads, b"four"))
    sent = received + 4 * len(b"re: ")
    assert match.groups() == ("3", "4", f"{received} B", "4", f"{sent} B")


def test_sigterm_also_ends_with_the_summary() -> None:
    with child(server_args()) as server:
        server.expect(BANNER)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(WAIT) == 0
        server._reader.join(WAIT)
    assert re.match(SUMMARY, server.out[-1].rstrip("\n")), server.out


def test_a_reader_that_went_away_is_no_error() -> None:
    """``python -m morsock server | head -1``: the summary finds no reader; still a
    clean stop."""
    proc = subprocess.Popen([sys.executable, "-m", "morsock", *server_args()],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=CHILD_ENV)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert re.match(BANNER, proc.stdout.readline())  # bounded by the wait below
        proc.stdout.close()  # like head(1) after its line
        proc.send_signal(signal.SIGINT)
        assert proc.wait(WAIT) == 0
        err = proc.stderr.read()
        assert "Traceback" not in err and "BrokenPipe" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(WAIT)
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.fixture
def sigint_not_ignored() -> Iterator[None]:
    """Children start with SIGINT at its default, so Ctrl+C raises KeyboardInterrupt in
    them: a process inherits an ignored SIGINT (as pytest has when started with ``&``
    from a non-interactive shell), and Python then leaves it ignored in the CLI client.
    This process's own handler is not inherited across exec: children get the default."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.usefixtures("sigint_not_ignored")
def test_sigint_ends_the_client_without_a_traceback() -> None:
    with child(server_args()) as server:
        port = server.expect(BANNER)[1]
        with child(["client", "--port", port], stdin=subprocess.PIPE) as client:
            assert client.proc.stdin is not None
            client.proc.stdin.write("first\n")
            client.proc.stdin.flush()
            client.expect(r"^first$")  # connected, and now waiting for the next line
            code, out, err = client.interrupt()
        assert code == 130
        assert err == "interrupted\n"
        assert server.interrupt()[0] == 0


# -- the live status line and the log --------------------------------------------------------

def render(line: str) -> str:
    """What a terminal shows for *line*: each ``\\r`` returns to column 0, and later
    characters overwrite earlier ones."""
    cells: List[str] = []
    col = 0
    for ch in line:
        if ch == "\r":
            col = 0
            continue
        if col < len(cells):
            cells[col] = ch
        else:
            cells.append(ch)
        col += 1
    return "".join(cells).rstrip()


def test_log_records_never_land_on_the_status_line() -> None:
    master, slave = os.openpty()
    seen = ""
    try:
        with child(server_args(), stderr=slave) as server:
            os.close(slave)
            slave = -1
            port = int(server.expect(BANNER)[1])
            # the status line is up
            seen = read_terminal(master, r"clients +0 \| +\d+ msg/s", seen)
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as bad:
                bad.sendall(b"this is not a morsock frame")  # logged at ERROR
                bad.settimeout(WAIT)
                assert bad.recv(100) == b""  # the server closed it
            seen = read_terminal(master, r"ERROR morsock: [^\n]*\n", seen)
            # the status line drawn again below
            seen = read_terminal(master, r"ERROR morsock: [^\n]*\n.*clients +\d+ \|", seen)
            assert server.interrupt()[0] == 0
    finally:
        if slave != -1:
            os.close(slave)
        os.close(master)
    error_lines = [render(line) for line in seen.split("\n") if "ERROR morsock" in line]
    assert len(error_lines) == 1, seen
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ERROR morsock: ", error_lines[0]), \
        error_lines


# -- bad arguments ---------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--log-level", "verbose", "server"],
     "argument --log-level: invalid choice: 'VERBOSE' (choose from 'DEBUG', 'INFO', "
     "'WARNING', 'ERROR', 'CRITICAL')"),
    (["server", "--mode", "XYZ"],
     "argument --mode: invalid choice: 'XYZ' (choose from ECB, CBC, CFB, OFB, CTR, GCM, "
     "CFC, OFC, CTC)"),
    (["client", "--mode", "XYZ", "x"], "argument --mode: invalid choice: 'XYZ'"),
    (["server", "--key-size", "100"],
     "argument --key-size: invalid choice: '100' (choose from 128, 192, 256)"),
    (["server", "--profile", "strong"],
     "argument --profile: invalid choice: 'strong' (choose from AUTHENTICATED, MORMOT)"),
    (["server", "--port", "99999"], "argument --port: "),
    (["server", "--port", "abc"], "argument --port: 'abc' is not a whole number"),
    (["server", "--threads", "0"], "argument --threads: "),
    (["client", "--timeout", "-1", "x"], "argument --timeout: "),
    (["client", "--encrypted", "x"], "--encrypted needs --key"),
], ids=["log-level", "mode", "client-mode", "key-size", "profile", "port-range",
        "port-text", "threads", "timeout", "encrypted"])
def test_bad_arguments_end_with_a_usage_message(args: List[str], message: str) -> None:
    result = run(args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("usage: python -m morsock")
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize("command", ["server", "client"])
@pytest.mark.parametrize("flag", ["--cafile", "--certfile", "--keyfile"])
def test_a_missing_tls_file_is_named(tmp_path: Path, command: str, flag: str) -> None:
    missing = tmp_path / f"missing{flag[1:]}.pem"
    result = run([command, flag, str(missing), *(["x"] if command == "client" else [])])
    assert result.returncode == 2
    assert f"argument {flag}: no such file: {missing}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_an_unusable_certificate_names_the_file(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate\n")
    result = run(server_args("--certfile", str(bogus)))
    assert result.returncode == 2
    assert f"error: --certfile {bogus}: not a usable PEM certificate" in result.stderr
    assert "Traceback" not in result.stderr


# -- the client's errors ---------------------------------------------------------------------

def test_the_client_prints_a_refused_connection_once() -> None:
    with socket.socket() as idle:
        idle.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        port = idle.getsockname()[1]
        result = run(["client", "--port", str(port), "x"])
        verbose = run(["--log-level", "error", "client", "--port", str(port), "x"])
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: cannot connect to 127.0.0.1:{port}")
    # Asked for, the library's log is shown as well.
    assert verbose.returncode == 1
    assert " ERROR morsock: " in verbose.stderr and lines[0] in verbose.stderr.splitlines()


def test_the_client_prints_a_refused_profile_once() -> None:
    """A MORMOT client against an AUTHENTICATED server: the failed request and the
    client's on_error tell the same story; it is printed once."""
    with morsock.Server(0, "127.0.0.1", encryption_key="k",
                        on_handle_command=lambda s, c, d: d) as server:
        result = run(["client", "--port", str(server.port), "--key", "k", "--profile",
                      "mormot", "--encrypted", "x"])
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "MORMOT" in lines[0]
