"""The morsock.testing kit's pytest fixtures (the plugin registered by installing morsock)."""

from __future__ import annotations

import pytest


def test_raw_peer_factory_takes_a_server(morsock_server_factory, raw_peer_factory) -> None:
    server = morsock_server_factory()
    peer = raw_peer_factory(server)
    assert peer.request(b"by server") == b"by server"


def test_raw_peer_factory_takes_a_port(morsock_server_factory, raw_peer_factory) -> None:
    server = morsock_server_factory(lambda s, c, data: data.upper())
    peer = raw_peer_factory(server.port)
    peer.send_frame(b"by port")
    assert peer.recv_frame().payload == b"BY PORT"


def test_raw_peer_factory_rejects_anything_else(raw_peer_factory) -> None:
    with pytest.raises(TypeError, match="Server or a port"):
        raw_peer_factory("127.0.0.1")
