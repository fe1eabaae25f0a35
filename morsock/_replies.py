"""Matching :meth:`Client.request` replies by order, without sessions.

Not public; the rule is documented for users in docs/guide/requests.rst.

The server answers one connection's frames in the order they came, so the client keeps,
per connection, the *order* of the requests it sent (the ledger) and gives each frame
that comes back to the oldest entry. Two kinds of entry:

* a waiting request: the frame is its reply;
* a *late* entry, left by a request that timed out: its reply is still owed, and the
  frame that pays it goes to ``on_handle_command`` (a late reply is never handed to
  another request).

A server may also skip a reply (a handler that returns nothing). A late entry can then
never be paid, and every later frame would be one place off. Nothing on the wire tells a
skipped reply from a slow one, so the rules are:

1. After a request timed out, the connection is *out of step*. A request sent while out
   of step is held back (not sent) until every request sent before it has been paid a
   frame: then the order is known again.
2. When a request times out, every request still waiting behind it, except the newest,
   gives up too (RequestTimeout): if the server skipped the reply, each of them could
   otherwise be handed the reply of the one behind it.
3. A held request whose timeout passes before the order is known again means the owed
   replies are not coming: the order of that connection is lost for good, so the client
   closes it (with ``auto_reconnect`` a new connection follows, in step).

A server that answers the messages sent with ``send_data`` (the Delphi components'
model: a reply for every command) can be declared with ``send_data_replies``: each such
message then takes a late place too (:meth:`ReplyOrder.owe`), so its answer is never taken
for a request's reply; a request made before that answer came is held back by rule 1.

So a request returns its own reply or raises; it never returns another one's.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable

from .errors import NotConnectedError, RequestTimeout

__all__ = ["ReplyOrder", "LATE", "Waiter"]


class _Late:
    """Marker of a place whose frame is a late reply (see the module)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "LATE"


#: A ledger place owed to a request that timed out; what :meth:`ReplyOrder.deliver`
#: returns for the frame that pays it.
LATE: Any = _Late()


class Waiter:
    """One waiting request: *event* is set once *reply* or *error* is (also a session's
    requests, matched by id in morsock._session_link)."""

    __slots__ = ("event", "reply", "error")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reply: bytes | None = None
        self.error: BaseException | None = None


class ReplyOrder:
    """The request ledger of a client's current connection (see the module docstring).

    :meth:`request` runs on the caller's thread; :meth:`deliver` on the client's strand (one
    frame at a time, in arrival order); :meth:`reset` when a connection closes. All are
    thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_step = threading.Condition(self._lock)
        self._ledger: deque[Any] = deque()  # Waiter or LATE, in send order
        self._conn: Any = None              # the connection the ledger belongs to
        self._out_of_step = False
        self._pushed = 0  # places ever taken on this connection's ledger
        self._popped = 0  # places ever paid a frame
        #: requests held back right now (rule 1); read by tests
        self.held = 0

    def request(self, conn: Any, send: Callable[[], None], timeout: float,
                order_lost: Callable[[str], Any]) -> bytes:
        """Send with *send* (on *conn*) and return the reply that comes in its place.

        Raises RequestTimeout after *timeout* seconds, NotConnectedError when *conn*
        closes first, and whatever *send* raises (nothing is then owed). When the order
        of *conn* is lost (rule 3), *order_lost(message)* is called (it closes *conn*)
        before RequestTimeout is raised.
        """
        deadline = time.monotonic() + timeout
        waiter = Waiter()
        with self._lock:
            if self._conn is not conn:
                self._adopt(conn)
            ahead = self._pushed  # the places taken before this request
            while self._out_of_step and self._popped < ahead:
                if self._conn is not conn:  # closed while this request was held
                    raise NotConnectedError("the connection was closed before the request "
                                            "could be sent")
                left = deadline - time.monotonic()
                if left <= 0:
                    owed = ahead - self._popped
                    message = (f"request not sent: {owed} earlier message(s) on this "
                               f"connection are owed a reply (requests that timed out, or "
                               f"send_data() with send_data_replies) that has not come within "
                               f"{timeout:g} s (does the server skip replies?); without "
                               f"sessions the order of replies is lost, so the connection "
                               f"is closed")
                    break
                self.held += 1
                try:
                    self._in_step.wait(left)
                finally:
                    self.held -= 1
            else:
                if self._conn is not conn:  # closed while this request was held
                    raise NotConnectedError("the connection was closed before the request "
                                            "could be sent")
                message = ""
                self._ledger.append(waiter)
                try:
                    send()
                except BaseException:
                    self._ledger.remove(waiter)
                    raise
                self._pushed += 1
        if message:
            order_lost(message)
            raise RequestTimeout(message)
        if not waiter.event.wait(max(0.0, deadline - time.monotonic())):
            with self._lock:
                if not waiter.event.is_set():
                    self._give_up(waiter)
        if waiter.error is not None:
            raise waiter.error
        if waiter.reply is None:
            raise RequestTimeout(f"no reply within {timeout:g} s")
        return waiter.reply

    def owe(self, conn: Any, send: Callable[[], None]) -> None:
        """Send with *send* (on *conn*) a message that the server answers (send_data with
        ``send_data_replies``): it takes a place whose frame goes to ``on_handle_command``,
        and a request made before that frame came is held back (rule 1). Raises whatever
        *send* raises (no place is then taken)."""
        with self._lock:
            if self._conn is not conn:
                self._adopt(conn)
            self._ledger.append(LATE)
            try:
                send()
            except BaseException:
                self._ledger.pop()  # the place just taken, under the same lock
                raise
            self._pushed += 1
            self._out_of_step = True

    def _adopt(self, conn: Any) -> None:
        """Under the lock: a request on another connection than the ledger's (the old one
        closed): start an empty ledger for *conn*."""
        self._fail_all(NotConnectedError("the connection was closed before the reply came"))
        self._conn = conn
        self._in_step.notify_all()  # requests held for the old connection fail

    def _give_up(self, waiter: Waiter) -> None:
        """Under the lock: *waiter* timed out; it keeps its place as LATE (rule 2 for the
        ones behind it)."""
        ledger = self._ledger
        index = ledger.index(waiter)
        ledger[index] = LATE
        self._out_of_step = True
        behind = [i for i in range(index + 1, len(ledger)) if ledger[i] is not LATE]
        for i in behind[:-1]:
            other = ledger[i]
            ledger[i] = LATE
            other.error = RequestTimeout(
                "gave up: an earlier request on this connection timed out, and without "
                "sessions its late reply could not be told from this one's")
            other.event.set()

    def deliver(self, conn: Any, data: bytes) -> Any:
        """Strand: hand *data*, a frame that just came on *conn*, to the entry whose place
        it is. Returns True (a waiting request got it as its reply), LATE (a late reply:
        the caller passes it on as unsolicited) or None (nobody asked for it)."""
        with self._lock:
            if conn is not self._conn or not self._ledger:
                return None
            entry = self._ledger.popleft()
            self._popped += 1
            if self._out_of_step and not self._ledger:
                self._out_of_step = False
            if self.held:
                self._in_step.notify_all()
            if entry is LATE:
                return LATE
            entry.reply = data
            entry.event.set()
            return True

    def reset(self, conn: Any, why: str = "") -> None:
        """*conn* closed: every request waiting on it raises NotConnectedError at once
        (its message followed by *why* when given), and what it owed is forgotten (a new
        connection starts in step)."""
        with self._lock:
            if conn is not self._conn:
                return
            message = "the connection was closed before the reply came"
            self._fail_all(NotConnectedError(f"{message}: {why}" if why else message))
            self._conn = None
            self._in_step.notify_all()

    def _fail_all(self, error: BaseException) -> None:
        for entry in self._ledger:
            if entry is not LATE:
                entry.error = error
                entry.event.set()
        self._ledger.clear()
        self._out_of_step = False
        self._pushed = self._popped = 0
