"""pytest plugin (entry point ``morsock``): fixtures over :mod:`morsock.testing`.

``morsock_server_factory(handler=echo, **settings)`` starts servers that are stopped at
the end of the test; ``raw_peer_factory(server)`` opens :class:`RawPeer` connections that
are closed at the end of the test.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Callable

import pytest

from ..server import Server
from . import RawPeer, echo_handler, running_server


@pytest.fixture
def morsock_server_factory() -> Iterator[Callable[..., Server]]:
    """Call it to get a started server (127.0.0.1, free port); stopped after the test."""
    with contextlib.ExitStack() as stack:
        def factory(handler: Any = echo_handler, **settings: Any) -> Server:
            return stack.enter_context(running_server(handler, **settings))
        yield factory


@pytest.fixture
def raw_peer_factory() -> Iterator[Callable[..., RawPeer]]:
    """Call it with a server to get a connected RawPeer; closed after the test."""
    peers = []

    def factory(server: Server, timeout: float = 5.0) -> RawPeer:
        peer = RawPeer.to(server, timeout)
        peers.append(peer)
        return peer
    yield factory
    for peer in peers:
        peer.close()
