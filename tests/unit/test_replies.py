"""morsock._replies.ReplyOrder without sockets: the order rules of request() matching,
including a server that skips a reply while several requests are in flight (the case
where keeping late places alone would hand a request the reply of the one behind it)."""

from __future__ import annotations

import threading
import time
from typing import Any, List

import pytest
from helpers import scaled

from morsock._replies import LATE, ReplyOrder
from morsock.errors import NotConnectedError, RequestTimeout

CONN = object()


def _start(order: ReplyOrder, name: bytes, timeout: float, out: List[Any],
           sent: List[bytes]) -> threading.Thread:
    def run() -> None:
        try:
            out.append((name, order.request(CONN, lambda: sent.append(name), timeout,
                                            lambda message: out.append(("lost", message)))))
        except Exception as exc:  # the test looks at it
            out.append((name, exc))
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _until(predicate: Any) -> None:
    deadline = time.monotonic() + scaled(10)
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.002)  # polling a condition with a deadline, not timing


def test_skipped_reply_with_requests_in_flight_never_gives_wrong_data() -> None:
    order = ReplyOrder()
    out: List[Any] = []
    sent: List[bytes] = []
    threads = [_start(order, b"A", 0.2, out, sent)]
    _until(lambda: sent == [b"A"])
    threads.append(_start(order, b"B", 10, out, sent))
    _until(lambda: sent == [b"A", b"B"])
    threads.append(_start(order, b"C", 0.6, out, sent))
    _until(lambda: sent == [b"A", b"B", b"C"])
    _until(lambda: len(out) == 2)        # A timed out; B gave up at once
    assert isinstance(dict(out)[b"A"], RequestTimeout)
    assert "gave up" in str(dict(out)[b"B"])
    # the server skipped A: only B's and C's replies come
    assert order.deliver(CONN, b"reply B") is LATE
    assert order.deliver(CONN, b"reply C") is LATE
    for thread in threads:
        thread.join(scaled(10))
    results = dict(out)
    assert isinstance(results[b"C"], RequestTimeout)   # a timeout, not b"reply B"
    assert all(not isinstance(r, bytes) or r == b"reply " + n for n, r in results.items())


def test_held_request_is_sent_once_late_replies_are_in() -> None:
    order = ReplyOrder()
    out: List[Any] = []
    sent: List[bytes] = []
    with pytest.raises(RequestTimeout):
        order.request(CONN, lambda: sent.append(b"slow"), 0.05, out.append)
    thread = _start(order, b"next", 10, out, sent)
    _until(lambda: order.held == 1)
    assert sent == [b"slow"]                            # held: not sent yet
    assert order.deliver(CONN, b"late") is LATE
    _until(lambda: sent == [b"slow", b"next"])
    assert order.deliver(CONN, b"reply next") is True
    thread.join(scaled(10))
    assert out == [(b"next", b"reply next")]


def test_order_lost_when_the_late_reply_never_comes() -> None:
    order = ReplyOrder()
    lost: List[str] = []
    with pytest.raises(RequestTimeout):
        order.request(CONN, lambda: None, 0.05, lost.append)
    with pytest.raises(RequestTimeout, match="order of replies is lost"):
        order.request(CONN, lambda: pytest.fail("sent"), 0.1, lost.append)
    assert len(lost) == 1 and "skip replies" in lost[0]
    order.reset(CONN)                                   # the client closed that connection
    other = object()
    thread_out: List[Any] = []
    t = threading.Thread(target=lambda: thread_out.append(
        order.request(other, lambda: None, 10, lost.append)))
    t.start()
    _until(lambda: order.deliver(other, b"fresh") is True)
    t.join(scaled(10))
    assert thread_out == [b"fresh"]                     # a new connection starts in step


def test_frames_of_another_connection_are_nobody_s_reply() -> None:
    order = ReplyOrder()
    out: List[Any] = []
    thread = _start(order, b"x", 10, out, [])
    _until(lambda: order.deliver(object(), b"stale") is None and order._ledger)
    order.reset(CONN, "why")
    thread.join(scaled(10))
    (name, error), = out
    assert isinstance(error, NotConnectedError) and str(error).endswith(": why")
