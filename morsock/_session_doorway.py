"""The new connections of a ``Server(resume_window > 0)`` (the rules of
:mod:`morsock._session_link`): :class:`Doorway` holds each until its first frame says
whether it is a session (a new one, or a resume whose socket then moves into the
session's ServerClient) or a session-less peer, and sees each close. Reactor thread,
under the :class:`~morsock._session_server.ServerSessions` lock where it says so.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import TYPE_CHECKING, Any

from ._session import SessionEnded
from ._session_link import SessionFrames, SessionHello, Token, prepare_connection
from .connection import CONNECTED
from .enums import ErrorCode
from .errors import MorsockError, SendBufferFullError
from .protocol import FLAG_AUTHENTICATED, FLAG_PLAIN, FLAG_SESSION

if TYPE_CHECKING:
    from ._session_server import Entry, ServerSessions
    from .connection import Connection
    from .reactor import Timer

__all__ = ["Doorway", "Pending", "HELLO_GRACE"]

_log = logging.getLogger("morsock")

#: Seconds a new connection may stay silent before it is taken for a session-less peer
#: (its ``on_connect`` fires then at the latest).
HELLO_GRACE = 1.0


class Pending:
    """Server: a new connection not yet known to be a session or not."""

    __slots__ = ("timer", "auth_seen", "hello", "queued", "queued_bytes")

    def __init__(self) -> None:
        self.timer: Timer | None = None
        self.auth_seen = False
        self.hello = False          # its HELLO is on the way to the strand
        self.queued: list[tuple[bytes, bool]] = []   # sends while undecided
        self.queued_bytes = 0


class Doorway:
    """The connections of *sessions* not yet decided (``pending``), the hooks that
    decide them, and what happens when one closes or a resumed session moves in. Made by
    :class:`~morsock._session_server.ServerSessions`, sharing its lock."""

    def __init__(self, sessions: ServerSessions) -> None:
        self._sessions = sessions
        self._server = sessions.server
        self._lock = sessions.lock
        self.pending: dict[Connection, Pending] = {}

    def admit(self, conn: Connection) -> None:
        """ServerSessions.admit (reactor thread), before the connection starts: wait for
        its first frame."""
        prepare_connection(self._server, conn)
        pending = Pending()
        with self._lock:
            self.pending[conn] = pending
        pending.timer = self._server._reactor.call_later(HELLO_GRACE, self._grace_over, conn)
        conn.frame_hook = functools.partial(self._first_frames, conn)

    def _first_frames(self, conn: Connection, frames: list[Any]) -> list[Any]:
        """Reactor hook until the first frame: a HELLO (after the AUTHENTICATED
        handshake, if any) makes a session connection; anything else a session-less one."""
        pending = self.pending.get(conn)
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
                token = Token()
                conn.frame_hook = functools.partial(self._sessions.session_frames, token)
                out = frames[:index]
                out.append(SessionHello(self._sessions, token, [frame]))
                if index + 1 < len(frames):
                    out.append(SessionFrames(self._sessions, token, frames[index + 1:]))
                return out
            self._decide_plain(conn)
            return frames[:index] + self._plain_frames(conn, frames[index:])
        return frames

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
        pending = self.pending.get(conn)
        if pending is not None and not pending.hello and not conn.closing:
            self._decide_plain(conn)

    def _decide_plain(self, conn: Connection) -> None:
        """*conn* is a session-less peer: announce it, send what was queued for it."""
        server = self._server
        with self._lock:
            pending = self.pending.pop(conn, None)
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

    # -- while it waits (under the lock) -------------------------------------------------
    def queue(self, conn: Connection, payload: bytes, encrypted: bool) -> bool:
        """ServerSessions.send, under the lock: keep a message for *conn* until it is
        decided. False when *conn* is not waiting; SendBufferFullError past
        ``max_send_buffer``."""
        pending = self.pending.get(conn)
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

    def stop(self) -> None:
        """ServerSessions.shutdown, under the lock: cancel the grace timers."""
        for pending in self.pending.values():
            if pending.timer is not None:
                pending.timer.cancel()

    # -- closed, resumed ------------------------------------------------------------------
    def connection_closed(self, conn: Connection) -> None:
        """ServerSessions.connection_closed (reactor thread): a waiting connection is
        forgotten (never announced); a session's waits for its resume."""
        sessions = self._sessions
        with self._lock:
            pending = self.pending.pop(conn, None)
            if pending is not None:
                if pending.timer is not None:
                    pending.timer.cancel()
                # gone before a word or within the grace: never announced (no
                # on_connect, so no on_disconnect either)
                sessions.unannounced.add(conn)
                return
            entry = sessions.entries.get(conn)
            if entry is None:
                return
            entry.disconnects += 1
            if entry.writer is conn:
                entry.writer = None
                assert entry.token.channel is not None
                events = sessions.table.connection_lost(entry.session, entry.token.channel,
                                                        time.monotonic())
                for event in events:
                    if isinstance(event, SessionEnded):
                        sessions.end(entry, event)
                sessions.timers.arm_expiry()
            sessions.changed.notify_all()

    def adopt(self, entry: Entry, carrier: Connection, token: Token) -> None:
        """Reactor thread: the session of *entry* resumed on *carrier*'s connection."""
        server = self._server
        sessions = self._sessions
        target = entry.client
        with self._lock:
            if entry.token is not token or entry.ended or sessions.stopped:
                carrier.close()
                return
            if carrier.closing:   # gone before it could move
                assert token.channel is not None
                for event in sessions.table.connection_lost(entry.session, token.channel,
                                                            time.monotonic()):
                    if isinstance(event, SessionEnded):
                        sessions.end(entry, event)
                sessions.timers.arm_expiry()
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
            sessions.unannounced.discard(carrier)
            target.frame_hook = functools.partial(sessions.session_frames, token)
            entry.writer = target
            sessions.flush(entry)
            sessions.timers.arm(entry)
        _log.info("client #%d: session %s resumed from %s", target.facade.handle,
                  entry.session.session_id.hex(), target.describe())  # type: ignore[union-attr]
        target.start(announce=False)
        if target._out:
            target._reactor.call_soon(target._arm_write)
