"""The components' side of sessions (docs/guide/sessions.rst): pumps the sans-I/O core of
:mod:`morsock._session` with real connections, threads and a clock.

One object per component: :class:`~morsock._session_client.ClientLink` (a
``Client(resumable=True)``, in :mod:`morsock._session_client`) and
:class:`~morsock._session_server.ServerSessions` (a ``Server(resume_window > 0)``, in
:mod:`morsock._session_server`, with its new connections in
:mod:`morsock._session_doorway` and its timers in :mod:`morsock._session_timers`). The
components call them from a few small hooks; everything about sessions lives in those
modules. This one holds what both sides use: the
strand items, :class:`Token`, :func:`write_frames`, :func:`prepare_connection`,
:func:`channel_for`, :class:`Unacknowledged`.

Rules

* One lock per link (re-entrant) covers every call into the core AND the writing of
  the frames it queued, so frames leave in the order they were made (AUTHENTICATED
  frames carry sequence numbers).
* Frames of a session connection reach the application through the connection's strand
  as one :class:`SessionFrames` item per read; the core sees them there, so a message
  counts as delivered (and is acknowledged) only once its handler is about to run. A
  connection's frames left unhandled when it closes are dropped by the connection as
  always: not delivered, so the peer resends them on the next connection.
* A frame a connection cannot take (its queue is full, it failed) ends that connection
  for the session: nothing more is written to it (a hole in the stream would shift
  every later sequence number); the session resumes on the next one.
* Server: a connection whose first frame is a session HELLO becomes a session; any
  other first frame (or none within
  :data:`~morsock._session_doorway.HELLO_GRACE`) makes it a session-less
  connection, handled exactly as on a server without sessions. ``on_connect`` waits
  for that decision. A resumed session keeps its :class:`~morsock.ServerClient`: the
  new socket moves into it (``Doorway.adopt``) and the new connection's object is
  discarded unseen.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from ._session_wire import Channel
from .enums import ErrorCode
from .errors import NotConnectedError, SendBufferFullError
from .protocol import FrameDecoder

if TYPE_CHECKING:
    from .connection import Connection
    from .reactor import Reactor, Timer

__all__ = ["SessionFrames", "SessionHello", "Token", "Unacknowledged", "EarliestCall", "ACK_DELAY",
           "is_session_item", "channel_for", "prepare_connection", "write_frames"]

#: Seconds an acknowledgement may wait for a message to ride on (then it goes alone).
ACK_DELAY = 0.05
#: Bytes a session connection's send queue may hold beyond ``max_send_buffer`` (the
#: resend buffer bounds the messages; acknowledgements and headers come on top).
_QUEUE_SLACK = 64 * 1024


class Unacknowledged(NamedTuple):
    """A message of a session that ended before the peer acknowledged it (handed back by
    :meth:`morsock.Client.take_unacknowledged`). ``request``: it was a ``request()``,
    whose caller got an error."""

    data: bytes
    encrypted: bool
    request: bool


class Token:
    """One TCP connection of a session; its frames carry it to the strand, so frames of
    a connection the session has left are recognised and ignored."""

    __slots__ = ("channel", "dead")

    def __init__(self, channel: Channel | None = None) -> None:
        self.channel = channel
        self.dead = False   # a write failed: nothing more goes to this connection


class SessionFrames:
    """Strand item: the frames of one read of a session connection."""

    __slots__ = ("link", "token", "frames")

    def __init__(self, link: Any, token: Token, frames: list[Any]) -> None:
        self.link = link
        self.token = token
        self.frames = frames

    def run(self, conn: Connection) -> None:
        self.link.handle(conn, self.token, self.frames)


class SessionHello(SessionFrames):
    """Strand item (server): the HELLO that opens a session connection."""

    __slots__ = ()

    def run(self, conn: Connection) -> None:
        self.link.hello(conn, self.token, self.frames[0])


_ITEMS = frozenset((SessionFrames, SessionHello))


def is_session_item(item: Any) -> bool:
    """True for the strand items of this module (they run themselves: ``item.run(conn)``)."""
    return item.__class__ in _ITEMS


def channel_for(owner: Any, conn: Connection) -> Channel:
    """The session's view of *conn*: its encryption and its binding."""
    ctx = owner._crypto
    if ctx is not None and ctx.mormot is not None:
        return Channel.mormot(ctx.mormot)
    if conn.session is not None:
        return Channel.authenticated(conn.session)
    return Channel.plain()


def prepare_connection(owner: Any, conn: Connection) -> None:
    """A connection that may carry a session: its decoder takes flag-3 frames."""
    conn._decoder = FrameDecoder(owner.max_message_size,
                                 plain_as_bytes=owner._PLAIN_FRAMES_AS_BYTES,
                                 session_frames=True)
    conn.max_send_buffer = 2 * owner.max_send_buffer + _QUEUE_SLACK


def write_frames(token: Token, conn: Connection, frames: list[bytes]) -> None:
    """Under the link's lock: write *frames* to *conn* in order. A frame it does not take
    ends the connection for the session (its close is scheduled; the rest is dropped:
    the session resends from the peer's resume point on the next connection)."""
    if token.dead:
        return
    for frame in frames:
        try:
            conn.send_frame(frame)
        except NotConnectedError:
            token.dead = True
            return
        except SendBufferFullError as exc:
            token.dead = True
            conn._reactor.call_soon(
                conn.close, ErrorCode.SEND_BUFFER_FULL,
                f"{exc}: the peer does not read; the session resumes on a new connection")
            return


class EarliestCall:
    """One pending reactor call, kept at the earliest deadline asked for (a session's
    next ack or expiry; deadlines on the ``time.monotonic`` clock). Not thread-safe: the
    caller holds its session lock around every method."""

    __slots__ = ("_timer", "_at")

    def __init__(self) -> None:
        self._timer: Timer | None = None
        self._at: float | None = None

    def arm(self, reactor: Reactor, at: float, fn: Callable[..., Any], *args: Any) -> None:
        """Have ``fn(*args)`` run at *at*, unless a call already pending runs no later."""
        if self._at is not None and self._at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._at = at
        self._timer = reactor.call_later(at - time.monotonic(), fn, *args)

    def fired(self) -> None:
        """The pending call is running: the next :meth:`arm` schedules anew."""
        self._timer = self._at = None

    def cancel(self) -> None:
        """Drop the pending call, if any."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._at = None
