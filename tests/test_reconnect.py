"""Auto-reconnection of :class:`morsock.Client` over real sockets (API.md §4, "Reconnection").

Every failure class must feed the retry loop: refused, connect timeout, reset during the
AUTHENTICATED handshake, name resolution failure, a drop of an established connection and a
failed send. Each failed retry fires ``on_error(message, n)``; the maximum fires ``-99`` once
and then nothing; a success resets the count; ``disconnect()`` stops everything at once.

Only 127.0.0.1 is used. Fault injection without helper threads:

* refused -- a socket bound to a port but not listening;
* connect timeout -- a listener with ``listen(0)`` whose one queue slot is taken by a
  filler connection that is never accepted, so the kernel drops every further SYN;
* established but never accepted -- a listener with a queue that the test never (or only
  later) accepts: the kernel completes the TCP handshake on its own.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from typing import Any, Callable, Iterator, List, Optional, Tuple

import pytest

import morsock
from morsock import (Client, ClientState, ConnectError, ErrorCode, NotConnectedError,
                     ReconnectStrategy)
from morsock.reconnect import VirtualClock
from morsock.testing import running_server

from helpers import Recorder, scaled

WAIT = scaled(15.0)  # generous bound for anything that must happen (2 cores, parallel runs)


class ClientRecorder(Recorder):
    """The shared :class:`helpers.Recorder` attached to one client's events, each
    recorded as ``(kind, detail, monotonic time)`` in the client's single event order."""

    def attach(self, client: Client) -> Client:
        client.on_connect = lambda c: self._add("connect", None)
        client.on_disconnect = lambda c: self._add("disconnect", None)
        client.on_error = lambda c, message, code: self._add("error", (int(code), message))
        client.on_state_change = lambda c, old, new: self._add("state", (old, new))
        return client

    def _add(self, kind: str, detail: Any) -> None:
        self.add(kind, detail, time.monotonic())

    def wait_for(self, predicate: Callable[[], bool],  # type: ignore[override]
                 timeout: float = WAIT) -> bool:
        """Whether ``predicate()`` became true within *timeout* (see ``holds``)."""
        return self.holds(predicate, timeout)

    def count(self, kind: str) -> int:
        return len(self.named(kind))

    def details(self, kind: str) -> List[Any]:
        """The details of the events of *kind*, in order."""
        return [e[1] for e in self.named(kind)]

    def codes(self) -> List[int]:
        return [d[0] for d in self.details("error")]

    def states(self) -> List[ClientState]:
        return [d[1] for d in self.details("state")]

    def kinds(self, start: int = 0) -> List[str]:
        """Compact trace from event *start*: ``connect``, ``S:CONNECTED``, ``E:3`` ..."""
        out = []
        for kind, detail, _ in self.snapshot()[start:]:
            if kind == "state":
                out.append(f"S:{detail[1].name}")
            elif kind == "error":
                out.append(f"E:{detail[0]}")
            else:
                out.append(kind)
        return out

    def __len__(self) -> int:
        return len(self.snapshot())

    def quiet_for(self, seconds: float) -> bool:
        """True if no event at all arrives within *seconds* (an event that must NOT fire)."""
        n = len(self)
        return not self.holds(lambda: len(self.events) > n, seconds)


@contextlib.contextmanager
def client_of(**settings: Any) -> Iterator[Tuple[Client, ClientRecorder]]:
    """A Client on 127.0.0.1 with a Recorder attached; always disconnected at the end."""
    settings.setdefault("host", "127.0.0.1")
    client = Client(**settings)
    recorder = ClientRecorder()
    recorder.attach(client)
    try:
        yield client, recorder
    finally:
        client.disconnect()


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections (bound, never listening)."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
    finally:
        sock.close()


@contextlib.contextmanager
def blackhole_port() -> Iterator[int]:
    """A loopback port where connect() hangs: the listen queue is full and never drained."""
    listener = socket.socket()
    filler: Optional[socket.socket] = None
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        filler = socket.create_connection(("127.0.0.1", port), timeout=scaled(5))
        yield port
    finally:
        if filler is not None:
            filler.close()
        listener.close()


@contextlib.contextmanager
def pending_listener(backlog: int = 16) -> Iterator[socket.socket]:
    """A listener the test accepts from by hand (connections complete in the kernel)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(backlog)
    listener.settimeout(WAIT)
    try:
        yield listener
    finally:
        listener.settimeout(0)
        with contextlib.suppress(OSError):
            while True:
                listener.accept()[0].close()
        listener.close()


def reset_close(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def client_threads(port: int) -> List[threading.Thread]:
    prefix = f"morsock-client-127.0.0.1:{port}-"
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


def eventually(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Poll *predicate* until true or *timeout* (for server-side state: no event to wait on)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)   # polling a condition with a deadline, not synchronising on time
    return True


def drop_all(server: morsock.Server) -> int:
    """disconnect_all_clients() once the server has accepted what the kernel connected
    (a client's connect() can return before the server's reactor accepted it)."""
    eventually(lambda: server.client_count > 0)
    return server.disconnect_all_clients()


def connect_and_settle(client: Client, rec: ClientRecorder) -> None:
    """connect(), then wait until its on_connect ran (events trail connect() a little)."""
    before = rec.count("connect")
    client.connect()
    assert rec.wait_for(lambda: rec.count("connect") == before + 1), rec.kinds()


def connect_expecting_failure(client: Client) -> ConnectError:
    with pytest.raises(ConnectError) as info:
        client.connect()
    return info.value


# -- forced disconnects and server restarts ------------------------------------------------
def test_twenty_forced_disconnects_each_reconnect_and_serve() -> None:
    with running_server() as server, client_of(
            port=server.port, auto_reconnect=True,
            reconnect_strategy=ReconnectStrategy.IMMEDIATE) as (client, rec):
        connect_and_settle(client, rec)
        assert client.request(b"hello", timeout=WAIT) == b"hello"
        for i in range(20):
            start = len(rec)
            assert server.disconnect_all_clients() == 1
            assert rec.wait_for(lambda: rec.count("connect") == i + 2), rec.kinds(start)
            assert client.request(f"ping {i}", timeout=WAIT) == f"ping {i}".encode()
            assert rec.kinds(start) == ["S:DISCONNECTED", "disconnect", "S:CONNECTING",
                                        "S:CONNECTED", "connect"]
            assert client.reconnect_attempts == 0
            assert client.connected and client.state is ClientState.CONNECTED
        assert rec.codes() == []
        assert server.total_connections == 21
        assert client.connected_time < WAIT


def test_server_restart_on_same_port_with_fixed_interval() -> None:
    with running_server() as server, client_of(
            port=server.port, auto_reconnect=True, reconnect_max_attempts=0,
            reconnect_strategy=ReconnectStrategy.FIXED_INTERVAL,
            reconnect_interval=100) as (client, rec):
        connect_and_settle(client, rec)
        assert client.request(b"before", timeout=WAIT) == b"before"
        server.stop()
        assert rec.wait_for(lambda: rec.codes()[:3] == [1, 2, 3]), rec.kinds()
        assert client.reconnect_attempts >= 3
        assert not client.connected
        with pytest.raises(NotConnectedError):
            client.request(b"while down", timeout=WAIT)
        server.start()
        assert rec.wait_for(lambda: rec.count("connect") == 2), rec.kinds()
        assert client.request(b"after", timeout=WAIT) == b"after"
        assert client.reconnect_attempts == 0
        codes = rec.codes()
        assert codes == list(range(1, len(codes) + 1))   # numbered, no -99, no gap


def test_drop_of_established_connection_counts_from_one_and_gives_up() -> None:
    with running_server() as server, client_of(
            port=server.port, auto_reconnect=True, reconnect_max_attempts=3,
            reconnect_strategy=ReconnectStrategy.IMMEDIATE) as (client, rec):
        connect_and_settle(client, rec)
        start = len(rec)
        server.stop()
        assert rec.wait_for(lambda: ErrorCode.MAX_RECONNECT_ATTEMPTS in rec.codes()), rec.kinds()
        assert rec.kinds(start) == (["S:DISCONNECTED", "disconnect"]
                                    + ["S:CONNECTING", "S:DISCONNECTED", "E:1",
                                       "S:CONNECTING", "S:DISCONNECTED", "E:2",
                                       "S:CONNECTING", "S:DISCONNECTED", "E:3", "E:-99"])
        assert rec.quiet_for(0.6)                         # 6 IMMEDIATE intervals: silence
        assert client.reconnect_attempts == 3
        assert client.connected_time >= 0


# -- every failure class feeds the loop ------------------------------------------------------
def test_refused_immediate_codes_then_max_then_silence() -> None:
    with refused_port() as port, client_of(
            port=port, auto_reconnect=True, reconnect_max_attempts=3,
            reconnect_strategy=ReconnectStrategy.IMMEDIATE) as (client, rec):
        error = connect_expecting_failure(client)
        assert "refused" in str(error).lower()
        assert rec.wait_for(lambda: ErrorCode.MAX_RECONNECT_ATTEMPTS in rec.codes()), rec.kinds()
        assert rec.codes() == [-1, 1, 2, 3, -99]
        assert rec.kinds() == ["S:CONNECTING", "S:DISCONNECTED", "E:-1"] + [
            "S:CONNECTING", "S:DISCONNECTED", "E:1",
            "S:CONNECTING", "S:DISCONNECTED", "E:2",
            "S:CONNECTING", "S:DISCONNECTED", "E:3", "E:-99"]
        assert rec.quiet_for(0.6)
        assert client.reconnect_attempts == 3
        assert client.state is ClientState.DISCONNECTED
        # Documented: after giving up the client's threads stay until disconnect().
        assert len(client_threads(port)) == 2
        client.disconnect()
        assert client_threads(port) == []


def test_connect_timeout_raises_within_connection_timeout_and_retries() -> None:
    with blackhole_port() as port, client_of(
            port=port, auto_reconnect=True, reconnect_max_attempts=2, connection_timeout=0.5,
            reconnect_strategy=ReconnectStrategy.IMMEDIATE) as (client, rec):
        start = time.monotonic()
        error = connect_expecting_failure(client)
        elapsed = time.monotonic() - start
        assert 0.4 <= elapsed <= 0.5 + 1.5, elapsed
        # one code everywhere: the exception's is the one on_error reported
        assert error.code is ErrorCode.CONNECTION_FAILED and "timed out" in str(error)
        assert rec.wait_for(lambda: ErrorCode.MAX_RECONNECT_ATTEMPTS in rec.codes()), rec.kinds()
        assert rec.codes() == [-1, 1, 2, -99]
        assert rec.quiet_for(0.6)


def test_name_resolution_failure_feeds_the_loop() -> None:
    with client_of(host="no-such-host.invalid", port=3434, auto_reconnect=True,
                   reconnect_max_attempts=2,
                   reconnect_strategy=ReconnectStrategy.IMMEDIATE) as (client, rec):
        error = connect_expecting_failure(client)
        assert "no-such-host.invalid" in str(error)
        assert rec.wait_for(lambda: ErrorCode.MAX_RECONNECT_ATTEMPTS in rec.codes()), rec.kinds()
        assert rec.codes() == [-1, 1, 2, -99]
        messages = [d[1] for d in rec.details("error")]
        assert all("no-such-host.invalid" in m for m in messages[:3]), messages


def test_reset_during_authenticated_handshake_is_a_failed_attempt() -> None:
    with pending_listener() as listener, client_of(
            port=listener.getsockname()[1], encryption_key="reconnect secret",
            auto_reconnect=True, reconnect_max_attempts=2,
            reconnect_strategy=ReconnectStrategy.IMMEDIATE) as (client, rec):
        outcome: List[BaseException] = []

        def connect() -> None:
            try:
                client.connect()
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                outcome.append(exc)

        thread = threading.Thread(target=connect)
        thread.start()
        try:
            for _ in range(3):                # connect() and two retries
                peer, _ = listener.accept()
                peer.settimeout(WAIT)
                assert peer.recv(9)           # the client's handshake frame arrived...
                reset_close(peer)             # ...and is answered by a reset
        finally:
            thread.join(WAIT)
        assert len(outcome) == 1 and isinstance(outcome[0], ConnectError), outcome
        assert rec.wait_for(lambda: ErrorCode.MAX_RECONNECT_ATTEMPTS in rec.codes()), rec.kinds()
        assert rec.codes() == [-1, 1, 2, -99]
        assert rec.count("connect") == 0 and rec.count("disconnect") == 0
        assert rec.quiet_for(0.5)


def test_reset_of_established_connection_reconnects() -> None:
    with pending_listener() as listener, client_of(
            port=listener.getsockname()[1], auto_reconnect=True,
            reconnect_strategy=ReconnectStrategy.IMMEDIATE) as (client, rec):
        connect_and_settle(client, rec)
        peer, _ = listener.accept()
        reset_close(peer)
        assert rec.wait_for(lambda: rec.count("connect") == 2), rec.kinds()
        assert rec.kinds() == ["S:CONNECTING", "S:CONNECTED", "connect", "S:DISCONNECTED",
                               "disconnect", "S:CONNECTING", "S:CONNECTED", "connect"]
        assert client.reconnect_attempts == 0


def test_failed_send_drops_the_connection_and_reconnects() -> None:
    with pending_listener() as listener, client_of(
            port=listener.getsockname()[1], auto_reconnect=True,
            reconnect_strategy=ReconnectStrategy.IMMEDIATE) as (client, rec):
        connect_and_settle(client, rec)
        conn = client._conn
        assert conn is not None
        # White-box fault: the socket can no longer send, so the next send fails at once.
        conn._sock.shutdown(socket.SHUT_WR)
        with pytest.raises(NotConnectedError, match="send failed"):
            client.send_data(b"lost")
        assert rec.wait_for(lambda: rec.count("connect") == 2), rec.kinds()
        assert rec.count("disconnect") == 1
        client.send_data(b"delivered")
        peer = None
        for _ in range(2):
            peer, _ = listener.accept()
            peer.settimeout(WAIT)
            data = peer.recv(64)
            if data:
                break
            peer.close()
        assert peer is not None and data.endswith(b"delivered")
        peer.close()


# -- timing of the strategies ---------------------------------------------------------------
def next_deadline(client: Client) -> Optional[float]:
    """When the client's next timer is due, on its reactor's clock (asked of the reactor
    thread, after whatever it is doing now)."""
    answer: List[Optional[float]] = []
    done = threading.Event()

    def ask() -> None:
        answer.append(client._reactor.next_deadline())
        done.set()

    client._reactor.call_soon(ask)
    assert done.wait(WAIT)
    return answer[0]


@pytest.mark.parametrize("strategy, interval, nominal", [
    (ReconnectStrategy.BACKOFF, 100, [0.1, 0.2, 0.4, 0.4, 0.4]),
    (ReconnectStrategy.FIXED_INTERVAL, 250, [0.25] * 5),
    (ReconnectStrategy.IMMEDIATE, 5000, [0.1] * 5),
])
def test_reconnect_gaps_in_virtual_time(strategy: ReconnectStrategy, interval: int,
                                        nominal: List[float]) -> None:
    """The client's reactor runs on a virtual clock: each retry is due exactly its delay
    after the failure before it (BACKOFF: doubling, jitter within +-20 %, capped), and
    starts when the clock gets there -- not before, whatever the machine's load."""
    clock = VirtualClock(500.0)
    with refused_port() as port, client_of(
            port=port, auto_reconnect=True, reconnect_max_attempts=5,
            reconnect_strategy=strategy, reconnect_interval=interval,
            reconnect_max_interval=400) as (client, rec):
        client._clock = clock
        starts: List[float] = []
        rec.hooks.append(lambda event: event[0] == "state" and
                         event[1][1] is ClientState.CONNECTING and starts.append(clock()))
        connect_expecting_failure(client)
        gaps = []
        for n in range(1, 6):
            failed_before = ErrorCode.CONNECTION_FAILED if n == 1 else n - 1
            assert rec.wait_for(lambda: failed_before in rec.codes()), rec.kinds()
            deadline = next_deadline(client)
            assert deadline is not None, f"no retry {n} scheduled"
            gaps.append(deadline - clock())
            assert rec.count("state") == 2 * n     # retry n waits for the clock ...
            clock.advance(gaps[-1] + 1e-9)
            client._reactor.wakeup()               # ... and starts once it is there
        assert rec.wait_for(lambda: ErrorCode.MAX_RECONNECT_ATTEMPTS in rec.codes()), \
            rec.kinds()
        assert next_deadline(client) is None       # given up: no timer left
        for gap, delay in zip(gaps, nominal):
            if strategy is ReconnectStrategy.BACKOFF:
                assert 0.8 * delay - 1e-9 <= gap <= min(0.4, 1.2 * delay) + 1e-9, gaps
            else:
                assert gap == pytest.approx(delay, abs=1e-9), gaps
        assert [b - a for a, b in zip(starts, starts[1:])] == pytest.approx(gaps, abs=1e-6)


def test_immediate_and_fixed_interval_gaps() -> None:
    """Wall-clock smoke test of the same (the virtual-time test checks the delays)."""
    for strategy, interval, nominal in ((ReconnectStrategy.IMMEDIATE, 5000, 0.1),
                                        (ReconnectStrategy.FIXED_INTERVAL, 250, 0.25)):
        with refused_port() as port, client_of(
                port=port, auto_reconnect=True, reconnect_max_attempts=3,
                reconnect_strategy=strategy, reconnect_interval=interval) as (client, rec):
            connect_expecting_failure(client)
            assert rec.wait_for(lambda: -99 in rec.codes()), rec.kinds()
            starts = [t for kind, d, t in rec.snapshot()
                      if kind == "state" and d[1] is ClientState.CONNECTING]
            gaps = [b - a for a, b in zip(starts, starts[1:])]
            assert len(gaps) == 3
            assert all(0.6 * nominal <= g <= 1.4 * nominal + 0.05 for g in gaps), gaps


# -- the user's controls --------------------------------------------------------------------
def test_manual_disconnect_while_connected_never_reconnects() -> None:
    with running_server() as server, client_of(
            port=server.port, auto_reconnect=True,
            reconnect_strategy=ReconnectStrategy.IMMEDIATE) as (client, rec):
        connect_and_settle(client, rec)
        start = len(rec)
        client.disconnect()
        assert rec.kinds(start) == ["S:DISCONNECTING", "S:DISCONNECTED", "disconnect"]
        assert not client.connected
        assert rec.quiet_for(0.5)                         # 5 IMMEDIATE intervals
        assert eventually(lambda: server.total_connections >= 1) and server.total_connections == 1
        assert client_threads(server.port) == []


def test_disconnect_while_retrying_stops_at_once() -> None:
    with refused_port() as port, client_of(
            port=port, auto_reconnect=True, reconnect_max_attempts=0,
            reconnect_strategy=ReconnectStrategy.FIXED_INTERVAL,
            reconnect_interval=150) as (client, rec):
        connect_expecting_failure(client)
        assert rec.wait_for(lambda: 2 in rec.codes()), rec.kinds()
        client.disconnect()
        assert client.state is ClientState.DISCONNECTED
        assert client_threads(port) == []
        assert rec.quiet_for(0.6)                         # 4 retry intervals: no attempt


def test_disconnect_from_on_error_handler_stops_retrying() -> None:
    with refused_port() as port, client_of(
            port=port, auto_reconnect=True, reconnect_max_attempts=0,
            reconnect_strategy=ReconnectStrategy.IMMEDIATE) as (client, rec):
        stopped = threading.Event()

        def on_error(event: Tuple[Any, ...]) -> None:
            if event[0] == "error" and event[1][0] == 1:
                client.disconnect()                       # from the client's own thread
                stopped.set()

        rec.hooks.append(on_error)
        connect_expecting_failure(client)
        assert stopped.wait(WAIT)
        # no event tells that the threads ended: poll with a deadline
        assert eventually(lambda: not client_threads(port)), \
            [t.name for t in client_threads(port)]
        assert rec.quiet_for(0.5)
        assert [c for c in rec.codes() if c > 1] == []


def test_disconnect_aborts_a_hanging_connect_at_once() -> None:
    with blackhole_port() as port, client_of(
            port=port, auto_reconnect=True, connection_timeout=30,
            reconnect_strategy=ReconnectStrategy.IMMEDIATE) as (client, rec):
        outcome: List[BaseException] = []

        def connect() -> None:
            try:
                client.connect()
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                outcome.append(exc)

        thread = threading.Thread(target=connect)
        thread.start()
        try:
            assert rec.wait_for(lambda: ClientState.CONNECTING in rec.states())
            start = time.monotonic()
            client.disconnect()
            thread.join(WAIT)
            assert time.monotonic() - start < 5.0        # not connection_timeout (30 s)
        finally:
            thread.join(WAIT)
        assert len(outcome) == 1 and isinstance(outcome[0], ConnectError)
        assert client.state is ClientState.DISCONNECTED
        assert rec.quiet_for(0.4)


def test_none_strategy_never_retries() -> None:
    with running_server() as server, client_of(
            port=server.port, auto_reconnect=True,
            reconnect_strategy=ReconnectStrategy.NONE) as (client, rec):
        connect_and_settle(client, rec)
        assert drop_all(server) == 1
        assert rec.wait_for(lambda: rec.count("disconnect") == 1)
        assert rec.quiet_for(0.5)
        assert client.state is ClientState.DISCONNECTED
        assert eventually(lambda: server.total_connections >= 1) and server.total_connections == 1
    with refused_port() as port, client_of(
            port=port, auto_reconnect=True,
            reconnect_strategy=ReconnectStrategy.NONE) as (client, rec):
        connect_expecting_failure(client)
        assert rec.wait_for(lambda: rec.codes() == [-1])
        assert rec.quiet_for(0.5)
        assert rec.codes() == [-1]


def test_without_auto_reconnect_nothing_retries() -> None:
    with running_server() as server, client_of(port=server.port) as (client, rec):
        connect_and_settle(client, rec)
        assert drop_all(server) == 1
        assert rec.wait_for(lambda: rec.count("disconnect") == 1)
        assert rec.quiet_for(0.5)
        assert eventually(lambda: server.total_connections >= 1) and server.total_connections == 1


def test_reconnect_over_authenticated_profile() -> None:
    key = "reconnect secret"
    with running_server(encryption_key=key) as server, client_of(
            port=server.port, encryption_key=key, auto_reconnect=True,
            reconnect_strategy=ReconnectStrategy.IMMEDIATE) as (client, rec):
        connect_and_settle(client, rec)
        assert client.request(b"sealed 0", timeout=WAIT, encrypted=True) == b"sealed 0"
        for i in range(1, 4):
            assert drop_all(server) == 1
            assert rec.wait_for(lambda: rec.count("connect") == i + 1), rec.kinds()
            assert client.request(f"sealed {i}", timeout=WAIT, encrypted=True) == \
                f"sealed {i}".encode()
        assert rec.codes() == []


def test_reconnect_method_and_connect_after_giving_up() -> None:
    with running_server() as server, client_of(
            port=server.port, auto_reconnect=True, reconnect_max_attempts=2,
            reconnect_strategy=ReconnectStrategy.IMMEDIATE) as (client, rec):
        connect_and_settle(client, rec)
        start = len(rec)
        client.reconnect()
        assert client.connected
        assert rec.wait_for(lambda: rec.count("connect") == 2), rec.kinds(start)
        assert rec.kinds(start) == ["S:DISCONNECTING", "S:DISCONNECTED", "disconnect",
                                    "S:CONNECTING", "S:CONNECTED", "connect"]
        assert eventually(lambda: server.total_connections == 2)
        server.stop()
        assert rec.wait_for(lambda: -99 in rec.codes()), rec.kinds()
        assert client.reconnect_attempts == 2
        server.start()
        client.reconnect()                                # works after giving up
        assert client.connected and client.reconnect_attempts == 0
        assert client.request(b"back", timeout=WAIT) == b"back"
        assert drop_all(server) == 1                   # and the loop is armed again
        assert rec.wait_for(lambda: rec.count("connect") == 4), rec.kinds()
        assert client.request(b"again", timeout=WAIT) == b"again"


def test_reset_reconnection_state_zeroes_the_count() -> None:
    with refused_port() as port, client_of(
            port=port, auto_reconnect=True, reconnect_max_attempts=0,
            reconnect_strategy=ReconnectStrategy.FIXED_INTERVAL,
            reconnect_interval=300) as (client, rec):
        connect_expecting_failure(client)
        assert rec.wait_for(lambda: 3 in rec.codes()), rec.kinds()
        mark = len(rec)
        client.reset_reconnection_state()
        assert client.reconnect_attempts == 0
        assert rec.wait_for(lambda: "E:2" in rec.kinds(mark)), rec.kinds(mark)
        later = [int(k[2:]) for k in rec.kinds(mark) if k.startswith("E:")]
        assert later[:2] == [1, 2] or later[:3] == [4, 1, 2], later   # 4: already in flight
        assert client.state is not ClientState.CONNECTED


def test_connect_resets_the_count_and_takes_over_the_retries() -> None:
    with refused_port() as port, client_of(
            port=port, auto_reconnect=True, reconnect_max_attempts=0,
            reconnect_strategy=ReconnectStrategy.FIXED_INTERVAL,
            reconnect_interval=100) as (client, rec):
        connect_expecting_failure(client)
        assert rec.wait_for(lambda: 2 in rec.codes()), rec.kinds()
        mark = len(rec)
        connect_expecting_failure(client)                 # a second user connect()
        assert rec.wait_for(lambda: "E:1" in rec.kinds(mark)), rec.kinds(mark)
        later = [int(k[2:]) for k in rec.kinds(mark) if k.startswith("E:")]
        assert -1 in later and later[later.index(-1) + 1] == 1, later


def test_events_through_main_thread_queue_keep_the_order() -> None:
    queue = morsock.EventQueue()
    with running_server() as server, client_of(
            port=server.port, auto_reconnect=True, events_use_main_thread=True,
            event_queue=queue, reconnect_strategy=ReconnectStrategy.IMMEDIATE) as (client, rec):
        threads = set()
        rec.hooks.append(lambda event: threads.add(threading.current_thread()))
        client.connect()
        assert drop_all(server) == 1
        deadline = time.monotonic() + WAIT
        while rec.count("connect") < 2 and time.monotonic() < deadline:
            queue.pump(timeout=0.05)
        assert rec.kinds() == ["S:CONNECTING", "S:CONNECTED", "connect", "S:DISCONNECTED",
                               "disconnect", "S:CONNECTING", "S:CONNECTED", "connect"]
        assert threads == {threading.current_thread()}
    queue.clear()


# -- more failure classes, live settings, truthful properties ---------------------------------
def test_unanswered_authenticated_handshake_times_out_as_a_failed_attempt() -> None:
    with pending_listener() as listener, client_of(
            port=listener.getsockname()[1], encryption_key="reconnect secret",
            connection_timeout=0.3, auto_reconnect=True, reconnect_max_attempts=2,
            reconnect_strategy=ReconnectStrategy.IMMEDIATE) as (client, rec):
        error = connect_expecting_failure(client)       # TCP connects; no one answers
        assert error.code is ErrorCode.CONNECTION_FAILED
        assert "did not answer the AUTHENTICATED handshake" in str(error)
        assert rec.wait_for(lambda: -99 in rec.codes()), rec.kinds()
        assert rec.codes() == [-1, 1, 2, -99]
        assert rec.count("connect") == 0


def test_host_name_is_resolved_off_the_reactor_and_reconnects() -> None:
    with running_server() as server, client_of(
            host="localhost", port=server.port, auto_reconnect=True,
            reconnect_strategy=ReconnectStrategy.IMMEDIATE) as (client, rec):
        connect_and_settle(client, rec)
        assert client.remote_ip in ("127.0.0.1", "::1")
        assert drop_all(server) == 1
        assert rec.wait_for(lambda: rec.count("connect") == 2), rec.kinds()
        assert client.request(b"by name", timeout=WAIT) == b"by name"


def test_slow_name_lookup_blocks_neither_timeout_nor_disconnect(
        monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real_getaddrinfo = socket.getaddrinfo

    def slow_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "slow.invalid" and not kwargs.get("flags"):
            release.wait(WAIT)                            # a resolver that hangs
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow_getaddrinfo)
    try:
        with client_of(host="slow.invalid", port=3434, connection_timeout=0.4,
                       auto_reconnect=True, reconnect_max_attempts=0,
                       reconnect_strategy=ReconnectStrategy.IMMEDIATE) as (client, rec):
            start = time.monotonic()
            error = connect_expecting_failure(client)
            assert time.monotonic() - start < 0.4 + 1.5
            assert error.code is ErrorCode.CONNECTION_FAILED
            assert rec.wait_for(lambda: 1 in rec.codes()), rec.kinds()   # the loop goes on
            release.set()
            start = time.monotonic()
            client.disconnect()
            assert time.monotonic() - start < 5.0
            assert [t for t in threading.enumerate() if "slow.invalid" in t.name] == []
    finally:
        release.set()


def test_reconnect_settings_apply_while_retrying() -> None:
    with refused_port() as port, client_of(
            port=port, auto_reconnect=True, reconnect_max_attempts=0,
            reconnect_strategy=ReconnectStrategy.IMMEDIATE) as (client, rec):
        connect_expecting_failure(client)
        assert rec.wait_for(lambda: 1 in rec.codes()), rec.kinds()
        client.reconnect_max_attempts = 3                 # live: gives up at 3, count kept
        assert rec.wait_for(lambda: -99 in rec.codes()), rec.kinds()
        assert rec.codes() == [-1, 1, 2, 3, -99]
        assert rec.quiet_for(0.5)


def test_connected_time_and_attempts_stay_truthful() -> None:
    with running_server() as server, client_of(
            port=server.port, auto_reconnect=True, reconnect_max_attempts=0,
            reconnect_strategy=ReconnectStrategy.FIXED_INTERVAL,
            reconnect_interval=100) as (client, rec):
        assert client.connected_time == 0 and client.reconnect_attempts == 0
        connect_and_settle(client, rec)
        assert eventually(lambda: client.connected_time > 0.05)
        server.stop()
        assert rec.wait_for(lambda: 1 in rec.codes()), rec.kinds()
        frozen = client.connected_time                    # the last connection's length
        assert frozen > 0.05
        assert rec.wait_for(lambda: 2 in rec.codes()), rec.kinds()
        assert client.connected_time == frozen
        assert client.reconnect_attempts >= 2
        server.start()
        assert rec.wait_for(lambda: rec.count("connect") == 2), rec.kinds()
        connected_at = [t for kind, d, t in rec.snapshot()
                        if kind == "state" and d[1] is ClientState.CONNECTED][-1]
        assert client.reconnect_attempts == 0
        assert client.connected_time <= time.monotonic() - connected_at + 0.5   # new clock
        first = client.connected_time
        assert eventually(lambda: client.connected_time > first)


def test_reconnect_from_on_error_handler_after_giving_up() -> None:
    with running_server() as server, client_of(
            port=server.port, auto_reconnect=True, reconnect_max_attempts=2,
            reconnect_strategy=ReconnectStrategy.IMMEDIATE) as (client, rec):
        outcome: List[Any] = []

        def on_give_up(event: Tuple[Any, ...]) -> None:
            if event[0] == "error" and event[1][0] == ErrorCode.MAX_RECONNECT_ATTEMPTS:
                server.start()
                try:
                    client.reconnect()                    # on the client's own worker
                    outcome.append("ok")
                except BaseException as exc:  # noqa: BLE001 - checked by the test
                    outcome.append(exc)

        rec.hooks.append(on_give_up)
        connect_and_settle(client, rec)
        server.stop()
        assert rec.wait_for(lambda: rec.count("connect") == 2), rec.kinds()
        assert outcome == ["ok"]
        assert client.connected and client.reconnect_attempts == 0
        assert client.request(b"revived", timeout=WAIT) == b"revived"
        assert rec.kinds()[-3:] == ["S:CONNECTING", "S:CONNECTED", "connect"]
        assert rec.codes() == [1, 2, -99]
