"""The reactor thread's side of the client's life cycle: :meth:`ClientActions._feed` hands
an event to the machine of :mod:`morsock._client_state` and runs the actions it returns --
resolving and dialling (:class:`~morsock._dialer.Dialer`), wrapping the socket in a
:class:`~morsock.connection.Connection` and starting its handshakes, timers, state
events, and answering the ``connect()`` / ``disconnect()`` calls that wait.

:class:`ClientActions` is the base of :class:`~morsock.Client` only: the client's public
methods feed it events through ``call_soon``; everything here runs on the reactor thread,
and the state it sets up in ``__init__`` is written on that thread only (by these actions
and the client's close handling). Nothing here raises to a caller: a socket that fails is
fed back to the machine as an event.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from . import _client_state as life
from ._component import Component
from .connection import CONNECTED, Connection

if TYPE_CHECKING:
    from ._client_handshake import HandshakeGate
    from ._dialer import Dialer
    from ._session_client import ClientLink
    from .reactor import Timer
    from .workers import Strand

__all__ = ["ClientActions", "ConnectOutcome"]


class ConnectOutcome:
    """What one :meth:`Client.connect` call waits for: set by the reactor thread when the
    machine says ``ConnectFinished``."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None


class ClientActions(Component):
    """The life-cycle actions of :class:`~morsock.Client` (see the module docstring)."""

    # The client's own state and settings these actions read (set by Client).
    _machine: life.ClientLifecycle
    _session_link: ClientLink | None
    _strand: Strand | None
    _dialer: Dialer | None
    if TYPE_CHECKING:
        host: str
        port: int
        server_hostname: str | None

        def _report_ordered(self, message: str, code: int) -> None: ...

    def __init__(self, settings: dict[str, Any], events: dict[str, Any]) -> None:
        # Reactor thread only (the client reads some of it: connected, statistics):
        self._pending_events: deque[life.Event] = deque()   # see _feed
        self._timers: dict[life.TimerName, Timer] = {}
        self._conn: Connection | None = None
        self._conn_attempt = 0                          # the attempt that opened _conn
        self._handshake: HandshakeGate | None = None    # of _conn, until it ended
        #: why _conn closed in its handshake (set by the gate and the session link)
        self._handshake_error: BaseException | None = None
        self._connect_waiters: list[ConnectOutcome] = []  # connect() calls waiting
        self._stop_waiters: list[threading.Event] = []  # disconnect() calls waiting ...
        self._stop_ready: list[threading.Event] = []    # ... the machine stopped for them
        self._connected_mono: float | None = None
        self._connected_for = 0.0
        self._remote_ip = ""
        self._live_conns: set[Connection] = set()  # counted in the totals, under _stats_lock
        super().__init__(settings, events)

    def _live_connections(self) -> list[Connection]:
        """The connections counted in the totals (any thread)."""
        with self._stats_lock:
            return list(self._live_conns)

    def _request_connect(self, outcome: ConnectOutcome) -> None:
        self._connect_waiters.append(outcome)
        self._feed(life.Connect())

    def _request_stop(self, stopped: threading.Event) -> None:
        self._stop_waiters.append(stopped)
        self._feed(life.Disconnect())

    def _feed(self, event: life.Event) -> None:
        """Reactor thread: hand *event* to the machine and run its actions. An event that
        an action reports (a socket that fails at once) waits until those run."""
        pending = self._pending_events
        pending.append(event)
        if len(pending) > 1:
            return  # a _feed further up this thread's stack takes it
        try:
            while pending:
                for action in self._machine.handle(pending[0]):
                    self._ACTIONS[type(action)](self, action)
                pending.popleft()
        finally:
            pending.clear()

    def _post_event(self, name: str, *args: Any) -> None:
        """Fire an event in the client's single event order (its strand)."""
        strand = self._strand
        if strand is not None and getattr(self, name, None) is not None:
            strand.post((None, (name, args)))

    def _running_dialer(self) -> Dialer:
        dialer = self._dialer
        assert dialer is not None, "the client's run has not started"
        return dialer

    def _do_change_state(self, action: life.ChangeState) -> None:
        self._post_event("on_state_change", action.old, action.new)

    def _do_resolve(self, action: life.Resolve) -> None:
        self._running_dialer().resolve(action.attempt, action.host, action.port)

    def _do_open_socket(self, action: life.OpenSocket) -> None:
        self._running_dialer().open(action.attempt, action.address)

    def _do_close_socket(self, action: life.CloseSocket) -> None:
        self._running_dialer().close()

    def _do_start_tls(self, action: life.StartTls) -> None:
        self._running_dialer().start_tls(action.attempt, self.ssl_context,
                               self.server_hostname or self.host, f"{self.host}:{self.port}")

    def _do_open_connection(self, action: life.OpenConnection) -> None:
        """Wrap the connected (TLS) socket in a Connection, then start its handshakes
        (AUTHENTICATED, then a session's hello) or report it usable (``Opened``)."""
        sock, address = self._running_dialer().take()
        try:
            conn = Connection(self._conn_owner, sock, max_message_size=self.max_message_size,
                              max_send_buffer=self.max_send_buffer, peer=address)
        except OSError as exc:
            sock.close()
            self._feed(life.SocketFailed(action.attempt, exc))
            return
        conn.established = False
        link = self._session_link
        if link is not None:
            link.prepare(conn)
        self._conn, self._conn_attempt = conn, action.attempt
        self._handshake, self._handshake_error = None, None
        with self._stats_lock:
            self._live_conns.add(conn)
        ctx = self._crypto
        assert ctx is not None
        handshake = ctx.authenticated or link is not None
        self._feed(life.Opened(action.attempt, handshake))  # queued before any close
        conn.start(announce=False)
        if ctx.authenticated:
            from ._client_handshake import HandshakeGate  # imports the crypto module
            self._handshake = HandshakeGate(
                conn, ctx, f"{self.host}:{self.port}",
                functools.partial(self._established, conn), self._handshake_failed)
            self._handshake.start()
        elif handshake:
            self._established(conn)

    def _handshake_failed(self, error: BaseException) -> None:
        self._handshake_error = error

    def _established(self, conn: Connection) -> None:
        """Reactor thread: a handshake on *conn* is done (the AUTHENTICATED gate's answer,
        or a session's WELCOME, from the session link): the next one starts, or the
        machine hears ``HandshakeDone``."""
        link = self._session_link
        if link is not None and link.begin(conn):
            return  # the link calls this again once the server answered its hello
        if conn is self._conn:
            self._feed(life.HandshakeDone(self._conn_attempt))

    def _do_close_connection(self, action: life.CloseConnection) -> None:
        conn = self._conn
        assert conn is not None
        # Not from inside _feed: a close that completes at once reports ConnectionClosed
        # from within it, and on_state_change(DISCONNECTED) must come before the
        # on_disconnect that the connection posts right after that report.
        self._reactor.call_soon(conn.close)

    def _do_abandon_connection(self, action: life.AbandonConnection) -> None:
        conn, self._conn, self._handshake = self._conn, None, None
        if conn is not None:
            conn.close()

    def _do_start_timer(self, action: life.StartTimer) -> None:
        self._timers[action.timer] = self._reactor.call_later(
            action.delay, self._timer_fired, action.timer, action.attempt)

    def _timer_fired(self, timer: life.TimerName, attempt: int) -> None:
        reason = None
        gate = self._handshake
        if (timer is life.TimerName.CONNECT_TIMEOUT and gate is not None and gate.pending
                and attempt == self._conn_attempt):
            from ._client_handshake import unanswered_hello
            reason = unanswered_hello(self.host, self.port, self.connection_timeout,
                                      gate.early_frames)
        self._feed(life.TimerFired(timer, attempt, reason))

    def _do_cancel_timer(self, action: life.CancelTimer) -> None:
        timer = self._timers.pop(action.timer, None)
        if timer is not None:
            timer.cancel()

    def _do_established(self, action: life.Established) -> None:
        conn = self._conn
        assert conn is not None
        conn.established = True
        self._connected_mono = time.monotonic()
        self._remote_ip = conn.peer_ip
        self._log.info("connected to %s:%d (%s)", self.host, self.port, self.encryption_info)
        link = self._session_link
        if link is None or link.announce():  # a session: on_connect once, not per resume
            conn.post(CONNECTED)

    def _do_fire_error(self, action: life.FireError) -> None:
        self._report_ordered(action.message, action.code)

    def _do_connect_finished(self, action: life.ConnectFinished) -> None:
        waiters, self._connect_waiters = self._connect_waiters, []
        for outcome in waiters:
            outcome.error = action.error
            outcome.done.set()

    def _do_stopped(self, action: life.Stopped) -> None:
        self._stop_ready += self._stop_waiters
        self._stop_waiters = []
        self._release_stop_waiters()

    def _release_stop_waiters(self) -> None:
        """Reactor thread: once the machine stopped and every socket is closed, release
        the disconnect() calls waiting -- after the work queued now (``call_soon``): the
        DISCONNECTED item of the last connection is posted after its close, and the pool
        must still run it."""
        if not self._stop_ready or self._live_connections():
            return
        ready, self._stop_ready = self._stop_ready, []
        for stopped in ready:
            self._reactor.call_soon(stopped.set)

    _ACTIONS: dict[type, Callable[[ClientActions, Any], None]] = {
        life.ChangeState: _do_change_state, life.Resolve: _do_resolve,
        life.OpenSocket: _do_open_socket, life.CloseSocket: _do_close_socket,
        life.StartTls: _do_start_tls,
        life.OpenConnection: _do_open_connection, life.CloseConnection: _do_close_connection,
        life.AbandonConnection: _do_abandon_connection, life.StartTimer: _do_start_timer,
        life.CancelTimer: _do_cancel_timer, life.Established: _do_established,
        life.FireError: _do_fire_error, life.ConnectFinished: _do_connect_finished,
        life.Stopped: _do_stopped,
    }
