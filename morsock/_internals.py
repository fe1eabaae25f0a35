"""Private APIs of the standard library that morsock's hot paths use, each behind a check
that falls back to the public API when it is not there (another Python, another
platform). Nothing else in morsock reaches into them.

* ``socket.socket._accept`` -- :func:`accepter`: ``socket.accept()`` without its wrapper,
  which asks the listener for its family and type (two enum conversions) and its
  timeout for every connection.
* ``logging.Logger._cache`` -- :func:`level_cache`: the answers of ``isEnabledFor``,
  kept by the logging module until a level changes, read with one ``dict.get`` per
  message batch instead of a call.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from typing import Any, Callable

__all__ = ["accepter", "level_cache"]


def accepter(listener: socket.socket) -> Callable[[], tuple[socket.socket, Any]]:
    """A function that accepts one connection from the non-blocking *listener*: ``(sock,
    address)``, raising what ``listener.accept()`` raises."""
    accept = getattr(listener, "_accept", None)
    if accept is None:
        return listener.accept
    family = listener.family

    def accept_one() -> tuple[socket.socket, Any]:
        fd, address = accept()
        return socket.socket(family, socket.SOCK_STREAM, 0, fd), address
    return accept_one


def level_cache(logger: logging.Logger) -> Mapping[int, bool]:
    """``isEnabledFor(level)``'s cached answers for *logger*: ``.get(level)`` is True,
    False, or None (not known: ask the logger). Empty where the cache is not there."""
    cache = getattr(logger, "_cache", None)
    return cache if isinstance(cache, dict) else {}
