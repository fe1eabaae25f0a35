"""The worker pool and strands: where user handlers run.

A :class:`Strand` is a per-connection FIFO of work items that runs one item at a time,
in order, on whichever pool thread picks it up: frames of one connection are handled
sequentially while different connections run in parallel. Producers (the reactor, or any
thread) call :meth:`Strand.post` / :meth:`Strand.post_many`; the strand schedules itself on
the :class:`WorkerPool` when it goes from idle to busy. No lock is held while an item runs.

Given a reactor, the pool runs it **leader/follower** style (as mORMot's reader threads
do): the pool threads take turns holding the *poll role*. The leader runs one
:meth:`~morsock.reactor.Reactor.poll_once` -- reading, decoding and scheduling the strands
that became ready -- then hands the poll role to an idle follower and runs a ready strand
itself, on the thread that already holds the data and the GIL. A request therefore costs
no thread hand-off of its own. When handlers are slow on average (> :data:`SLOW_STRAND`)
the leader wakes a follower to take the poll role at once; when they are fast, waking one
would cost more than the handler. Then one idle follower, the standby, looks every
:data:`WATCHDOG` seconds whether the poll role has been left free that long (a handler
that blocks) and takes it if so: a handler that blocks delays other connections' I/O by
at most about twice that. Ready strands that wait while every thread is busy are picked
up by the next free thread; while any wait, the leader only harvests I/O that is already there
(a zero-timeout poll) and then runs the next one, so a busy server alternates between
reading and handling instead of blocking in ``select``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .reactor import Reactor

__all__ = ["WorkerPool", "Strand"]

#: One idle follower (the standby) looks at the poll role this often: a leader that went
#: on to run a handler that blocks is relieved of polling within this time, even with no
#: hand-off. Each look costs a GIL hand-off, so it is rare.
WATCHDOG = 0.05
#: A leader hands the poll role over at once (waking a follower) when strands take longer
#: than this on average; for faster handlers the wake-up would cost more than it saves.
SLOW_STRAND = 0.0005


class Strand:
    """Serial executor bound to a pool; ``runner(item)`` processes one item."""

    __slots__ = ("_pool", "_runner", "_items", "_lock", "_scheduled", "_begin", "_end")

    def __init__(self, pool: WorkerPool, runner: Callable[[Any], None],
                 begin: Callable[[], None] | None = None,
                 end: Callable[[], None] | None = None) -> None:
        self._pool = pool
        self._runner = runner
        self._begin = begin   # called before each batch (the connection corks its output)
        self._end = end       # called after each batch (uncork: one send for all replies)
        self._items: list[Any] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, item: Any) -> None:
        """Queue one item. Thread-safe."""
        with self._lock:
            self._items.append(item)
            if self._scheduled:
                return
            self._scheduled = True
        self._pool._schedule(self)

    def post_many(self, items: Iterable[Any]) -> None:
        """Queue several items in order with one hand-off. Thread-safe."""
        with self._lock:
            self._items.extend(items)
            if self._scheduled or not self._items:
                return
            self._scheduled = True
        self._pool._schedule(self)

    def is_idle(self) -> bool:
        """True when nothing is queued or running on this strand. Thread-safe."""
        with self._lock:
            return not self._scheduled

    def _drain(self) -> None:
        """Run queued items until none is left (pool thread)."""
        runner = self._runner
        lock = self._lock
        while True:
            with lock:
                if not self._items:
                    self._scheduled = False
                    return
                batch = self._items
                self._items = []
            if self._begin is not None:
                self._begin()
            try:
                for item in batch:
                    try:
                        runner(item)
                    except Exception:
                        self._pool._log.exception("unhandled error in %s", self._pool.name)
            finally:
                if self._end is not None:
                    self._end()


class WorkerPool:
    """``size`` daemon threads that drain strands (and, given a *reactor*, take turns
    running it). Start with :meth:`start`; stop with :meth:`shutdown`, which first lets
    every strand already scheduled finish."""

    def __init__(self, size: int, name: str, logger: logging.Logger | None = None,
                 reactor: Reactor | None = None) -> None:
        if size < 1:
            raise ValueError("thread_pool_size must be >= 1")
        self.size = size
        self.name = name
        self._log = logger or logging.getLogger("morsock")
        self._reactor = reactor
        self._cv = threading.Condition(threading.Lock())
        self._ready: deque[Strand] = deque()
        self._poll_free = reactor is not None
        self._idle = 0
        self._standby = False     # an idle thread is in the timed (watchdog) wait
        self._released_at = 0.0   # when the leader last left the poll role (monotonic)
        self._stopping = False
        self._strand_time = 0.0   # moving average of a strand batch's run time, seconds
        self._threads: list[threading.Thread] = []

    def strand(self, runner: Callable[[Any], None], begin: Callable[[], None] | None = None,
               end: Callable[[], None] | None = None) -> Strand:
        """A new strand whose items are passed to *runner* on this pool, with optional
        *begin*/*end* hooks around each batch."""
        return Strand(self, runner, begin, end)

    def start(self) -> None:
        """Start the threads."""
        for i in range(self.size):
            t = threading.Thread(target=self._work, name=f"{self.name}-{i + 1}", daemon=True)
            self._threads.append(t)
            t.start()

    def owns_current_thread(self) -> bool:
        """True when called from one of this pool's threads."""
        return threading.current_thread() in self._threads

    def shutdown(self, timeout: float = 10.0) -> None:
        """Run what is queued, then stop and join every thread (not from a pool thread)."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._reactor is not None:
            self._reactor.wakeup()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)
                if t.is_alive():
                    self._log.error("%s did not stop within %.1f s", t.name, timeout)
        self._threads = []

    def _schedule(self, strand: Strand) -> None:
        reactor = self._reactor
        with self._cv:
            self._ready.append(strand)
            # The leader runs what it scheduled itself; anyone else wakes a thread.
            if self._idle and (reactor is None or not reactor.in_thread()):
                self._cv.notify()

    def _work(self) -> None:
        cv = self._cv
        ready = self._ready
        reactor = self._reactor
        while True:
            strand: Strand | None = None
            with cv:
                watching = False
                while True:
                    if (watching and not self._stopping
                            and time.monotonic() - self._released_at < WATCHDOG):
                        pass  # the watch found the leader cycling normally: back to sleep
                    elif self._poll_free and not self._stopping:
                        self._poll_free = False
                        break
                    elif ready:
                        strand = ready.popleft()
                        if ready and self._idle and (reactor is None
                                                     or self._strand_time > SLOW_STRAND):
                            cv.notify()
                        break
                    elif self._stopping:
                        return
                    self._idle += 1
                    if reactor is not None and not self._standby:
                        # One idle thread at a time keeps watch (see WATCHDOG): it steps in
                        # only if the poll role has been left free that long (a handler
                        # blocks); the others sleep until notified.
                        self._standby = True
                        watching = not cv.wait(WATCHDOG)
                        self._standby = False
                    else:
                        cv.wait()
                        watching = False
                    self._idle -= 1
            if strand is None:
                assert reactor is not None
                try:
                    # strands waiting: only harvest ready I/O, never block in select
                    reactor.poll_once(0.0 if ready else None)
                except Exception:
                    self._log.exception("%s: error in the reactor loop", self.name)
                with cv:
                    self._poll_free = True
                    self._released_at = time.monotonic()
                    if not ready:
                        continue
                    strand = ready.popleft()
                    if self._idle and self._strand_time > SLOW_STRAND:
                        cv.notify()  # a follower takes the poll role (or the next strand)
            start = time.perf_counter()
            strand._drain()
            self._strand_time += (time.perf_counter() - start - self._strand_time) * 0.125
