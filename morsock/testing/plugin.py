"""pytest plugin (entry point ``morsock``): fixtures over :mod:`morsock.testing`.

``morsock_server_factory(handler=echo, **settings)`` starts servers that are stopped at
the end of the test; ``raw_peer_factory(server_or_port)`` opens :class:`RawPeer`
connections (to a :class:`~morsock.Server`, or to a port on 127.0.0.1) that are closed at
the end of the test.
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
    """Call it with a server or a port (on 127.0.0.1) to get a connected RawPeer.

    The peer is closed after the test. Anything else than a Server or an int raises
    TypeError.
    """
    peers = []

    def factory(server: Server | int, timeout: float = 5.0) -> RawPeer:
        if isinstance(server, Server):
            peer = RawPeer.to(server, timeout)
        elif isinstance(server, int) and not isinstance(server, bool):
            peer = RawPeer("127.0.0.1", server, timeout)
        else:
            raise TypeError("raw_peer_factory takes a morsock Server or a port number (int), "
                            f"not {type(server).__name__}")
        peers.append(peer)
        return peer
    yield factory
    for peer in peers:
        peer.close()
