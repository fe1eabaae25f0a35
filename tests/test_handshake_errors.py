"""A client that cannot talk to its server is told, in its exception and in on_error,
what is wrong and what to change -- not only the server's log -- with one error code in
the exception, on_error and the log line."""

from __future__ import annotations

import logging
import ssl
import subprocess
from pathlib import Path
from typing import Any, Dict

import pytest

from morsock import Client, ConnectError, ErrorCode, NotConnectedError
from morsock.crypto import REFUSAL_MAGIC, ClientHandshake, refusal_frame
from morsock.protocol import FLAG_AUTHENTICATED, FrameDecoder
from morsock.testing import RawPeer, running_server

from helpers import Recorder, log_lines, scaled, wait_until

LOCAL = "127.0.0.1"
KEY = "handshake errors key"


def _connect_failure(client: Client, rec: Recorder) -> ConnectError:
    """connect() fails: its ConnectError, once the matching on_error has come."""
    with log_lines("morsock", logging.ERROR) as lines:
        try:
            with pytest.raises(ConnectError) as info:
                client.connect()
            (_, message, code), = rec.wait_count("error", 1)
        finally:
            client.disconnect()
    error = info.value
    assert code == error.code and message == str(error)  # one code, one message
    assert f"{error} (code {int(code)})" in lines                # and the log line says so
    return error


@pytest.mark.parametrize("server_settings, client_settings, expected", [
    ({"encryption_mode": "CBC"}, {"encryption_mode": "GCM"},
     r"mode/key size mismatch \(client AES-256-GCM, server AES-256-CBC\): set "
     r"encryption_mode and encryption_key_size alike"),
    ({"encryption_key_size": 128}, {"encryption_key_size": 256},
     r"client AES-256-CBC, server AES-128-CBC"),
    ({"encryption_key": ""}, {},
     r"the server has no encryption_key .*connect without encryption_key"),
    ({"encryption_profile": "MORMOT"}, {},
     r"the server uses encryption_profile=MORMOT .*set encryption_profile='MORMOT' on the "
     r"client"),
], ids=["mode", "key-size", "keyless-server", "mormot-server"])
def test_refused_handshake_tells_the_client_why(server_settings: Dict[str, Any],
                                                client_settings: Dict[str, Any],
                                                expected: str) -> None:
    srec, crec = Recorder(), Recorder()
    settings = {"encryption_key": KEY, **server_settings}
    with running_server(on_error=srec.handler("error"), **settings) as server:
        client = Client(LOCAL, server.port, encryption_key=KEY, connection_timeout=5,
                        on_error=crec.handler("error"), **client_settings)
        error = _connect_failure(client, crec)
        assert error.code == ErrorCode.AUTHENTICATION_FAILED
        assert "the server refused the AUTHENTICATED handshake" in str(error)
        assert __import__("re").search(expected, str(error)), str(error)
        (_, _, message, code), = srec.wait_count("error", 1)  # the server's log still says it
        assert code == ErrorCode.AUTHENTICATION_FAILED
        # on_error comes first, then the reactor closes the socket (Connection.close)
        wait_until(lambda: server.client_count == 0, what="the refused client removed")


def test_wrong_key_is_named_on_the_client() -> None:
    crec = Recorder()
    with running_server(encryption_key=KEY) as server:
        client = Client(LOCAL, server.port, encryption_key="another key",
                        on_error=crec.handler("error"))
        error = _connect_failure(client, crec)
        assert error.code == ErrorCode.AUTHENTICATION_FAILED
        assert "different encryption_key values" in str(error)


def test_refusal_goes_only_to_a_client_hello() -> None:
    """A flag-2 frame that is not a morsock ClientHello (what a Delphi peer could never
    send either) gets no refusal: the server closes without a byte."""
    with running_server() as server:
        with RawPeer(LOCAL, server.port) as peer:
            peer.send_frame(b"MSA1 but not a hello", FLAG_AUTHENTICATED)
            assert peer.expect_close() == b""
        with RawPeer(LOCAL, server.port) as peer:
            hello = ClientHandshake(KEY).hello_frame
            peer.send_raw(hello)
            (frame,) = FrameDecoder().feed(peer.expect_close())
            assert frame.flag == FLAG_AUTHENTICATED
            assert frame.payload.startswith(REFUSAL_MAGIC)
            assert b"no encryption_key" in frame.payload


def test_a_hostile_refusal_text_is_printable_and_bounded() -> None:
    handshake = ClientHandshake(KEY)
    payload = FrameDecoder().feed(refusal_frame("\x1b[31mred\nline" + "x" * 2000))[0].payload
    with pytest.raises(Exception) as info:
        handshake.finish(payload)
    text = str(info.value)
    assert "\x1b" not in text and "\n" not in text and len(text) < 600


# ------------------------------------------------------------------ TLS servers

@pytest.fixture(scope="module")
def tls_server_ctx(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    d: Path = tmp_path_factory.mktemp("pki")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "s.key", "-out",
                    "s.pem", "-days", "2", "-subj", "/CN=localhost"],
                   cwd=d, check=True, capture_output=True, timeout=scaled(60))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "s.pem", d / "s.key")
    return ctx


def test_keyed_plain_client_against_a_tls_server(tls_server_ctx: ssl.SSLContext) -> None:
    crec = Recorder()
    with running_server(ssl_context=tls_server_ctx) as server:
        client = Client(LOCAL, server.port, encryption_key=KEY, connection_timeout=5,
                        on_error=crec.handler("error"))
        error = _connect_failure(client, crec)
        assert error.code == ErrorCode.CONNECTION_FAILED
        assert f"{LOCAL}:{server.port}" in str(error)
        assert "a server that uses TLS" in str(error) and "ssl_context" in str(error)


def test_keyless_plain_client_against_a_tls_server(tls_server_ctx: ssl.SSLContext) -> None:
    crec = Recorder()
    with running_server(ssl_context=tls_server_ctx) as server:
        with Client(LOCAL, server.port, on_error=crec.handler("error"),
                    on_disconnect=crec.handler("disconnect")) as client:
            with pytest.raises(NotConnectedError, match="a server that uses TLS") as info:
                client.request(b"hello", timeout=scaled(5))
            crec.wait_count("disconnect", 1)
        (_, message, code), = crec.named("error")
        assert code == ErrorCode.CONNECTION_LOST
        assert "ssl_context" in message and message in str(info.value)


@pytest.mark.parametrize("server_settings", [{"encryption_key": KEY}, {},
                                             {"encryption_key": KEY,
                                              "encryption_profile": "MORMOT",
                                              "encryption_mode": "GCM"}],
                         ids=["authenticated-server", "keyless-server", "other-mode"])
def test_mormot_client_refused_by_a_morsock_server_is_told_what_to_check(
        server_settings: Dict[str, Any]) -> None:
    """A MORMOT client has no handshake (a Delphi peer could be one, so the server sends
    it nothing new): the server closes on its first encrypted frame, and the client's
    error says what to make equal."""
    crec = Recorder()
    with running_server(**server_settings) as server:
        with Client(LOCAL, server.port, encryption_key=KEY, encryption_profile="MORMOT",
                    on_error=crec.handler("error"),
                    on_disconnect=crec.handler("disconnect")) as client:
            assert client.request(b"plain first", timeout=scaled(5)) == b"plain first"
            with pytest.raises(NotConnectedError, match="cannot decrypt") as info:
                client.request(b"secret", encrypted=True, timeout=scaled(5))
            crec.wait_count("disconnect", 1)
        (_, message, code), = crec.named("error")
        assert code == ErrorCode.CONNECTION_LOST and message in str(info.value)
        assert "AES-256-CBC (MORMOT)" in message and "encryption_profile" in message
