"""morsock against the live Delphi original, both ways: a morsock Client and the Delphi
``mm_echo_server``, the Delphi ``mm_client`` and a morsock Server; plaintext and the
MORMOT profile in every mode and key size, sizes from 0 B to 1 MiB, replies checked byte
for byte, and reconnection after a server-side disconnect. Skipped, saying why, where the
programs are not present (``MORSOCK_DELPHI_BIN``)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

from morsock import Client
from morsock.testing import running_server

from delphi import LOCAL, DelphiPeer, delphi_bin, key_args
from helpers import Recorder, free_port, scaled

__all__ = ["delphi_bin"]

KEY = "clé-🔑 delphi"
MODES = ["ECB", "CBC", "CFB", "OFB", "CTR", "GCM", "CFC", "OFC", "CTC"]
#: Every mode once, the key sizes spread over them (each size three times).
MODE_BITS = [(mode, (128, 192, 256)[i % 3]) for i, mode in enumerate(MODES)]
SIZES = [0, 1, 1024, 65536, 1 << 20]


def payload(size: int, seed: int = 0) -> bytes:
    """*size* printable ASCII bytes (the Delphi handler treats data as text)."""
    return bytes(33 + (i * 7 + seed) % 94 for i in range(size))


def echo_server(directory: Path, args: List[str]) -> DelphiPeer:
    port = free_port()
    peer = DelphiPeer(directory, "mm_echo_server", ["--port", str(port), *args])
    peer.port = port  # type: ignore[attr-defined]
    peer.expect(r"^READY")
    return peer


@pytest.fixture
def server_factory(delphi_bin: Path) -> Iterator[object]:
    started: List[DelphiPeer] = []

    def start(args: List[str]) -> DelphiPeer:
        started.append(echo_server(delphi_bin, args))
        return started[-1]
    yield start
    for peer in started:
        peer.close()


def _client(port: int, mode: Optional[str] = None, bits: int = 256, **kw: object) -> Client:
    if mode is None:
        return Client(LOCAL, port, connection_timeout=5, **kw)  # type: ignore[arg-type]
    return Client(LOCAL, port, encryption_key=KEY, encryption_profile="MORMOT",
                  encryption_mode=mode, encryption_key_size=bits, connection_timeout=5,
                  **kw)  # type: ignore[arg-type]


# --- morsock Client -> Delphi mm_echo_server ---------------------------------------

@pytest.mark.parametrize("size", SIZES)
def test_plaintext_request_to_delphi_server(server_factory, size: int) -> None:  # type: ignore[no-untyped-def]
    server = server_factory([])
    data = payload(size, size)
    with _client(server.port) as client:
        assert client.request(data, timeout=scaled(20)) == b"Echo: " + data


@pytest.mark.parametrize("mode,bits", MODE_BITS, ids=[f"{m}-{b}" for m, b in MODE_BITS])
def test_every_mode_to_delphi_server(server_factory, mode: str, bits: int) -> None:  # type: ignore[no-untyped-def]
    """The component's reply (plaintext) and an encrypted reply, both understood."""
    server = server_factory(key_args(KEY, mode, bits))
    data = payload(1024, bits)
    with _client(server.port, mode, bits) as client:
        assert client.request(data, encrypted=True, timeout=scaled(20)) == b"Echo: " + data
        server.command("reply encrypted")
        server.expect(r"^OK")
        assert (client.request(data[::-1], encrypted=True, timeout=scaled(20))
                == b"Echo: " + data[::-1])


@pytest.mark.parametrize("size", SIZES)
def test_encrypted_sizes_to_delphi_server(server_factory, size: int) -> None:  # type: ignore[no-untyped-def]
    server = server_factory(key_args(KEY, "GCM", 256) + ["--reply", "encrypted"])
    data = payload(size, 3)
    with _client(server.port, "GCM", 256) as client:
        assert client.request(data, encrypted=True, timeout=scaled(30)) == b"Echo: " + data


def _wait_listed(server: DelphiPeer, timeout: float = 20.0) -> None:
    """Wait until the Delphi server's ``clients`` command lists a client; fails after
    *timeout* seconds."""
    server.expect(r"^EV connect h=\d+", timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        server.command("clients")
        if server.expect(r"^CLIENTS").string.split()[1:]:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"the Delphi server listed no client within {timeout} s")


def test_client_reconnects_after_delphi_server_kicks_it(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory(key_args(KEY, "CBC", 256) + ["--reply", "encrypted"])
    rec = Recorder()
    with _client(server.port, "CBC", 256, auto_reconnect=True,
                 reconnect_strategy="immediate", on_connect=rec.handler("connect"),
                 on_disconnect=rec.handler("disconnect")) as client:
        assert client.request(b"before", encrypted=True, timeout=scaled(10)) == b"Echo: before"
        # kick only once the original lists the client, so kickall has someone to kick
        _wait_listed(server)
        server.command("kickall")
        server.expect(r"^OK kickall")
        server.expect(r"^EV disconnect h=\d+")

        def story() -> str:
            return (f"client state {client.state}, events {rec.events}; the Delphi server "
                    f"printed: {''.join(server.out)[-2000:]}")
        try:
            rec.wait_count("disconnect", 1, timeout=scaled(20))
            rec.wait_count("connect", 2, timeout=scaled(20))
        except AssertionError as exc:
            pytest.fail(f"{exc}; {story()}")
        assert client.request(b"after", encrypted=True, timeout=scaled(10)) == b"Echo: after", \
            story()


# --- Delphi mm_client -> morsock Server --------------------------------------------

def _echo(server: object, client: object, data: bytes) -> bytes:
    return b"Echo: " + data


def _expect_recv(peer: DelphiPeer, n: int, reply: bytes) -> None:
    m = peer.expect(rf"^RECV n={n} len=(\d+) sha256=([0-9a-fA-F]+)")
    assert int(m.group(1)) == len(reply)
    assert m.group(2).lower() == hashlib.sha256(reply).hexdigest()


def _send_hex(data: bytes) -> str:
    return data.hex() if data else "-"


MODES_FROM_DELPHI = [(None, 256)] + MODE_BITS


@pytest.mark.parametrize("mode,bits", MODES_FROM_DELPHI,
                         ids=["plain"] + [f"{m}-{b}" for m, b in MODE_BITS])
def test_delphi_client_to_morsock_server(delphi_bin: Path, mode: Optional[str],
                                         bits: int) -> None:
    settings = {} if mode is None else {
        "encryption_key": KEY, "encryption_profile": "MORMOT", "encryption_mode": mode,
        "encryption_key_size": bits}
    enc = 0 if mode is None else 1
    args = [] if mode is None else key_args(KEY, mode, bits)
    with running_server(_echo, **settings) as server:  # type: ignore[arg-type]
        peer = DelphiPeer(delphi_bin, "mm_client",
                          ["--host", LOCAL, "--port", str(server.port), *args])
        try:
            peer.command("quiet 0")
            peer.command("connect 5000")
            for n, size in enumerate((1, 1024, 65536) if mode else SIZES[1:], 1):
                data = payload(size, n)
                peer.command(f"send {enc} {_send_hex(data)}")
                _expect_recv(peer, n, b"Echo: " + data)
        finally:
            peer.close()


def test_delphi_client_reconnects_after_morsock_server_disconnects_it(
        delphi_bin: Path) -> None:
    rec = Recorder()
    with running_server(_echo, encryption_key=KEY, encryption_profile="MORMOT",
                        on_connect=rec.handler("connect")) as server:
        peer = DelphiPeer(delphi_bin, "mm_client",
                          ["--host", LOCAL, "--port", str(server.port),
                           *key_args(KEY, "CBC", 256), "--auto", "1",
                           "--strategy", "immediate"])
        try:
            peer.command("connect 5000")
            peer.command(f"send 1 {b'before'.hex()}")
            _expect_recv(peer, 1, b"Echo: before")
            assert server.disconnect_all_clients() == 1
            peer.expect(r"^EV disconnect")
            rec.wait_count("connect", 2, timeout=scaled(20))
            peer.command("waitstate connected 10000")
            peer.expect(r"^OK waitstate Connected")
            peer.command(f"send 1 {b'after'.hex()}")
            _expect_recv(peer, 2, b"Echo: after")
        finally:
            peer.close()
