"""The components' side of sessions (docs/guide/sessions.rst): pumps the sans-I/O core of
:mod:`morsock._session` with real connections, threads and a clock.

One object per component: :class:`ClientLink` (a ``Client(resumable=True)``) and
:class:`ServerSessions` (a ``Server(resume_window > 0)``). The components call them from
a few small hooks; everything about sessions lives here.

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
  other first frame (or none within :data:`HELLO_GRACE`) makes it a session-less
  connection, handled exactly as on a server without sessions. ``on_connect`` waits
  for that decision. A resumed session keeps its :class:`~morsock.ServerClient`: the
  new socket moves into it (:func:`_rebind`) and the new connection's object is
  discarded unseen.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from ._component import as_bytes
from ._replies import Waiter
from ._session import (
    Channel,
    LateReply,
    Message,
    Session,
    SessionEnded,
    SessionStarted,
)
from ._session_table import SessionTable
from .connection import CONNECTED, DISCONNECTED
from .enums import ErrorCode
from .errors import (
    ConnectError,
    CryptoError,
    MorsockError,
    NotConnectedError,
    ProtocolError,
    RequestTimeout,
    SendBufferFullError,
)
from .protocol import FLAG_AUTHENTICATED, FLAG_PLAIN, FLAG_SESSION, Frame, FrameDecoder

if TYPE_CHECKING:
    from .client import Client
    from .connection import Connection
    from .reactor import Timer
    from .server import Server

__all__ = ["ClientLink", "ServerSessions", "SessionFrames", "Unacknowledged",
           "HELLO_GRACE", "ACK_DELAY", "is_session_item"]

_log = logging.getLogger("morsock")

#: Seconds an acknowledgement may wait for a message to ride on (then it goes alone).
ACK_DELAY = 0.05
#: Server: seconds a new connection may stay silent before it is taken for a
#: session-less peer (its ``on_connect`` fires then at the latest).
HELLO_GRACE = 1.0
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


class _Token:
    """One TCP connection of a session; its frames carry it to the strand, so frames of
    a connection the session has left are recognised and ignored."""

    __slots__ = ("channel", "dead")

    def __init__(self, channel: Channel | None = None) -> None:
        self.channel = channel
        self.dead = False   # a write failed: nothing more goes to this connection


class SessionFrames:
    """Strand item: the frames of one read of a session connection."""

    __slots__ = ("link", "token", "frames")

    def __init__(self, link: Any, token: _Token, frames: list[Any]) -> None:
        self.link = link
        self.token = token
        self.frames = frames

    def run(self, conn: Connection) -> None:
        self.link.handle(conn, self.token, self.frames)


class _Hello(SessionFrames):
    """Strand item (server): the HELLO that opens a session connection."""

    __slots__ = ()

    def run(self, conn: Connection) -> None:
        self.link.hello(conn, self.token, self.frames[0])


_ITEMS = frozenset((SessionFrames, _Hello))


def is_session_item(item: Any) -> bool:
    """True for the strand items of this module (they run themselves: ``item.run(conn)``)."""
    return item.__class__ in _ITEMS


def _channel_for(owner: Any, conn: Connection) -> Channel:
    """The session's view of *conn*: its encryption and its binding."""
    ctx = owner._crypto
    if ctx is not None and ctx.mormot is not None:
        return Channel.mormot(ctx.mormot)
    if conn.session is not None:
        return Channel.authenticated(conn.session)
    return Channel.plain()


def _prepare(owner: Any, conn: Connection) -> None:
    """A connection that may carry a session: its decoder takes flag-3 frames."""
    conn._decoder = FrameDecoder(owner.max_message_size,
                                 plain_as_bytes=owner._PLAIN_FRAMES_AS_BYTES,
                                 session_frames=True)
    conn.max_send_buffer = 2 * owner.max_send_buffer + _QUEUE_SLACK


def _write(token: _Token, conn: Connection, frames: list[bytes]) -> None:
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


def _as_message(data: Any) -> bytes:
    return as_bytes(data)


# ----------------------------------------------------------------------------- client

class ClientLink:
    """The session of a ``Client(resumable=True)``: one for the client's life, carrying
    session after session over its connections.

    Threads: :meth:`begin`, :meth:`connection_lost` and the hooks they install run on the
    reactor thread; :meth:`handle` on the client's strand; :meth:`send`,
    :meth:`request`, :meth:`leave`, :meth:`take_unacknowledged` on any thread.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self.session = Session(client=True, max_send_buffer=client.max_send_buffer,
                               ack_delay=ACK_DELAY, ack_when_handled=True)
        self._conn: Connection | None = None   # the connection of the current HELLO
        self._token: _Token | None = None
        self._open = False                     # the WELCOME came on _conn
        self._announce = False                 # on_connect is due (a new session)
        self._announced = False                # on_connect fired; on_disconnect due
        self._waiters: dict[int, Waiter] = {}
        self._unacked: list[Unacknowledged] = []
        self._timer: Timer | None = None
        self._timer_at: float | None = None
        self._leaving = False

    # -- reactor thread ----------------------------------------------------------------
    def prepare(self, conn: Connection) -> None:
        """A new connection (before it starts reading)."""
        _prepare(self._client, conn)

    def begin(self, conn: Connection) -> bool:
        """*conn* finished its TLS/AUTHENTICATED handshakes (Client._established): send
        the HELLO and return True (the client is established once the WELCOME came), or
        False when the WELCOME already came on it."""
        if conn is self._conn and self._open:
            return False
        channel = _channel_for(self._client, conn)
        token = _Token(channel)
        with self._lock:
            self._leaving = False
            events = self.session.connection_made(channel, time.monotonic())
            self._conn, self._token, self._open = conn, token, False
            _write(token, conn, self.session.frames_to_send())
        self._events(events)
        conn.frame_hook = functools.partial(self._welcome_frames, conn, token)
        return True

    def _welcome_frames(self, conn: Connection, token: _Token, frames: list[Frame]
                        ) -> list[Any]:
        """Reactor hook until the WELCOME: the first frame must be it."""
        client = self._client
        with self._lock:
            if token is not self._token:
                return []
            try:
                events = self.session.receive(frames[0], time.monotonic())
            except (ProtocolError, CryptoError) as exc:
                conn.frame_hook = None
                client._handshake_error = ConnectError(
                    f"session refused by {conn.describe()}: {exc}",
                    exc.code or ErrorCode.INVALID_PROTOCOL)
                conn.close()
                return []
            self._open = True
            resumed = any(isinstance(e, SessionStarted) and e.resumed for e in events)
            self._announce = not resumed
            _write(token, conn, self.session.frames_to_send())
            self._arm_locked()
        conn.frame_hook = functools.partial(self._session_frames, token)
        self._events(events)
        if not resumed:
            _log.info("session %s started with %s", self.session_id_hex(), conn.describe())
        else:
            _log.info("session %s resumed with %s", self.session_id_hex(), conn.describe())
        client._established(conn)
        rest = frames[1:]
        return [SessionFrames(self, token, rest)] if rest else []

    def _session_frames(self, token: _Token, frames: list[Any]) -> list[Any]:
        return [SessionFrames(self, token, frames)]

    def announce(self) -> bool:
        """Client._established: True when on_connect is due (a new session)."""
        with self._lock:
            if not self._announce:
                return False
            self._announce = False
            self._announced = True
            return True

    def connection_lost(self, conn: Connection) -> None:
        """Client._connection_closed: the session waits for the next connection."""
        with self._lock:
            if conn is not self._conn:
                return
            token = self._token
            assert token is not None and token.channel is not None
            self._conn = self._token = None
            self._open = False
            events = self.session.connection_lost(token.channel, time.monotonic())
            self._arm_locked()
        self._events(events)

    def _arm_locked(self) -> None:
        deadline = self.session.next_deadline()
        reactor = self._client._reactor
        if deadline is None or reactor is None:
            return
        if self._timer_at is not None and self._timer_at <= deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = reactor.call_later(deadline - time.monotonic(), self._on_timer)

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = self._timer_at = None
            events = self.session.poll(time.monotonic())
            if self._open and self._conn is not None and self._token is not None:
                _write(self._token, self._conn, self.session.frames_to_send())
            self._arm_locked()
        self._events(events)

    # -- strand ------------------------------------------------------------------------
    def handle(self, conn: Connection, token: _Token, frames: list[Frame]) -> None:
        """The frames of one read of the session connection: deliver, in order."""
        events: list[Any] = []
        bad: MorsockError | None = None
        with self._lock:
            if token is not self._token or not self._open:
                return
            now = time.monotonic()
            receive = self.session.receive
            for frame in frames:
                try:
                    events += receive(frame, now)
                except (ProtocolError, CryptoError) as exc:
                    bad = exc
                    break
            if self.session.has_output:
                _write(token, conn, self.session.frames_to_send())
        for event in events:
            self._dispatch(conn, event)
        with self._lock:
            if token is self._token:
                self._arm_locked()
        if bad is not None:
            conn.close(bad.code or ErrorCode.INVALID_PROTOCOL,
                       f"session frame from {conn.describe()} rejected: {bad}")

    def _handled(self) -> None:
        """A delivered message was handled: its acknowledgement may go."""
        with self._lock:
            self.session.handled(time.monotonic())
            self._write_out()

    def _write_out(self) -> None:
        """Under the lock: write what the session queued, if it is open."""
        if (self.session.has_output and self._open and self._token is not None
                and self._conn is not None):
            _write(self._token, self._conn, self.session.frames_to_send())

    def _dispatch(self, conn: Connection, event: Any) -> None:
        client = self._client
        if event.__class__ is Message:
            if event.reply_to:
                with self._lock:
                    waiter = self._waiters.pop(event.reply_to, None)
                    self.session.handled(time.monotonic())
                    self._write_out()
                if waiter is not None:
                    waiter.reply = event.data
                    waiter.event.set()
                    return
            handler = client.on_handle_command
            if client._observer is not None:
                handler = client._observed(handler)
            if handler is None:
                if not event.reply_to:
                    self._handled()
                return
            try:
                reply = handler(client, event.data)
            except Exception as exc:
                client._handler_failed("on_handle_command", exc)
                reply = None
            if not event.reply_to:
                self._handled()
            if reply:
                try:
                    self.send(_as_message(reply), event.encrypted)
                except (MorsockError, TypeError, ValueError) as exc:
                    client._report(conn, f"reply to {conn.describe()} not sent: {exc}",
                                   getattr(exc, "code", None) or ErrorCode.HANDLER_EXCEPTION)
        elif isinstance(event, LateReply):
            self._handled()
            _log.warning("session %s: the reply to request %d came after it timed out; "
                         "dropped", self.session_id_hex(), event.request_id)
        else:
            self._events([event])

    def _events(self, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, SessionEnded):
                self._ended(event)

    def _ended(self, end: SessionEnded) -> None:
        """The session is over: hand back what it did not get acknowledged, fail its
        requests, fire SESSION_LOST and on_disconnect (for a session that fired
        on_connect)."""
        client = self._client
        with self._lock:
            lost = [Unacknowledged(m.data, m.encrypted, bool(m.request_id))
                    for m in end.unacknowledged]
            self._unacked += lost
            waiters, self._waiters = self._waiters, {}
            announced, self._announced = self._announced, False
            leaving = self._leaving
            self._changed.notify_all()
        error = MorsockError(f"the session ended before the reply came ({end.reason})",
                             ErrorCode.SESSION_LOST)
        for waiter in waiters.values():
            waiter.error = error
            waiter.event.set()
        if lost or not (end.graceful or leaving):
            client._report_ordered(
                f"session {end.session_id.hex() or '(not started)'} lost ({end.reason}): "
                f"{len(lost)} "
                f"message(s) not acknowledged by the server, handed back "
                f"(take_unacknowledged())", ErrorCode.SESSION_LOST)
        if announced:
            client._post_event("on_disconnect")

    # -- any thread --------------------------------------------------------------------
    def send(self, data: bytes, encrypted: bool) -> None:
        """Client.send_data: accept one message (queued while there is no connection)."""
        self._check_key(encrypted)
        with self._lock:
            try:
                self.session.send(data, encrypted, time.monotonic())
            except ValueError as exc:
                raise NotConnectedError(str(exc)) from None
            if self._open and self.session.has_output:
                assert self._token is not None and self._conn is not None
                _write(self._token, self._conn, self.session.frames_to_send())

    def request(self, data: bytes, timeout: float, encrypted: bool) -> bytes:
        """Client.request inside a session: matched by request id."""
        self._check_key(encrypted)
        waiter = Waiter()
        with self._lock:
            try:
                rid = self.session.request(data, encrypted, time.monotonic())
            except ValueError as exc:
                raise NotConnectedError(str(exc)) from None
            self._waiters[rid] = waiter
            if self._open and self.session.has_output:
                assert self._token is not None and self._conn is not None
                _write(self._token, self._conn, self.session.frames_to_send())
        if not waiter.event.wait(timeout):
            with self._lock:
                if self._waiters.pop(rid, None) is not None:
                    self.session.abandon(rid)
                    raise RequestTimeout(f"no reply to request {rid} within {timeout:g} s")
            waiter.event.wait()
        if waiter.error is not None:
            raise waiter.error
        assert waiter.reply is not None
        return waiter.reply

    def _check_key(self, encrypted: bool) -> None:
        ctx = self._client._crypto
        key = ctx.enabled if ctx is not None else bool(self._client.encryption_key)
        if encrypted and not key:
            raise CryptoError("encrypted=True but no encryption_key is set",
                              ErrorCode.ENCRYPTION_REQUIRED)

    def leave(self, timeout: float) -> None:
        """Client.disconnect: end the session with GOING_AWAY and wait (at most *timeout*)
        for the server's, which acknowledges what it delivered; what it did not is handed
        back (:meth:`take_unacknowledged`)."""
        with self._lock:
            self._leaving = True
            session = self.session
            if session.session_id is None and session.unacknowledged:
                # queued for a session that never started: they were never sent
                events: list[Any] = [session.end_unstarted(
                    "disconnect() before a session started")]
                self._events(events)
                return
            events = session.going_away(time.monotonic())
            if self._open and self._token is not None and self._conn is not None:
                _write(self._token, self._conn, self.session.frames_to_send())
                deadline = time.monotonic() + timeout
                while self.session.session_id is not None and not events:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._open:
                        break
                    self._changed.wait(remaining)
        self._events(events)

    def take_unacknowledged(self) -> list[Unacknowledged]:
        """The messages of ended sessions the server never acknowledged, oldest first;
        each is returned once."""
        with self._lock:
            out, self._unacked = self._unacked, []
            return out

    def session_id_hex(self) -> str:
        sid = self.session.session_id
        return sid.hex() if sid is not None else "-"

    def cancel_timer(self) -> None:
        """The client's threads stop."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._timer_at = None


# ----------------------------------------------------------------------------- server

class _Pending:
    """Server: a new connection not yet known to be a session or not."""

    __slots__ = ("timer", "auth_seen", "hello", "queued", "queued_bytes")

    def __init__(self) -> None:
        self.timer: Timer | None = None
        self.auth_seen = False
        self.hello = False          # its HELLO is on the way to the strand
        self.queued: list[tuple[bytes, bool]] = []   # sends while undecided
        self.queued_bytes = 0


class _Entry:
    """Server: one session and the ServerClient that is its face for its whole life."""

    __slots__ = ("session", "client", "writer", "token", "timer", "timer_at", "ended",
                 "disconnects", "lost_report")

    def __init__(self, session: Session, client: Connection, token: _Token) -> None:
        self.session = session
        self.client = client
        self.writer: Connection | None = client   # None while detached or moving
        self.token = token
        self.timer: Timer | None = None
        self.timer_at: float | None = None
        self.ended = False
        self.disconnects = 0   # DISCONNECTED markers posted to its strand, not yet run
        self.lost_report: str | None = None   # SESSION_LOST, fired before on_disconnect


class ServerSessions:
    """The sessions of a ``Server(resume_window > 0)``.

    Threads: :meth:`admit`, :meth:`connection_closed`, the frame hooks and timers on the
    reactor thread; :meth:`hello`, :meth:`handle`, :meth:`disconnect_marker` on the
    connection's strand; :meth:`send`, :meth:`close_session`, :meth:`going_away`,
    :meth:`shutdown` on any thread.
    """

    def __init__(self, server: Server) -> None:
        self._server = server
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._table = SessionTable(server.resume_window, server.max_send_buffer, ACK_DELAY,
                                   ack_when_handled=True)
        self._entries: dict[Connection, _Entry] = {}
        self._by_sid: dict[bytes, _Entry] = {}
        self._pending: dict[Connection, _Pending] = {}
        self._unannounced: set[Connection] = set()   # on_connect never fired
        self._expiry: Timer | None = None
        self._expiry_at: float | None = None
        self._stopped = False

    def __len__(self) -> int:
        return len(self._entries)

    def session_id(self, client: Connection) -> bytes | None:
        entry = self._entries.get(client)
        return entry.session.session_id if entry is not None and not entry.ended else None

    # -- reactor thread: new connections -------------------------------------------------
    def admit(self, conn: Connection) -> None:
        """Server._admit, before the connection starts: wait for its first frame."""
        _prepare(self._server, conn)
        pending = _Pending()
        with self._lock:
            self._pending[conn] = pending
        pending.timer = self._server._reactor.call_later(HELLO_GRACE, self._grace_over, conn)
        conn.frame_hook = functools.partial(self._first_frames, conn)

    def _first_frames(self, conn: Connection, frames: list[Any]) -> list[Any]:
        pending = self._pending.get(conn)
        if pending is None or pending.hello:
            return frames
        authenticated = self._server._sealed_flag == FLAG_AUTHENTICATED
        for index, frame in enumerate(frames):
            flag = FLAG_PLAIN if frame.__class__ is bytes else frame.flag
            if flag == FLAG_AUTHENTICATED and authenticated and not pending.auth_seen:
                pending.auth_seen = True   # the handshake: the HELLO may follow it
                continue
            if flag == FLAG_SESSION:
                if pending.timer is not None:
                    pending.timer.cancel()
                pending.hello = True
                token = _Token()
                conn.frame_hook = functools.partial(self._session_frames, token)
                out = frames[:index]
                out.append(_Hello(self, token, [frame]))
                if index + 1 < len(frames):
                    out.append(SessionFrames(self, token, frames[index + 1:]))
                return out
            self._decide_plain(conn)
            return frames[:index] + self._plain_frames(conn, frames[index:])
        return frames

    def _session_frames(self, token: _Token, frames: list[Any]) -> list[Any]:
        return [SessionFrames(self, token, frames)]

    def _plain_frames(self, conn: Connection, frames: list[Any]) -> list[Any]:
        """Hook of a session-less connection: it may not start a session later."""
        for index, frame in enumerate(frames):
            if frame.__class__ is not bytes and frame.flag == FLAG_SESSION:
                conn.close(ErrorCode.INVALID_PROTOCOL,
                           f"session frame from {conn.describe()}, which did not open "
                           "its connection with a session hello")
                return frames[:index]
        return frames

    def _grace_over(self, conn: Connection) -> None:
        pending = self._pending.get(conn)
        if pending is not None and not pending.hello and not conn.closing:
            self._decide_plain(conn)

    def _decide_plain(self, conn: Connection) -> None:
        """*conn* is a session-less peer: announce it, send what was queued for it."""
        server = self._server
        with self._lock:
            pending = self._pending.pop(conn, None)
            if pending is None:
                return
            if pending.timer is not None:
                pending.timer.cancel()
            conn.frame_hook = functools.partial(self._plain_frames, conn)
            if server._marker_wanted(CONNECTED):
                conn.post(CONNECTED)
            for data, encrypted in pending.queued:
                try:
                    server._send_raw(conn, data, encrypted)
                except MorsockError as exc:
                    server._report(conn, f"message to {conn.describe()} not sent: {exc}",
                                   exc.code or ErrorCode.SEND_BUFFER_FULL)

    def connection_closed(self, conn: Connection) -> None:
        """Server._connection_closed (reactor thread)."""
        with self._lock:
            pending = self._pending.pop(conn, None)
            if pending is not None:
                if pending.timer is not None:
                    pending.timer.cancel()
                # gone before a word or within the grace: never announced (no
                # on_connect, so no on_disconnect either)
                self._unannounced.add(conn)
                return
            entry = self._entries.get(conn)
            if entry is None:
                return
            entry.disconnects += 1
            if entry.writer is conn:
                entry.writer = None
                assert entry.token.channel is not None
                events = self._table.connection_lost(entry.session, entry.token.channel,
                                                     time.monotonic())
                for event in events:
                    if isinstance(event, SessionEnded):
                        self._end(entry, event)
                self._arm_expiry()
            self._changed.notify_all()

    # -- strand ------------------------------------------------------------------------
    def hello(self, conn: Connection, token: _Token, frame: Any) -> None:
        """The HELLO of *conn* (on its strand, after its AUTHENTICATED handshake)."""
        server = self._server
        channel = _channel_for(server, conn)
        token.channel = channel
        failure: MorsockError | None = None
        resumed = False
        with self._lock:
            pending = self._pending.pop(conn, None)
            queued = pending.queued if pending is not None else []
            if conn.closing or self._stopped:
                self._unannounced.add(conn)
                return
            try:
                if server.require_encryption and channel.flag == FLAG_PLAIN:
                    raise CryptoError("a session without an encryption key, but encryption "
                                      "is required", ErrorCode.ENCRYPTION_REQUIRED)
                session, resumed = self._table.accept(frame, channel, time.monotonic())
            except (ProtocolError, CryptoError) as exc:
                failure = exc
            if failure is None:
                if resumed:
                    entry = self._by_sid[session.session_id]   # type: ignore[index]
                    entry.token = token
                    entry.writer = None   # until _adopt moved the socket
                    self._unannounced.add(conn)
                else:
                    entry = _Entry(session, conn, token)
                    self._entries[conn] = entry
                    self._by_sid[session.session_id] = entry   # type: ignore[index]
                    self._unannounced.discard(conn)
                for data, encrypted in queued:
                    self._accept_locked(entry, data, encrypted)
                if not resumed:
                    self._flush(entry)
        if failure is not None:
            self._unannounced.add(conn)
            conn.close(failure.code or ErrorCode.INVALID_PROTOCOL,
                       f"session hello from {conn.describe()} refused: {failure}")
            return
        if resumed:
            server._reactor.call_soon(self._adopt, entry, conn, token)
            return
        _log.info("client #%d: session %s started", conn.facade.handle,
                  entry.session.session_id.hex())   # type: ignore[union-attr]
        server._emit("on_connect", conn.facade)

    def handle(self, conn: Connection, token: _Token, frames: list[Any]) -> None:
        """Frames of one read of a session connection: deliver, in order."""
        entry = self._entries.get(conn)
        if entry is None or entry.token is not token:
            return
        if len(frames) == 1 and self._handle_request(entry, conn, token, frames[0]):
            return
        events: list[Any] = []
        bad: MorsockError | None = None
        session = entry.session
        with self._lock:
            if entry.token is not token or entry.ended:
                return
            receive = session.receive
            now = time.monotonic()
            try:
                for frame in frames:
                    events += receive(Frame(frame, 0) if frame.__class__ is bytes else frame,
                                      now)
            except (ProtocolError, CryptoError) as exc:
                bad = exc
            if session.out:
                self._flush(entry)
        for event in events:
            self._dispatch(entry, conn, event)
        if session.ack_deadline is not None:
            with self._lock:
                self._arm(entry)
        if bad is not None:
            conn.close(bad.code or ErrorCode.INVALID_PROTOCOL,
                       f"session frame from {conn.describe()} rejected: {bad}")

    def _handle_request(self, entry: _Entry, conn: Connection, token: _Token,
                        frame: Any) -> bool:
        """:meth:`handle` of the commonest read: one plaintext request
        (:meth:`Session.take_request`), answered through :meth:`_answer`. False when
        *frame* is anything else (nothing changed); True when it was handled, dropped or
        refused."""
        if frame.__class__ is bytes or frame.flag != FLAG_SESSION:
            return False
        session = entry.session
        with self._lock:
            if entry.token is not token or entry.ended:
                return True
            try:
                taken = session.take_request(frame.payload, time.monotonic())
            except (ProtocolError, CryptoError) as exc:
                bad: MorsockError | None = exc
            else:
                if taken is None:
                    return False
                bad = None
                if session.out:   # an ACK that could not wait
                    self._flush(entry)
        if bad is not None:
            conn.close(bad.code or ErrorCode.INVALID_PROTOCOL,
                       f"session frame from {conn.describe()} rejected: {bad}")
            return True
        self._answer(entry, conn, taken[1], False, taken[0])  # type: ignore[index]
        if session.ack_deadline is not None:
            with self._lock:
                self._arm(entry)
        return True

    def _dispatch(self, entry: _Entry, conn: Connection, event: Any) -> None:
        if event.__class__ is Message:
            self._answer(entry, conn, event.data, event.encrypted, event.request_id)
        elif isinstance(event, SessionEnded):
            with self._lock:
                self._end(entry, event)

    def _answer(self, entry: _Entry, conn: Connection, data: bytes, encrypted: bool,
                request_id: int) -> None:
        """Strand: a delivered message through the server's handler; acknowledged once the
        handler returned, its reply (to *request_id*, if not 0) sent in the session."""
        server = self._server
        handler = server.on_handle_command   # timed by _call_handler for the metrics
        session = entry.session
        reply: Any = None
        if handler is not None and encrypted:
            entry.client.facade.message_encrypted = True
            try:
                reply = server._call_handler(handler, entry.client, data)
            finally:
                entry.client.facade.message_encrypted = False
        elif handler is not None:
            reply = server._call_handler(handler, entry.client, data)
        if reply and reply.__class__ is not bytes:
            try:
                reply = _as_message(reply)
            except TypeError as exc:
                server._report(entry.client, f"reply to {conn.describe()} not sent: {exc}",
                               ErrorCode.HANDLER_EXCEPTION)
                reply = None
        with self._lock:
            writer = entry.writer
            if (reply and request_id and not encrypted and writer is not None
                    and not entry.ended):
                frame = session.reply_frame(request_id, reply)
                if frame is not None:
                    _write(entry.token, writer, [frame])
                    return
            # acknowledged only now that its handler returned (the reply carries it)
            session.handled(time.monotonic())
            if reply and not entry.ended:
                self._reply_locked(entry, conn, reply, encrypted, request_id)
            self._flush(entry)

    def _reply_locked(self, entry: _Entry, conn: Connection, data: bytes, encrypted: bool,
                      request_id: int) -> None:
        """Under the lock: the handler's reply into the session (queued for _flush); a
        refused one is reported."""
        try:
            if request_id:
                entry.session.reply(request_id, data, encrypted, time.monotonic())
            else:
                entry.session.send(data, encrypted, time.monotonic())
        except (MorsockError, ValueError) as exc:
            self._server._report(entry.client, f"reply to {conn.describe()} not sent: {exc}",
                                 getattr(exc, "code", None) or ErrorCode.SEND_BUFFER_FULL)

    def disconnect_marker(self, conn: Connection) -> bool:
        """Server._run_item, DISCONNECTED of *conn*: True when on_disconnect fires now (and
        the strand retires); False when the connection's session lives on."""
        with self._lock:
            if conn in self._unannounced:
                self._unannounced.discard(conn)
                conn.retire_strand()
                return False
            entry = self._entries.get(conn)
            if entry is None:
                return True
            entry.disconnects -= 1
            if not (entry.ended and entry.disconnects <= 0):
                return False
            del self._entries[conn]
            report, entry.lost_report = entry.lost_report, None
        if report is not None:
            self._server._emit("on_error", conn.facade, report, ErrorCode.SESSION_LOST)
        return True

    # -- any thread --------------------------------------------------------------------
    def send(self, conn: Connection, data: Any, encrypted: bool) -> bool:
        """Server._send_on: False when *conn* is not a session's (nor undecided)."""
        if conn not in self._pending and conn not in self._entries:
            return False
        payload = as_bytes(data)
        if encrypted:
            ctx = self._server._crypto
            if ctx is None or not ctx.enabled:
                raise CryptoError("encrypted=True but no encryption_key is set",
                                  ErrorCode.ENCRYPTION_REQUIRED)
        with self._lock:
            entry = self._entries.get(conn)
            if entry is None:
                pending = self._pending.get(conn)
                if pending is None:
                    return False
                limit = self._server.max_send_buffer
                if pending.queued and pending.queued_bytes + len(payload) > limit:
                    raise SendBufferFullError(
                        f"{pending.queued_bytes} bytes wait for {conn.describe()} to "
                        f"start; max_send_buffer={limit}")
                pending.queued.append((payload, encrypted))
                pending.queued_bytes += len(payload)
                return True
            if entry.ended:
                raise NotConnectedError(f"the session of {conn.describe()} is over")
            self._accept_locked(entry, payload, encrypted, raise_errors=True)
            self._flush(entry)
        return True

    def _accept_locked(self, entry: _Entry, data: bytes, encrypted: bool,
                       raise_errors: bool = False) -> None:
        try:
            entry.session.send(data, encrypted, time.monotonic())
        except ValueError as exc:
            if raise_errors:
                raise NotConnectedError(str(exc)) from None
        except MorsockError as exc:
            if raise_errors:
                raise
            self._server._report(entry.client, f"message to {entry.client.describe()} "
                                 f"not sent: {exc}", exc.code or ErrorCode.SEND_BUFFER_FULL)

    def _flush(self, entry: _Entry) -> None:
        """Under the lock: write what the session queued to its connection (kept in the
        session while it has none: a resume is moving it)."""
        writer = entry.writer
        session = entry.session
        if writer is not None and session.out:
            out = session.out
            session.out = []
            _write(entry.token, writer, out)

    def close_session(self, conn: Connection) -> bool:
        """ServerClient.disconnect of a session: GOING_AWAY, then the session ends (the
        client hands back what it did not see acknowledged). False: not a session."""
        with self._lock:
            entry = self._entries.get(conn)
            if entry is None or entry.ended:
                return False
            events = entry.session.going_away(time.monotonic())
            self._flush(entry)
            for event in events:
                if isinstance(event, SessionEnded):
                    self._end(entry, event)
            if not entry.ended:
                self._end(entry, entry.session.lose("disconnected by the server"))
        return True

    def going_away(self, timeout: float) -> None:
        """Server.stop: tell every connected session to move on; wait (at most *timeout*)
        for their answers, which acknowledge what they delivered."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._stopped = True
            for entry in list(self._entries.values()):
                if entry.ended:
                    continue
                events = entry.session.going_away(time.monotonic())
                self._flush(entry)
                for event in events:
                    if isinstance(event, SessionEnded):
                        self._end(entry, event)
            while any(not e.ended and e.writer is not None for e in self._entries.values()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)

    def shutdown(self) -> None:
        """Server.stop, after every connection was closed: end the sessions left."""
        with self._lock:
            self._stopped = True
            if self._expiry is not None:
                self._expiry.cancel()
                self._expiry = self._expiry_at = None
            for entry in list(self._entries.values()):
                if entry.timer is not None:
                    entry.timer.cancel()
                if not entry.ended:
                    self._end(entry, entry.session.lose("the server stopped"))
            for pending in self._pending.values():
                if pending.timer is not None:
                    pending.timer.cancel()
        posted = threading.Event()   # the on_disconnect markers are posted (FIFO) ...
        self._server._reactor.call_soon(posted.set)
        posted.wait(10)              # ... before the pool is shut down

    # -- the end of a session ----------------------------------------------------------
    def _end(self, entry: _Entry, end: SessionEnded) -> None:
        """Under the lock: the session of *entry* is over; its on_disconnect follows
        (through its strand, once its connection is closed)."""
        if entry.ended:
            return
        entry.ended = True
        self._by_sid.pop(end.session_id, None)
        self._table.remove(entry.session)
        client = entry.client
        count = len(end.unacknowledged)
        handle = client.facade.handle if client.facade is not None else 0
        _log.info("client #%d: session %s ended (%s)", handle, end.session_id.hex(),
                  end.reason)
        if count:
            message = (f"session of client #{handle} ended ({end.reason}): {count} "
                       "message(s) to it were not acknowledged")
            if client.closed:   # reported in its order still: before its on_disconnect
                server = self._server
                if server._observer is not None:
                    server._observer.error(ErrorCode.SESSION_LOST)
                server._log.error("%s (code %d)", message, ErrorCode.SESSION_LOST)
                entry.lost_report = message
            else:
                self._server._report(client, message, ErrorCode.SESSION_LOST)
        if client.closed:
            # decided on the reactor thread, where a close runs whole (closed, counted,
            # its DISCONNECTED posted): exactly one DISCONNECTED fires on_disconnect
            self._server._reactor.call_soon(self._last_disconnect, entry)
        elif not client.closing:
            client.close()
        self._changed.notify_all()

    def _last_disconnect(self, entry: _Entry) -> None:
        """Reactor thread: the ended session's connection is closed; unless one of its
        DISCONNECTED markers is still to run (it fires on_disconnect), post one."""
        with self._lock:
            if entry.disconnects <= 0 and entry.client in self._entries:
                entry.disconnects += 1
                entry.client.post(DISCONNECTED)

    # -- timers (reactor thread, armed from any) -------------------------------------------
    def _arm(self, entry: _Entry) -> None:
        deadline = entry.session.next_deadline()
        if deadline is None or self._stopped:
            return
        if entry.timer_at is not None and entry.timer_at <= deadline:
            return
        if entry.timer is not None:
            entry.timer.cancel()
        entry.timer_at = deadline
        entry.timer = self._server._reactor.call_later(deadline - time.monotonic(),
                                                       self._on_timer, entry)

    def _on_timer(self, entry: _Entry) -> None:
        with self._lock:
            entry.timer = entry.timer_at = None
            if entry.ended:
                return
            entry.session.poll(time.monotonic())
            self._flush(entry)
            self._arm(entry)

    def _arm_expiry(self) -> None:
        at = self._table.next_expiry()
        if at is None or self._stopped:
            return
        if self._expiry_at is not None and self._expiry_at <= at:
            return
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry_at = at
        self._expiry = self._server._reactor.call_later(at - time.monotonic(), self._expire)

    def _expire(self) -> None:
        with self._lock:
            self._expiry = self._expiry_at = None
            for _session, end in self._table.expire(time.monotonic()):
                entry = self._by_sid.get(end.session_id)
                if entry is not None:
                    self._end(entry, end)
            self._arm_expiry()

    # -- resume: the new socket moves into the session's ServerClient ------------------
    def _adopt(self, entry: _Entry, carrier: Connection, token: _Token) -> None:
        """Reactor thread: the session of *entry* resumed on *carrier*'s connection."""
        server = self._server
        target = entry.client
        with self._lock:
            if entry.token is not token or entry.ended or self._stopped:
                carrier.close()
                return
            if carrier.closing:   # gone before it could move
                assert token.channel is not None
                for event in self._table.connection_lost(entry.session, token.channel,
                                                         time.monotonic()):
                    if isinstance(event, SessionEnded):
                        self._end(entry, event)
                self._arm_expiry()
                return
        if not target.closed:   # the old connection (a silent drop): close it now
            target._broken = True
            if not target.close():
                target._finish_close()
        server._reactor.unregister(carrier._sock)
        with server.property_lock:
            server._clients.pop(carrier.facade.handle, None)
            target.adopt(carrier)
            server._clients[target.facade.handle] = target.facade
        carrier.retire_strand()
        with self._lock:
            self._unannounced.discard(carrier)
            target.frame_hook = functools.partial(self._session_frames, token)
            entry.writer = target
            self._flush(entry)
            self._arm(entry)
        _log.info("client #%d: session %s resumed from %s", target.facade.handle,
                  entry.session.session_id.hex(), target.describe())  # type: ignore[union-attr]
        target.start(announce=False)
        if target._out:
            target._reactor.call_soon(target._arm_write)
