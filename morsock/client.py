"""The client component (Delphi ``TmMClient``): connect, send, request, auto-reconnect.

:class:`Client` is a facade over the pure life-cycle machine of
:mod:`morsock._client_state`: its methods feed the machine events on the reactor thread,
and the reactor thread runs the actions the machine returns
(:class:`~morsock._client_actions.ClientActions`: sockets through
:class:`~morsock._dialer.Dialer`, the connection through
:class:`~morsock.connection.Connection`, events on the client's strand).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from . import _client_state as life
from ._client_actions import ClientActions, ConnectOutcome
from ._component import Data, Tally, as_bytes
from ._dialer import Dialer
from ._replies import LATE, ReplyOrder
from ._session_client import ClientLink
from ._session_link import is_session_item
from ._settings import (
    Setting,
    _boolean,
    _client_host,
    _enum,
    _non_negative_int,
    _optional_name,
    _port,
    _positive_int,
    check_timeout,
)
from .connection import CONNECTED, DISCONNECTED, Connection
from .enums import AESMode, ClientState, EncryptionProfile, ErrorCode, KeySize, ReconnectStrategy
from .errors import ConnectError, MorsockError, NotConnectedError
from .events import EventQueue
from .protocol import FLAG_PLAIN, Frame
from .workers import Strand, WorkerPool, each

if TYPE_CHECKING:
    from ._session_link import Unacknowledged

__all__ = ["Client"]


class _BoundStrand:
    """Adapter that tags a connection's items with it on the client's single strand, so
    every event of a client -- whatever the connection -- runs in one total order."""

    __slots__ = ("_strand", "_conn")

    def __init__(self, strand: Strand, conn: Connection) -> None:
        self._strand = strand
        self._conn = conn

    def post(self, item: Any) -> None:
        self._strand.post((self._conn, item))

    def is_idle(self) -> bool:
        return False  # shared by every connection of the client: keep the strand's order

    def post_many(self, items: list[Any], polled: bool = False) -> None:
        conn = self._conn
        self._strand.post_many([(conn, item) for item in items])


class Client(ClientActions):
    """A connecting TCP component with auto-reconnect (Delphi ``TmMClient``).

    Methods for the caller: :meth:`connect` / :meth:`disconnect` (or ``active``, or
    ``with Client(...)``), :meth:`reconnect`, :meth:`send_data`, :meth:`request`,
    :meth:`reset_reconnection_state`, :meth:`clear_statistics`.

    Events you may assign (``sender`` is the client): ``on_connect(sender)``,
    ``on_disconnect(sender)``, ``on_handle_command(sender, data) -> bytes | None``,
    ``on_error(sender, message, code)`` (a positive code is a reconnection attempt number),
    ``on_state_change(sender, old, new)``, ``on_data_sent(sender, n)``,
    ``on_data_received(sender, n)``. All of a client's events run in one order, on its
    worker thread (or, with ``events_use_main_thread``, wherever its queue is pumped).
    Each is also a constructor keyword.

    Settings -- constructor arguments, and attributes settable while disconnected (the
    ``auto_reconnect`` and ``reconnect_*`` ones, ``connection_timeout``,
    ``require_encryption`` and ``max_send_buffer`` at any time; ``help()`` on each tells
    its meaning). "Disconnected" is the state, also after a failed :meth:`connect` or a
    drop, while the threads still run: the address, socket and TLS settings are read by
    the next attempt (they may change while retries are scheduled, e.g. to fail over to
    another ``host``); changing the others (encryption, events, logger) first releases
    the idle threads as :meth:`disconnect` does -- refused (MorsockError) while retries
    are scheduled or from the client's own threads. The settings: ``host``, ``port``,
    ``connection_timeout``, ``auto_reconnect``, ``reconnect_strategy``,
    ``reconnect_interval``, ``reconnect_max_attempts``, ``reconnect_max_interval``,
    ``keep_alive``, ``keepalive_idle``, ``keepalive_interval``, ``keepalive_count``,
    ``no_delay``, ``max_message_size``, ``max_send_buffer``, ``encryption_key``,
    ``encryption_mode``, ``encryption_key_size``, ``encryption_profile``,
    ``require_encryption``, ``ssl_context``, ``server_hostname``, ``resumable``,
    ``send_data_replies`` (live), ``events_use_main_thread``, ``event_queue``, ``logger``.

    Read-only: ``state``, ``active``, ``connected``, ``connected_time``,
    ``reconnect_attempts``, ``remote_ip``, ``total_bytes_received``, ``total_bytes_sent``,
    ``messages_received``, ``messages_sent``, ``encryption_info``.

    Keep-alive (``keep_alive``, ``keepalive_idle=10``, ``keepalive_interval=5``,
    ``keepalive_count=3``, seconds / probes) detects a dead server within about
    idle + interval * count seconds (``on_error(..., TIMEOUT)``, then ``on_disconnect``
    and, with ``auto_reconnect``, a reconnection): see
    :func:`morsock.connection.configure_socket`.

    Reconnection (``auto_reconnect=True``): a failed :meth:`connect`, a failed retry, or a
    drop of an established connection for any reason other than :meth:`disconnect`
    (refused, timed out, reset, name lookup failed, AUTHENTICATED/TLS handshake failed,
    peer closed, a send failed) schedules the next attempt. Around every attempt the
    events run in this order: ``on_state_change(DISCONNECTED, CONNECTING)``, then either
    ``on_state_change(CONNECTING, CONNECTED)`` and ``on_connect``, or
    ``on_state_change(CONNECTING, DISCONNECTED)`` and ``on_error(message, n)`` (``n`` =
    attempt number; ``CONNECTION_FAILED`` for :meth:`connect` itself), followed once by
    ``on_error(..., MAX_RECONNECT_ATTEMPTS)`` when ``n`` reaches
    ``reconnect_max_attempts``. A drop fires ``on_state_change(CONNECTED, DISCONNECTED)``
    then ``on_disconnect``; :meth:`disconnect` fires ``on_state_change(CONNECTED,
    DISCONNECTING)``, then -- once the queue drained (or ``on_error(..., TIMEOUT)`` said
    what it dropped) and the socket is closed -- ``on_state_change(DISCONNECTING,
    DISCONNECTED)`` and ``on_disconnect``. The ``reconnect_*`` settings may change at any
    time and apply to the next delay.

    Threads: :meth:`connect` starts a reactor thread and a worker thread (plus a short-lived
    resolver thread per attempt when ``host`` is a name, not an IP address). They live until
    :meth:`disconnect` -- also after the retries gave up (``MAX_RECONNECT_ATTEMPTS``), so
    the client can still be reconnected; call :meth:`disconnect` (or leave the ``with``
    block) to release every thread and socket. The life-cycle state (the machine, the
    connection, the timers, the attempt's socket) is written by the reactor thread only;
    the application's threads hand it their calls (``call_soon``) and wait for the answer.
    """

    host: Setting[str] = Setting("localhost", _client_host, doc="Server address (name or IP).")
    port: Setting[int] = Setting(3434, _port, doc="Server port.")
    auto_reconnect: Setting[bool] = Setting(
        False, _boolean, live=True,
        doc="Retry after a failed connect() and after a drop (for any reason but "
            "disconnect()), as reconnect_strategy says.")
    reconnect_strategy: Setting[ReconnectStrategy] = Setting(
        ReconnectStrategy.BACKOFF, _enum(ReconnectStrategy.parse), live=True,
        doc="Delay before attempt n: NONE (no retry), IMMEDIATE (100 ms), FIXED_INTERVAL "
            "(reconnect_interval), BACKOFF (reconnect_interval * 2 ** (n - 1), +-20% "
            "jitter, at most reconnect_max_interval).")
    reconnect_interval: Setting[int] = Setting(
        5000, _positive_int, live=True,
        doc="Milliseconds: the FIXED_INTERVAL delay and the first BACKOFF delay.")
    reconnect_max_attempts: Setting[int] = Setting(
        10, _non_negative_int, live=True,
        doc="Failed attempts before giving up (on_error(..., MAX_RECONNECT_ATTEMPTS)); "
            "0: unlimited.")
    reconnect_max_interval: Setting[int] = Setting(
        30000, _positive_int, live=True, doc="Milliseconds: the longest BACKOFF delay.")
    server_hostname: Setting[str | None] = Setting(
        None, _optional_name, doc="Name the server's TLS certificate must match (None: host).")
    resumable: Setting[bool] = Setting(
        False, _boolean,
        doc="Ask for a session on connect (a morsock server with resume_window > 0): "
            "acknowledged delivery, exactly once and in order across dropped "
            "connections; send_data queues while disconnected (docs/guide/sessions.rst).")
    send_data_replies: Setting[bool] = Setting(
        False, _boolean, live=True,
        doc="The server answers messages sent with send_data (an echo server; the Delphi "
            "components' handler returns a reply per command): each answer then goes to "
            "on_handle_command and is never taken for a request's reply; a request waits "
            "for the answers owed before it (docs/guide/requests.rst). Without sessions.")

    _EVENTS = ("on_handle_command", "on_connect", "on_disconnect", "on_error",
               "on_state_change", "on_data_sent", "on_data_received")

    on_handle_command: Callable[[Client, bytes], Data | None] | None
    on_connect: Callable[[Client], Any] | None
    on_disconnect: Callable[[Client], Any] | None
    on_error: Callable[[Client, str, int], Any] | None
    on_state_change: Callable[[Client, ClientState, ClientState], Any] | None
    on_data_sent: Callable[[Client, int], Any] | None
    on_data_received: Callable[[Client, int], Any] | None

    def __init__(self, host: str = "localhost", port: int = 3434, *,
                 connection_timeout: float = 10, auto_reconnect: bool = False,
                 reconnect_strategy: ReconnectStrategy | str = ReconnectStrategy.BACKOFF,
                 reconnect_interval: int = 5000, reconnect_max_attempts: int = 10,
                 reconnect_max_interval: int = 30000, events_use_main_thread: bool = False,
                 event_queue: EventQueue | None = None, encryption_key: str = "",
                 encryption_mode: AESMode | str = AESMode.CBC,
                 encryption_key_size: KeySize | int = KeySize.AES256,
                 encryption_profile: EncryptionProfile | str = EncryptionProfile.AUTHENTICATED,
                 require_encryption: bool = False, keep_alive: bool = True,
                 no_delay: bool = True, keepalive_idle: int = 10,
                 keepalive_interval: int = 5, keepalive_count: int = 3,
                 max_message_size: int = 16 * 1024 * 1024,
                 max_send_buffer: int = 8 * 1024 * 1024,
                 max_receive_backlog: int = 1024 * 1024, ssl_context: Any = None,
                 server_hostname: str | None = None, resumable: bool = False,
                 send_data_replies: bool = False,
                 logger: logging.Logger | None = None, **events: Any) -> None:
        settings = dict(locals())
        for name in ("self", "events", "__class__"):
            settings.pop(name, None)
        #: The life cycle (reactor thread; see the class docstring).
        self._machine = life.ClientLifecycle(self)
        #: Serialises connect(), disconnect() and reconnect() (the application's threads).
        self._life_lock = threading.RLock()
        self._replies = ReplyOrder()  # request() matching (see morsock._replies)
        self._session_link: ClientLink | None = None  # resumable: made by the first use
        self._link_lock = threading.Lock()
        #: the connection an encrypted frame was last sent on, with the frames it had
        #: received by then; the one an encrypted frame was last received on (_reset_hint)
        self._sealed_out: tuple[Connection, int] | None = None
        self._sealed_in: Connection | None = None
        # Written under _life_lock, as a run starts and after it stopped:
        self._strand: Strand | None = None
        self._dialer: Dialer | None = None
        #: True while disconnect() shuts the threads down (it holds _life_lock meanwhile)
        self._stopping = False
        super().__init__(settings, events)
        self._tally = Tally(self._stats_lock, lambda: self._live_conns)

    # -- life cycle: the caller's side ---------------------------------------------------
    def _is_running(self) -> bool:
        return self._reactor is not None

    #: Settings each connection attempt reads afresh (address, socket options, TLS, the
    #: decoder's limit): assignable whenever the state is DISCONNECTED.
    _PER_ATTEMPT = frozenset({"host", "port", "ssl_context", "server_hostname", "keep_alive",
                              "no_delay", "keepalive_idle", "keepalive_interval",
                              "keepalive_count", "max_message_size"})

    def _before_change(self, name: str) -> None:
        """A setting is assigned while the threads run (see the class docstring: settable
        in the DISCONNECTED state). Caller's thread; raises MorsockError when refused."""
        state = self._machine.state
        if state is not ClientState.DISCONNECTED:
            raise MorsockError(f"Client.{name} cannot change while "
                               f"{state.name.lower()}; disconnect() first")
        if name in self._PER_ATTEMPT:
            return
        # The others are built into the threads' state (cipher context, event dispatcher):
        # release the idle threads first, as disconnect() would.
        if self._machine.retry_scheduled:
            raise MorsockError(f"Client.{name} cannot change while retries are scheduled "
                               f"(auto_reconnect); disconnect() first")
        if self._own_run() is not None:
            raise MorsockError(f"Client.{name} cannot change from a handler while the "
                               f"client's threads run; disconnect() first")
        self.disconnect()

    @property
    def state(self) -> ClientState:
        """DISCONNECTED, CONNECTING, CONNECTED or DISCONNECTING."""
        return self._machine.state

    @property
    def connected(self) -> bool:
        """True while a connection is established: False as soon as it starts closing
        (when :meth:`send_data` would raise NotConnectedError), before ``state`` changes."""
        conn = self._conn
        return (self._machine.state is ClientState.CONNECTED and conn is not None
                and not conn.closing)

    @property
    def active(self) -> bool:
        """True while connected; assigning True/False connects/disconnects."""
        return self._machine.state is ClientState.CONNECTED

    @active.setter
    def active(self, value: bool) -> None:
        if value:
            self.connect()
        else:
            self.disconnect()

    def connect(self) -> None:
        """Connect; block until connected.

        Raises ConnectError (after firing ``on_error(..., CONNECTION_FAILED)``) when the
        server refuses, cannot be reached, or does not answer within
        ``connection_timeout`` seconds; with ``ssl_context``, when the TLS handshake fails
        (code and ``on_error`` code ``TLS_FAILED``; the server's certificate is checked
        against ``server_hostname``, default ``host``). With ``auto_reconnect`` the
        numbered retries then go on in the background. No effect if already connected.
        While retries run, connect() takes over: the scheduled retry is cancelled, the
        attempt count restarts at 0, and a failure schedules retry 1 again. A connect()
        while another one's attempt is in progress waits for that attempt's outcome.
        """
        self._acquire_life()
        try:
            if self._machine.state is ClientState.CONNECTED:
                return
            self._link()
            if not self._is_running():
                self._start_run()
            outcome = ConnectOutcome()
            self._reactor.call_soon(self._request_connect, outcome)
        finally:
            self._life_lock.release()
        if not outcome.done.wait(self.connection_timeout + 5):
            raise ConnectError(f"connect to {self.host}:{self.port} did not finish")
        error = outcome.error
        if error is None:
            return
        if isinstance(error, ConnectError):
            raise error
        if isinstance(error, MorsockError):
            raise life.connect_error(error) from error
        raise ConnectError(f"cannot connect to {self.host}:{self.port}: {error}") from error

    def _start_run(self) -> None:
        """Under _life_lock: build and start the reactor, the worker and the dialer."""
        name = f"morsock-client-{self.host}:{self.port}"
        self._prepare_runtime(name, 1)
        self._timers.clear()  # of the last run's reactor, if any
        self._strand = self._pool.strand(each(self._run_pair, self._log))
        self._dialer = Dialer(self._reactor, self._feed, self._configure, name)
        self._pool.start()
        self._reactor.start()

    def disconnect(self) -> None:
        """Close the connection, stop any reconnection at once, join the threads.

        What is queued drains first, for at most ``connection_timeout`` seconds (what did
        not leave is reported: ``on_error(..., TIMEOUT)``). Pending requests raise
        NotConnectedError. Never triggers a reconnection. Called from one of the client's
        own threads (a handler), it completes on a helper thread. Releases every thread
        and socket of the client; a name lookup still running on a resolver thread is
        waited for (at most ``connection_timeout`` seconds).
        """
        run = self._own_run()
        if run is not None:
            # Checked before the lock: a disconnect() under way holds it while it joins
            # this thread. The helper finishes the run it was asked from, not one the
            # application began after this one ended.
            self._reactor.call_soon(self._feed, life.Disconnect())
            if not self._stopping:
                threading.Thread(target=self._disconnect, args=(run,),
                                 name="morsock-client-stop").start()
            return
        self._disconnect(None)

    def _disconnect(self, run: WorkerPool | None) -> None:
        """disconnect() outside the client's threads; *run*: only if the pool of the run
        is this (the helper of a disconnect() asked from a handler)."""
        with self._life_lock:
            reactor, pool = self._reactor, self._pool
            if run is not None and run is not pool:
                return  # that run is over since the handler asked
            if self._session_link is not None and run is None:
                self._session_link.leave(min(self.connection_timeout, 2.0))
            if reactor is None:
                return
            self._stopping = True
            try:
                stopped = threading.Event()
                reactor.call_soon(self._request_stop, stopped)
                bound = 30.0 + self.connection_timeout  # the drain, and a margin
                if not stopped.wait(bound):
                    self._log.error("client: connection not closed within %g s", bound)
                pool.shutdown()
                if self._session_link is not None:
                    self._session_link.cancel_timer()
                reactor.stop()
                self._reactor = self._pool = self._strand = None
                dialer, self._dialer = self._dialer, None
                if dialer is not None:
                    dialer.join(self.connection_timeout)
                self._give_up_connection()
            finally:
                self._stopping = False

    def _give_up_connection(self) -> None:
        """After the threads stopped (the thread of disconnect(), the machine's only user
        now): a connection whose close never came is given up."""
        if self._machine.phase is not life.Phase.CLOSING:
            return
        for action in self._machine.handle(life.ConnectionClosed(self._conn_attempt)):
            if isinstance(action, life.ChangeState):
                self._dispatcher.emit("on_state_change", action.old, action.new)
        self._conn = None

    def _acquire_life(self) -> None:
        """Take _life_lock. On one of the client's own threads, raise ConnectError instead
        of waiting while a disconnect() is under way: it holds the lock while it joins
        this very thread, and wins (it "stops retrying at once")."""
        pool = self._pool
        if pool is None or not pool.owns_current_thread():
            self._life_lock.acquire()
            return
        while not self._life_lock.acquire(timeout=0.05):
            if self._stopping:
                raise ConnectError("disconnect() was called")

    def reconnect(self) -> None:
        """Disconnect (if connected) and connect again; raises like :meth:`connect`.

        Also works from one of the client's own handlers (e.g. ``on_error`` after
        ``MAX_RECONNECT_ATTEMPTS``): the threads are then kept, the connection closed, and a
        new one made; the events of both follow once the handler returns.
        """
        self._acquire_life()
        try:
            reactor, pool = self._reactor, self._pool
            own_thread = pool is not None and pool.owns_current_thread()
            if own_thread:
                closed = threading.Event()
                reactor.call_soon(self._request_stop, closed)
        finally:
            self._life_lock.release()
        if not own_thread:
            self.disconnect()
        elif not closed.wait(30):
            self._log.error("client: connection not closed within 30 s")
        self.connect()

    def __enter__(self) -> Client:
        """connect(); if it raises, disconnect() first: the ``with`` statement binds no
        name then, and background retries of an object nobody can reach would never
        stop."""
        try:
            self.connect()
        except BaseException:
            self.disconnect()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.disconnect()

    # -- life cycle: the reactor thread runs the machine ---------------------------------
    # -- the connection ------------------------------------------------------------------
    def _connection_closed(self, conn: Connection) -> None:
        """Reactor thread: the socket of *conn* is closed."""
        if self._session_link is not None:
            self._session_link.connection_lost(conn)
        with self._stats_lock:
            if conn in self._live_conns:
                self._live_conns.remove(conn)
                self._tally.closed(conn)
        current = conn is self._conn
        hint = self._reset_hint(conn) if current else ""
        self._fail_waiters(conn, hint)
        if current:
            self._conn = self._handshake = None
            if hint:
                self._report_ordered(hint, ErrorCode.CONNECTION_LOST)
            error, self._handshake_error = self._handshake_error, None
            if conn.established:
                if self._connected_mono is not None:
                    self._connected_for = time.monotonic() - self._connected_mono
                self._connected_mono = None
                self._log.info("disconnected from %s:%d", self.host, self.port)
            elif error is None:
                error = ConnectError(self._closed_in_handshake(conn))
            self._feed(life.ConnectionClosed(self._conn_attempt, error))
        self._release_stop_waiters()

    # -- strand (worker thread) ----------------------------------------------------------
    def _strand_for(self, conn: Connection) -> Any:
        assert self._strand is not None
        return _BoundStrand(self._strand, conn)

    def _run_pair(self, pair: tuple[Connection | None, Any]) -> None:
        conn, item = pair
        if conn is None:
            name, args = item
            self._dispatcher.emit(name, *args)
        else:
            try:
                conn.run_item(item)
            finally:
                conn.handled(1)  # read back-pressure: the strand caught up this far

    def _run_item(self, conn: Connection, item: Any) -> None:
        if item is CONNECTED:
            self._dispatcher.emit("on_connect")
        elif item is DISCONNECTED:
            if conn.established and self._session_link is None:  # a session's: its end
                self._dispatcher.emit("on_disconnect")
        elif is_session_item(item):
            item.run(conn)
        else:
            self._handle_frame(conn, item)

    def _handle_frame(self, conn: Connection, frame: Frame) -> None:
        data = self._open_frame(conn, frame)
        if data is None:
            return
        if self._debug():
            self._log.debug("%d-byte message from %s (flag %d)", len(data), conn.describe(),
                            frame.flag)
        if frame.flag != FLAG_PLAIN:
            self._sealed_in = conn
        owner = self._replies.deliver(conn, data)
        if owner is True:
            return
        if owner is LATE:
            self._late_reply(data)
        handler = self.on_handle_command
        if self._observer is not None:
            handler = self._observed(handler)
        if handler is None:
            return
        try:
            reply = handler(self, data)
        except Exception as exc:
            self._handler_failed("on_handle_command", exc)
            return
        if reply:
            self._reply(conn, reply, frame.flag != 0)

    def _late_reply(self, data: bytes) -> None:
        """Strand: *data* is the late reply of a request that timed out; it goes on to
        ``on_handle_command`` (noted at DEBUG)."""
        if self._debug():
            self._log.debug("%d-byte late reply to a request that timed out: passed to "
                            "on_handle_command", len(data))

    def _fail_waiters(self, conn: Connection, why: str = "") -> None:
        self._replies.reset(conn, why)

    def _closed_in_handshake(self, conn: Connection) -> str:
        """Why an AUTHENTICATED handshake ended in a close without an answer."""
        how = "reset" if conn._broken else "closed"
        text = (f"{self.host}:{self.port} {how} the connection during the AUTHENTICATED "
                f"handshake without answering it")
        if self.ssl_context is None:
            text += (": a server that uses TLS does this to a client without ssl_context "
                     "(give the client one if the server uses TLS); otherwise the server "
                     "refused the handshake, and its log says why (key, mode, key size or "
                     "profile)")
        return text

    def _reset_hint(self, conn: Connection) -> str:
        """Reactor thread: why the server probably closed an established connection, when
        the way it closed tells: reset after our first frames before sending anything
        (what a TLS server does to a client that does not speak TLS), or closed after our
        encrypted frame without sending anything after it, nor any encrypted frame before
        (what a morsock server does with a frame it cannot decrypt). '' for any other close."""
        if (not conn.established or self._machine.phase is life.Phase.CLOSING
                or conn.close_code is not None):
            return ""
        where = f"{self.host}:{self.port}"
        if (conn._broken and self.ssl_context is None and not conn.messages_received
                and conn.messages_sent):
            return (f"{where} reset the connection after our first message without sending "
                    f"anything: a server that uses TLS does this to a client without "
                    f"ssl_context (give the client one if the server uses TLS)")
        if self._sealed_unanswered(conn):
            return (f"{where} closed the connection after our encrypted message without "
                    f"sending anything back: a morsock server does this with a frame it cannot "
                    f"decrypt. Give both sides the same encryption_key, encryption_mode, "
                    f"encryption_key_size and encryption_profile (this client uses "
                    f"{self.encryption_info}; a morsock server in its default "
                    f"AUTHENTICATED profile refuses MORMOT frames)")
        return ""

    def _sealed_unanswered(self, conn: Connection) -> bool:
        """Reactor thread: whether our last encrypted frame went on *conn* and the peer
        sent nothing after it, nor any encrypted frame before it."""
        sealed = self._sealed_out
        return (sealed is not None and sealed[0] is conn and self._sealed_in is not conn
                and conn.messages_received == sealed[1])

    # -- sending ---------------------------------------------------------------------------
    def _live_connection(self) -> Connection:
        conn = self._conn
        if conn is None or self._machine.state is not ClientState.CONNECTED or conn.closing:
            if conn is not None and conn.closing:  # the state changes once it is closed
                raise NotConnectedError(f"the connection to {conn.describe()} is closing")
            raise NotConnectedError(f"client is not connected ({self._machine.state.name})")
        return conn

    def send_data(self, data: Data, encrypted: bool = False) -> None:
        """Send one message. Thread-safe; never blocks on a slow peer.

        Raises NotConnectedError when not connected, SendBufferFullError past
        ``max_send_buffer``, CryptoError if ``encrypted`` without a key. Resumable: the
        message is kept until the server acknowledges it and queued while disconnected
        (SendBufferFullError past ``max_send_buffer`` of unacknowledged messages).
        """
        link = self._session_link or self._link()
        if link is not None:
            payload = as_bytes(data)
            self._check_size(payload, encrypted)
            link.send(payload, encrypted)
            return
        conn = self._live_connection()
        if self.send_data_replies:
            self._replies.owe(conn, lambda: self._send_on(conn, data, encrypted))
        else:
            self._send_on(conn, data, encrypted)
        if encrypted:
            self._sealed_out = (conn, conn.messages_received)

    def request(self, data: Data, timeout: float = 15.0, encrypted: bool = False) -> bytes:
        """Send *data* and return the frame the server sends back in its place (decrypted).

        Replies are matched by order (docs/guide/requests.rst; resumable: by request id,
        in any order, and pushes are never taken for replies): concurrent requests are
        answered in the order they were sent, and a request never returns another
        request's reply. A request that times out keeps its place: its late reply goes
        to ``on_handle_command``, and a request made meanwhile is sent once the late
        replies are in; if they do not come within its *timeout* (the server skipped a
        reply), the connection is closed (``on_error(..., TIMEOUT)``), as its order is
        lost. While a request waits, its reply does not reach ``on_handle_command``.

        Raises RequestTimeout after *timeout* seconds, NotConnectedError if the
        connection is (or gets) closed, TypeError/ValueError for a *timeout* that is not a
        finite number > 0, and whatever :meth:`send_data` raises (ProtocolError over
        ``max_message_size``), all before anything is sent.

        Not from the client's own threads (its handlers in direct event mode): the reply
        is matched on the thread that would be waiting, so MorsockError is raised at once.
        """
        timeout = check_timeout(timeout)
        if self._own_run() is not None:
            raise MorsockError(
                "request() cannot wait on one of the client's own threads (a handler): "
                "its reply is handled on this thread; use send_data() and take the reply "
                "in on_handle_command, or call request() from another thread")
        link = self._session_link or self._link()
        if link is not None:  # a session matches replies by request id
            payload = as_bytes(data)
            self._check_size(payload, encrypted)
            return link.request(payload, timeout, encrypted)
        conn = self._live_connection()
        payload = as_bytes(data)
        self._check_size(payload, encrypted)
        if encrypted:
            self._sealed_out = (conn, conn.messages_received)
        return self._replies.request(
            conn, lambda: self._send_on(conn, payload, encrypted), timeout,
            lambda message: conn.close(ErrorCode.TIMEOUT, message))

    # -- events and statistics -----------------------------------------------------------
    def _report_ordered(self, message: str, code: int) -> None:
        observer = self._observer
        if observer is not None:
            observer.error(code)
        self._log.error("%s (code %d)", message, code)
        self._post_event("on_error", message, code)

    def _report(self, conn: Connection | None, message: str, code: int) -> None:
        self._report_ordered(message, code)

    def _handler_failed(self, name: str, exc: BaseException, args: tuple[Any, ...] = ()) -> None:
        observer = self._observer
        if observer is not None:
            observer.error(ErrorCode.HANDLER_EXCEPTION)
        self._log.error("%s handler raised %s: %s", name, type(exc).__name__, exc, exc_info=exc)
        self._dispatcher.emit("on_error", f"{name} handler raised {type(exc).__name__}: {exc}",
                              ErrorCode.HANDLER_EXCEPTION)

    def _emit_data_event(self, name: str, conn: Connection, nbytes: int) -> None:
        self._dispatcher.emit(name, nbytes)

    @property
    def connected_time(self) -> float:
        """Seconds the current connection has lasted (the last one's, once closed)."""
        if self._connected_mono is not None:
            return time.monotonic() - self._connected_mono
        return self._connected_for

    @property
    def reconnect_attempts(self) -> int:
        """Failed reconnection attempts since the last successful connection."""
        return self._machine.attempts

    @property
    def _reconnects(self) -> int:
        """Automatic reconnection attempts started (never cleared; for the metrics)."""
        return self._machine.retries_started

    @property
    def remote_ip(self) -> str:
        """IP address of the server of the current (or last) connection."""
        return self._remote_ip

    @property
    def total_bytes_received(self) -> int:
        """Wire bytes received (headers included), over all connections; over TLS, the
        application bytes that came out of the TLS layer (record overhead excluded)."""
        return self._tally.total(0)

    @property
    def total_bytes_sent(self) -> int:
        """Wire bytes sent (headers included), over all connections; over TLS, the
        application bytes handed to the TLS layer (record overhead excluded)."""
        return self._tally.total(1)

    @property
    def messages_received(self) -> int:
        """Frames received, over all connections."""
        return self._tally.total(2)

    @property
    def messages_sent(self) -> int:
        """Frames sent, over all connections."""
        return self._tally.total(3)

    def reset_reconnection_state(self) -> None:
        """Zero the failed-attempt count, so the backoff restarts from its first delay.

        A retry already scheduled still happens (a failure of it is numbered 1). Retrying
        that stopped at ``reconnect_max_attempts`` does not resume by itself: call
        :meth:`connect` or :meth:`reconnect`. Any thread; ``reconnect_attempts`` is 0
        when it returns.
        """
        reactor = self._reactor
        if reactor is None:
            self._machine.handle(life.ResetAttempts())  # no reactor: this thread owns it
            return
        if reactor.in_thread():
            self._feed(life.ResetAttempts())
            return
        done = threading.Event()
        reactor.call_soon(self._reset_attempts, done)
        if not done.wait(5):   # the reactor stopped meanwhile (disconnect())
            self._machine.handle(life.ResetAttempts())

    def _reset_attempts(self, done: threading.Event) -> None:
        self._feed(life.ResetAttempts())
        done.set()

    # -- sessions (docs/guide/sessions.rst) -------------------------------------------------------
    def _link(self) -> ClientLink | None:
        """The session link of a resumable client (made on first use), else None."""
        link = self._session_link
        if link is None and self.resumable:
            with self._link_lock:
                link = self._session_link
                if link is None:
                    link = self._session_link = ClientLink(self)
        return link

    @property
    def session_id(self) -> bytes | None:
        """The id of the current session (resumable clients), None without one."""
        link = self._session_link
        return link.session.session_id if link is not None else None

    def take_unacknowledged(self) -> list[Unacknowledged]:
        """The messages of sessions that ended (``on_error(..., SESSION_LOST)``) before
        the server acknowledged them, oldest first, as ``(data, encrypted, request)``;
        each is returned once. Send them again, or drop them, as the application
        decides: the library never does either on its own. Any thread."""
        link = self._session_link
        return link.take_unacknowledged() if link is not None else []

    def clear_statistics(self) -> None:
        """Zero the byte and message counters."""
        self._tally.clear()
