"""The session of a ``Client(resumable=True)`` (docs/guide/sessions.rst):
:class:`ClientLink` pumps the client's :class:`~morsock._session.Session` with its
connections, threads and a clock, under the rules of :mod:`morsock._session_link`.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from ._component import as_bytes
from ._replies import Waiter
from ._session import LateReply, Message, Session, SessionEnded, SessionStarted
from ._session_link import (
    ACK_DELAY,
    EarliestCall,
    SessionFrames,
    Token,
    Unacknowledged,
    channel_for,
    prepare_connection,
    write_frames,
)
from .enums import ErrorCode
from .errors import (
    ConnectError,
    CryptoError,
    MorsockError,
    NotConnectedError,
    ProtocolError,
    RequestTimeout,
)

if TYPE_CHECKING:
    from .client import Client
    from .connection import Connection
    from .protocol import Frame

__all__ = ["ClientLink"]

_log = logging.getLogger("morsock")


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
        self._token: Token | None = None
        self._open = False                     # the WELCOME came on _conn
        self._announce = False                 # on_connect is due (a new session)
        self._announced = False                # on_connect fired; on_disconnect due
        self._waiters: dict[int, Waiter] = {}
        self._unacked: list[Unacknowledged] = []
        self._timer = EarliestCall()   # the session's next deadline (a delayed ack)
        self._leaving = False

    # -- reactor thread ----------------------------------------------------------------
    def prepare(self, conn: Connection) -> None:
        """A new connection (before it starts reading)."""
        prepare_connection(self._client, conn)

    def begin(self, conn: Connection) -> bool:
        """*conn* finished its TLS/AUTHENTICATED handshakes (Client._established): send
        the HELLO and return True (the client is established once the WELCOME came), or
        False when the WELCOME already came on it."""
        if conn is self._conn and self._open:
            return False
        channel = channel_for(self._client, conn)
        token = Token(channel)
        with self._lock:
            self._leaving = False
            events = self.session.connection_made(channel, time.monotonic())
            self._conn, self._token, self._open = conn, token, False
            write_frames(token, conn, self.session.frames_to_send())
        self._events(events)
        conn.frame_hook = functools.partial(self._welcome_frames, conn, token)
        return True

    def _welcome_frames(self, conn: Connection, token: Token, frames: list[Frame]
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
            write_frames(token, conn, self.session.frames_to_send())
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

    def _session_frames(self, token: Token, frames: list[Any]) -> list[Any]:
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
        if deadline is not None and reactor is not None:
            self._timer.arm(reactor, deadline, self._on_timer)

    def _on_timer(self) -> None:
        with self._lock:
            self._timer.fired()
            events = self.session.poll(time.monotonic())
            if self._open and self._conn is not None and self._token is not None:
                write_frames(self._token, self._conn, self.session.frames_to_send())
            self._arm_locked()
        self._events(events)

    # -- strand ------------------------------------------------------------------------
    def handle(self, conn: Connection, token: Token, frames: list[Frame]) -> None:
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
                write_frames(token, conn, self.session.frames_to_send())
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
            write_frames(self._token, self._conn, self.session.frames_to_send())

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
                    self.send(as_bytes(reply), event.encrypted)
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
                write_frames(self._token, self._conn, self.session.frames_to_send())

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
                write_frames(self._token, self._conn, self.session.frames_to_send())
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
                write_frames(self._token, self._conn, self.session.frames_to_send())
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
            self._timer.cancel()
