"""Against the live Delphi original (../shared/delphi_peer/bin, copied to a temporary
directory as its README asks): a morsock client in the AUTHENTICATED profile, which the
original does not have, is told so -- not "connect timed out" -- and the MORMOT profile
then works. Skipped, saying why, where the binaries are not present."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from morsock import Client, ConnectError, ErrorCode

from delphi import LOCAL, delphi_bin
from helpers import Recorder, scaled

__all__ = ["delphi_bin"]

KEY = "clé delphi"


def _free_port() -> int:
    with socket.create_server((LOCAL, 0)) as s:
        return int(s.getsockname()[1])


@pytest.fixture
def delphi_server(delphi_bin: Path, request: pytest.FixtureRequest) -> Iterator[int]:
    """``mm_echo_server`` with the parameter's extra arguments; yields its port."""
    port = _free_port()
    proc = subprocess.Popen([str(delphi_bin / "mm_echo_server"), "--port", str(port),
                             *request.param], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=delphi_bin)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("READY"):
                break
        else:
            pytest.fail("mm_echo_server did not start")
        yield port
    finally:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("quit\n")
        proc.stdin.close()
        proc.wait(scaled(20))
        proc.stdout.close()


KEYED = ["--keyhex", KEY.encode("utf-8").hex(), "--mode", "CBC", "--bits", "256"]


def _fail_connect(port: int) -> Tuple[ConnectError, List[Tuple[object, ...]]]:
    rec = Recorder()
    client = Client(LOCAL, port, encryption_key=KEY, connection_timeout=3,
                    on_error=rec.handler("error"))
    try:
        with pytest.raises(ConnectError) as info:
            client.connect()
        errors = rec.wait_count("error", 1)
    finally:
        client.disconnect()
    return info.value, errors


@pytest.mark.parametrize("delphi_server", [KEYED, []], indirect=True,
                         ids=["keyed", "keyless"])
def test_authenticated_client_is_told_the_delphi_server_has_no_such_profile(
        delphi_server: int) -> None:
    """The original passes the hello to its handler as data and echoes it: recognised at
    once (no connect timeout), with what to change."""
    error, errors = _fail_connect(delphi_server)
    assert error.code == ErrorCode.AUTHENTICATION_FAILED
    assert "does not know the AUTHENTICATED profile" in str(error)
    assert "encryption_profile='MORMOT'" in str(error)
    assert errors == [("error", str(error), error.code)]


@pytest.mark.parametrize("delphi_server", [KEYED + ["--reply", "none"]], indirect=True,
                         ids=["no-reply"])
def test_unanswered_handshake_says_why_it_usually_happens(delphi_server: int) -> None:
    """A handler that answers nothing: the handshake gets no answer; the error says TCP
    connected, that the handshake was not answered, and the usual reason."""
    error, errors = _fail_connect(delphi_server)
    assert error.code == ErrorCode.CONNECTION_FAILED
    text = str(error)
    assert text.startswith(f"connected to {LOCAL}:{delphi_server}, but the server did not "
                           f"answer the AUTHENTICATED handshake within 3 s")
    assert "Delphi mORMot server has no AUTHENTICATED profile" in text
    assert errors == [("error", text, error.code)]


@pytest.mark.parametrize("delphi_server", [KEYED + ["--reply", "encrypted"]], indirect=True,
                         ids=["encrypted"])
def test_mormot_profile_then_works(delphi_server: int) -> None:
    with Client(LOCAL, delphi_server, encryption_key=KEY, encryption_profile="MORMOT",
                connection_timeout=3) as client:
        assert client.request("hello", encrypted=True, timeout=scaled(5)) == b"Echo: hello"


@pytest.mark.parametrize("settings", [{"encryption_key": KEY}, {}],
                         ids=["authenticated-server", "keyless-server"])
def test_a_refused_delphi_client_sees_no_new_byte(delphi_bin: Path,
                                                  settings: Dict[str, Any]) -> None:
    """Compatibility guard for the handshake refusal: the original TmMClient (MORMOT
    frames, no ClientHello) refused by a morsock server gets not one frame, only the
    close, exactly as before."""
    from morsock.testing import running_server
    with running_server(**settings) as server:
        out = subprocess.run(
            [str(delphi_bin / "mm_client"), "--host", LOCAL, "--port", str(server.port),
             *KEYED], input="connect 3000\nsend 1 68656c6c6f\nwaitstate disconnected 5000\n"
                            "quit\n", capture_output=True, text=True, timeout=scaled(60),
            cwd=delphi_bin)
    assert "OK waitstate Disconnected" in out.stdout, out.stdout
    assert "RECV" not in out.stdout, out.stdout
