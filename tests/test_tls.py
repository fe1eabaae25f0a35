"""TLS transport (API.md §4b): handshake driven by the reactor, certificate verification,
mutual TLS, and everything else (frames, both encryption profiles, statistics, limits,
reconnection) unchanged inside it.

A throw-away PKI is made once per session with the ``openssl`` command: a test CA, a
server certificate for ``localhost`` / ``127.0.0.1``, a client certificate
(``CN=client-1``) signed by the CA, a self-signed "rogue" client certificate with the
same name, and an "impostor" server certificate signed by another CA.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from morsock import (Client, ConnectError, EncryptionProfile, ErrorCode, NotConnectedError,
                     ReconnectStrategy, SendBufferFullError, Server)
from morsock.protocol import encode_frame
from morsock.testing import RawPeer, echo_handler, running_server

from helpers import TIMEOUT, Recorder, free_port, scaled, wait_until

LOCAL = "127.0.0.1"
BIG = 300 * 1024


# ------------------------------------------------------------------------------- PKI

def _openssl(directory: Path, *args: str) -> None:
    result = subprocess.run(["openssl", *args], cwd=directory, capture_output=True,
                            text=True, timeout=scaled(60))
    assert result.returncode == 0, f"openssl {' '.join(args)} failed:\n{result.stderr}"


_EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _make_ca(d: Path, name: str, cn: str) -> None:
    _openssl(d, "req", "-x509", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-days", "2", "-subj", f"/CN={cn}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def _make_leaf(d: Path, name: str, ca: str, cn: str, san: str, usage: str) -> None:
    _openssl(d, "req", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/O=morsock tests/CN={cn}")
    (d / f"{name}.ext").write_text(
        f"basicConstraints=CA:FALSE\nsubjectAltName={san}\nextendedKeyUsage={usage}\n"
        f"subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey",
             f"{ca}.key", "-set_serial", str(int.from_bytes(os.urandom(8), "big")),
             "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca", "morsock test CA")
    _make_leaf(d, "server", "ca", "localhost", "DNS:localhost,IP:127.0.0.1", "serverAuth")
    _make_leaf(d, "client", "ca", "client-1", "DNS:client-1", "clientAuth")
    _openssl(d, "req", "-x509", *_EC, "-keyout", "rogue.key", "-out", "rogue.pem",
             "-days", "2", "-subj", "/O=morsock tests/CN=client-1")
    _make_ca(d, "other-ca", "some other CA")
    _make_leaf(d, "impostor", "other-ca", "localhost", "DNS:localhost,IP:127.0.0.1",
               "serverAuth")
    return d


def server_ctx(pki: Path, cert: str = "server", client_certs: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki / f"{cert}.pem", pki / f"{cert}.key")
    if client_certs:
        ctx.load_verify_locations(pki / "ca.pem")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_ctx(pki: Path, cert: Optional[str] = None,
               max_version: Optional[ssl.TLSVersion] = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if cert is not None:
        ctx.load_cert_chain(pki / f"{cert}.pem", pki / f"{cert}.key")
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def server_events(rec: Recorder) -> Dict[str, Any]:
    return {"on_connect": rec.handler("connect"), "on_disconnect": rec.handler("disconnect"),
            "on_error": rec.handler("error")}


def client_events(rec: Recorder) -> Dict[str, Any]:
    return {"on_connect": rec.handler("connect"), "on_disconnect": rec.handler("disconnect"),
            "on_error": rec.handler("error")}


def error_codes(rec: Recorder) -> List[int]:
    return [e[-1] for e in rec.named("error")]


def assert_never_admitted(server: Server, rec: Recorder) -> None:
    """The refused peer never became a client."""
    assert rec.count("connect") == 0
    assert server.clients == {} and server.client_count == 0
    assert server.total_connections == 0


# ---------------------------------------------------------------------- round trips

def test_round_trip_with_300k_message_and_statistics(pki: Path) -> None:
    srec, crec = Recorder(), Recorder()
    with running_server(ssl_context=server_ctx(pki), **server_events(srec)) as server:
        client = Client(LOCAL, server.port, ssl_context=client_ctx(pki), **client_events(crec))
        with client:
            assert client.request(b"hello over TLS") == b"hello over TLS"
            big = os.urandom(BIG)
            assert client.request(big, timeout=scaled(30)) == big
            (sc,) = server.clients.values()
            assert sc.peer_certificate is None  # the client sent no certificate
            assert sc.messages_received == 2
            wait_until(lambda: sc.messages_sent == 2, what="the reply counted as sent")
        srec.wait_count("disconnect", 1)
        # statistics count application bytes (frames), not TLS record overhead
        expected = (9 + len(b"hello over TLS")) + (9 + BIG)
        wait_until(lambda: (server.total_bytes_sent, server.total_messages_sent) == (expected, 2),
                   what="server bytes and messages sent")
        assert server.total_bytes_received == expected
        assert server.total_messages_received == server.total_messages_sent == 2
        assert client.total_bytes_sent == client.total_bytes_received == expected
        assert client.messages_sent == client.messages_received == 2
        assert server.total_connections == 1
    # the client's disconnect sent close_notify: a clean end, no error on either side
    assert srec.named("error") == [] and crec.named("error") == []
    assert crec.count("connect") == crec.count("disconnect") == 1


@pytest.mark.parametrize("profile", [EncryptionProfile.AUTHENTICATED, EncryptionProfile.MORMOT])
def test_per_message_encryption_inside_tls(pki: Path, profile: EncryptionProfile) -> None:
    key = "tls and aes"
    srec = Recorder()
    with running_server(ssl_context=server_ctx(pki), encryption_key=key,
                        encryption_profile=profile, require_encryption=True,
                        **server_events(srec)) as server:
        with Client(LOCAL, server.port, ssl_context=client_ctx(pki), encryption_key=key,
                    encryption_profile=profile) as client:
            for data in (b"x", os.urandom(1000), os.urandom(BIG)):
                assert client.request(data, encrypted=True, timeout=scaled(30)) == data
            # a plaintext frame is still refused under require_encryption
            client.send_data(b"plain")
            srec.wait_for(lambda ev: any(e[0] == "error" and e[-1] == ErrorCode.ENCRYPTION_REQUIRED
                                         for e in ev), what="ENCRYPTION_REQUIRED")
    assert ErrorCode.TLS_FAILED not in error_codes(srec)


def test_concurrent_requests_and_sends_on_one_tls_connection(pki: Path) -> None:
    """Worker threads write the SSL object while the reactor reads it."""
    failures: List[str] = []
    with running_server(ssl_context=server_ctx(pki), thread_pool_size=4) as server:
        with Client(LOCAL, server.port, ssl_context=client_ctx(pki)) as client:
            def work(seed: int) -> None:
                try:
                    for i in range(25):
                        data = bytes([seed]) * (1 + (seed * 7919 + i * 104729) % 70000)
                        if client.request(data, timeout=scaled(30)) != data:
                            failures.append(f"thread {seed}: wrong reply {i}")
                except Exception as exc:  # reported below
                    failures.append(f"thread {seed}: {exc!r}")

            threads = [threading.Thread(target=work, args=(n,)) for n in range(1, 5)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(scaled(60))
            assert not any(t.is_alive() for t in threads)
    assert failures == []


def _recv_exact(sock: ssl.SSLSocket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed inside a frame")
        buf += chunk
    return bytes(buf)


def test_peer_that_reads_late_gets_every_frame_in_order(pki: Path) -> None:
    """The server's sends hit SSLWantWriteError, queue, and are retried from the same
    queue head (OpenSSL's rule) until the peer reads: nothing lost, nothing reordered."""
    srec = Recorder()
    size = 100 * 1024
    with running_server(ssl_context=server_ctx(pki), max_send_buffer=2 * 1024 * 1024,
                        **server_events(srec)) as server:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        raw.settimeout(TIMEOUT)
        raw.connect((LOCAL, server.port))
        with client_ctx(pki).wrap_socket(raw, server_hostname="localhost") as peer:
            srec.wait_count("connect", 1)
            (sc,) = server.clients.values()
            accepted = 0
            for i in range(200):
                try:
                    sc.send_data(bytes([i % 251]) * size)
                except SendBufferFullError:
                    break
                accepted += 1
            assert 1 < accepted < 200  # the queue filled up: the peer was not reading
            assert sc.send_queue_size > 0
            for i in range(accepted):
                magic, length, flag = struct.unpack("<IIB", _recv_exact(peer, 9))
                assert (magic, length, flag) == (0xCAFEBABE, size, 0)
                assert _recv_exact(peer, size) == bytes([i % 251]) * size, f"frame {i}"
            wait_until(lambda: (server.total_bytes_sent, server.total_messages_sent)
                       == (accepted * (9 + size), accepted),
                       what="every accepted frame counted as sent")
            assert server.total_messages_sent == accepted
            assert sc.send_queue_size == 0
    assert ErrorCode.TLS_FAILED not in error_codes(srec)


def test_limits_apply_inside_tls(pki: Path) -> None:
    srec, crec = Recorder(), Recorder()
    with running_server(ssl_context=server_ctx(pki), max_message_size=1024,
                        **server_events(srec)) as server:
        with Client(LOCAL, server.port, ssl_context=client_ctx(pki),
                    **client_events(crec)) as client:
            assert client.request(b"a" * 1024) == b"a" * 1024
            client.send_data(b"b" * 1025)
            errors = srec.wait_for(lambda ev: any(e[0] == "error" for e in ev))
            crec.wait_count("disconnect", 1)
    (error,) = [e for e in errors if e[0] == "error"]
    assert error[-1] == ErrorCode.MESSAGE_TOO_LARGE and error[1] is not None


def test_frame_timeout_applies_inside_tls(pki: Path) -> None:
    srec = Recorder()
    with running_server(ssl_context=server_ctx(pki), connection_timeout=0.5,
                        **server_events(srec)) as server:
        raw = socket.create_connection((LOCAL, server.port), timeout=TIMEOUT)
        with client_ctx(pki).wrap_socket(raw, server_hostname="localhost") as peer:
            srec.wait_count("connect", 1)  # the handshake itself was in time
            peer.sendall(encode_frame(b"never finished")[:12])
            srec.wait_count("disconnect", 1)
            assert peer.recv(100) == b""  # closed with close_notify
    errors = srec.named("error")
    assert len(errors) == 1 and errors[0][1] is not None
    assert errors[0][-1] == ErrorCode.TIMEOUT and "frame" in errors[0][2]


# ------------------------------------------------------------- refused handshakes

def test_plain_tcp_peer_is_refused(pki: Path) -> None:
    srec = Recorder()
    handled: List[bytes] = []
    def echo(sender: Server, sc: Any, data: bytes) -> bytes:
        handled.append(data)
        return data

    with running_server(echo, ssl_context=server_ctx(pki), **server_events(srec)) as server:
        with RawPeer.to(server, timeout=TIMEOUT) as peer:
            peer.send_frame(b"no TLS here")
            leftover = peer.expect_close()
        errors = srec.wait_count("error", 1)
        assert b"\xbe\xba\xfe\xca" not in leftover  # at most a TLS alert, never a frame
        assert [(e[1], e[-1]) for e in errors] == [(None, ErrorCode.TLS_FAILED)]
        assert "TLS" in errors[0][2]
        assert_never_admitted(server, srec)
        assert handled == []
        with Client(LOCAL, server.port, ssl_context=client_ctx(pki)) as client:
            assert client.request(b"still serving") == b"still serving"
        assert handled == [b"still serving"]


def test_silent_peer_is_closed_after_connection_timeout(pki: Path) -> None:
    srec = Recorder()
    with running_server(ssl_context=server_ctx(pki), connection_timeout=0.5,
                        **server_events(srec)) as server:
        with RawPeer.to(server, timeout=TIMEOUT) as peer:
            started = time.monotonic()
            peer.expect_close()
            elapsed = time.monotonic() - started
        errors = srec.wait_count("error", 1)
        assert [(e[1], e[-1]) for e in errors] == [(None, ErrorCode.TIMEOUT)]
        assert "TLS handshake" in errors[0][2]
        assert 0.3 <= elapsed < 8  # about connection_timeout (generous bound)
        assert_never_admitted(server, srec)


def test_handshaking_peers_count_against_max_connections(pki: Path) -> None:
    srec = Recorder()
    with running_server(ssl_context=server_ctx(pki), max_connections=1,
                        **server_events(srec)) as server:
        with RawPeer.to(server, timeout=TIMEOUT):  # holds the only slot, never handshakes
            refused = Client(LOCAL, server.port, ssl_context=client_ctx(pki))
            try:
                with pytest.raises(ConnectError) as info:
                    refused.connect()
            finally:
                refused.disconnect()
            assert info.value.code in (ErrorCode.TLS_FAILED, ErrorCode.CONNECTION_FAILED)
            srec.wait_for(lambda ev: any(e[0] == "error" and e[-1] == ErrorCode.SERVER_FULL
                                         for e in ev), what="SERVER_FULL")
            assert server.total_rejected_connections == 1
            assert server.client_count == 0
        # the silent peer left: its handshake failed and freed the slot
        srec.wait_for(lambda ev: any(e[0] == "error" and e[-1] == ErrorCode.TLS_FAILED
                                     for e in ev), what="TLS_FAILED")
        with Client(LOCAL, server.port, ssl_context=client_ctx(pki)) as client:
            assert client.request(b"now there is room") == b"now there is room"
        assert server.total_connections == 1


def test_stop_aborts_pending_handshakes(pki: Path) -> None:
    srec = Recorder()
    server = Server(0, LOCAL, ssl_context=server_ctx(pki), connection_timeout=60,
                    on_handle_command=echo_handler, **server_events(srec))
    server.start()
    try:
        peer = RawPeer.to(server, timeout=TIMEOUT)
        # make sure the server has accepted it: a TLS client behind it gets through
        with Client(LOCAL, server.port, ssl_context=client_ctx(pki)) as client:
            assert client.request(b"after the silent one") == b"after the silent one"
    finally:
        server.stop()
    with peer:
        peer.expect_close()
    assert srec.count("connect") == srec.count("disconnect") == 1


# ------------------------------------------------------------------------- mutual TLS

def test_mutual_tls_accepts_ca_signed_client_and_exposes_its_certificate(pki: Path) -> None:
    srec = Recorder()
    subjects: List[Any] = []

    def on_connect(sender: Server, sc: Any) -> None:
        subjects.append(dict(x[0] for x in sc.peer_certificate["subject"]))

    with running_server(ssl_context=server_ctx(pki, client_certs=True), on_connect=on_connect,
                        on_error=srec.handler("error")) as server:
        with Client(LOCAL, server.port, ssl_context=client_ctx(pki, cert="client")) as client:
            assert client.request(b"authenticated peer") == b"authenticated peer"
            (sc,) = server.clients.values()
            cert = sc.peer_certificate
            assert cert is not None
            assert dict(x[0] for x in cert["subject"])["commonName"] == "client-1"
            assert dict(x[0] for x in cert["issuer"])["commonName"] == "morsock test CA"
    assert subjects == [{"organizationName": "morsock tests", "commonName": "client-1"}]
    assert srec.named("error") == []


@pytest.mark.parametrize("cert", ["rogue", None], ids=["self-signed", "no-certificate"])
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2],
                         ids=["TLS1.3", "TLS1.2"])
def test_mutual_tls_refuses_untrusted_or_missing_client_certificate(
        pki: Path, cert: Optional[str], version: ssl.TLSVersion) -> None:
    srec, crec = Recorder(), Recorder()
    with running_server(ssl_context=server_ctx(pki, client_certs=True),
                        **server_events(srec)) as server:
        client = Client(LOCAL, server.port, ssl_context=client_ctx(pki, cert, version),
                        **client_events(crec))
        try:
            if version is ssl.TLSVersion.TLSv1_2:
                # the server checks the certificate before it finishes: connect() fails
                with pytest.raises(ConnectError) as info:
                    client.connect()
                assert info.value.code == ErrorCode.TLS_FAILED
                crec.wait_for(lambda ev: any(e[0] == "error" for e in ev))
                assert error_codes(crec) == [ErrorCode.TLS_FAILED]
                assert crec.count("connect") == 0
            else:
                # TLS 1.3: the client's side of the handshake ends before the server
                # checks its certificate; the server's alert then ends the connection
                client.connect()
                crec.wait_count("disconnect", 1)
                assert error_codes(crec) == [ErrorCode.TLS_FAILED]
                with pytest.raises(NotConnectedError):
                    client.send_data(b"too late")
            # the messages name the server's real address, also once the socket is reset
            peer = f"{LOCAL}:{server.port}"
            messages = [e[1] for e in crec.named("error")]
            assert messages and all(peer in m and ":0 " not in m for m in messages), messages
        finally:
            client.disconnect()
        errors = srec.wait_count("error", 1)
        assert [(e[1], e[-1]) for e in errors] == [(None, ErrorCode.TLS_FAILED)]
        assert_never_admitted(server, srec)


# ------------------------------------------------------------ verifying the server

def test_client_handshake_bounded_by_connection_timeout(pki: Path) -> None:
    crec = Recorder()
    with socket.socket() as mute:  # the kernel completes TCP connects; nobody answers TLS
        mute.bind((LOCAL, 0))
        mute.listen(8)
        client = Client(LOCAL, mute.getsockname()[1], ssl_context=client_ctx(pki),
                        connection_timeout=0.5, **client_events(crec))
        try:
            started = time.monotonic()
            with pytest.raises(ConnectError) as info:
                client.connect()
            elapsed = time.monotonic() - started
        finally:
            client.disconnect()
    assert info.value.code == ErrorCode.CONNECTION_FAILED == crec.wait_count("error", 1)[0][-1]
    assert 0.3 <= elapsed < 8  # about connection_timeout (generous bound)
    assert crec.count("connect") == 0


@pytest.mark.parametrize("case", ["other-ca", "wrong-name"])
def test_client_refuses_a_server_it_cannot_verify(pki: Path, case: str) -> None:
    srec, crec = Recorder(), Recorder()
    cert = "impostor" if case == "other-ca" else "server"
    with running_server(ssl_context=server_ctx(pki, cert=cert), **server_events(srec)) as server:
        client = Client(LOCAL, server.port, ssl_context=client_ctx(pki),
                        server_hostname="other.example" if case == "wrong-name" else None,
                        **client_events(crec))
        try:
            with pytest.raises(ConnectError) as info:
                client.connect()
        finally:
            client.disconnect()
        assert info.value.code == ErrorCode.TLS_FAILED
        assert "certificate verify failed" in str(info.value)
        crec.wait_for(lambda ev: any(e[0] == "error" for e in ev))
        assert error_codes(crec) == [ErrorCode.TLS_FAILED] and crec.count("connect") == 0
        srec.wait_count("error", 1)  # the client's alert fails the server's side too
        assert error_codes(srec) == [ErrorCode.TLS_FAILED]
        assert_never_admitted(server, srec)


def test_failed_tls_attempts_are_retried_like_any_failed_attempt(pki: Path) -> None:
    crec = Recorder()
    with running_server(ssl_context=server_ctx(pki, cert="impostor")) as server:
        client = Client(LOCAL, server.port, ssl_context=client_ctx(pki), auto_reconnect=True,
                        reconnect_strategy=ReconnectStrategy.IMMEDIATE,
                        reconnect_max_attempts=2, **client_events(crec))
        try:
            with pytest.raises(ConnectError):
                client.connect()
            crec.wait_for(lambda ev: any(e[0] == "error"
                                         and e[-1] == ErrorCode.MAX_RECONNECT_ATTEMPTS
                                         for e in ev), what="MAX_RECONNECT_ATTEMPTS")
        finally:
            client.disconnect()
    errors = crec.named("error")
    assert [e[-1] for e in errors] == [ErrorCode.TLS_FAILED, 1, 2,
                                       ErrorCode.MAX_RECONNECT_ATTEMPTS]
    assert "certificate verify failed" in errors[1][1]
    assert crec.count("connect") == 0


# ----------------------------------------------------------------------- reconnect

def test_reconnects_over_tls_after_a_forced_disconnect(pki: Path) -> None:
    srec, crec = Recorder(), Recorder()
    with running_server(ssl_context=server_ctx(pki, client_certs=True),
                        **server_events(srec)) as server:
        with Client(LOCAL, server.port, ssl_context=client_ctx(pki, cert="client"),
                    auto_reconnect=True, reconnect_strategy=ReconnectStrategy.IMMEDIATE,
                    **client_events(crec)) as client:
            assert client.request(b"first") == b"first"
            assert server.disconnect_all_clients() == 1
            crec.wait_count("connect", 2)
            wait_until(lambda: client.connected, what="connected again")
            assert client.request(b"second", timeout=TIMEOUT) == b"second"
            (sc,) = server.clients.values()
            assert sc.handle == 2 and sc.peer_certificate is not None
        assert server.total_connections == 2
    assert crec.count("disconnect") == 2
    assert ErrorCode.TLS_FAILED not in error_codes(srec) + error_codes(crec)


# ----------------------------------------------------------------- settings and CLI

def test_ssl_context_must_be_an_ssl_context() -> None:
    with pytest.raises(TypeError):
        Server(0, LOCAL, ssl_context="server.pem")
    with pytest.raises(TypeError):
        Client(LOCAL, 1, ssl_context=object())


def _run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "morsock", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_cli_client_over_tls(pki: Path) -> None:
    with running_server(ssl_context=server_ctx(pki, client_certs=True)) as server:
        ok = _run_cli("client", "--port", str(server.port), "--cafile", str(pki / "ca.pem"),
                      "--certfile", str(pki / "client.pem"), "--keyfile",
                      str(pki / "client.key"), "hello", "TLS")
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.splitlines() == ["hello", "TLS"]
        untrusted = _run_cli("client", "--port", str(server.port), "--tls", "hello")
        assert untrusted.returncode == 1
        assert "certificate verify failed" in untrusted.stderr


def test_cli_server_with_required_client_certificates(pki: Path) -> None:
    bad = _run_cli("server", "--certfile", str(pki / "server.pem"), "--require-client-cert")
    assert bad.returncode == 2 and "--cafile" in bad.stderr
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "morsock", "server", "--host", LOCAL, "--port", str(port),
         "--status", "off", "--certfile", str(pki / "server.pem"), "--keyfile",
         str(pki / "server.key"), "--cafile", str(pki / "ca.pem"), "--require-client-cert"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + scaled(30)
        while True:  # wait for it to listen (no event to wait on across processes)
            try:
                socket.create_connection((LOCAL, port), timeout=scaled(1)).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "server not up"
                time.sleep(0.05)
        with Client(LOCAL, port, ssl_context=client_ctx(pki, cert="client")) as client:
            assert client.request(b"via the CLI server") == b"via the CLI server"
        refused = Client(LOCAL, port,
                         ssl_context=client_ctx(pki, max_version=ssl.TLSVersion.TLSv1_2))
        try:
            with pytest.raises(ConnectError):
                refused.connect()
        finally:
            refused.disconnect()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=scaled(30))
    assert proc.returncode == 0, err
