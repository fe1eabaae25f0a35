"""The server component (Delphi ``TmMServer``): its settings, life cycle, statistics,
client table and cluster calls. Its two bases hold the rest: the strand side (a frame
in, the handler, its reply: :mod:`morsock._server_strand`) and the reactor thread's side
(accept, admit, sweep: :mod:`morsock._server_admission`). Its view of one connection
(``TmMServerClient``), :class:`ServerClient`, is defined in :mod:`morsock._server_client`
and re-exported here."""

from __future__ import annotations

import errno
import itertools
import logging
import os
import selectors
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from threading import get_ident
from typing import Any, Callable

from ._component import Data, Tally, as_bytes
from ._server_admission import OPTIONS_INHERITED, ServerAdmission
from ._server_client import ServerClient
from ._server_strand import ServerStrand
from ._session_server import ServerSessions
from ._settings import (
    Setting,
    _boolean,
    _non_negative_seconds,
    _optional_seconds,
    _port,
    _positive_int,
    _server_host,
)
from .cluster import Backplane, split_client_id
from .connection import Connection, ErrorReport
from .enums import AESMode, EncryptionProfile, ErrorCode, KeySize, ServerState
from .errors import CryptoError, MorsockError, NotConnectedError, SendBufferFullError
from .events import EventQueue
from .protocol import FLAG_AUTHENTICATED, FLAG_MORMOT
from .reactor import EVENT_READ
from .tls import TLSHandshake
from .workers import WorkerPool

__all__ = ["Server", "ServerClient"]


#: Most clients a server admits where the selector is ``select()`` (Windows:
#: ``selectors.DefaultSelector`` is ``SelectSelector``, which watches at most 512 sockets;
#: the listening and wake-up sockets take two). A higher ``max_connections`` is capped.
SELECT_MAX_CONNECTIONS = 500

#: SO_REUSEADDR on the listening socket, except on Windows, where it would let a second
#: server bind a port that is in use (as ``socket.create_server`` does; Windows never
#: holds a closed listener's port in TIME_WAIT, so a restart still binds at once).
_REUSE_ADDRESS = os.name not in ("nt", "cygwin")


def _backplane(value: Any) -> Backplane | None:
    if value is not None and not isinstance(value, Backplane):
        raise TypeError(f"a morsock.cluster.Backplane (RedisBackplane) or None, not "
                        f"{type(value).__name__}")
    return value


def _select_limited() -> bool:
    """True where the reactor's selector is ``select()``-based (Windows)."""
    default: type[selectors.BaseSelector] = selectors.DefaultSelector  # varies by platform
    return default is selectors.SelectSelector


class Server(ServerAdmission, ServerStrand):
    """A listening TCP component (Delphi ``TmMServer``).

    Methods for the caller: :meth:`start`, :meth:`stop` (or ``active = True/False``,
    or ``with Server(...)``), :meth:`broadcast_data`, :meth:`find_client`,
    :meth:`find_client_by_ip`, :meth:`disconnect_client`, :meth:`disconnect_all_clients`,
    :meth:`clear_statistics`, :meth:`get_server_info`.

    Events you may assign (``sender`` is the server; see README "Threads and events"):
    ``on_handle_command(sender, client, data) -> bytes | None`` (runs on a worker; a
    non-empty return is sent back to that client, encrypted when the request was),
    ``on_connect(sender, client)``, ``on_disconnect(sender, client)``,
    ``on_error(sender, client_or_None, message, code)``,
    ``on_state_change(sender, old, new)``, ``on_data_sent(sender, client, nbytes)``,
    ``on_data_received(sender, client, nbytes)``. Each is also a constructor keyword.

    Settings -- constructor arguments, and attributes settable while stopped (a few --
    ``max_connections``, ``connection_timeout``, ``idle_timeout``, ``require_encryption``,
    ``max_send_buffer`` -- also while listening; ``help()`` on each tells its meaning):
    ``port``, ``host``, ``max_connections``, ``thread_pool_size``, ``connection_timeout``,
    ``idle_timeout``, ``backlog``, ``reuse_port``, ``keep_alive``, ``keepalive_idle``,
    ``keepalive_interval``, ``keepalive_count``, ``no_delay``, ``max_message_size``,
    ``max_send_buffer``, ``encryption_key``, ``encryption_mode``, ``encryption_key_size``,
    ``encryption_profile``, ``require_encryption``, ``ssl_context``,
    ``events_use_main_thread``, ``event_queue``, ``logger``.

    Read-only, exact at every moment: ``state``, ``active``, ``client_count`` (also
    ``total_active_connections``), ``total_connections``, ``total_rejected_connections``,
    ``total_bytes_received``, ``total_bytes_sent``, ``total_messages_received``,
    ``total_messages_sent``, ``up_time``, ``encryption_info``, ``clients`` (a snapshot
    ``{handle: ServerClient}``); ``property_lock`` (holding it freezes the client set).

    Limits on hostile or dead peers: a frame must be complete within
    ``connection_timeout`` seconds of its first byte, and a connection silent for
    ``idle_timeout`` seconds (None: never) is closed (both ``TIMEOUT``); a client that
    does not read is disconnected (``SEND_BUFFER_FULL``) as soon as a handler's reply no
    longer fits ``max_send_buffer``, or once frames sent to it with :meth:`ServerClient.
    send_data` / :meth:`broadcast_data` have been refused for ``connection_timeout``
    seconds without it reading a byte. Keep-alive (``keep_alive``, ``keepalive_idle=10``,
    ``keepalive_interval=5``, ``keepalive_count=3``) finds dead peers: see
    :func:`morsock.connection.configure_socket`.
    """

    port: Setting[int] = Setting(
        3434, _port, doc="TCP port to listen on (0: a free one, which port then holds).")
    host: Setting[str] = Setting(
        "0.0.0.0", _server_host, doc="Address to listen on ('0.0.0.0': every IPv4 interface).")
    max_connections: Setting[int] = Setting(
        1000, _positive_int, live=True,
        doc="Most clients at once: a connection past it is closed at once "
            "(on_error(None, ..., SERVER_FULL)). Capped at SELECT_MAX_CONNECTIONS (500) "
            "where the selector is select() (Windows).")
    thread_pool_size: Setting[int] = Setting(
        4, _positive_int,
        doc="Worker threads running on_handle_command (one connection's frames run one "
            "at a time, in order).")
    reuse_port: Setting[bool] = Setting(
        False, _boolean,
        doc="Also set SO_REUSEPORT (where the platform has none, start() raises "
            "MorsockError).")
    idle_timeout: Setting[float | None] = Setting(
        None, _optional_seconds, live=True,
        doc="Seconds a client may send nothing before it is closed (TIMEOUT); None: never.")
    backlog: Setting[int] = Setting(
        4096, _positive_int, doc="listen() backlog: connections the kernel holds until "
                                 "they are accepted.")
    backplane: Setting[Backplane | None] = Setting(
        None, _backplane, doc="A cluster backplane (morsock.cluster.RedisBackplane): "
                              "broadcasts, send_to and counts then cover every server "
                              "of the cluster (docs/guide/cluster.rst).")
    resume_window: Setting[float] = Setting(
        0.0, _non_negative_seconds,
        doc="Seconds a dropped session stays resumable (0: no sessions): a resumable "
            "client that reconnects within it gets every message exactly once, in order "
            "(docs/guide/sessions.rst).")

    _PLAIN_FRAMES_AS_BYTES = True
    _EVENTS = ("on_handle_command", "on_connect", "on_disconnect", "on_error",
               "on_state_change", "on_data_sent", "on_data_received")

    on_handle_command: Callable[[Server, ServerClient, bytes], Data | None] | None
    on_connect: Callable[[Server, ServerClient], Any] | None
    on_disconnect: Callable[[Server, ServerClient], Any] | None
    on_error: Callable[[Server, ServerClient | None, str, int], Any] | None
    on_state_change: Callable[[Server, ServerState, ServerState], Any] | None
    on_data_sent: Callable[[Server, ServerClient, int], Any] | None
    on_data_received: Callable[[Server, ServerClient, int], Any] | None

    def __init__(self, port: int = 3434, host: str = "0.0.0.0", *,
                 max_connections: int = 1000, thread_pool_size: int = 4,
                 connection_timeout: float = 10, events_use_main_thread: bool = False,
                 event_queue: EventQueue | None = None, encryption_key: str = "",
                 encryption_mode: AESMode | str = AESMode.CBC,
                 encryption_key_size: KeySize | int = KeySize.AES256,
                 encryption_profile: EncryptionProfile | str = EncryptionProfile.AUTHENTICATED,
                 require_encryption: bool = False, keep_alive: bool = True,
                 no_delay: bool = True, keepalive_idle: int = 10,
                 keepalive_interval: int = 5, keepalive_count: int = 3,
                 reuse_port: bool = False,
                 max_message_size: int = 16 * 1024 * 1024,
                 max_send_buffer: int = 8 * 1024 * 1024,
                 max_receive_backlog: int = 1024 * 1024,
                 idle_timeout: float | None = None, backlog: int = 4096,
                 resume_window: float = 0.0,
                 ssl_context: Any = None, logger: logging.Logger | None = None,
                 backplane: Backplane | None = None, **events: Any) -> None:
        self._state = ServerState.DISCONNECTED
        settings = dict(locals())
        for name in ("self", "events", "__class__"):
            settings.pop(name, None)
        self._life_lock = threading.RLock()
        #: Re-entrant lock over the client set: holding it freezes ``clients``.
        self.property_lock = threading.RLock()
        self._no_clients = threading.Condition(self.property_lock)  # notified when empty
        self._clients: dict[int, ServerClient] = {}
        self._handles = itertools.count(1)
        self._tls_pending: set[TLSHandshake] = set()  # reactor thread only
        self._listener: socket.socket | None = None
        self._started_mono = 0.0
        self._sweep_timer: Any = None
        self._zero_stats()
        self._tally = Tally(self.property_lock, self._live_connection_iter)
        #: The flag of the encrypted frames this server takes (-1: none, no key).
        self._sealed_flag = -1
        self._sessions: ServerSessions | None = None  # while running with resume_window
        super().__init__(settings, events)

    # -- life cycle --------------------------------------------------------------------
    def _is_running(self) -> bool:
        return self._state is not ServerState.DISCONNECTED

    @property
    def state(self) -> ServerState:
        """DISCONNECTED, STARTING, LISTENING or STOPPING."""
        return self._state

    @property
    def active(self) -> bool:
        """True while listening; assigning True/False starts/stops the server."""
        return self._state is ServerState.LISTENING

    @active.setter
    def active(self, value: bool) -> None:
        if value:
            self.start()
        else:
            self.stop()

    def _set_state(self, new: ServerState) -> None:
        old, self._state = self._state, new
        if old is not new:
            self._emit("on_state_change", old, new)

    def start(self) -> None:
        """Bind, listen and start the threads; returns once listening.

        With ``port=0`` a free port is chosen and ``port`` then holds it. Raises
        MorsockError (and fires ``on_error(None, ..., BIND_FAILED)``) if the address
        cannot be bound. No effect if already listening.
        """
        with self._life_lock:
            if self._state is ServerState.LISTENING:
                return
            if self._state is not ServerState.DISCONNECTED:
                raise MorsockError(f"cannot start a server that is {self._state.name}")
            try:
                self._prepare_runtime(f"morsock-server-{self.port}", self.thread_pool_size,
                                      leader_follower=True)
                ctx = self._crypto
                assert ctx is not None
                self._sealed_flag = (FLAG_MORMOT if ctx.mormot is not None else
                                     FLAG_AUTHENTICATED if ctx.authenticated else -1)
                self._sessions = ServerSessions(self) if self.resume_window > 0 else None
                # after _prepare_runtime: its dispatcher honours events_use_main_thread
                self._set_state(ServerState.STARTING)
                listener = self._bind()
            except Exception as exc:
                if self._reactor is not None:
                    self._reactor.stop()  # never started: releases its selector and wake-up pair
                self._set_state(ServerState.DISCONNECTED)
                if isinstance(exc, OSError):
                    message = f"cannot listen on {self.host}:{self.port}: {exc}"
                    self._report(None, message, ErrorCode.BIND_FAILED)
                    raise MorsockError(message, ErrorCode.BIND_FAILED) from exc
                raise
            self._listener = listener
            self.__dict__["_setting_port"] = listener.getsockname()[1]
            self._pool.start()
            self._reactor.call_soon(self._reactor.register, listener, EVENT_READ, self._on_accept)
            self._started_mono = time.monotonic()
            self._log.info("server listening on %s:%d (%s)", self.host, self.port,
                           self.encryption_info)
            self._connection_limit()  # warns now if max_connections is capped here
            self._set_state(ServerState.LISTENING)
            if self.backplane is not None:
                try:
                    self.backplane.attach(self)
                except BaseException:
                    self._stop(None)
                    raise

    def _bind(self) -> socket.socket:
        infos = socket.getaddrinfo(self.host or None, self.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, socktype, proto, _, address = infos[0]
        sock = socket.socket(family, socktype, proto)
        try:
            if _REUSE_ADDRESS:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            elif hasattr(socket, "SO_EXCLUSIVEADDRUSE"):  # pragma: no cover - Windows
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
            if self.reuse_port:
                if not hasattr(socket, "SO_REUSEPORT"):
                    raise OSError(errno.ENOPROTOOPT, "SO_REUSEPORT is not supported here")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            sock.listen(self.backlog)
            sock.setblocking(False)
            if OPTIONS_INHERITED:  # the accepted sockets inherit the options
                self._configure(sock)
        except BaseException:
            sock.close()
            raise
        return sock

    def stop(self) -> None:
        """Close every client (each gets ``on_disconnect``), stop listening, join all
        threads and release every socket. No effect if already stopped.

        Called from one of this server's own threads (a handler), the stop runs on a
        helper thread and this call returns at once; it stops the run it was asked from
        (not one the application started after stopping this one), and does nothing if
        a stop is under way.
        """
        run = self._own_run()
        if run is not None:
            # Checked before the lock: a stop under way holds it while it joins this
            # thread, so waiting for it here would hold that stop up (until its join
            # timed out).
            if self._state is not ServerState.STOPPING:
                threading.Thread(target=self._stop, args=(run,),
                                 name="morsock-server-stop").start()
            return
        self._stop(None)

    def _stop(self, run: WorkerPool | None) -> None:
        """stop() outside the server's threads; *run*: only if the pool of the run is this
        (the helper of a stop asked from a handler), else whatever runs."""
        with self._life_lock:
            if self._state is ServerState.DISCONNECTED:
                return
            if run is not None and run is not self._pool:
                return  # stopped (and started again) since the handler asked
            if self._state is ServerState.STOPPING:
                return
            self._set_state(ServerState.STOPPING)
            sessions = self._sessions
            if sessions is not None:  # "going away": clients move on, nothing acknowledged is lost
                sessions.going_away(min(self.connection_timeout, 2.0))
            closed = threading.Event()
            self._reactor.call_soon(self._close_everything, closed)
            if not closed.wait(30):
                self._log.error("server: sockets not closed within 30 s")
            if sessions is not None:
                sessions.shutdown()
            self._await_closes()
            if self.backplane is not None:
                self.backplane.detach(self)  # reports what it could not send: pool still up
            self._pool.shutdown()
            self._reactor.close()
            self._listener = None
            self._log.info("server on port %d stopped", self.port)
            self._set_state(ServerState.DISCONNECTED)

    def _await_closes(self, timeout: float = 30.0) -> None:
        """Wait (stopping thread) until every client's socket is closed and its
        on_disconnect queued: a close that another thread began just before
        _close_everything (e.g. from a worker still inside an on_error handler) queues its
        _finish_close on the reactor later, and the pool must still be running then."""
        with self._no_clients:
            if not self._no_clients.wait_for(lambda: not self._clients, timeout):
                self._log.error("server: %d client(s) not closed within %.0f s",
                                len(self._clients), timeout)

    def _close_everything(self, done: threading.Event) -> None:
        try:
            if self._sweep_timer is not None:
                self._sweep_timer.cancel()
                self._sweep_timer = None
            if self._listener is not None:
                self._reactor.unregister(self._listener)
                self._listener.close()
            for handshake in list(self._tls_pending):
                handshake.abort()
            self._tls_pending.clear()
            for client in list(self._clients.values()):
                client.disconnect()
        finally:
            done.set()

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- limits and live connections ----------------------------------------------------
    _cap_warned = False  # the SELECT_MAX_CONNECTIONS warning was logged (once per server)

    def _connection_limit(self) -> int:
        """``max_connections``, capped at :data:`SELECT_MAX_CONNECTIONS` where the selector
        is ``select()`` (a warning is logged the first time the cap applies)."""
        limit = self.max_connections
        if limit <= SELECT_MAX_CONNECTIONS or not _select_limited():
            return limit
        if not self._cap_warned:
            self._cap_warned = True
            self._log.warning("max_connections=%d capped at %d: this platform's selector is "
                              "select(), which watches at most 512 sockets", limit,
                              SELECT_MAX_CONNECTIONS)
        return SELECT_MAX_CONNECTIONS

    def _live_connection_iter(self) -> Iterator[Connection]:
        """The live connections (under ``property_lock``, for the tally)."""
        return (client._conn for client in self._clients.values())

    def _live_connections(self) -> list[Connection]:
        with self.property_lock:
            return list(self._live_connection_iter())

    # -- events and statistics -----------------------------------------------------------
    def _handler_failed(self, name: str, exc: BaseException, args: tuple[Any, ...] = ()) -> None:
        """Report ``on_error(client, ..., HANDLER_EXCEPTION)``; *client* is the event's
        first argument when that is a client (on_connect, on_handle_command ...), else None."""
        conn = args[0] if args and isinstance(args[0], ServerClient) else None
        observer = self._observer
        if observer is not None:
            observer.error(ErrorCode.HANDLER_EXCEPTION)
        self._log.error("%s handler raised %s: %s", name, type(exc).__name__, exc, exc_info=exc)
        self._emit("on_error", conn, f"{name} handler raised {type(exc).__name__}: {exc}",
                   ErrorCode.HANDLER_EXCEPTION)

    def _report(self, conn: Connection | None, message: str, code: int) -> None:
        """Log an error and fire ``on_error``: for a client, in that client's order (after
        its on_connect, never beside its handlers, before its on_disconnect; once its
        on_disconnect is under way, with None for the client). Any thread."""
        observer = self._observer
        if observer is not None:
            observer.error(code)
        self._log.error("%s (code %d)", message, code)
        if conn is None or not conn.post_in_order(ErrorReport(message, code)):
            client = None if conn is None else conn.facade
            if conn is not None and conn.closed and conn.runner != get_ident():
                client = None  # its on_disconnect is queued or done: not tied to it any more
            self._emit("on_error", client, message, code)

    def _send_on(self, conn: Connection, data: Data, encrypted: bool) -> None:
        sessions = self._sessions
        if sessions is not None and sessions.send(conn, data, encrypted):
            return  # a session's: kept until acknowledged
        super()._send_on(conn, data, encrypted)

    def _send_raw(self, conn: Connection, data: Data, encrypted: bool) -> None:
        """Send as a server without sessions does (a session-less connection)."""
        super()._send_on(conn, data, encrypted)

    def _zero_stats(self) -> None:
        self._total_connections = 0
        self._total_rejected = 0

    def _emit_data_event(self, name: str, conn: Connection, nbytes: int) -> None:
        self._emit(name, conn.facade, nbytes)

    @property
    def client_count(self) -> int:
        """Clients connected right now."""
        return len(self._clients)

    @property
    def total_active_connections(self) -> int:
        """Same as :attr:`client_count` (the Delphi name)."""
        return len(self._clients)

    @property
    def total_connections(self) -> int:
        """Connections accepted since start (or :meth:`clear_statistics`), rejected ones
        excluded."""
        return self._total_connections

    @property
    def total_rejected_connections(self) -> int:
        """Connections closed at once because of ``max_connections``."""
        return self._total_rejected

    @property
    def total_bytes_received(self) -> int:
        """Wire bytes received from all clients (headers included; over TLS, the
        application bytes that came out of the TLS layer, record overhead excluded)."""
        return self._tally.total(0)

    @property
    def total_bytes_sent(self) -> int:
        """Wire bytes sent to all clients (headers included; over TLS, the application
        bytes handed to the TLS layer, record overhead excluded)."""
        return self._tally.total(1)

    @property
    def total_messages_received(self) -> int:
        """Frames received from all clients."""
        return self._tally.total(2)

    @property
    def total_messages_sent(self) -> int:
        """Frames sent to all clients."""
        return self._tally.total(3)

    @property
    def up_time(self) -> int:
        """Whole seconds since the server started listening (0 when stopped)."""
        if self._state is not ServerState.LISTENING:
            return 0
        return int(time.monotonic() - self._started_mono)

    def clear_statistics(self) -> None:
        """Zero the totals (live clients and their own counters are kept)."""
        with self._stats_lock:
            self._zero_stats()
        self._tally.clear()

    def get_server_info(self) -> str:
        """A short multi-line report of state, address, clients and totals."""
        return "\n".join([
            f"State: {self._state.name}",
            f"Address: {self.host}:{self.port}",
            f"Clients: {self.client_count} (max {self.max_connections})",
            f"Total connections: {self.total_connections} "
            f"(rejected {self.total_rejected_connections})",
            f"Messages: {self.total_messages_received} received, {self.total_messages_sent} sent",
            f"Bytes: {self.total_bytes_received} received, {self.total_bytes_sent} sent",
            f"Encryption: {self.encryption_info}",
            f"Threads: {self.thread_pool_size} workers",
            f"Up time: {self.up_time} s",
        ])

    # -- clients ---------------------------------------------------------------------------
    @property
    def clients(self) -> dict[int, ServerClient]:
        """A snapshot ``{handle: ServerClient}`` of the connected clients."""
        with self.property_lock:
            return dict(self._clients)

    def find_client(self, handle: int) -> ServerClient | None:
        """The client with that handle, or None."""
        return self._clients.get(handle)

    def find_client_by_ip(self, ip: str) -> ServerClient | None:
        """The first (lowest handle) client connected from *ip*, or None."""
        with self.property_lock:
            for client in self._clients.values():
                if client.peer_ip == ip:
                    return client
        return None

    def disconnect_client(self, client: int | str | ServerClient) -> bool:
        """Disconnect a client given by handle, object or ``client_id`` (a client of any
        node of the cluster: True once routed to its node); False if not connected."""
        if isinstance(client, str) and ":" in client:
            node, handle = split_client_id(client)
            if node != self.node_id:
                bp = self.backplane
                return bp is not None and bp.route_disconnect(node, handle)
            client = handle
        if not isinstance(client, ServerClient):
            found = self.find_client(int(client))
            if found is None:
                return False
            client = found
        return client.disconnect()

    def disconnect_all_clients(self) -> int:
        """Disconnect every client; return how many were disconnected."""
        return sum(1 for client in self.clients.values() if client.disconnect())

    def broadcast_data(self, data: Data, encrypted: bool = False) -> int:
        """Queue *data* for every connected client; return for how many it was queued.

        A client whose send queue is full is skipped and reported
        (``on_error(client, ..., SEND_BUFFER_FULL)``), as is one that cannot take an
        encrypted frame; the others still get the message. With a ``backplane``, the
        other nodes' clients get it too (the count is this server's clients).
        """
        bp = self.backplane
        if bp is None or self._state is not ServerState.LISTENING:
            return self._broadcast_local(data, encrypted)
        payload = as_bytes(data)
        self._check_cluster_payload(payload, encrypted)
        bp.publish_broadcast(payload, encrypted)  # first: the other nodes start at once
        return self._broadcast_local(payload, encrypted)

    # -- cluster (docs/guide/cluster.rst) ---------------------------------------------------------
    @property
    def node_id(self) -> str:
        """This server's node id: its backplane's, else one of its own (random)."""
        if self.backplane is not None:
            return self.backplane.node_id
        own: str | None = self.__dict__.get("_own_node_id")
        if own is None:
            own = self.__dict__.setdefault("_own_node_id", uuid.uuid4().hex[:12])
        return own

    @property
    def cluster_client_count(self) -> int:
        """Clients of every node of the cluster (``client_count`` without a backplane)."""
        bp = self.backplane
        local = len(self._clients)
        return local if bp is None or not self.active else bp.cluster_client_count(local)

    @property
    def cluster_nodes(self) -> list[str]:
        """Ids of the live nodes of the cluster, this one included, sorted."""
        bp = self.backplane
        return [self.node_id] if bp is None or not self.active else bp.cluster_nodes()

    def send_to(self, client_id: str, data: Data, encrypted: bool = False) -> bool:
        """Send one message to the client named *client_id* on any node of the cluster.

        True if it was queued for a client of this server, or routed to the live node
        that holds the client (that node reports a client gone meanwhile back here:
        ``on_error(..., CLUSTER_UNDELIVERED)``); False if no such client or node. Raises
        ValueError for a malformed id; for a client of this server, what
        :meth:`ServerClient.send_data` raises, NotConnectedError excepted.
        """
        node, handle = split_client_id(client_id)
        if node == self.node_id:
            client = self.find_client(handle)
            if client is None:
                return False
            try:
                client.send_data(data, encrypted)
            except NotConnectedError:
                return False
            return True
        bp = self.backplane
        if bp is None or not self.active:
            return False
        payload = as_bytes(data)
        self._check_cluster_payload(payload, encrypted)
        return bp.route_send(node, handle, payload, encrypted)

    def _check_cluster_payload(self, payload: bytes, encrypted: bool) -> None:
        """What the other nodes would refuse, refused here, before anything is sent."""
        self._check_size(payload, encrypted)
        if encrypted and not (self._crypto and self._crypto.enabled):
            raise CryptoError("encrypted=True but no encryption_key is set",
                              ErrorCode.ENCRYPTION_REQUIRED)

    def _broadcast_local(self, data: Data, encrypted: bool) -> int:
        """broadcast_data to this server's own clients (also for the backplane's
        reader, which delivers the other nodes' broadcasts here)."""
        payload = as_bytes(data)
        self._check_size(payload, encrypted)
        count = 0
        for client in self.clients.values():
            try:
                self._send_on(client._conn, payload, encrypted)
            except NotConnectedError:
                continue
            except (SendBufferFullError, CryptoError) as exc:
                if isinstance(exc, CryptoError) and not (self._crypto and self._crypto.enabled):
                    raise
                self._report(client._conn, f"broadcast to {client._conn.describe()} skipped: {exc}",
                             exc.code or ErrorCode.SEND_BUFFER_FULL)
                continue
            count += 1
        return count
