"""The reactor's poll: both ways of dispatching ready sockets (epoll read directly, and the
selector's own ``select()`` elsewhere) deliver the same masks; the epoll path skips a
socket an earlier callback of the same poll unregistered."""

from __future__ import annotations

import selectors
import socket
import sys
import time
from typing import Iterator, List, Tuple

import pytest

from morsock.reactor import EVENT_READ, EVENT_WRITE, Reactor
from morsock.reconnect import VirtualClock

#: Bound of every poll here: each one has something ready, so none should take it.
POLL = 5.0

epoll_only = pytest.mark.skipif(not hasattr(selectors, "EpollSelector"), reason="Linux epoll")


@pytest.fixture(params=["epoll", "select"])
def reactor(request: pytest.FixtureRequest) -> Iterator[Reactor]:
    """A reactor polled by the test thread, dispatching one way or the other."""
    r = Reactor("test-reactor")
    if request.param == "epoll":
        if r._epoll_poll is None:
            r.close()
            pytest.skip("no epoll selector here")
    else:
        r._epoll_poll = None  # what non-epoll selectors do: selector.select()
    try:
        yield r
    finally:
        r.close()


@pytest.fixture()
def pairs() -> Iterator[List[Tuple[socket.socket, socket.socket]]]:
    made = [socket.socketpair() for _ in range(3)]
    for a, b in made:
        a.setblocking(False)
        b.setblocking(False)
    try:
        yield made
    finally:
        for a, b in made:
            a.close()
            b.close()


def test_read_and_write_masks_reach_the_callbacks(reactor: Reactor, pairs) -> None:
    seen: List[Tuple[str, int]] = []
    (a, b), (c, d), (e, f) = pairs
    reactor.register(a, EVENT_READ, lambda mask: seen.append(("a", mask)))
    reactor.register(c, EVENT_READ | EVENT_WRITE, lambda mask: seen.append(("c", mask)))
    reactor.register(e, EVENT_READ, lambda mask: seen.append(("e", mask)))
    b.send(b"x")
    d.send(b"y")
    reactor.poll_once(POLL)
    # a: readable; c: readable and writable; e: nothing (not called)
    assert sorted(seen) == [("a", EVENT_READ), ("c", EVENT_READ | EVENT_WRITE)]

    seen.clear()
    reactor.modify(c, EVENT_WRITE, lambda mask: seen.append(("c", mask)))
    reactor.unregister(a)
    reactor.poll_once(POLL)
    # c is still readable, but only its write interest is reported now; a is not watched
    assert seen == [("c", EVENT_WRITE)]


def test_callbacks_and_masks_follow_every_register_modify_and_unregister(
        reactor: Reactor, pairs) -> None:
    """What a poll calls, with which mask, follows each change of interest and callback
    exactly (on the epoll path, from the selector's own bookkeeping)."""
    seen: List[Tuple[str, int]] = []
    (a, b), _, _ = pairs
    b.send(b"x")  # a stays readable (never read) and writable throughout

    def poll(name: str, events: int) -> List[Tuple[str, int]]:
        if events:
            reactor.modify(a, events, lambda mask: seen.append((name, mask)))
        seen.clear()
        reactor.poll_once(POLL if events else 0.0)
        return list(seen)

    reactor.register(a, EVENT_READ, lambda mask: seen.append(("first", mask)))
    assert poll("", 0) == [("first", EVENT_READ)]
    assert poll("second", EVENT_READ) == [("second", EVENT_READ)]
    assert poll("both", EVENT_READ | EVENT_WRITE) == [("both", EVENT_READ | EVENT_WRITE)]
    assert poll("write", EVENT_WRITE) == [("write", EVENT_WRITE)]
    assert poll("read again", EVENT_READ) == [("read again", EVENT_READ)]
    reactor.unregister(a)
    assert poll("", 0) == []
    reactor.register(a, EVENT_READ | EVENT_WRITE, lambda mask: seen.append(("new", mask)))
    assert poll("", 0) == [("new", EVENT_READ | EVENT_WRITE)]
    assert poll("last", EVENT_READ) == [("last", EVENT_READ)]
    reactor.unregister(a)
    reactor.unregister(a)  # twice: no error
    assert poll("", 0) == []


def test_a_peer_that_closed_reads_as_readable_only_when_read_is_watched(
        reactor: Reactor, pairs) -> None:
    seen: List[Tuple[str, int]] = []
    (a, b), (c, d), _ = pairs
    reactor.register(a, EVENT_READ, lambda mask: seen.append(("a", mask)))
    reactor.register(c, EVENT_WRITE, lambda mask: seen.append(("c", mask)))
    b.close()
    d.close()
    reactor.poll_once(POLL)
    # a hang-up is reported within the interest: never a mask the callback did not ask for
    assert sorted(seen) == [("a", EVENT_READ), ("c", EVENT_WRITE)]


@epoll_only
def test_a_socket_unregistered_by_an_earlier_callback_is_skipped(pairs) -> None:
    reactor = Reactor("test-reactor")
    try:
        assert reactor._epoll_poll is not None, "Linux: the epoll path is used"
        seen: List[str] = []
        socks = [a for a, _ in pairs]

        def make(index: int):
            def callback(mask: int) -> None:
                seen.append(f"read {index}")
                for other in socks:  # the first one called drops the other two
                    if other is not socks[index]:
                        reactor.unregister(other)
            return callback

        for index, sock in enumerate(socks):
            reactor.register(sock, EVENT_READ, make(index))
        for _, peer in pairs:
            peer.send(b"x")
        reactor.poll_once(POLL)
        assert len(seen) == 1, seen
    finally:
        reactor.close()


def test_a_callback_that_raises_is_logged_and_the_others_still_run(
        reactor: Reactor, pairs, caplog: pytest.LogCaptureFixture) -> None:
    seen: List[str] = []
    (a, b), (c, d), _ = pairs

    def boom(mask: int) -> None:
        raise RuntimeError("boom")

    reactor.register(a, EVENT_READ, boom)
    reactor.register(c, EVENT_READ, lambda mask: seen.append("c"))
    b.send(b"x")
    d.send(b"y")
    with caplog.at_level("ERROR", logger="morsock"):
        reactor.poll_once(POLL)
    assert seen == ["c"]
    assert any("error in I/O callback" in r.getMessage() and r.exc_info
               and r.exc_info[0] is RuntimeError for r in caplog.records)


def test_a_poll_waits_for_a_timer_due_in_under_a_millisecond_not_for_its_bound(
        reactor: Reactor) -> None:
    # The timers run on a virtual clock, so the timer is still pending when the second
    # poll computes its wait, however loaded the machine (on the wall clock it could
    # already be due and run first, and the poll then rightly wait for its bound).
    clock = VirtualClock(10.0)
    reactor._clock = clock
    called: List[int] = []
    reactor.call_later(0.0005, called.append, 1)
    reactor.poll_once(0.0)  # takes the call_later hand-off: the timer is now pending
    start = time.monotonic()
    reactor.poll_once(POLL)  # nothing ready: sleeps as long as the timer needs (ms rounding)
    assert called == []
    clock.advance(0.0005)
    reactor.poll_once(0.0)  # runs it
    assert called == [1]
    # not a benchmark: a poll that ignored the timer would block for the whole bound
    assert time.monotonic() - start < POLL / 2


@pytest.mark.skipif(sys.platform != "linux", reason="the epoll path is Linux's")
def test_linux_uses_the_epoll_path() -> None:
    reactor = Reactor("test-reactor")
    try:
        assert reactor._epoll_poll is not None
    finally:
        reactor.close()


def test_timers_run_on_an_injected_clock() -> None:
    """A reactor on a VirtualClock runs a timer when the clock reaches its deadline --
    not before, however much wall time passes -- in deadline order; a cancelled timer
    never runs and is not reported as next."""
    clock = VirtualClock(100.0)
    ran: List[str] = []
    r = Reactor("test-reactor", clock=clock)
    try:
        r.call_later(0.5, ran.append, "b")
        r.call_later(0.2, ran.append, "a")
        r.call_later(0.3, ran.append, "cancelled").cancel()
        r.poll_once(0.0)                      # queues the timers (not the reactor thread)
        assert r.next_deadline() == 100.2
        r.poll_once(0.05)                     # wall time passes: the clock does not
        assert ran == []
        clock.advance(0.25)
        r.poll_once(0.0)
        assert ran == ["a"] and r.next_deadline() == 100.5
        clock.advance(1.0)
        r.poll_once(0.0)
        assert ran == ["a", "b"] and r.next_deadline() is None
    finally:
        r.close()
