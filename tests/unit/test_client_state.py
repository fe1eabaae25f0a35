"""The client's life cycle (morsock/_client_state.py): pure, no sockets, virtual time.

Each test feeds the machine events and checks the exact list of actions it returns. Timers
are kept by :class:`Harness` on a :class:`~morsock.reconnect.VirtualClock`: running one
moves the clock to its deadline, so reconnection gaps are measured exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from morsock import (
    ClientState,
    ConnectError,
    CryptoError,
    ErrorCode,
    ProtocolError,
    ReconnectStrategy,
)
from morsock._client_state import (
    ATTEMPT_PHASES,
    AbandonConnection,
    Action,
    CancelTimer,
    ChangeState,
    ClientLifecycle,
    CloseConnection,
    CloseSocket,
    Connect,
    ConnectFinished,
    ConnectionClosed,
    Disconnect,
    Established,
    Event,
    FireError,
    HandshakeDone,
    LifecycleError,
    OpenConnection,
    Opened,
    OpenSocket,
    Phase,
    ResetAttempts,
    Resolve,
    Resolved,
    ResolveFailed,
    SocketConnected,
    SocketFailed,
    StartTimer,
    StartTls,
    Stopped,
    TimerFired,
    TimerName,
    TlsDone,
    TlsFailed,
)
from morsock.reconnect import VirtualClock

D, C, OK, DING = (ClientState.DISCONNECTED, ClientState.CONNECTING, ClientState.CONNECTED,
                  ClientState.DISCONNECTING)
CT, RETRY = TimerName.CONNECT_TIMEOUT, TimerName.RETRY
ADDR_A = (2, 1, 6, "", ("127.0.0.1", 3434))
ADDR_B = (10, 1, 6, "", ("::1", 3434, 0, 0))
REFUSED = ConnectionRefusedError(111, "Connection refused")


@dataclass
class Settings:
    """What the machine reads of a Client (LifecycleSettings)."""

    host: str = "127.0.0.1"
    port: int = 3434
    connection_timeout: float = 10.0
    ssl_context: Any = None
    auto_reconnect: bool = False
    reconnect_strategy: ReconnectStrategy = ReconnectStrategy.BACKOFF
    reconnect_interval: int = 5000
    reconnect_max_attempts: int = 10
    reconnect_max_interval: int = 30000


class Harness:
    """A machine, its settings, a virtual clock and the timers its actions started."""

    def __init__(self, random: float = 0.5, **values: Any) -> None:
        self.settings = Settings(**values)
        self.random = random
        self.clock = VirtualClock(1000.0)
        self.machine = ClientLifecycle(self.settings, random=lambda: self.random)
        self.timers: dict[TimerName, tuple[float, int]] = {}
        self.starts: list[float] = []  # virtual time of every DISCONNECTED -> CONNECTING

    def feed(self, event: Any) -> list[Action]:
        state = self.machine.state
        actions = self.machine.handle(event)
        for action in actions:
            if isinstance(action, StartTimer):
                assert action.timer not in self.timers, f"{action.timer} started twice"
                self.timers[action.timer] = (self.clock() + action.delay, action.attempt)
            elif isinstance(action, CancelTimer):
                self.timers.pop(action.timer, None)
            elif isinstance(action, ChangeState):
                assert action.old is state and action.new is not state, actions
                state = action.new
                if action.new is C:
                    self.starts.append(self.clock())
        assert state is self.machine.state, "a state change without ChangeState"
        return actions

    def fire(self, timer: TimerName) -> list[Action]:
        """Move the clock to *timer*'s deadline and fire it."""
        deadline, attempt = self.timers.pop(timer)
        self.clock.advance(deadline - self.clock())
        return self.feed(TimerFired(timer, attempt))

    # scenarios ------------------------------------------------------------------------
    def to_opening(self) -> int:
        """connect() up to the TCP connect of the first address; return the attempt."""
        self.feed(Connect())
        n = self.machine.attempt
        assert self.feed(Resolved(n, (ADDR_A,))) == [OpenSocket(n, ADDR_A)]
        return n

    def to_handshake(self, opened: bool = True) -> int:
        """... up to the AUTHENTICATED handshake (with its Connection when *opened*)."""
        n = self.to_opening()
        assert self.feed(SocketConnected(n)) == [OpenConnection(n)]
        if opened:
            assert self.feed(Opened(n, True)) == []
        return n

    def to_connected(self) -> int:
        n = self.to_opening()
        self.feed(SocketConnected(n))
        self.feed(Opened(n, False))
        assert self.machine.phase is Phase.CONNECTED
        return n

    def refuse(self) -> list[Action]:
        """The attempt in progress (RESOLVING) finds one address that refuses."""
        n = self.machine.attempt
        assert self.feed(Resolved(n, (ADDR_A,))) == [OpenSocket(n, ADDR_A)]
        return self.feed(SocketFailed(n, REFUSED))


def norm(actions: list[Action]) -> list[Any]:
    """Actions, comparable: an error inside becomes (type name, message, code)."""
    out: list[Any] = []
    for action in actions:
        error = getattr(action, "error", None)
        if isinstance(action, ConnectFinished) and error is not None:
            out.append(("ConnectFinished", type(error).__name__, str(error), error.code))
        else:
            out.append(action)
    return out


def failed(message: str, code: int = ErrorCode.CONNECTION_FAILED,
           error_code: ErrorCode = ErrorCode.CONNECTION_FAILED) -> list[Any]:
    """The tail of a failed connect(): on_error, then the connect() calls raise."""
    return [FireError(message, code), ("ConnectFinished", "ConnectError", message, error_code)]


DISCONNECT_CALLED = ("ConnectFinished", "ConnectError", "disconnect() was called",
                     ErrorCode.CONNECTION_FAILED)


# -- a connect() that succeeds, step by step ---------------------------------------------
def test_plain_connect_every_step() -> None:
    h = Harness()
    assert h.feed(Connect()) == [ChangeState(D, C), StartTimer(CT, 10.0, 1),
                                 Resolve(1, "127.0.0.1", 3434)]
    assert h.machine.phase is Phase.RESOLVING and h.machine.state is C
    assert h.feed(Resolved(1, (ADDR_A, ADDR_B))) == [OpenSocket(1, ADDR_A)]
    assert h.machine.phase is Phase.OPENING
    assert h.feed(SocketConnected(1)) == [OpenConnection(1)]
    assert h.machine.phase is Phase.HANDSHAKE
    assert h.feed(Opened(1, False)) == [CancelTimer(CT), ChangeState(C, OK),
                                        Established(1, False), ConnectFinished(None)]
    assert h.machine.phase is Phase.CONNECTED and h.machine.state is OK
    assert h.timers == {}


def test_tls_then_authenticated_handshake() -> None:
    h = Harness(ssl_context=object())
    n = h.to_opening()
    assert h.feed(SocketConnected(n)) == [StartTls(n)]
    assert h.machine.phase is Phase.TLS and h.machine.state is C
    assert h.feed(TlsDone(n)) == [OpenConnection(n)]
    assert h.feed(Opened(n, True)) == []          # the handshake answer is awaited
    assert h.machine.phase is Phase.HANDSHAKE
    assert h.feed(HandshakeDone(n)) == [CancelTimer(CT), ChangeState(C, OK),
                                        Established(n, False), ConnectFinished(None)]


def test_the_next_address_after_a_failed_one() -> None:
    h = Harness()
    h.feed(Connect())
    assert h.feed(Resolved(1, (ADDR_A, ADDR_B))) == [OpenSocket(1, ADDR_A)]
    assert h.feed(SocketFailed(1, REFUSED)) == [OpenSocket(1, ADDR_B)]
    # a Connection that cannot be made counts as that address failing too
    assert h.feed(SocketConnected(1)) == [OpenConnection(1)]
    assert norm(h.feed(SocketFailed(1, OSError("too many open files")))) == [
        CancelTimer(CT), ChangeState(C, D),               # a failed socket is closed already
        *failed("cannot connect to 127.0.0.1:3434: too many open files")]
    assert h.machine.phase is Phase.IDLE and h.timers == {}


@pytest.mark.parametrize("event, message", [
    (ResolveFailed(1, OSError("Name or service not known")),
     "cannot resolve 127.0.0.1: Name or service not known"),
    (Resolved(1, ()), "cannot connect to 127.0.0.1:3434: no address"),
])
def test_a_lookup_that_gives_nothing_fails_the_attempt(event: Event, message: str) -> None:
    h = Harness()
    h.feed(Connect())
    assert norm(h.feed(event)) == [CancelTimer(CT), ChangeState(C, D), *failed(message)]


def test_tls_failure_is_reported_as_tls_failed() -> None:
    h = Harness(ssl_context=object())
    n = h.to_opening()
    h.feed(SocketConnected(n))
    assert norm(h.feed(TlsFailed(n, "certificate verify failed"))) == [
        CancelTimer(CT), ChangeState(C, D),              # the handshake closed its socket
        *failed("certificate verify failed", ErrorCode.TLS_FAILED, ErrorCode.TLS_FAILED)]


def test_a_close_during_the_handshake_fails_the_attempt() -> None:
    h = Harness()
    n = h.to_handshake()
    bad = ConnectError("the server did not answer", ErrorCode.AUTHENTICATION_FAILED)
    actions = h.feed(ConnectionClosed(n, bad))
    assert actions[:2] == [CancelTimer(CT), ChangeState(C, D)]      # nothing left to close
    assert actions[3] == ConnectFinished(bad)
    h2 = Harness()
    n = h2.to_handshake()
    assert norm(h2.feed(ConnectionClosed(n))) == [
        CancelTimer(CT), ChangeState(C, D),
        *failed("127.0.0.1:3434 closed the connection during the handshake")]


# -- the attempt's timeout, in each phase ------------------------------------------------
@pytest.mark.parametrize("phase, closes", [
    ("resolving", []), ("opening", [CloseSocket()]), ("tls", [CloseSocket()]),
    ("wrapping", [CloseSocket()]), ("handshake", [AbandonConnection()])])
def test_connect_timeout_in_every_phase(phase: str, closes: list[Action]) -> None:
    h = Harness(connection_timeout=2.5, ssl_context=object() if phase == "tls" else None)
    if phase == "resolving":
        h.feed(Connect())
    elif phase == "opening":
        h.to_opening()
    elif phase == "tls":
        h.feed(SocketConnected(h.to_opening()))
    else:
        h.to_handshake(opened=phase == "handshake")
    started = h.starts[0]
    message = "connect to 127.0.0.1:3434 timed out after 2.5 s"
    actions = h.fire(CT)
    assert h.clock() - started == 2.5
    assert norm(actions) == [CancelTimer(CT), *closes, ChangeState(C, D),
                             *failed(message)]
    # whatever the abandoned steps report later is stale
    for late in (Resolved(1, (ADDR_A,)), SocketConnected(1), SocketFailed(1, REFUSED),
                 TlsDone(1), Opened(1, True), HandshakeDone(1), ConnectionClosed(1),
                 TimerFired(CT, 1)):
        assert h.feed(late) == [], late
    assert h.machine.phase is Phase.IDLE


def test_the_shell_names_why_a_handshake_timed_out() -> None:
    h = Harness()
    n = h.to_handshake()
    deadline, attempt = h.timers.pop(CT)
    h.clock.advance(deadline - h.clock())
    why = "connected, but the server did not answer the AUTHENTICATED handshake"
    assert norm(h.feed(TimerFired(CT, attempt, why))) == [
        CancelTimer(CT), AbandonConnection(), ChangeState(C, D), *failed(why)]
    assert h.feed(ConnectionClosed(n)) == []               # given up: its close is stale


def test_connect_fails_with_the_handshake_code_or_connection_failed() -> None:
    """connect() raises (and on_error reports) TLS_FAILED or AUTHENTICATION_FAILED as they
    are, anything else as CONNECTION_FAILED; the original error is the cause."""
    refused = CryptoError("bad key confirmation", ErrorCode.AUTHENTICATION_FAILED)
    for error, code in ((refused, ErrorCode.AUTHENTICATION_FAILED),
                        (ProtocolError("bad magic"), ErrorCode.CONNECTION_FAILED)):
        h = Harness()
        n = h.to_handshake()
        actions = h.feed(ConnectionClosed(n, error))
        fired = [a for a in actions if isinstance(a, FireError)]
        [finished] = [a for a in actions if isinstance(a, ConnectFinished)]
        assert fired == [FireError(str(error), code)]
        assert isinstance(finished.error, ConnectError) and finished.error.code == code
        assert finished.error.__cause__ is error


# -- reconnection: delays per strategy, in virtual time ----------------------------------
def refuse_until_given_up(h: Harness, limit: int = 100) -> tuple[list[float], list[int]]:
    """connect() and every retry refused; return the gaps between attempt starts and the
    on_error codes."""
    codes: list[int] = []
    h.feed(Connect())
    for _ in range(limit):
        codes += [a.code for a in h.refuse() if isinstance(a, FireError)]
        if RETRY not in h.timers:
            break
        assert h.fire(RETRY)[0] == ChangeState(D, C)
    gaps = [round(b - a, 9) for a, b in zip(h.starts, h.starts[1:])]
    return gaps, codes


@pytest.mark.parametrize("strategy, interval, gaps", [
    (ReconnectStrategy.IMMEDIATE, 5000, [0.1] * 4),
    (ReconnectStrategy.FIXED_INTERVAL, 250, [0.25] * 4),
    (ReconnectStrategy.BACKOFF, 100, [0.1, 0.2, 0.4, 0.4]),
])
def test_reconnect_delays_per_strategy(strategy: ReconnectStrategy, interval: int,
                                       gaps: list[float]) -> None:
    h = Harness(auto_reconnect=True, reconnect_strategy=strategy, reconnect_interval=interval,
                reconnect_max_interval=400, reconnect_max_attempts=4)
    measured, codes = refuse_until_given_up(h)
    assert measured == gaps
    assert codes == [ErrorCode.CONNECTION_FAILED, 1, 2, 3, 4, ErrorCode.MAX_RECONNECT_ATTEMPTS]
    assert h.machine.phase is Phase.IDLE and h.timers == {}
    assert h.machine.attempts == 4 and h.machine.retries_started == 4


@pytest.mark.parametrize("random, factor", [(0.0, 0.8), (0.999999, 1.2)])
def test_backoff_jitter_bounds_and_cap(random: float, factor: float) -> None:
    h = Harness(random=random, auto_reconnect=True, reconnect_interval=100,
                reconnect_max_interval=400, reconnect_max_attempts=4)
    gaps, _ = refuse_until_given_up(h)
    nominal = [0.1, 0.2, 0.4, 0.4]
    assert gaps == pytest.approx([min(0.4, n * factor) for n in nominal], abs=1e-6)


def test_none_strategy_and_no_auto_reconnect_never_retry() -> None:
    for values in ({"auto_reconnect": True, "reconnect_strategy": ReconnectStrategy.NONE},
                   {"auto_reconnect": False}):
        h = Harness(**values)
        gaps, codes = refuse_until_given_up(h)
        assert (gaps, codes) == ([], [ErrorCode.CONNECTION_FAILED])
        assert h.machine.phase is Phase.IDLE and h.timers == {}


def test_unlimited_attempts_never_give_up() -> None:
    h = Harness(auto_reconnect=True, reconnect_strategy=ReconnectStrategy.IMMEDIATE,
                reconnect_max_attempts=0)
    gaps, codes = refuse_until_given_up(h, limit=60)
    assert codes == [ErrorCode.CONNECTION_FAILED, *range(1, 60)]
    assert ErrorCode.MAX_RECONNECT_ATTEMPTS not in codes
    assert h.machine.phase is Phase.RESOLVING and h.machine.attempts == 59


def test_give_up_after_max_attempts_then_connect_starts_again() -> None:
    h = Harness(auto_reconnect=True, reconnect_strategy=ReconnectStrategy.IMMEDIATE,
                reconnect_max_attempts=2)
    h.feed(Connect())
    h.refuse()
    h.fire(RETRY)
    h.refuse()
    h.fire(RETRY)
    assert h.refuse() == [CancelTimer(CT), ChangeState(C, D),
                          FireError("reconnection attempt 2 failed: cannot connect to "
                                    "127.0.0.1:3434: [Errno 111] Connection refused", 2),
                          FireError("giving up after 2 reconnection attempts",
                                    ErrorCode.MAX_RECONNECT_ATTEMPTS)]
    assert h.machine.phase is Phase.IDLE and h.timers == {} and h.machine.attempts == 2
    actions = h.feed(Connect())                 # connect() after giving up: count from 0
    assert actions[0] == ChangeState(D, C) and h.machine.attempts == 0
    h.refuse()
    assert h.machine.attempts == 0 and RETRY in h.timers   # retry 1 again


def test_a_drop_schedules_attempt_one_and_success_resets_the_count() -> None:
    h = Harness(auto_reconnect=True, reconnect_strategy=ReconnectStrategy.FIXED_INTERVAL,
                reconnect_interval=1000)
    n = h.to_connected()
    assert h.feed(ConnectionClosed(n)) == [ChangeState(OK, D), StartTimer(RETRY, 1.0, n)]
    assert h.machine.phase is Phase.RETRY_WAIT and h.machine.retry_scheduled
    h.fire(RETRY)
    h.refuse()                                  # retry 1 fails ...
    assert h.machine.attempts == 1
    actions = h.fire(RETRY)                     # ... retry 2 connects
    assert actions == [ChangeState(D, C), StartTimer(CT, 10.0, 3), Resolve(3, "127.0.0.1", 3434)]
    h.feed(Resolved(3, (ADDR_A,)))
    h.feed(SocketConnected(3))
    # a retry has no connect() waiting; reconnected: an earlier connection was established
    assert h.feed(Opened(3, False)) == [CancelTimer(CT), ChangeState(C, OK),
                                        Established(3, True)]
    assert h.machine.attempts == 0 and h.machine.retries_started == 2


def test_a_drop_without_auto_reconnect_just_disconnects() -> None:
    h = Harness()
    n = h.to_connected()
    assert h.feed(ConnectionClosed(n)) == [ChangeState(OK, D)]
    assert h.machine.phase is Phase.IDLE
    # connect() after a drop: the connection is a reconnection (a session may resume)
    m = h.to_opening()
    h.feed(SocketConnected(m))
    assert Established(m, True) in h.feed(Opened(m, False))


def test_settings_read_live_for_the_next_delay_and_the_next_attempt() -> None:
    h = Harness(auto_reconnect=True, reconnect_strategy=ReconnectStrategy.FIXED_INTERVAL,
                reconnect_interval=1000)
    h.feed(Connect())
    h.refuse()
    h.fire(RETRY)
    h.settings.reconnect_interval = 3000      # applies to the next delay, count kept
    h.settings.host = "127.0.0.2"             # applies to the next attempt
    h.refuse()
    assert h.timers[RETRY][0] - h.clock() == 3.0 and h.machine.attempts == 1
    assert h.fire(RETRY)[2] == Resolve(3, "127.0.0.2", 3434)
    h.settings.auto_reconnect = False
    h.refuse()
    assert h.timers == {} and h.machine.phase is Phase.IDLE


def test_reset_attempts_zeroes_the_count_and_keeps_the_retry() -> None:
    h = Harness(auto_reconnect=True, reconnect_strategy=ReconnectStrategy.IMMEDIATE)
    h.feed(Connect())
    h.refuse()
    h.fire(RETRY)
    h.refuse()
    assert h.machine.attempts == 1 and RETRY in h.timers
    assert h.feed(ResetAttempts()) == []
    assert h.machine.attempts == 0 and RETRY in h.timers
    h.fire(RETRY)
    assert [a.code for a in h.refuse() if isinstance(a, FireError)] == [1]


# -- connect() while something is under way ----------------------------------------------
def test_connect_while_connected_or_in_a_connect() -> None:
    h = Harness()
    h.feed(Connect())
    assert h.feed(Connect()) == []             # joins the attempt in progress
    h.refuse()
    n = h.to_connected()
    assert h.feed(Connect()) == [ConnectFinished(None)]
    assert h.machine.attempt == n


def test_connect_takes_over_a_retry_in_progress_silently() -> None:
    h = Harness(auto_reconnect=True, reconnect_strategy=ReconnectStrategy.IMMEDIATE)
    h.feed(Connect())
    h.refuse()
    h.fire(RETRY)
    h.refuse()
    h.fire(RETRY)                              # retry 2 is resolving ...
    assert h.feed(Resolved(3, (ADDR_A,))) == [OpenSocket(3, ADDR_A)]
    assert h.machine.attempts == 1
    # ... connect(): no on_error for it, no state change, the count restarts
    assert h.feed(Connect()) == [CancelTimer(CT), CloseSocket(), StartTimer(CT, 10.0, 4),
                                 Resolve(4, "127.0.0.1", 3434)]
    assert h.machine.attempts == 0
    assert h.feed(SocketFailed(3, REFUSED)) == []   # the old attempt is stale
    # a failure of that connect() is a connect() failure, then retry 1 again
    codes = [a.code for a in h.refuse() if isinstance(a, FireError)]
    assert codes == [ErrorCode.CONNECTION_FAILED] and h.timers[RETRY][1] == 4


def test_connect_while_a_retry_waits() -> None:
    h = Harness(auto_reconnect=True, reconnect_strategy=ReconnectStrategy.IMMEDIATE)
    h.feed(Connect())
    h.refuse()
    h.fire(RETRY)
    h.refuse()
    assert h.feed(Connect()) == [CancelTimer(RETRY), ChangeState(D, C), StartTimer(CT, 10.0, 3),
                                 Resolve(3, "127.0.0.1", 3434)]
    assert h.machine.attempts == 0 and RETRY not in h.timers


def test_connect_while_closing_fails() -> None:
    h = Harness()
    h.to_connected()
    h.feed(Disconnect())
    assert norm(h.feed(Connect())) == [DISCONNECT_CALLED]
    assert h.machine.phase is Phase.CLOSING


# -- disconnect() in every phase ---------------------------------------------------------
def test_disconnect_while_idle_or_waiting_to_retry() -> None:
    h = Harness(auto_reconnect=True)
    assert h.feed(Disconnect()) == [Stopped()]
    h.feed(Connect())
    h.refuse()
    assert h.machine.phase is Phase.RETRY_WAIT
    assert h.feed(Disconnect()) == [CancelTimer(RETRY), Stopped()]
    assert h.machine.phase is Phase.IDLE and h.timers == {}


@pytest.mark.parametrize("phase, closes", [
    ("resolving", []), ("opening", [CloseSocket()]), ("tls", [CloseSocket()]),
    ("wrapping", [CloseSocket()])])
def test_disconnect_during_an_attempt(phase: str, closes: list[Action]) -> None:
    for user in (True, False):
        h = Harness(auto_reconnect=True, ssl_context=object() if phase == "tls" else None)
        if not user:                              # the same phase, in a retry
            h.feed(Connect())
            h.refuse()
            h.fire(RETRY)
        else:
            h.feed(Connect())
        n = h.machine.attempt
        if phase != "resolving":
            h.feed(Resolved(n, (ADDR_A,)))
        if phase in ("tls", "wrapping"):
            h.feed(SocketConnected(n))
        finished = [DISCONNECT_CALLED] if user else []
        assert norm(h.feed(Disconnect())) == [CancelTimer(CT), *closes, ChangeState(C, D),
                                              *finished, Stopped()]
        assert h.machine.phase is Phase.IDLE and h.timers == {}
        assert h.feed(SocketFailed(n, REFUSED)) == []      # late: stale


def test_disconnect_during_the_handshake_closes_and_waits_for_the_close() -> None:
    h = Harness()
    n = h.to_handshake()
    assert norm(h.feed(Disconnect())) == [CancelTimer(CT), ChangeState(C, DING),
                                          DISCONNECT_CALLED, CloseConnection()]
    assert h.machine.phase is Phase.CLOSING
    assert h.feed(HandshakeDone(n)) == []                  # the attempt is over
    assert h.feed(ConnectionClosed(n)) == [ChangeState(DING, D), Stopped()]


def test_disconnect_while_connected_drains_then_stops() -> None:
    h = Harness(auto_reconnect=True)
    n = h.to_connected()
    assert h.feed(Disconnect()) == [ChangeState(OK, DING), CloseConnection()]
    assert h.feed(Disconnect()) == []                      # a second one waits the same close
    assert h.feed(ConnectionClosed(n)) == [ChangeState(DING, D), Stopped()]  # never a retry
    assert h.machine.phase is Phase.IDLE and h.timers == {}
    # the next connection is not a reconnection: disconnect() ended the session
    m = h.to_opening()
    h.feed(SocketConnected(m))
    assert Established(m, False) in h.feed(Opened(m, False))


# -- events that cannot happen -----------------------------------------------------------
@pytest.mark.parametrize("setup, event, words", [
    ("resolving", SocketConnected(1), "SocketConnected cannot happen in phase RESOLVING"),
    ("opening", HandshakeDone(1), "HandshakeDone cannot happen in phase OPENING"),
    ("opening", TlsDone(1), "TlsDone cannot happen in phase OPENING"),
    ("resolving", Resolved(2, ()), "Resolved names attempt 2, but the latest is 1"),
    ("handshake", Opened(1, True), "Opened cannot happen in phase HANDSHAKE"),
    ("handshake", SocketFailed(1, REFUSED), "SocketFailed cannot happen in phase HANDSHAKE"),
    ("wrapping", HandshakeDone(1), "HandshakeDone cannot happen in phase HANDSHAKE"),
    ("idle", TimerFired(RETRY, 0), "TimerFired cannot happen in phase IDLE"),
    ("connected", ConnectionClosed(2), "ConnectionClosed names attempt 2"),
    ("idle", "connect", "not a client life-cycle event: 'connect'"),
    ("idle", Resolved(-1, ()), "Resolved names attempt -1"),
])
def test_an_impossible_event_raises_and_changes_nothing(setup: str, event: Any,
                                                       words: str) -> None:
    h = Harness()
    if setup == "resolving":
        h.feed(Connect())
    elif setup == "opening":
        h.to_opening()
    elif setup in ("handshake", "wrapping"):
        h.to_handshake(opened=setup == "handshake")
    elif setup == "connected":
        h.to_connected()
    before = dict(vars(h.machine))
    with pytest.raises(LifecycleError, match=words.replace("(", r"\(")):
        h.machine.handle(event)
    assert vars(h.machine) == before


# -- whatever the order of events: the invariants ----------------------------------------
def _event(kind: str, attempt: int, flag: bool) -> Any:
    return {
        "connect": Connect(), "disconnect": Disconnect(), "reset": ResetAttempts(),
        "resolved": Resolved(attempt, (ADDR_A, ADDR_B) if flag else (ADDR_A,)),
        "resolve_failed": ResolveFailed(attempt, OSError("no such name")),
        "connected": SocketConnected(attempt), "failed": SocketFailed(attempt, REFUSED),
        "tls_done": TlsDone(attempt), "tls_failed": TlsFailed(attempt, "bad certificate"),
        "opened": Opened(attempt, flag), "handshake_done": HandshakeDone(attempt),
        "closed": ConnectionClosed(attempt), "connect_timeout": TimerFired(CT, attempt),
        "retry": TimerFired(RETRY, attempt),
    }[kind]


@settings(max_examples=300, deadline=None)
@given(tls=st.booleans(), auto=st.booleans(), steps=st.lists(st.tuples(
    st.sampled_from(["connect", "disconnect", "reset", "resolved", "resolve_failed",
                     "connected", "failed", "tls_done", "tls_failed", "opened",
                     "handshake_done", "closed", "connect_timeout", "retry"]),
    st.integers(-1, 1), st.booleans()), max_size=40))
def test_any_order_of_events_keeps_the_invariants(tls: bool, auto: bool,
                                                  steps: list[tuple[str, int, bool]]) -> None:
    h = Harness(ssl_context=object() if tls else None, auto_reconnect=True if auto else False,
                reconnect_strategy=ReconnectStrategy.IMMEDIATE, reconnect_max_attempts=3)
    for kind, offset, flag in steps:
        before = dict(vars(h.machine))
        timer = {"connect_timeout": CT, "retry": RETRY}.get(kind)
        try:
            if timer in h.timers and offset == 0:
                actions = h.fire(timer)         # a timer that runs, running out
            else:
                actions = h.feed(_event(kind, h.machine.attempt + offset, flag))
        except LifecycleError:
            assert vars(h.machine) == before    # refused: nothing changed
            continue
        phase, connection = h.machine.phase, h.machine._connection
        for action in actions:
            if isinstance(action, (CloseConnection, AbandonConnection)):
                assert before["_connection"] is not None, actions
            if isinstance(action, Established):
                assert phase is Phase.CONNECTED
            if isinstance(action, Stopped):
                assert kind in ("disconnect", "closed") and phase is Phase.IDLE
        # the timers that run are the ones the phase needs ...
        assert (CT in h.timers) == (phase in ATTEMPT_PHASES), (phase, h.timers)
        assert (RETRY in h.timers) == (phase is Phase.RETRY_WAIT), (phase, h.timers)
        # ... and a Connection is open exactly where a phase has one
        if phase in (Phase.CONNECTED, Phase.CLOSING):
            assert connection is not None
        elif phase is not Phase.HANDSHAKE:
            assert connection is None
