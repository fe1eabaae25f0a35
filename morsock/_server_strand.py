"""The strand side of the server: one connection's items, in order, on a worker thread --
a frame opened, handed to ``on_handle_command``, its reply sent; the life-cycle markers
(``on_connect``, ``on_disconnect``) and ordered ``on_error`` reports between them.

:class:`ServerStrand` is the base of :class:`~morsock.Server` only; it holds no state of
its own (the server's settings, its sessions and its ``_sealed_flag``). Everything here
runs on the strand of the connection it is given (one pool thread at a time, see
:class:`~morsock.workers.Strand`): :meth:`ServerStrand._run_items` is every connection's
batch runner, :meth:`ServerStrand._run_item` and :meth:`ServerStrand._emit_error` are
called through :class:`~morsock.connection.Connection`, :meth:`ServerStrand._call_handler`
by the session link. A handler that raises is reported (``HANDLER_EXCEPTION``) and the
strand goes on; nothing here raises to its caller.
"""

from __future__ import annotations

import logging
from threading import get_ident
from time import perf_counter
from typing import TYPE_CHECKING, Any, Callable

from ._component import Component
from ._send_queue import HEADER_CACHE_MAX, HOLD_MAX, PLAIN_HEADERS, SendQueue, plain_header
from ._session_link import SessionFrames, is_session_item
from ._session_server import ServerSessions
from .connection import CONNECTED, DISCONNECTED, Connection
from .errors import CryptoError, MorsockError
from .protocol import HEADER_SIZE, Frame

if TYPE_CHECKING:
    from ._server_client import ServerClient
    from .server import Server

__all__ = ["ServerStrand"]


def _no_handler(sender: Server, client: ServerClient, data: bytes) -> None:
    """The ``on_handle_command`` of a server that has none: frames get no reply."""


class ServerStrand(Component):
    """The strand side of :class:`~morsock.Server` (see the module docstring)."""

    # The server's state these methods read (set by Server).
    _sessions: ServerSessions | None
    _sealed_flag: int
    on_handle_command: Callable[..., Any] | None

    def _run_items(self, conn: Connection, items: list[Any]) -> None:
        """Strand batch runner (a pool thread): *conn*'s items in order, through
        :meth:`_handle_items`. A batch of several is corked: its plaintext replies are
        held and leave in one ``send`` at the end (or once they pass ``HOLD_MAX``); a
        batch of one, the commonest, replies at once."""
        conn.runner = get_ident()
        try:
            if items[0].__class__ is SessionFrames and len(items) == 1:
                self._run_session_item(conn, items[0])  # it delivers and replies itself
                return
            handler = self.on_handle_command
            debug = self._log_levels.get(logging.DEBUG)  # isEnabledFor's answer, if known
            if debug or (debug is None and self._debug()):
                handler = self._logged(handler)
            observer = self._observer
            if observer is None or handler is None:
                handler = handler or _no_handler
                done = None
            else:  # plaintext runs timed as a whole (done), other calls one by one
                done = observer.shard.handler_done
            plain = None if self.require_encryption else bytes  # items handled as they are
            if len(items) == 1:  # the commonest batch: its reply leaves at once, uncorked
                self._handle_items(conn, items, handler, done, plain, None)
                return
            queue = conn.cork()
            try:
                self._handle_items(conn, items, handler, done, plain, queue)
            finally:
                conn.uncork()
        finally:
            conn.runner = None
            conn.handled(len(items))  # read back-pressure: the strand caught up this far

    def _handle_items(self, conn: Connection, items: list[Any], handler: Callable[..., Any],
                      done: Callable[[float, int], None] | None, plain: Any,
                      queue: SendQueue | None) -> None:
        """Strand: the one path of a frame -- open it, call the handler, send its reply.

        Items of class *plain* are plaintext payloads to hand over as they are (None
        under ``require_encryption``) and go to *handler*; others go to
        :meth:`_handle_sealed`. With metrics (*done* not None, the thread's
        ``handler_done``), each run of plaintext frames handled back to back is timed as
        a whole (its handler calls and the queuing of their replies) and recorded once as
        that many calls; any other call is timed alone (:meth:`_observed`). A plaintext
        ``bytes`` reply to a plaintext frame is held in *queue* (corked, see
        :meth:`Connection.cork`) or, without one, sent at once
        (:meth:`Connection.send_plain`); any other reply goes to
        :meth:`_reply`. Never raises."""
        client = conn.facade
        hold = None if queue is None else queue.held.append
        limit = self.max_message_size  # a larger reply is refused by _reply, reported
        calls = 0  # plaintext frames of the current timed run (counted, timed with done)
        start = perf_counter() if done is not None else 0.0  # when that run began
        for item in items:
            if item.__class__ is not plain:  # ends the run of plaintext frames
                start = self._handle_sealed(conn, item, handler, done, start, calls)
                calls = 0
                continue
            if conn.closing:
                continue  # frames left behind by a close are dropped, never handled
            calls += 1
            try:
                reply = handler(self, client, item)
            except Exception as exc:
                self._handler_failed("on_handle_command", exc, (client,))
                continue
            if not reply:  # None, b"" or any empty reply: nothing to send
                continue
            if reply.__class__ is not bytes:
                self._reply(conn, reply, False)  # corked: sent with the batch
                continue
            n = len(reply)
            if n > limit:
                self._reply(conn, reply, False)  # refused there, and reported
            elif hold is None:
                conn.send_plain(reply)
            else:  # held: SendQueue.hold, inline (once per reply)
                hold(PLAIN_HEADERS[n] if n < HEADER_CACHE_MAX else plain_header(n))
                hold(reply)
                queue.held_bytes += n + HEADER_SIZE  # type: ignore[union-attr]
                if queue.held_bytes >= HOLD_MAX:  # type: ignore[union-attr]
                    conn.release_held()
        if calls and done is not None:
            done(perf_counter() - start, calls)

    def _handle_sealed(self, conn: Connection, item: Any, handler: Callable[..., Any],
                       done: Callable[[float, int], None] | None, start: float,
                       calls: int) -> float:
        """Strand (:meth:`_handle_items`): an item that is not a plaintext payload, which
        ends the timed run of *calls* plaintext frames begun at *start* (recorded with
        *done*, when set); handled by :meth:`_handle_opened`, timed alone with metrics.
        Returns when the next run begins (``perf_counter()``; 0.0 without metrics)."""
        if done is None:
            self._handle_opened(conn, item, handler)
            return 0.0
        if calls:
            done(perf_counter() - start, calls)
        self._handle_opened(conn, item, self._observed(handler))  # type: ignore[arg-type]
        return perf_counter()

    def _handle_opened(self, conn: Connection, item: Any, call: Callable[..., Any]) -> None:
        """Strand: *item* opened (:meth:`_open_item`), handed to *call* and its reply sent
        (:meth:`_reply`, encrypted when the frame was). Nothing happens when the item was
        refused or the connection is closing; a handler that raises is reported. Never
        raises."""
        opened = self._open_item(conn, item)
        if opened is None or conn.closing:
            return
        data, flag = opened
        client = conn.facade
        try:
            if flag:
                reply = self._call_encrypted(call, client, data)
            else:
                reply = call(self, client, data)
        except Exception as exc:
            self._handler_failed("on_handle_command", exc, (client,))
            return
        if reply:
            self._reply(conn, reply, flag != 0)

    def _logged(self, handler: Callable[..., Any] | None) -> Callable[..., Any] | None:
        """*handler* that first logs each message at DEBUG (while the logger takes them)."""
        if handler is None:
            return None
        log = self._log
        sealed_flag = self._sealed_flag

        def logged(sender: Server, client: ServerClient, data: bytes) -> Any:
            log.debug("client #%d: %d-byte message (flag %d)", client.handle, len(data),
                      sealed_flag if client.message_encrypted else 0)
            return handler(sender, client, data)
        return logged

    def _call_encrypted(self, handler: Callable[..., Any], client: ServerClient,
                        data: bytes) -> Any:
        """Strand: ``handler(self, client, data)`` for a message that arrived encrypted,
        with ``client.message_encrypted`` set meanwhile."""
        client.message_encrypted = True
        try:
            return handler(self, client, data)
        finally:
            client.message_encrypted = False

    def _call_handler(self, handler: Callable[..., Any], conn: Connection, data: bytes) -> Any:
        """Strand (the session link): ``handler(self, client, data)`` for *conn*'s client;
        None when it raised (reported as HANDLER_EXCEPTION)."""
        observer = self._observer
        start = perf_counter() if observer is not None else 0.0
        try:
            return handler(self, conn.facade, data)
        except Exception as exc:
            self._handler_failed("on_handle_command", exc, (conn.facade,))
            return None
        finally:
            if observer is not None:
                observer.handler_done(perf_counter() - start)

    def _run_session_item(self, conn: Connection, item: SessionFrames) -> None:
        """Strand: one read of a session connection, which delivers (and replies) itself;
        logs what it raises."""
        if not conn.closing:
            try:
                item.run(conn)
            except Exception:
                self._log.exception("unhandled error handling %r on %s", item, conn)

    def _open_item(self, conn: Connection, item: Any) -> tuple[bytes, int] | None:
        """Strand: the data and flag of a frame that needs opening (encrypted, or any
        under ``require_encryption``); None when there is nothing to handle: the frame
        was consumed (handshake) or refused, or *item* is a life-cycle marker, which
        this runs."""
        cls = item.__class__
        if cls is SessionFrames:
            self._run_session_item(conn, item)
            return None
        if cls is not bytes and cls is not Frame:
            self._run_marker(conn, item)
            return None
        frame = item if cls is Frame else Frame(item, 0)
        if conn.closing:
            return None
        opened = self._open_frame(conn, frame)
        return None if opened is None else (opened, frame.flag)

    def _run_marker(self, conn: Connection, item: Any) -> None:
        try:
            conn.run_item(item)
        except Exception:
            self._log.exception("unhandled error handling %r on %s", item, conn)

    def _run_item(self, conn: Connection, item: Any) -> None:
        """Strand, from :meth:`Connection.run_item`: a life-cycle marker."""
        if item is CONNECTED:
            self._emit("on_connect", conn.facade)
        elif item is DISCONNECTED:
            sessions = self._sessions
            if sessions is not None and not sessions.disconnect_marker(conn):
                return  # its session lives on: on_disconnect once it ends
            self._emit("on_disconnect", conn.facade)
            conn.retire_strand()  # the last item: freed without the collector
        elif is_session_item(item):
            item.run(conn)
        else:  # a frame: the batch runner takes them itself, this is for completeness
            handler = self._observed(self.on_handle_command) or _no_handler
            plain = None if self.require_encryption else bytes
            self._handle_items(conn, [item], handler, None, plain, None)

    def _authenticated_hello(self, conn: Connection, payload: bytes) -> None:
        from .crypto import server_handshake
        ctx = self._crypto
        assert ctx is not None
        try:
            reply, session = server_handshake(ctx.key, ctx.mode, ctx.key_size, payload)
        except CryptoError as exc:
            self._refuse_hello(conn, payload, str(exc))
            raise
        conn.send_frame(reply)
        conn.session = session

    def _refuse_hello(self, conn: Connection, payload: bytes, reason: str) -> None:
        from .crypto import is_client_hello, refusal_frame
        if is_client_hello(payload):  # only a morsock client sends one: no Delphi peer
            try:
                conn.send_frame(refusal_frame(reason))
            except MorsockError:
                pass  # gone already: the close that follows is reported anyway

    def _emit_error(self, conn: Connection, message: str, code: int) -> None:
        """Strand: an :class:`ErrorReport` of *conn* comes up in its order."""
        self._emit("on_error", conn.facade, message, code)

