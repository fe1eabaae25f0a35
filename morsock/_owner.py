"""What a :class:`~morsock.connection.Connection` needs of the component that owns it.

A connection knows its owner only through :class:`ConnectionOwner`; the components
implement it with :class:`morsock._component.ComponentLink`, so neither side reaches the
other's private names, and :mod:`morsock.connection` imports nothing of the components.

Threads, as the connection calls them: ``strand_for``, ``marker_wanted``, ``watch``,
``connection_closed`` on the reactor thread; ``run_item`` and ``emit_error`` on the
connection's strand (a pool thread); ``report`` and ``data_event`` on any thread (the one
that found the error, the one that moved the bytes).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    from .connection import Connection
    from .reactor import Reactor

__all__ = ["ConnectionOwner", "DataEvents", "StrandLike"]


class StrandLike(Protocol):
    """Where a connection posts its items (a :class:`morsock.workers.Strand`, or the
    client's adapter that tags items with their connection)."""

    def post(self, item: Any) -> None: ...

    def post_many(self, items: list[Any], polled: bool = False) -> None: ...

    def is_idle(self) -> bool: ...

    def retire(self) -> None: ...


class DataEvents(Protocol):
    """The component's two public data events, read on every read and send: the
    connection calls :meth:`ConnectionOwner.data_event` only while one is set."""

    on_data_received: Callable[..., Any] | None
    on_data_sent: Callable[..., Any] | None


class ConnectionOwner(Protocol):
    """The component side of every connection (see the module docstring for threads)."""

    @property
    def reactor(self) -> Reactor:
        """The reactor that runs the connection's socket."""

    #: Where the reactor thread reads into (shared by the component's connections).
    read_buffer: bytearray
    read_view: memoryview
    #: Strand items for plaintext frames are their payloads (``bytes``), not Frames.
    plain_frames_as_bytes: bool
    #: The component's data events (its public ``on_data_received`` / ``on_data_sent``).
    events: DataEvents

    @property
    def log(self) -> logging.Logger:
        """The component's logger."""

    @property
    def connection_timeout(self) -> float:
        """Seconds a graceful close may wait for the queue to drain."""

    @property
    def max_receive_backlog(self) -> int:
        """The read back-pressure limit of a new connection (docs/guide/flow_control.rst)."""

    def strand_for(self, conn: Connection) -> StrandLike:
        """The strand that runs *conn*'s items in order."""

    def marker_wanted(self, marker: Any) -> bool:
        """Whether *conn*'s strand needs the life-cycle marker (CONNECTED, DISCONNECTED)."""

    def run_item(self, conn: Connection, item: Any) -> None:
        """Strand: one item of *conn* -- a frame or a life-cycle marker."""

    def emit_error(self, conn: Connection, message: str, code: int) -> None:
        """Strand: *conn*'s ordered ``on_error`` comes up."""

    def report(self, conn: Connection | None, message: str, code: int) -> None:
        """Log an error of *conn* and fire ``on_error`` in its order. Any thread."""

    def data_event(self, name: str, conn: Connection, nbytes: int) -> None:
        """``on_data_received`` / ``on_data_sent`` (*name*) for *nbytes* on *conn*."""

    def watch(self) -> None:
        """Reactor thread: *a* connection has a frame in progress or a refused send: its
        time limits need watching."""

    def connection_closed(self, conn: Connection) -> None:
        """Reactor thread: *conn*'s socket is closed; it leaves the live set."""
