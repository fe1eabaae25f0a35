"""The reactor thread's side of the server: accepting connections (plain, or through a
TLS handshake), admitting them into the client table -- or refusing them past
``max_connections`` --, taking them out once closed, and the sweep that closes those past
a time limit (``connection_timeout``, ``idle_timeout``, a peer that does not read).

:class:`ServerAdmission` is a base of :class:`~morsock.Server` only; it holds no state of
its own (the server's listener, client table, counters and sweep timer). Everything here
runs on the server's reactor thread (the listener's callback, the TLS handshakes'
outcomes, timers, a connection's close), the only thread that adds clients; the client
table is changed under ``property_lock``, the counters under the statistics lock. Nothing
here raises: a socket that fails is closed and logged, a refusal reported (``on_error``).
"""

from __future__ import annotations

import errno
import itertools
import logging
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, cast

from ._component import Component, Tally
from ._internals import accepter
from ._server_client import ServerClient
from .connection import CONNECTED, Connection
from .enums import ErrorCode, ServerState
from .reactor import EVENT_READ
from .tls import TLSHandshake

if TYPE_CHECKING:
    from ._session_server import ServerSessions
    from .cluster import Backplane
    from .server import Server

__all__ = ["ServerAdmission", "OPTIONS_INHERITED"]

#: Linux copies TCP_NODELAY, SO_KEEPALIVE, the keep-alive timings and TCP_USER_TIMEOUT
#: from a listening socket to the sockets it accepts: set there once, they cost accepted
#: connections nothing (test_hardening checks accepted sockets carry them).
OPTIONS_INHERITED = sys.platform.startswith("linux")


class ServerAdmission(Component):
    """The reactor thread's side of :class:`~morsock.Server` (see the module docstring)."""

    # The server's state and settings these methods use (set by Server).
    _state: ServerState
    _listener: socket.socket | None
    _clients: dict[int, ServerClient]
    _handles: itertools.count[int]
    _tls_pending: set[TLSHandshake]
    _total_connections: int
    _total_rejected: int
    _tally: Tally
    _sweep_timer: Any
    _sessions: ServerSessions | None
    _no_clients: threading.Condition
    property_lock: Any
    if TYPE_CHECKING:
        idle_timeout: float | None
        backplane: Backplane | None
        on_connect: Callable[..., Any] | None
        on_disconnect: Callable[..., Any] | None

        def _connection_limit(self) -> int: ...

    def _on_accept(self, mask: int) -> None:
        """Reactor thread: the listener is readable; accept what is waiting (a bounded
        number at a time, so the other sockets are served meanwhile)."""
        listener = self._listener
        if listener is None or self._state is not ServerState.LISTENING:
            return
        accept = accepter(listener)
        for _ in range(64):
            try:
                sock, address = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._accept_failed(listener, exc)
                return
            self._accepted(sock, address)

    def _accept_failed(self, listener: socket.socket, exc: OSError) -> None:
        """Reactor thread: ``accept`` failed; out of descriptors or memory, pause accepts
        for a moment (the kernel holds the connections meanwhile)."""
        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            self._report(None, f"accept failed: {exc}; pausing accepts for 0.1 s",
                         ErrorCode.SERVER_FULL)
            self._reactor.unregister(listener)
            self._reactor.call_later(0.1, self._resume_accepting)

    def _accepted(self, sock: socket.socket, address: Any) -> None:
        """Reactor thread: admit (or refuse, past ``max_connections``) one accepted socket."""
        # The limit is read for every connection: a refusal's on_error runs on this
        # thread, in the accept loop, and may raise max_connections before the next accept.
        limit = self._connection_limit()
        if len(self._clients) + len(self._tls_pending) >= limit:  # only this thread adds
            sock.close()
            with self._stats_lock:
                self._total_rejected += 1
            self._report(None, f"connection from {address[0]}:{address[1]} refused: "
                         f"server full (max_connections={limit})", ErrorCode.SERVER_FULL)
            return
        try:
            if OPTIONS_INHERITED:
                sock.setblocking(False)  # the rest came with the listener's options
            else:
                self._configure(sock)
            if self.ssl_context is not None:
                self._start_tls(sock, address)
                return
            client = ServerClient(cast("Server", self), sock, next(self._handles), address)
        except OSError as exc:
            sock.close()
            self._log.info("accepted socket from %s failed at once: %s", address, exc)
            return
        self._admit(client)

    def _admit(self, client: ServerClient) -> None:
        """Reactor thread: count *client*, make it visible in ``clients``, start its I/O."""
        with self.property_lock:
            self._clients[client.handle] = client
        with self._stats_lock:
            self._total_connections += 1
        if self._log_levels.get(logging.INFO) is not False:
            self._log.info("client #%d connected from %s:%d", client.handle, client.peer_ip,
                           client.peer_port)
        if self.idle_timeout is not None:
            self._watch()
        if self.backplane is not None:
            self.backplane.client_joined(client.handle, f"{client.peer_ip}:{client.peer_port}")
        sessions = self._sessions
        if sessions is not None:
            sessions.admit(client._conn)  # on_connect once its first frame tells what it is
        client._conn.start(announce=sessions is None)

    def _marker_wanted(self, marker: Any) -> bool:
        # A marker only fires its event: without a handler, it need not go through the
        # strand at all (a connection that comes and goes costs two strand runs less).
        if marker is CONNECTED:
            return self.on_connect is not None
        return self.on_disconnect is not None or self._sessions is not None

    def _start_tls(self, sock: socket.socket, address: Any) -> None:
        """Reactor thread: TLS handshake with an accepted socket. It counts against
        ``max_connections`` meanwhile; the ServerClient exists only once it succeeded."""
        peer = f"{address[0]}:{address[1]}"
        handshake = TLSHandshake(
            self._reactor, self.ssl_context, sock, server_side=True,
            timeout=self.connection_timeout, description=peer,
            on_success=lambda tls_sock: self._tls_accepted(handshake, tls_sock),
            on_failure=lambda message, code: self._tls_refused(handshake, message, code))
        self._tls_pending.add(handshake)
        handshake.start()

    def _tls_accepted(self, handshake: TLSHandshake, sock: socket.socket) -> None:
        self._tls_pending.discard(handshake)
        if self._state is not ServerState.LISTENING:
            sock.close()
            return
        try:
            client = ServerClient(cast("Server", self), sock, next(self._handles))
        except OSError as exc:
            sock.close()
            self._log.info("TLS connection from %s failed at once: %s",
                           handshake.description, exc)
            return
        self._admit(client)

    def _tls_refused(self, handshake: TLSHandshake, message: str, code: ErrorCode) -> None:
        self._tls_pending.discard(handshake)
        self._report(None, message, code)

    def _resume_accepting(self) -> None:
        if self._listener is not None and self._state is ServerState.LISTENING:
            self._reactor.register(self._listener, EVENT_READ, self._on_accept)

    def _watch(self) -> None:
        """Reactor thread: make sure the sweep runs while something needs watching (see
        :meth:`_sweep`); a server with nothing to watch has no timer."""
        if self._sweep_timer is not None or self._state is not ServerState.LISTENING:
            return
        interval = min(1.0, max(0.05, self.connection_timeout / 4))
        if self.idle_timeout:
            interval = min(interval, max(0.05, self.idle_timeout / 4))
        self._sweep_timer = self._reactor.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        """Close connections stuck mid-frame (connection_timeout), idle (idle_timeout) or
        not reading while sends to them are refused (connection_timeout). Runs again
        only while one of those can happen: a frame in progress, a refused send, or
        clients and an idle_timeout; otherwise the next of them arms it (:meth:`_watch`)."""
        self._sweep_timer = None
        if self._state is not ServerState.LISTENING:
            return
        now = time.monotonic()
        idle_limit = self.idle_timeout
        watching = False
        for client in list(self._clients.values()):
            conn = client._conn
            if conn.closing:
                continue
            expired = self._expired(conn, now)
            if expired is not None:
                conn.close(*expired)
            else:
                watching = watching or (idle_limit is not None
                                        or conn.partial_since is not None
                                        or conn.send_stalled_since is not None)
        if watching:
            self._watch()

    def _expired(self, conn: Connection, now: float) -> tuple[ErrorCode, str] | None:
        """The code and message to close *conn* with if one of its time limits passed."""
        frame_limit = self.connection_timeout
        idle_limit = self.idle_timeout
        if conn.partial_since is not None and now - conn.partial_since > frame_limit:
            return ErrorCode.TIMEOUT, (f"{conn.describe()}: frame not completed within "
                                       f"connection_timeout={frame_limit:g} s")
        if idle_limit is not None and now - conn.last_activity > idle_limit:
            return ErrorCode.TIMEOUT, (f"{conn.describe()}: idle for more than "
                                       f"idle_timeout={idle_limit:g} s")
        stalled = conn.send_stalled_since
        if stalled is not None and now - stalled > frame_limit:
            return ErrorCode.SEND_BUFFER_FULL, (
                f"{conn.describe()}: does not read; its send queue stayed full "
                f"(max_send_buffer={conn.max_send_buffer}) for more than "
                f"connection_timeout={frame_limit:g} s; disconnected")
        return None

    def _connection_closed(self, conn: Connection) -> None:
        client: ServerClient = conn.facade
        client._closed_mono = time.monotonic()
        if self._sessions is not None:
            self._sessions.connection_closed(conn)
        with self.property_lock:
            if self._clients.pop(client.handle, None) is not None:
                self._tally.closed(conn)  # closed: nothing is read or sent any more
                if self.backplane is not None:
                    self.backplane.client_left(client.handle)
            if not self._clients:
                self._no_clients.notify_all()
        if self._log_levels.get(logging.INFO) is not False:
            self._log.info("client #%d %s:%d disconnected", client.handle, conn.peer_ip,
                           conn.peer_port)
