"""The worker pool and strands: where user handlers run.

A :class:`Strand` is a per-connection FIFO of work items that runs one item at a time,
in order, on whichever pool thread picks it up: frames of one connection are handled
sequentially while different connections run in parallel. Producers (the reactor, or any
thread) call :meth:`Strand.post` / :meth:`Strand.post_many`; the strand schedules itself on
the :class:`WorkerPool` when it goes from idle to busy. No lock is held while an item runs.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from typing import Any, Callable, Deque, Iterable, List, Optional

__all__ = ["WorkerPool", "Strand"]


class Strand:
    """Serial executor bound to a pool; ``runner(item)`` processes one item."""

    __slots__ = ("_pool", "_runner", "_items", "_lock", "_scheduled", "_begin", "_end")

    def __init__(self, pool: "WorkerPool", runner: Callable[[Any], None],
                 begin: Optional[Callable[[], None]] = None,
                 end: Optional[Callable[[], None]] = None) -> None:
        self._pool = pool
        self._runner = runner
        self._begin = begin   # called before each batch (the connection corks its output)
        self._end = end       # called after each batch (uncork: one send for all replies)
        self._items: Deque[Any] = deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, item: Any) -> None:
        """Queue one item. Thread-safe."""
        with self._lock:
            self._items.append(item)
            if self._scheduled:
                return
            self._scheduled = True
        self._pool._queue.put(self)

    def post_many(self, items: Iterable[Any]) -> None:
        """Queue several items in order with one hand-off. Thread-safe."""
        with self._lock:
            self._items.extend(items)
            if self._scheduled or not self._items:
                return
            self._scheduled = True
        self._pool._queue.put(self)

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
                self._items = deque()
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
    """``size`` daemon threads that drain strands. Start with :meth:`start`; stop with
    :meth:`shutdown`, which first lets every strand already scheduled finish."""

    def __init__(self, size: int, name: str, logger: Optional[logging.Logger] = None) -> None:
        if size < 1:
            raise ValueError("thread_pool_size must be >= 1")
        self.size = size
        self.name = name
        self._log = logger or logging.getLogger("morsock")
        self._queue: "queue.SimpleQueue[Optional[Strand]]" = queue.SimpleQueue()
        self._threads: List[threading.Thread] = []

    def strand(self, runner: Callable[[Any], None], begin: Optional[Callable[[], None]] = None,
               end: Optional[Callable[[], None]] = None) -> Strand:
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
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)
                if t.is_alive():
                    self._log.error("%s did not stop within %.1f s", t.name, timeout)
        self._threads = []

    def _work(self) -> None:
        get = self._queue.get
        while True:
            strand = get()
            if strand is None:
                return
            strand._drain()
