"""The life cycle of a :class:`~morsock.Client` as a pure state machine (sans-I/O).

:class:`ClientLifecycle` takes *events* -- what happened: the application called
``connect()``, an address lookup answered, a socket connected, a timer fired, the
connection closed -- and returns *actions* -- what to do now: look up a name, open a socket
to an address, start or cancel a timer, fire ``on_error``, close the connection. It opens
no socket, starts no thread and reads no clock: the client runs the actions on its reactor
thread and feeds the outcomes back, and a test drives it with plain objects in virtual
time (``tests/unit/test_client_state.py``).

Rules:

1. One event at a time: :meth:`ClientLifecycle.handle` returns every action the event
   calls for, in the order they must run. Public state changes (``on_state_change``) are
   actions too, so their order against ``on_connect`` and ``on_error`` is decided here.
2. Every step that completes later is tagged with the number of the attempt that started
   it. An event of an attempt that is over, or of a connection that was given up, is
   stale and ignored (returns no action): lookups, sockets and timers may always report
   late.
3. An event that cannot happen -- a step of the live attempt in the wrong phase, an
   attempt number never handed out, something that is not an event -- is a bug of the
   caller: :class:`LifecycleError`, and the machine is left as it was.
4. Only the reactor thread (or, while no reactor runs, the one thread that owns the
   client) calls :meth:`~ClientLifecycle.handle`; the machine holds no lock.

Phases, and the public :class:`~morsock.ClientState` each one shows::

    IDLE, RETRY_WAIT                          DISCONNECTED
    RESOLVING -> OPENING [-> TLS] -> HANDSHAKE  CONNECTING
    CONNECTED                                 CONNECTED
    CLOSING (disconnect() drains, then closes) DISCONNECTING

An attempt goes RESOLVING (``Resolve``) -> OPENING (``OpenSocket`` per address, the next
one after a ``SocketFailed``) -> TLS (``StartTls``, with an ``ssl_context``) -> HANDSHAKE
(``OpenConnection``; ``Opened`` says whether handshakes follow -- AUTHENTICATED, a
session's hello -- and ``HandshakeDone`` ends them) -> CONNECTED. Any failure, or the
``CONNECT_TIMEOUT`` timer, ends it: DISCONNECTED, ``on_error``, then a ``RETRY`` timer as
the reconnect policy says.
"""

from __future__ import annotations

import enum
import random as _random
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Union

from .enums import ClientState, ErrorCode, ReconnectStrategy
from .errors import ConnectError
from .reconnect import ReconnectPolicy

__all__ = ["ClientLifecycle", "LifecycleError", "LifecycleSettings", "Phase", "TimerName",
           "Event", "Action", "connect_error"]


class LifecycleError(RuntimeError):
    """An event the machine cannot take in its phase: a bug of whoever fed it."""


class Phase(enum.Enum):
    """Where the client is in its life cycle (finer than :class:`ClientState`)."""

    IDLE = "IDLE"                # no connection, nothing scheduled
    RETRY_WAIT = "RETRY_WAIT"    # a RETRY timer runs
    RESOLVING = "RESOLVING"      # the address of host is being looked up
    OPENING = "OPENING"          # a TCP connect to one address is in progress
    TLS = "TLS"                  # the TLS handshake runs on the connected socket
    HANDSHAKE = "HANDSHAKE"      # the Connection is opened, its handshakes run
    CONNECTED = "CONNECTED"      # established
    CLOSING = "CLOSING"          # disconnect(): the connection drains, then closes


#: The phases of an attempt in progress (public state CONNECTING).
ATTEMPT_PHASES = frozenset({Phase.RESOLVING, Phase.OPENING, Phase.TLS, Phase.HANDSHAKE})

_PUBLIC_STATE = {
    Phase.IDLE: ClientState.DISCONNECTED,
    Phase.RETRY_WAIT: ClientState.DISCONNECTED,
    Phase.CONNECTED: ClientState.CONNECTED,
    Phase.CLOSING: ClientState.DISCONNECTING,
    **{phase: ClientState.CONNECTING for phase in ATTEMPT_PHASES},
}


class TimerName(enum.Enum):
    """The machine's timers: at most one of each runs at a time."""

    CONNECT_TIMEOUT = "CONNECT_TIMEOUT"  # bounds one attempt (connection_timeout)
    RETRY = "RETRY"                      # the delay before the next reconnection attempt


class LifecycleSettings(Protocol):
    """The client settings the machine reads (the :class:`~morsock.Client` itself).

    The address, ``connection_timeout`` and ``ssl_context`` are read once per attempt, as
    it starts; ``auto_reconnect`` and the ``reconnect_*`` settings whenever a retry is
    decided, so a change applies to the next delay.
    """

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def connection_timeout(self) -> float: ...
    @property
    def ssl_context(self) -> Any: ...
    @property
    def auto_reconnect(self) -> bool: ...
    @property
    def reconnect_strategy(self) -> ReconnectStrategy: ...
    @property
    def reconnect_interval(self) -> int: ...
    @property
    def reconnect_max_attempts(self) -> int: ...
    @property
    def reconnect_max_interval(self) -> int: ...


# -- events (what happened) ------------------------------------------------------------
@dataclass(frozen=True)
class Connect:
    """The application called ``connect()`` (or ``reconnect()``)."""


@dataclass(frozen=True)
class Disconnect:
    """The application called ``disconnect()``: stop retrying, close, then ``Stopped``."""


@dataclass(frozen=True)
class ResetAttempts:
    """``reset_reconnection_state()``: zero the failed-attempt count."""


@dataclass(frozen=True)
class Resolved:
    """The lookup of ``Resolve`` answered with *addresses* (``getaddrinfo`` tuples)."""

    attempt: int
    addresses: tuple[Any, ...]


@dataclass(frozen=True)
class ResolveFailed:
    """The lookup of ``Resolve`` failed with *error*."""

    attempt: int
    error: BaseException


@dataclass(frozen=True)
class SocketConnected:
    """The TCP connect of ``OpenSocket`` succeeded (socket configured)."""

    attempt: int


@dataclass(frozen=True)
class SocketFailed:
    """The socket of ``OpenSocket`` (or the Connection of ``OpenConnection``) failed."""

    attempt: int
    error: BaseException


@dataclass(frozen=True)
class TlsDone:
    """The TLS handshake of ``StartTls`` succeeded."""

    attempt: int


@dataclass(frozen=True)
class TlsFailed:
    """The TLS handshake of ``StartTls`` failed (*message* says why)."""

    attempt: int
    message: str


@dataclass(frozen=True)
class Opened:
    """The Connection of ``OpenConnection`` exists; *handshake*: handshakes were started
    on it (AUTHENTICATED, a session's hello) and ``HandshakeDone`` follows the last one
    (else it is usable now)."""

    attempt: int
    handshake: bool


@dataclass(frozen=True)
class HandshakeDone:
    """The server answered the last handshake of the connection."""

    attempt: int


@dataclass(frozen=True)
class ConnectionClosed:
    """The socket of the Connection opened by *attempt* is closed; *error*: why, when it
    was closed during the handshake (None: the peer closed, or no reason known)."""

    attempt: int
    error: BaseException | None = None


@dataclass(frozen=True)
class TimerFired:
    """A timer of ``StartTimer`` ran out. *reason*: for CONNECT_TIMEOUT, what the shell
    knows of why the attempt got no further (the failure's message; None: "timed out")."""

    timer: TimerName
    attempt: int
    reason: str | None = None


Event = Union[Connect, Disconnect, ResetAttempts, Resolved, ResolveFailed, SocketConnected,
              SocketFailed, TlsDone, TlsFailed, Opened, HandshakeDone, ConnectionClosed,
              TimerFired]


# -- actions (what to do) --------------------------------------------------------------
@dataclass(frozen=True)
class ChangeState:
    """The public state changed: fire ``on_state_change(old, new)``."""

    old: ClientState
    new: ClientState


@dataclass(frozen=True)
class Resolve:
    """Look up *host*:*port*; report ``Resolved`` or ``ResolveFailed``."""

    attempt: int
    host: str
    port: int


@dataclass(frozen=True)
class OpenSocket:
    """Start a TCP connect to *address* (a ``getaddrinfo`` tuple); report
    ``SocketConnected`` or ``SocketFailed``."""

    attempt: int
    address: tuple[Any, ...]


@dataclass(frozen=True)
class CloseSocket:
    """Close the socket (and stop the TLS handshake) in progress, if any; nothing is
    reported."""


@dataclass(frozen=True)
class StartTls:
    """Run the TLS handshake on the connected socket; report ``TlsDone`` or ``TlsFailed``."""

    attempt: int


@dataclass(frozen=True)
class OpenConnection:
    """Wrap the connected socket in a Connection (start the AUTHENTICATED handshake when
    the profile has one); report ``Opened`` or ``SocketFailed``."""

    attempt: int


@dataclass(frozen=True)
class CloseConnection:
    """Close the Connection, letting what is queued drain; ``ConnectionClosed`` follows."""


@dataclass(frozen=True)
class AbandonConnection:
    """Close the Connection of an attempt that was given up; its close is not awaited."""


@dataclass(frozen=True)
class StartTimer:
    """Start *timer*: ``TimerFired(timer, attempt)`` after *delay* seconds."""

    timer: TimerName
    delay: float
    attempt: int


@dataclass(frozen=True)
class CancelTimer:
    """Cancel *timer* if it runs."""

    timer: TimerName


@dataclass(frozen=True)
class Established:
    """The connection is usable: fire ``on_connect``. *reconnected*: an earlier connection
    of this client was established since the last ``disconnect()`` (a session may resume)."""

    attempt: int
    reconnected: bool


@dataclass(frozen=True)
class FireError:
    """Fire ``on_error(message, code)`` (a positive code is a reconnection attempt number)."""

    message: str
    code: int


@dataclass(frozen=True)
class ConnectFinished:
    """The ``connect()`` calls waiting return (*error* None) or raise *error*."""

    error: BaseException | None = None


@dataclass(frozen=True)
class Stopped:
    """``disconnect()`` is done with the connection: the threads may be released."""


Action = Union[ChangeState, Resolve, OpenSocket, CloseSocket, StartTls, OpenConnection,
               CloseConnection, AbandonConnection, StartTimer, CancelTimer, Established,
               FireError, ConnectFinished, Stopped]

_DISCONNECT_CALLED = "disconnect() was called"

#: The codes a failed connect() reports as they are (on_error and the exception alike):
#: a handshake the server refused. Anything else is CONNECTION_FAILED.
_HANDSHAKE_CODES = (ErrorCode.TLS_FAILED, ErrorCode.AUTHENTICATION_FAILED)


def connect_error(error: BaseException) -> ConnectError:
    """The ConnectError that connect() raises for *error*, with the one code that its
    ``on_error`` reports too (see _HANDSHAKE_CODES); the cause chained."""
    code = getattr(error, "code", None)
    code = code if code in _HANDSHAKE_CODES else ErrorCode.CONNECTION_FAILED
    if isinstance(error, ConnectError) and error.code == code:
        return error
    wrapped = ConnectError(str(error), code)
    wrapped.__cause__ = error
    return wrapped


class ClientLifecycle:
    """The client's life cycle: :meth:`handle` an event, run the actions it returns.

    Read-only for the shell: :attr:`phase`, :attr:`state`, :attr:`attempt` (number of the
    latest attempt), :attr:`attempts` (failed reconnection attempts since the last
    success, ``Client.reconnect_attempts``), :attr:`retries_started` (reconnection
    attempts started, never cleared). Not thread-safe (rule 4 of the module docstring).
    """

    def __init__(self, settings: LifecycleSettings, *,
                 random: Callable[[], float] = _random.random) -> None:
        """*settings*: read as :class:`LifecycleSettings` says; *random*: the jitter
        source of the BACKOFF delays (a float in [0, 1))."""
        self._settings = settings
        self._random = random
        self._actions: list[Action] = []
        self._policy: ReconnectPolicy | None = None
        self.phase = Phase.IDLE
        #: The public state of :attr:`phase` (a plain attribute: read on every send).
        self.state = ClientState.DISCONNECTED
        self.attempt = 0
        self.retries_started = 0
        self._live = False          # the attempt numbered self.attempt is in progress
        self._user = False          # ... and was started by connect() (not a retry)
        self._connection: int | None = None   # attempt whose Connection is open
        self._socket = False        # the live attempt has a socket not yet in a Connection
        self._ever_established = False
        self._host = ""
        self._port = 0
        self._tls = False
        self._timeout = 0.0
        self._addresses: list[tuple[Any, ...]] = []
        self._last_error: BaseException | None = None

    # -- what the shell reads --------------------------------------------------------
    @property
    def attempts(self) -> int:
        """Failed reconnection attempts since the last successful connection."""
        return self._policy.attempts if self._policy is not None else 0

    @property
    def retry_scheduled(self) -> bool:
        """True while a RETRY timer runs."""
        return self.phase is Phase.RETRY_WAIT

    def handle(self, event: Event) -> list[Action]:
        """Take *event*; return the actions to run, in order. Raises LifecycleError for an
        event that cannot happen now (rule 3), leaving the machine unchanged."""
        method = self._HANDLERS.get(type(event))
        if method is None:
            raise LifecycleError(f"not a client life-cycle event: {event!r}")
        self._actions = []
        method(self, event)  # every check that raises comes before the first change
        actions, self._actions = self._actions, []
        return actions

    # -- helpers -----------------------------------------------------------------------
    def _do(self, *actions: Action) -> None:
        self._actions.extend(actions)

    def _enter(self, phase: Phase) -> None:
        old, new = self.state, _PUBLIC_STATE[phase]
        self.phase, self.state = phase, new
        if old is not new:
            self._do(ChangeState(old, new))

    def _illegal(self, event: Event) -> LifecycleError:
        return LifecycleError(f"{type(event).__name__} cannot happen in phase "
                              f"{self.phase.name} (attempt {self.attempt}, "
                              f"{'in progress' if self._live else 'over'})")

    def _of_live_attempt(self, event: Any, *phases: Phase) -> bool:
        """Whether *event* (tagged with an attempt) belongs to the live attempt; False if
        it is stale (rule 2). Raises LifecycleError if it cannot happen (rule 3)."""
        if event.attempt > self.attempt or event.attempt < 0:
            raise LifecycleError(f"{type(event).__name__} names attempt {event.attempt}, "
                                 f"but the latest is {self.attempt}")
        if event.attempt != self.attempt or not self._live:
            return False
        if self.phase not in phases:
            raise self._illegal(event)
        return True

    def _live_policy(self) -> ReconnectPolicy:
        """The policy, rebuilt (count kept) when a ``reconnect_*`` setting changed since it
        was made, so that a change applies to the next delay."""
        s = self._settings
        wanted = (s.reconnect_strategy, s.reconnect_interval, s.reconnect_max_attempts,
                  s.reconnect_max_interval)
        policy = self._policy
        if policy is None or wanted != (policy.strategy, policy.interval_ms,
                                        policy.max_attempts, policy.max_interval_ms):
            fresh = ReconnectPolicy(*wanted, random=self._random)
            for _ in range(policy.attempts if policy is not None else 0):
                fresh.record_failure()
            self._policy = policy = fresh
        return policy

    def _start_attempt(self, user: bool) -> None:
        s = self._settings
        self.attempt += 1
        self._live, self._user = True, user
        if not user:
            self.retries_started += 1
        self._host, self._port, self._timeout = s.host, s.port, s.connection_timeout
        self._tls = s.ssl_context is not None
        self._addresses, self._last_error = [], None
        self._enter(Phase.RESOLVING)
        self._do(StartTimer(TimerName.CONNECT_TIMEOUT, self._timeout, self.attempt),
                 Resolve(self.attempt, self._host, self._port))

    def _drop_attempt(self) -> None:
        """End the live attempt's I/O: its timer, and its socket or Connection."""
        self._live = False
        self._do(CancelTimer(TimerName.CONNECT_TIMEOUT))
        if self._connection is not None:
            self._connection = None
            self._do(AbandonConnection())
        elif self._socket:
            self._socket = False
            self._do(CloseSocket())

    def _next_address(self) -> None:
        if not self._addresses:
            reason = self._last_error if self._last_error is not None else "no address"
            self._fail(ConnectError(f"cannot connect to {self._host}:{self._port}: {reason}"))
            return
        self._enter(Phase.OPENING)
        self._socket = True
        self._do(OpenSocket(self.attempt, self._addresses.pop(0)))

    def _fail(self, error: BaseException) -> None:
        """The live attempt failed: DISCONNECTED, ``on_error``, then maybe a retry."""
        self._drop_attempt()
        self._enter(Phase.IDLE)
        if self._user:
            error = connect_error(error)
            assert error.code is not None
            self._do(FireError(str(error), error.code), ConnectFinished(error))
            self._schedule_retry()
            return
        policy = self._live_policy()
        n = policy.record_failure()
        self._do(FireError(f"reconnection attempt {n} failed: {error}", n))
        if policy.exhausted:
            self._do(FireError(f"giving up after {n} reconnection attempts",
                               ErrorCode.MAX_RECONNECT_ATTEMPTS))
            return
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        """IDLE -> RETRY_WAIT when ``auto_reconnect`` and the policy want another attempt."""
        if not self._settings.auto_reconnect:
            return
        delay = self._live_policy().next_delay()
        if delay is None:
            return
        self._enter(Phase.RETRY_WAIT)
        self._do(StartTimer(TimerName.RETRY, delay, self.attempt))

    def _established(self) -> None:
        self._live = False
        self._do(CancelTimer(TimerName.CONNECT_TIMEOUT))
        if self._policy is not None:
            self._policy.reset()
        self._enter(Phase.CONNECTED)
        self._do(Established(self.attempt, self._ever_established))
        self._ever_established = True
        if self._user:
            self._do(ConnectFinished(None))

    # -- the application's calls -------------------------------------------------------
    def _on_connect(self, event: Connect) -> None:
        phase = self.phase
        if phase is Phase.CONNECTED:
            self._do(ConnectFinished(None))
            return
        if phase is Phase.CLOSING:
            self._do(ConnectFinished(ConnectError(_DISCONNECT_CALLED)))
            return
        if phase in ATTEMPT_PHASES:
            if self._user:
                return  # joins the attempt in progress
            self._drop_attempt()  # a retry in progress gives way, silently
        elif phase is Phase.RETRY_WAIT:
            self._do(CancelTimer(TimerName.RETRY))
        self._policy = None
        self._live_policy()  # the count restarts at 0
        self._start_attempt(user=True)

    def _on_disconnect(self, event: Disconnect) -> None:
        phase = self.phase
        self._ever_established = False
        if phase is Phase.CLOSING:
            return  # Stopped follows the close under way
        finished: list[Action] = []
        if phase in ATTEMPT_PHASES:
            if self._user:
                finished.append(ConnectFinished(ConnectError(_DISCONNECT_CALLED)))
            self._live = False
            self._do(CancelTimer(TimerName.CONNECT_TIMEOUT))
            if self._socket:
                self._socket = False
                self._do(CloseSocket())
        elif phase is Phase.RETRY_WAIT:
            self._do(CancelTimer(TimerName.RETRY))
        if self._connection is not None:  # CONNECTED, or a handshake on its Connection
            self._enter(Phase.CLOSING)
            self._do(*finished, CloseConnection())
        else:
            self._enter(Phase.IDLE)
            self._do(*finished, Stopped())

    def _on_reset(self, event: ResetAttempts) -> None:
        if self._policy is not None:
            self._policy.reset()

    # -- outcomes of the actions -------------------------------------------------------
    def _on_resolved(self, event: Resolved) -> None:
        if self._of_live_attempt(event, Phase.RESOLVING):
            self._addresses = list(event.addresses)
            self._next_address()

    def _on_resolve_failed(self, event: ResolveFailed) -> None:
        if self._of_live_attempt(event, Phase.RESOLVING):
            self._fail(ConnectError(f"cannot resolve {self._host}: {event.error}"))

    def _on_socket_connected(self, event: SocketConnected) -> None:
        if not self._of_live_attempt(event, Phase.OPENING):
            return
        if self._tls:
            self._enter(Phase.TLS)
            self._do(StartTls(self.attempt))
        else:
            self._enter(Phase.HANDSHAKE)
            self._do(OpenConnection(self.attempt))

    def _on_socket_failed(self, event: SocketFailed) -> None:
        if not self._of_live_attempt(event, Phase.OPENING, Phase.HANDSHAKE):
            return
        if self._connection is not None:
            raise self._illegal(event)  # the Connection exists: its close reports
        self._socket = False  # closed by whoever reports its failure
        self._last_error = event.error
        self._next_address()

    def _on_tls_done(self, event: TlsDone) -> None:
        if self._of_live_attempt(event, Phase.TLS):
            self._enter(Phase.HANDSHAKE)
            self._do(OpenConnection(self.attempt))

    def _on_tls_failed(self, event: TlsFailed) -> None:
        if self._of_live_attempt(event, Phase.TLS):
            self._socket = False  # a failed TLS handshake closes its socket
            self._fail(ConnectError(event.message, ErrorCode.TLS_FAILED))

    def _on_opened(self, event: Opened) -> None:
        if not self._of_live_attempt(event, Phase.HANDSHAKE):
            return
        if self._connection is not None:
            raise self._illegal(event)
        self._connection, self._socket = self.attempt, False  # the Connection owns it
        if not event.handshake:
            self._established()

    def _on_handshake_done(self, event: HandshakeDone) -> None:
        if not self._of_live_attempt(event, Phase.HANDSHAKE):
            return
        if self._connection is None:
            raise self._illegal(event)
        self._established()

    def _on_connection_closed(self, event: ConnectionClosed) -> None:
        if event.attempt > self.attempt:
            raise LifecycleError(f"ConnectionClosed names attempt {event.attempt}, but "
                                 f"the latest is {self.attempt}")
        if event.attempt != self._connection:
            return  # given up (AbandonConnection) or never opened
        self._connection = None
        phase = self.phase
        if phase is Phase.HANDSHAKE:
            self._fail(event.error or ConnectError(
                f"{self._host}:{self._port} closed the connection during the handshake"))
        elif phase is Phase.CONNECTED:
            self._enter(Phase.IDLE)
            self._schedule_retry()
        else:  # CLOSING: the only other phase with an open connection
            self._enter(Phase.IDLE)
            self._do(Stopped())

    def _on_timer(self, event: TimerFired) -> None:
        if event.timer is TimerName.RETRY:
            if event.attempt > self.attempt:
                raise LifecycleError(f"RETRY timer names attempt {event.attempt}, but the "
                                     f"latest is {self.attempt}")
            if event.attempt != self.attempt or self.phase is not Phase.RETRY_WAIT:
                raise self._illegal(event)  # a cancelled timer does not fire
            self._start_attempt(user=False)
            return
        if self._of_live_attempt(event, *ATTEMPT_PHASES):
            self._fail(ConnectError(event.reason or f"connect to {self._host}:{self._port} "
                                                    f"timed out after {self._timeout:g} s"))

    _HANDLERS: dict[type, Callable[[ClientLifecycle, Any], None]] = {
        Connect: _on_connect,
        Disconnect: _on_disconnect,
        ResetAttempts: _on_reset,
        Resolved: _on_resolved,
        ResolveFailed: _on_resolve_failed,
        SocketConnected: _on_socket_connected,
        SocketFailed: _on_socket_failed,
        TlsDone: _on_tls_done,
        TlsFailed: _on_tls_failed,
        Opened: _on_opened,
        HandshakeDone: _on_handshake_done,
        ConnectionClosed: _on_connection_closed,
        TimerFired: _on_timer,
    }
