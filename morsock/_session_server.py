"""The sessions of a ``Server(resume_window > 0)`` (docs/guide/sessions.rst):
:class:`ServerSessions` pumps the server's :class:`~morsock._session_table.SessionTable`
and its sessions with their connections, threads and a clock, under the rules of
:mod:`morsock._session_link`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from ._component import as_bytes
from ._session import Message, Session, SessionEnded
from ._session_doorway import Doorway
from ._session_link import (
    ACK_DELAY,
    EarliestCall,
    SessionFrames,
    Token,
    channel_for,
    write_frames,
)
from ._session_table import SessionTable
from ._session_timers import SessionTimers
from .connection import DISCONNECTED
from .enums import ErrorCode
from .errors import CryptoError, MorsockError, NotConnectedError, ProtocolError
from .protocol import FLAG_PLAIN, FLAG_SESSION, Frame

if TYPE_CHECKING:
    from .connection import Connection
    from .server import Server

__all__ = ["ServerSessions", "Entry"]

_log = logging.getLogger("morsock")


class Entry:
    """Server: one session and the ServerClient that is its face for its whole life."""

    __slots__ = ("session", "client", "writer", "token", "timer", "ended",
                 "disconnects", "lost_report")

    def __init__(self, session: Session, client: Connection, token: Token) -> None:
        self.session = session
        self.client = client
        self.writer: Connection | None = client   # None while detached or moving
        self.token = token
        self.timer = EarliestCall()   # the session's next deadline (a delayed ack)
        self.ended = False
        self.disconnects = 0   # DISCONNECTED markers posted to its strand, not yet run
        self.lost_report: str | None = None   # SESSION_LOST, fired before on_disconnect


class ServerSessions:
    """The sessions of a ``Server(resume_window > 0)``.

    Threads: :meth:`admit`, :meth:`connection_closed`, the frame hooks (its
    :class:`~morsock._session_doorway.Doorway`) and timers (its
    :class:`~morsock._session_timers.SessionTimers`) on the reactor thread;
    :meth:`hello`, :meth:`handle`, :meth:`disconnect_marker` on the connection's strand;
    :meth:`send`, :meth:`close_session`, :meth:`going_away`, :meth:`shutdown` on any
    thread. Its attributes are shared with those two, under ``lock``.
    """

    def __init__(self, server: Server) -> None:
        self.server = server
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.table = SessionTable(server.resume_window, server.max_send_buffer, ACK_DELAY,
                                   ack_when_handled=True)
        self.entries: dict[Connection, Entry] = {}
        self.by_sid: dict[bytes, Entry] = {}
        self.unannounced: set[Connection] = set()   # on_connect never fired
        self.stopped = False
        self.doorway = Doorway(self)
        self.timers = SessionTimers(self)

    def __len__(self) -> int:
        return len(self.entries)

    def session_id(self, client: Connection) -> bytes | None:
        entry = self.entries.get(client)
        return entry.session.session_id if entry is not None and not entry.ended else None

    def admit(self, conn: Connection) -> None:
        """Server._admit (reactor thread), before the connection starts: wait for its
        first frame (:meth:`Doorway.admit`)."""
        self.doorway.admit(conn)

    def connection_closed(self, conn: Connection) -> None:
        """Server._connection_closed (reactor thread): :meth:`Doorway.connection_closed`."""
        self.doorway.connection_closed(conn)

    def session_frames(self, token: Token, frames: list[Any]) -> list[Any]:
        """Reactor hook of a session connection (its frames, to its strand)."""
        return [SessionFrames(self, token, frames)]

    # -- strand ------------------------------------------------------------------------

    def hello(self, conn: Connection, token: Token, frame: Any) -> None:
        """The HELLO of *conn* (on its strand, after its AUTHENTICATED handshake)."""
        server = self.server
        channel = channel_for(server, conn)
        token.channel = channel
        failure: MorsockError | None = None
        resumed = False
        with self.lock:
            pending = self.doorway.pending.pop(conn, None)
            queued = pending.queued if pending is not None else []
            if conn.closing or self.stopped:
                self.unannounced.add(conn)
                return
            try:
                if server.require_encryption and channel.flag == FLAG_PLAIN:
                    raise CryptoError("a session without an encryption key, but encryption "
                                      "is required", ErrorCode.ENCRYPTION_REQUIRED)
                session, resumed = self.table.accept(frame, channel, time.monotonic())
            except (ProtocolError, CryptoError) as exc:
                failure = exc
            if failure is None:
                if resumed:
                    entry = self.by_sid[session.session_id]   # type: ignore[index]
                    entry.token = token
                    entry.writer = None   # until Doorway.adopt moved the socket
                    self.unannounced.add(conn)
                else:
                    entry = Entry(session, conn, token)
                    self.entries[conn] = entry
                    self.by_sid[session.session_id] = entry   # type: ignore[index]
                    self.unannounced.discard(conn)
                for data, encrypted in queued:
                    self._accept_locked(entry, data, encrypted)
                if not resumed:
                    self.flush(entry)
        if failure is not None:
            self.unannounced.add(conn)
            conn.close(failure.code or ErrorCode.INVALID_PROTOCOL,
                       f"session hello from {conn.describe()} refused: {failure}")
            return
        if resumed:
            server._reactor.call_soon(self.doorway.adopt, entry, conn, token)
            return
        _log.info("client #%d: session %s started", conn.facade.handle,
                  entry.session.session_id.hex())   # type: ignore[union-attr]
        server._emit("on_connect", conn.facade)

    def handle(self, conn: Connection, token: Token, frames: list[Any]) -> None:
        """Frames of one read of a session connection: deliver, in order."""
        entry = self.entries.get(conn)
        if entry is None or entry.token is not token:
            return
        if len(frames) == 1 and self._handle_request(entry, conn, token, frames[0]):
            return
        events: list[Any] = []
        bad: MorsockError | None = None
        session = entry.session
        with self.lock:
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
                self.flush(entry)
        for event in events:
            self._dispatch(entry, conn, event)
        if session.ack_deadline is not None:
            with self.lock:
                self.timers.arm(entry)
        if bad is not None:
            conn.close(bad.code or ErrorCode.INVALID_PROTOCOL,
                       f"session frame from {conn.describe()} rejected: {bad}")

    def _handle_request(self, entry: Entry, conn: Connection, token: Token,
                        frame: Any) -> bool:
        """:meth:`handle` of the commonest read: one plaintext request
        (:meth:`Session.take_request`), answered through :meth:`_answer`. False when
        *frame* is anything else (nothing changed); True when it was handled, dropped or
        refused."""
        if frame.__class__ is bytes or frame.flag != FLAG_SESSION:
            return False
        session = entry.session
        with self.lock:
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
                    self.flush(entry)
        if bad is not None:
            conn.close(bad.code or ErrorCode.INVALID_PROTOCOL,
                       f"session frame from {conn.describe()} rejected: {bad}")
            return True
        self._answer(entry, conn, taken[1], False, taken[0])  # type: ignore[index]
        if session.ack_deadline is not None:
            with self.lock:
                self.timers.arm(entry)
        return True

    def _dispatch(self, entry: Entry, conn: Connection, event: Any) -> None:
        if event.__class__ is Message:
            self._answer(entry, conn, event.data, event.encrypted, event.request_id)
        elif isinstance(event, SessionEnded):
            with self.lock:
                self.end(entry, event)

    def _answer(self, entry: Entry, conn: Connection, data: bytes, encrypted: bool,
                request_id: int) -> None:
        """Strand: a delivered message through the server's handler; acknowledged once the
        handler returned, its reply (to *request_id*, if not 0) sent in the session."""
        server = self.server
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
                reply = as_bytes(reply)
            except TypeError as exc:
                server._report(entry.client, f"reply to {conn.describe()} not sent: {exc}",
                               ErrorCode.HANDLER_EXCEPTION)
                reply = None
        with self.lock:
            writer = entry.writer
            if (reply and request_id and not encrypted and writer is not None
                    and not entry.ended):
                frame = session.reply_frame(request_id, reply)
                if frame is not None:
                    write_frames(entry.token, writer, [frame])
                    return
            # acknowledged only now that its handler returned (the reply carries it)
            session.handled(time.monotonic())
            if reply and not entry.ended:
                self._reply_locked(entry, conn, reply, encrypted, request_id)
            self.flush(entry)

    def _reply_locked(self, entry: Entry, conn: Connection, data: bytes, encrypted: bool,
                      request_id: int) -> None:
        """Under the lock: the handler's reply into the session (queued for flush); a
        refused one is reported."""
        try:
            if request_id:
                entry.session.reply(request_id, data, encrypted, time.monotonic())
            else:
                entry.session.send(data, encrypted, time.monotonic())
        except (MorsockError, ValueError) as exc:
            self.server._report(entry.client, f"reply to {conn.describe()} not sent: {exc}",
                                 getattr(exc, "code", None) or ErrorCode.SEND_BUFFER_FULL)

    def disconnect_marker(self, conn: Connection) -> bool:
        """Server._run_item, DISCONNECTED of *conn*: True when on_disconnect fires now (and
        the strand retires); False when the connection's session lives on."""
        with self.lock:
            if conn in self.unannounced:
                self.unannounced.discard(conn)
                conn.retire_strand()
                return False
            entry = self.entries.get(conn)
            if entry is None:
                return True
            entry.disconnects -= 1
            if not (entry.ended and entry.disconnects <= 0):
                return False
            del self.entries[conn]
            report, entry.lost_report = entry.lost_report, None
        if report is not None:
            self.server._emit("on_error", conn.facade, report, ErrorCode.SESSION_LOST)
        return True

    # -- any thread --------------------------------------------------------------------

    def send(self, conn: Connection, data: Any, encrypted: bool) -> bool:
        """Server._send_on: False when *conn* is not a session's (nor undecided)."""
        if conn not in self.doorway.pending and conn not in self.entries:
            return False
        payload = as_bytes(data)
        if encrypted:
            ctx = self.server._crypto
            if ctx is None or not ctx.enabled:
                raise CryptoError("encrypted=True but no encryption_key is set",
                                  ErrorCode.ENCRYPTION_REQUIRED)
        with self.lock:
            entry = self.entries.get(conn)
            if entry is None:
                return self.doorway.queue(conn, payload, encrypted)
            if entry.ended:
                raise NotConnectedError(f"the session of {conn.describe()} is over")
            self._accept_locked(entry, payload, encrypted, raise_errors=True)
            self.flush(entry)
        return True

    def _accept_locked(self, entry: Entry, data: bytes, encrypted: bool,
                       raise_errors: bool = False) -> None:
        try:
            entry.session.send(data, encrypted, time.monotonic())
        except ValueError as exc:
            if raise_errors:
                raise NotConnectedError(str(exc)) from None
        except MorsockError as exc:
            if raise_errors:
                raise
            self.server._report(entry.client, f"message to {entry.client.describe()} "
                                 f"not sent: {exc}", exc.code or ErrorCode.SEND_BUFFER_FULL)

    def flush(self, entry: Entry) -> None:
        """Under the lock: write what the session queued to its connection (kept in the
        session while it has none: a resume is moving it)."""
        writer = entry.writer
        session = entry.session
        if writer is not None and session.out:
            out = session.out
            session.out = []
            write_frames(entry.token, writer, out)

    def close_session(self, conn: Connection) -> bool:
        """ServerClient.disconnect of a session: GOING_AWAY, then the session ends (the
        client hands back what it did not see acknowledged). False: not a session."""
        with self.lock:
            entry = self.entries.get(conn)
            if entry is None or entry.ended:
                return False
            events = entry.session.going_away(time.monotonic())
            self.flush(entry)
            for event in events:
                if isinstance(event, SessionEnded):
                    self.end(entry, event)
            if not entry.ended:
                self.end(entry, entry.session.lose("disconnected by the server"))
        return True

    def going_away(self, timeout: float) -> None:
        """Server.stop: tell every connected session to move on; wait (at most *timeout*)
        for their answers, which acknowledge what they delivered."""
        deadline = time.monotonic() + timeout
        with self.lock:
            self.stopped = True
            for entry in list(self.entries.values()):
                if entry.ended:
                    continue
                events = entry.session.going_away(time.monotonic())
                self.flush(entry)
                for event in events:
                    if isinstance(event, SessionEnded):
                        self.end(entry, event)
            while any(not e.ended and e.writer is not None for e in self.entries.values()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.changed.wait(remaining)

    def shutdown(self) -> None:
        """Server.stop, after every connection was closed: end the sessions left."""
        with self.lock:
            self.stopped = True
            self.timers.stop()
            for entry in list(self.entries.values()):
                entry.timer.cancel()
                if not entry.ended:
                    self.end(entry, entry.session.lose("the server stopped"))
            self.doorway.stop()
        posted = threading.Event()   # the on_disconnect markers are posted (FIFO) ...
        self.server._reactor.call_soon(posted.set)
        posted.wait(10)              # ... before the pool is shut down

    # -- the end of a session ----------------------------------------------------------

    def end(self, entry: Entry, end: SessionEnded) -> None:
        """Under the lock: the session of *entry* is over; its on_disconnect follows
        (through its strand, once its connection is closed)."""
        if entry.ended:
            return
        entry.ended = True
        self.by_sid.pop(end.session_id, None)
        self.table.remove(entry.session)
        client = entry.client
        count = len(end.unacknowledged)
        handle = client.facade.handle if client.facade is not None else 0
        _log.info("client #%d: session %s ended (%s)", handle, end.session_id.hex(),
                  end.reason)
        if count:
            message = (f"session of client #{handle} ended ({end.reason}): {count} "
                       "message(s) to it were not acknowledged")
            if client.closed:   # reported in its order still: before its on_disconnect
                server = self.server
                if server._observer is not None:
                    server._observer.error(ErrorCode.SESSION_LOST)
                server._log.error("%s (code %d)", message, ErrorCode.SESSION_LOST)
                entry.lost_report = message
            else:
                self.server._report(client, message, ErrorCode.SESSION_LOST)
        if client.closed:
            # decided on the reactor thread, where a close runs whole (closed, counted,
            # its DISCONNECTED posted): exactly one DISCONNECTED fires on_disconnect
            self.server._reactor.call_soon(self._last_disconnect, entry)
        elif not client.closing:
            client.close()
        self.changed.notify_all()

    def _last_disconnect(self, entry: Entry) -> None:
        """Reactor thread: the ended session's connection is closed; unless one of its
        DISCONNECTED markers is still to run (it fires on_disconnect), post one."""
        with self.lock:
            if entry.disconnects <= 0 and entry.client in self.entries:
                entry.disconnects += 1
                entry.client.post(DISCONNECTED)
