"""The reactor: one thread that owns a selector, its sockets, timers and a wake-up pair.

Every component (server or client) has exactly one :class:`Reactor`. Only the reactor
thread touches the selector; other threads hand work to it with :meth:`Reactor.call_soon`
(thread-safe, wakes the loop through a ``socket.socketpair()``: no polling) or
:meth:`Reactor.call_later`. Callbacks registered for a socket run on the reactor thread
with ``(mask)`` and must not block.

Timers run on the reactor's *clock* (default ``time.monotonic``). A test may pass a
clock it moves itself (``morsock.reconnect.VirtualClock``): after moving it, it calls
:meth:`Reactor.wakeup` so that the loop runs the timers now due.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import select
import selectors
import socket
import threading
import time
from collections import deque
from typing import Any, Callable

__all__ = ["Reactor", "Timer", "EVENT_READ", "EVENT_WRITE"]

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE
_monotonic = time.monotonic
_NOT_EPOLLIN = ~getattr(select, "EPOLLIN", 0)
_NOT_EPOLLOUT = ~getattr(select, "EPOLLOUT", 0)

Callback = Callable[..., Any]


def _nothing_pending() -> int:
    return 0


class Timer:
    """A call scheduled on the reactor; :meth:`cancel` may be called from any thread."""

    __slots__ = ("deadline", "fn", "args", "cancelled")

    def __init__(self, deadline: float, fn: Callback, args: tuple[Any, ...]) -> None:
        self.deadline = deadline
        self.fn = fn
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        """Stop the call from happening (no effect if it already ran)."""
        self.cancelled = True


class Reactor:
    """A ``selectors`` loop, run by a thread of its own (:meth:`start`/:meth:`stop`) or by
    the threads of a leader/follower :class:`~morsock.workers.WorkerPool`, one at a time
    (:meth:`poll_once`, then :meth:`close`).

    Methods for any thread: :meth:`start`, :meth:`stop`, :meth:`call_soon`,
    :meth:`call_later`, :meth:`wakeup`, :meth:`in_thread`. Methods for the thread running
    the loop only ("the reactor thread"): :meth:`register`, :meth:`modify`,
    :meth:`unregister`.
    """

    def __init__(self, name: str, logger: logging.Logger | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """*clock*: seconds, never going back; the time base of :meth:`call_later`."""
        self.name = name
        self._clock = clock
        self._log = logger or logging.getLogger("morsock")
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        if self._wake_w.family in (socket.AF_INET, socket.AF_INET6):
            # Windows builds the pair over TCP: without this, Nagle could hold a wake-up
            # byte until the previous one is acknowledged (delayed ACK: up to 200 ms).
            self._wake_w.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._selector.register(self._wake_r, EVENT_READ, self._on_wake)
        # epoll (Linux): poll_once reads the epoll object itself and looks each key up as
        # it dispatches (one Python call less per ready socket than selector.select());
        # the selector still does all the bookkeeping of register/modify/unregister.
        self._epoll_poll: Callable[[float, int], list[tuple[int, int]]] | None = None
        self._fd_to_key: dict[int, selectors.SelectorKey] = {}
        if isinstance(self._selector, getattr(selectors, "EpollSelector", ())):
            epoll = getattr(self._selector, "_selector", None)
            fd_to_key = getattr(self._selector, "_fd_to_key", None)
            if hasattr(epoll, "poll") and isinstance(fd_to_key, dict):
                self._epoll_poll = epoll.poll  # type: ignore[union-attr]
                self._fd_to_key = fd_to_key
        self._calls: deque[tuple[Callback, tuple[Any, ...]]] = deque()
        self._calls_lock = threading.Lock()
        self._wake_pending = False
        self._timers: list[tuple[float, int, Timer]] = []
        self._timer_seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._leader: int | None = None   # ident of the thread inside poll_once()
        #: Whether the poll's own thread has work waiting (set by the pool that runs
        #: this reactor): a poll after a timer that made some does not block.
        self.pending: Callable[[], int] = _nothing_pending
        #: ``time.monotonic()`` as the last ``select`` returned: the time of its I/O, for
        #: its callbacks (one clock read per poll instead of one per ready socket).
        self.now = time.monotonic()
        self._running = False
        self._closed = False

    # -- any thread ------------------------------------------------------------------
    def start(self) -> None:
        """Start the loop thread (once)."""
        if self._thread is not None:
            raise RuntimeError("reactor already started")
        self._running = True
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop, join its thread and release the selector and wake-up sockets.

        Calls already queued with :meth:`call_soon` run before the loop exits. Must not
        be called from the reactor thread (it would join itself): raises RuntimeError.
        """
        if self._closed:
            return
        if self._thread is not None and threading.current_thread() is self._thread:
            raise RuntimeError("Reactor.stop() called from the reactor thread")
        if self._thread is not None:
            self.call_soon(self._halt)
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._log.error("%s did not stop within %.1f s", self.name, timeout)
                return
        self.close()

    def in_thread(self) -> bool:
        """True when called on the thread that is running the loop right now."""
        return self._leader == threading.get_ident()

    def call_soon(self, fn: Callback, *args: Any) -> None:
        """Run ``fn(*args)`` on the reactor thread, in call order. Thread-safe."""
        with self._calls_lock:
            self._calls.append((fn, args))
            if self._wake_pending:
                return
            self._wake_pending = True
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, InterruptedError):
            pass  # the pipe is full: the loop is bound to wake anyway
        except OSError:
            pass  # stopped: nothing left to wake

    def call_later(self, delay: float, fn: Callback, *args: Any) -> Timer:
        """Run ``fn(*args)`` on the reactor thread after *delay* seconds. Thread-safe."""
        timer = Timer(self._clock() + max(0.0, delay), fn, args)
        if self.in_thread():
            self._push_timer(timer)
        else:
            self.call_soon(self._push_timer, timer)
        return timer

    # -- reactor thread only ---------------------------------------------------------
    def register(self, sock: socket.socket, events: int, callback: Callback) -> None:
        """Watch *sock*; ``callback(mask)`` runs when it is ready."""
        self._selector.register(sock, events, callback)

    def modify(self, sock: socket.socket, events: int, callback: Callback) -> None:
        """Change what *sock* is watched for (watch it if it was not)."""
        try:
            self._selector.modify(sock, events, callback)
        except KeyError:
            self._selector.register(sock, events, callback)

    def unregister(self, sock: socket.socket) -> None:
        """Stop watching *sock* (no error if it was not watched or is closed)."""
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    # -- the loop --------------------------------------------------------------------
    def _halt(self) -> None:
        self._running = False

    def _push_timer(self, timer: Timer) -> None:
        heapq.heappush(self._timers, (timer.deadline, next(self._timer_seq), timer))

    def _on_wake(self, mask: int) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _run_calls(self) -> None:
        with self._calls_lock:
            calls = self._calls
            self._calls = deque()
            self._wake_pending = False
        for fn, args in calls:
            try:
                fn(*args)
            except Exception:
                self._log.exception("%s: error in %r", self.name, fn)

    def _run_timers(self) -> float | None:
        """Run due timers; return seconds until the next one (None: no timer)."""
        timers = self._timers
        clock = self._clock
        now = clock()
        while timers:
            deadline, _, timer = timers[0]
            if timer.cancelled:
                heapq.heappop(timers)
                continue
            if deadline > now:
                return deadline - now
            heapq.heappop(timers)
            try:
                timer.fn(*timer.args)
            except Exception:
                self._log.exception("%s: error in timer %r", self.name, timer.fn)
            now = clock()
        return None

    def next_deadline(self) -> float | None:
        """Reactor thread: when the next timer that is not cancelled is due, on the
        reactor's clock (None: no timer)."""
        live = [deadline for deadline, _, timer in self._timers if not timer.cancelled]
        return min(live) if live else None

    def poll_once(self, max_timeout: float | None = None) -> None:
        """One loop iteration: due timers, a ``select`` (blocking until I/O, the next timer,
        a :meth:`call_soon`, or *max_timeout*), its I/O callbacks, then queued calls.

        Called by exactly one thread at a time -- the dedicated loop thread, or the pool
        thread that holds the poll role (leader/follower, see :mod:`morsock.workers`).
        """
        self._leader = threading.get_ident()
        try:
            timeout = self._run_timers()
            if self._calls or self.pending():  # a timer made work: do not block on it
                timeout = 0.0
            elif max_timeout is not None and (timeout is None or timeout > max_timeout):
                timeout = max_timeout
            if self._epoll_poll is not None:
                self._dispatch_epoll(timeout)
            else:
                try:
                    ready = self._selector.select(timeout)
                except InterruptedError:
                    ready = []
                self.now = _monotonic()
                for key, mask in ready:
                    try:
                        key.data(mask)
                    except Exception:
                        self._log.exception("%s: error in I/O callback", self.name)
            if self._calls:
                self._run_calls()
        finally:
            self._leader = None

    def _dispatch_epoll(self, timeout: float | None) -> None:
        """``selector.select(timeout)`` and the callbacks, straight from the epoll object
        (what ``EpollSelector.select`` does, minus a call per event). A socket that an
        earlier callback of the same poll unregistered is skipped."""
        fd_to_key = self._fd_to_key
        if timeout is None:
            timeout = -1
        elif timeout <= 0:
            timeout = 0
        else:  # epoll counts milliseconds: round up, or a short wait turns into a spin
            timeout = math.ceil(timeout * 1e3) * 1e-3
        try:
            events = self._epoll_poll(timeout, len(fd_to_key) or 1)  # type: ignore[misc]
        except InterruptedError:
            return
        self.now = _monotonic()
        for fd, event in events:
            key = fd_to_key.get(fd)
            if key is None:
                continue
            try:
                if key.events == EVENT_READ:
                    # Read only, the commonest: whatever woke it (data, end of stream, an
                    # error) is the reader's to see; a stale EPOLLOUT costs an empty read.
                    key.data(EVENT_READ)
                else:
                    key.data(((event & _NOT_EPOLLIN and EVENT_WRITE)
                              | (event & _NOT_EPOLLOUT and EVENT_READ)) & key.events)
            except Exception:
                self._log.exception("%s: error in I/O callback", self.name)

    def wakeup(self) -> None:
        """Make a blocked :meth:`poll_once` return soon. Thread-safe."""
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def close(self) -> None:
        """Release the selector and the wake-up sockets (once no thread polls any more)."""
        if self._closed:
            return
        self._closed = True
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _run(self) -> None:
        while self._running:
            self.poll_once()
        self._leader = threading.get_ident()
        try:
            self._run_calls()
        finally:
            self._leader = None
