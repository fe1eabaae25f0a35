"""The worker pool and strands: where user handlers run.

Contract
--------

* A :class:`Strand` is one connection's FIFO of work items. Its items run **in the order
  they were posted, one batch at a time, never on two threads at once**, and no pool lock
  is held while they run: frames of one connection are handled sequentially while
  different connections' strands run in parallel on the pool's threads.
* Producers: :meth:`Strand.post` (any thread) and :meth:`Strand.post_many` (only the
  thread polling a reactor; its list is handed over). A strand schedules itself on its
  :class:`WorkerPool` when it goes from idle to busy; :meth:`Strand.is_idle` says whether
  anything is queued or running.
* A batch runner must not raise; one that does is logged and the rest of that batch is
  lost (the components' runners catch handler exceptions themselves).
* :meth:`WorkerPool.shutdown` runs every strand already scheduled, then joins the threads.
* An idle pool sleeps: with no traffic, every thread waits on the pool's condition
  without a timeout (docs/guide/flow_control.rst).

How it is done (five mechanisms, each needed by a measured case; see
benchmarks/README.rst "Worker threads that measure whether spreading pays")
---------------------------------------------------------------------------------

1. **Poll role (leader/follower).** Given a reactor, the pool threads take turns holding
   the poll role, as mORMot's reader threads do: there is no reactor thread. The leader
   runs one :meth:`~morsock.reactor.Reactor.poll_once` (read, decode, schedule), leaves
   the poll role free, then runs what it scheduled before it polls again: one ``select``
   per batch, on the thread that already holds the data, so a request costs no thread
   hand-off. While strands wait, the leader's poll does not block (a zero timeout).
2. **Harvest.** Strands scheduled by the leader inside its poll go to a list of its own
   (:attr:`WorkerPool._harvest`, no lock) and are published to the ready queue in one go
   when the poll returns.
3. **Lock-free first batch.** The post that schedules an idle strand puts its items in
   ``Strand._first``, which only the thread that drains the strand reads: the first batch
   costs no second lock. Later posts go to ``Strand._items`` under the strand's lock.
4. **Standby watch.** A leader running a handler that blocks must not hold up the other
   connections' I/O. It woke nobody when it left the poll role, so one idle thread at a
   time, the standby, waits at most :data:`WATCHDOG` and takes the poll role if it has
   been left free that long. A watch that finds the leader still inside the same poll
   (no traffic at all) makes the pool *quiet*: every idle thread then waits untimed
   until the leader leaves a poll with traffic, which wakes them all.
5. **Spreading.** When strands are slow on average (> :data:`SLOW_STRAND`), the leader
   wakes a follower at once, which takes the poll role (and may take strands of the
   batch). Whether that pays depends on the handlers: strands that wait on I/O or run
   long GIL-free C calls run faster side by side; strands made of Python and short C
   calls only pass the GIL back and forth and cost more CPU than on one thread. So
   :class:`SpreadPolicy` measures it, by turns, and the leader spreads only while it
   says so.

Threads: a strand's items run on pool threads only; the pool lock (``_cv``) guards the
ready queue, the idle count, the poll role and the watch state; ``_strand_time`` (a
moving average of a batch's run time) is written by the threads that ran batches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from time import perf_counter, process_time
from typing import TYPE_CHECKING, Any, Callable, cast

if TYPE_CHECKING:
    from .reactor import Reactor

__all__ = ["WorkerPool", "Strand", "each"]

#: What :meth:`WorkerPool._next_task` returns to the thread that takes the poll role (a
#: sentinel, never run).
_POLL_ROLE: Strand = cast("Strand", object())
#: What :meth:`WorkerPool._ready_task` returns when there is nothing to do yet.
_NOTHING: Strand = cast("Strand", object())

#: Seconds: while there is traffic, one idle follower (the standby) looks at the poll role
#: this often; a leader that went on to run a handler that blocks is relieved of polling
#: within this time. Each look costs a GIL hand-off, so it is rare.
WATCHDOG = 0.05
#: Seconds: a leader hands the poll role over at once (waking a follower) when strands
#: take longer than this on average (and :class:`SpreadPolicy` finds that it pays); for
#: faster strands the wake-up would cost more than it saves.
SLOW_STRAND = 0.0001
#: How :class:`SpreadPolicy` measures whether waking followers pays: windows of this
#: many seconds with and without, the better holding for SPREAD_HOLD seconds; the window
#: without only if the process kept SPREAD_BUSY_CPU of a CPU busy and ran at least
#: SPREAD_MIN_ITEMS items in the window with.
SPREAD_WINDOW = 0.1
SPREAD_HOLD = 2.0
SPREAD_HOLD_MAX = 32.0  # the hold doubles, up to this, while the answer stays the same
SPREAD_BUSY_CPU = 0.8
SPREAD_MIN_ITEMS = 16
_HOLD_ON, _SPREADING, _ALONE, _HOLD_OFF = range(4)  # SpreadPolicy's phases


class SpreadPolicy:
    """Whether waking followers for slow strands makes the pool do more work per second:
    measured by turns, since it depends on the handlers and on the machine.

    Strands that wait on I/O, or run long GIL-free C calls (CBC over big buffers), run
    faster side by side. Strands made of Python and C calls shorter than a thread
    wake-up (CTR or GCM over 64 KiB) only pass the GIL back and forth, and run slower and
    cost more CPU than on one thread.

    So the pool runs in cycles: a window of :data:`SPREAD_WINDOW` seconds spreading, one
    not spreading, then the better of the two for :data:`SPREAD_HOLD` seconds (twice as
    long each time the answer repeats, up to :data:`SPREAD_HOLD_MAX`). Not
    spreading is better when it does as many items per second or more, for at most
    90 % of the process CPU per item. Handlers that block need other threads whatever
    the numbers, and barely use the CPU: the window without spreading is tried only when
    the process kept at least :data:`SPREAD_BUSY_CPU` of a CPU busy in the window with
    (and ran :data:`SPREAD_MIN_ITEMS` items), and a hold without spreading ends as soon
    as a window finds the CPU less busy than that, or half the items per second.

    :meth:`note` is called by the pool's threads after each run of strands while strands
    are slow (the only time :attr:`spread` is read), under the pool's lock; *now* comes
    from the caller and the CPU time from *cpu_clock*, so the policy is tested without
    threads.
    """

    __slots__ = ("spread", "_cpu_clock", "_phase", "_phase_end", "_start", "_start_cpu",
                 "_items", "_with", "_hold", "_hold_end", "_alone", "_alone_rate")

    def __init__(self, cpu_clock: Callable[[], float] = process_time) -> None:
        #: Whether slow strands should wake followers.
        self.spread = True
        self._cpu_clock = cpu_clock
        self._phase = _HOLD_ON        # _SPREADING, _ALONE (the two windows) or a hold
        self._phase_end = 0.0         # 0: the first note starts a cycle
        self._start = self._start_cpu = 0.0   # when the phase began: time, process CPU
        self._items = 0               # items run since the phase began
        self._with: tuple[float, float] = (0.0, 0.0)  # spreading: items/s, CPU s per item
        self._hold = SPREAD_HOLD      # how long the current answer holds (s)
        self._hold_end = 0.0          # when a hold without spreading ends
        self._alone_rate = 0.0        # items/s of the last window not spreading
        self._alone = False           # the last answer: not spreading does better

    def note(self, now: float, items: int) -> None:
        """*items* more items ran; *now*: when (seconds, any monotonic clock)."""
        self._items += items
        if now < self._phase_end:
            return
        cpu = self._cpu_clock()
        span = now - self._start
        phase = self._phase
        if phase == _SPREADING:
            self._after_spreading(now, cpu, span)
        elif phase == _ALONE:
            self._after_alone(now, cpu, span)
        elif phase == _HOLD_OFF and now < self._hold_end and self._still_alone(cpu, span):
            self._next(_HOLD_OFF, SPREAD_WINDOW, now, cpu)  # still busy: go on alone
        else:
            # A hold is over; or one thread alone no longer keeps the CPU busy, or does
            # half the items it did (handlers that now wait on something, or less
            # load): measure again.
            if phase == _HOLD_OFF and now < self._hold_end:
                self._hold = SPREAD_HOLD
            self._next(_SPREADING, SPREAD_WINDOW, now, cpu)

    def _busy(self, cpu: float, span: float) -> bool:
        """Whether the process kept the CPU busy through the phase."""
        return cpu - self._start_cpu >= SPREAD_BUSY_CPU * span

    def _after_spreading(self, now: float, cpu: float, span: float) -> None:
        """The window spreading ended: measure one alone next, if it is worth trying."""
        items = self._items
        if self._busy(cpu, span) and items >= SPREAD_MIN_ITEMS:
            self._with = (items / span, (cpu - self._start_cpu) / items)
            self._next(_ALONE, SPREAD_WINDOW, now, cpu)
        else:
            self._next(_HOLD_ON, self._hold, now, cpu)

    def _after_alone(self, now: float, cpu: float, span: float) -> None:
        """The window alone ended: hold the better of the two."""
        items = self._items
        rate, cost = self._with
        alone = (items >= SPREAD_MIN_ITEMS and items / span >= rate
                 and (cpu - self._start_cpu) / items <= cost * 0.9)
        # the same answer again: hold it twice as long (each window not spreading
        # costs a workload that needs spreading a tenth of a second of it)
        self._hold = (min(self._hold * 2, SPREAD_HOLD_MAX) if alone == self._alone
                      else SPREAD_HOLD)
        self._alone = alone
        self._alone_rate = items / span
        if alone:
            self._hold_end = now + self._hold  # checked every window until then
            self._next(_HOLD_OFF, SPREAD_WINDOW, now, cpu)
        else:
            self._next(_HOLD_ON, self._hold, now, cpu)

    def _still_alone(self, cpu: float, span: float) -> bool:
        """In a hold alone: the CPU stays busy and the rate holds up (half of it)."""
        return self._busy(cpu, span) and self._items / span >= self._alone_rate * 0.5

    def _next(self, phase: int, length: float, now: float, cpu: float) -> None:
        self._phase = phase
        self._phase_end = now + length
        self.spread = phase != _ALONE and phase != _HOLD_OFF
        self._start = now
        self._start_cpu = cpu
        self._items = 0


class Strand:
    """Serial executor bound to a pool: ``run_batch(items)`` -- or, given a *target*,
    ``run_batch(target, items)`` -- processes a list of queued items in order (see
    :func:`each` to run an item at a time). It must not raise: an exception that escapes
    is logged and the rest of that batch is lost.

    A *target* spares an object per strand (``functools.partial(run_batch, target)``):
    one runner, e.g. a component's bound method, can serve all its connections' strands.
    """

    __slots__ = ("_pool", "_run_batch", "_target", "_first", "_items", "_lock", "_scheduled")

    def __init__(self, pool: WorkerPool, run_batch: Callable[..., None],
                 target: Any = None) -> None:
        self._pool = pool
        self._run_batch: Callable[..., None] | None = run_batch
        self._target = target
        # An idle strand (not scheduled) holds no items. The post that schedules it puts
        # its items in _first, which only the thread that drains the strand then reads:
        # the first batch costs no second lock. Items posted while the strand is
        # scheduled go to _items, under the lock.
        self._first: list[Any] | None = None
        self._items: list[Any] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, item: Any) -> None:
        """Queue one item. Thread-safe."""
        with self._lock:
            if self._scheduled:
                self._items.append(item)
                return
            self._scheduled = True
            self._first = [item]
        self._pool._schedule(self)

    def post_many(self, items: list[Any], polled: bool = False) -> None:
        """Queue the items of *items* in order with one hand-off; the strand may keep the
        list itself, so the caller must not use it afterwards. Called by the thread
        polling a reactor (the hot path of every read), never by the main thread (see
        :meth:`_drain`); safe beside posts from other threads. *polled*: the caller
        polls the pool's own reactor, so a strand this schedules joins the poll's
        harvest without asking."""
        if not items:
            return
        lock = self._lock
        lock.acquire()  # not ``with``: see _drain
        try:
            if self._scheduled:
                if self._items:
                    self._items.extend(items)
                else:
                    self._items = items
                return
            self._scheduled = True
            self._first = items
        finally:
            lock.release()
        pool = self._pool
        if polled and pool._reactor is not None:
            pool._harvest.append(self)
        else:
            pool._schedule(self)

    def retire(self) -> None:
        """Drop the batch runner and target once nothing more will be posted: they
        usually refer back to the strand's owner, a reference cycle that would wait for
        the garbage collector. Call it after the last item ran, or while idle after the
        last post (an item posted later is logged and dropped)."""
        self._run_batch = self._target = None

    def is_idle(self) -> bool:
        """True when nothing is queued or running on this strand. Thread-safe."""
        return not self._scheduled  # one attribute read: atomic

    def _drain(self) -> int:
        """Run queued items until none is left (pool thread); return how many ran."""
        items = self._first
        self._first = None
        lock = self._lock
        ran = 0
        while True:
            if items:
                ran += len(items)
                run_batch = self._run_batch
                target = self._target
                try:
                    if run_batch is None:
                        self._pool._log.error("%d item(s) posted to a retired strand, "
                                              "dropped", len(items))
                    elif target is None:
                        run_batch(items)
                    else:
                        run_batch(target, items)
                except Exception:
                    self._pool._log.exception("unhandled error in %s", self._pool.name)
            # acquire/release, not ``with`` (cheaper, and this runs once or twice a
            # request). Rule: only where no KeyboardInterrupt can strike -- pool and
            # reactor threads, never the main thread -- since one raised between
            # acquire() and ``try`` would leave the lock held for good.
            lock.acquire()
            try:
                items = self._items
                if not items:
                    self._scheduled = False
                    return ran
                self._items = []
            finally:
                lock.release()


def each(run_item: Callable[[Any], None], log: logging.Logger) -> Callable[[list[Any]], None]:
    """A batch runner for :class:`Strand` that passes items one at a time to *run_item*,
    logging (and going on after) an item that raises."""
    def run_batch(items: list[Any]) -> None:
        for item in items:
            try:
                run_item(item)
            except Exception:
                log.exception("unhandled error running %r", item)
    return run_batch


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
        self._quiet = False       # the watch found no traffic: idle threads wait untimed
        self._released_at = 0.0   # when the leader last left the poll role (monotonic)
        self._stopping = False
        self._strand_time = 0.0   # moving average of a strand batch's run time, seconds
        self._policy = SpreadPolicy()  # whether slow strands should wake followers
        self._harvest: list[Strand] = []  # scheduled by the leader during its poll
        if reactor is not None:
            reactor.pending = self._harvest.__len__
        self._threads: list[threading.Thread] = []

    def strand(self, run_batch: Callable[..., None], target: Any = None) -> Strand:
        """A new strand whose queued items are passed, a list at a time, to *run_batch*
        (after *target*, if given) on this pool."""
        return Strand(self, run_batch, target)

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
        if reactor is not None and reactor.in_thread():
            # The leader, inside poll_once: it publishes what it harvested in one go when
            # the poll returns, then runs it itself (see _lead).
            self._harvest.append(strand)
            return
        with self._cv:
            self._ready.append(strand)
            if self._idle:
                self._cv.notify()

    def _work(self) -> None:
        """A pool thread: take the poll role when it is free, else a ready strand, else
        wait; until the pool stops and nothing is left to run."""
        ran: tuple[float, int] | None = None  # the last run: _note_run
        while True:
            with self._cv:
                if ran is not None:
                    self._note_run(ran)
                task = self._next_task()
            if task is None:
                return
            ran = self._lead() if task is _POLL_ROLE else self._run_strand(task)

    def _next_task(self) -> Strand | None:
        """Under the pool lock: :data:`_POLL_ROLE` (this thread now leads), a ready strand,
        or None once stopping with nothing ready; waits until one of them."""
        while True:
            task = self._ready_task()
            if task is not _NOTHING:
                return task
            while self._wait():
                pass  # the watch found the leader cycling normally: watch again

    def _ready_task(self) -> Strand | None:
        """Under the pool lock: what :meth:`_next_task` returns if there is one now, else
        :data:`_NOTHING`."""
        ready = self._ready
        if self._poll_free and not self._stopping:
            self._poll_free = False
            return _POLL_ROLE
        if ready:
            strand = ready.popleft()
            if ready and self._idle and self._spreading():
                self._cv.notify()
            return strand
        return None if self._stopping else _NOTHING

    def _spreading(self) -> bool:
        """Under the pool lock: whether another ready strand should wake an idle thread
        (always without a reactor; with one, while strands are slow and it pays)."""
        return self._reactor is None or (self._strand_time > SLOW_STRAND
                                         and self._policy.spread)

    def _wait(self) -> bool:
        """Under the pool lock, idle: wait to be notified -- as the standby (one idle
        thread at a time, while the pool is not quiet), for at most :data:`WATCHDOG`.
        Returns True when a standby's watch timed out while the poll role is in use or
        was left free less than :data:`WATCHDOG` ago (the leader cycles normally: the
        caller watches again); False when there may be something to do. A watch that
        finds the leader still inside the same poll (no traffic) makes the pool quiet:
        idle threads then sleep until the leader leaves a poll with traffic (see
        :meth:`_release_poll_role`)."""
        self._idle += 1
        try:
            if self._reactor is None or self._standby or self._quiet:
                self._cv.wait()
                return False
            self._standby = True
            seen = self._released_at
            timed_out = not self._cv.wait(WATCHDOG)
            self._standby = False
            if not timed_out or self._stopping:
                return False
            if self._released_at == seen and not self._poll_free:
                self._quiet = True
            return time.monotonic() - self._released_at < WATCHDOG
        finally:
            self._idle -= 1

    def _run_strand(self, strand: Strand) -> tuple[float, int]:
        """Run *strand*'s items (no lock held); returns the run for :meth:`_note_run`."""
        start = perf_counter()
        items = strand._drain()
        end = perf_counter()
        self._strand_time += (end - start - self._strand_time) * 0.125
        return (end, items)

    def _release_poll_role(self) -> int:
        """Under the pool lock, after the leader's poll: leave the poll role free, publish
        the harvest; returns how many strands are ready."""
        self._poll_free = True
        self._released_at = time.monotonic()
        cv = self._cv
        if self._quiet:  # the first poll with traffic after a quiet spell
            self._quiet = False
            cv.notify_all()  # the watch resumes (and a follower may take the poll)
        harvest = self._harvest
        ready = self._ready
        if harvest:
            ready.extend(harvest)
            harvest.clear()
        if ready and self._idle and self._spreading():
            cv.notify()  # slow handlers: a follower takes the poll role at once
        return len(ready)

    def _note_run(self, ran: tuple[float, int]) -> None:
        """Under the pool lock, after a thread ran strands: *ran* is (when it ended,
        items run). Told to the spread policy while strands are slow, the only time it
        is asked."""
        if self._strand_time > SLOW_STRAND and self._reactor is not None:
            self._policy.note(*ran)

    def _lead(self) -> tuple[float, int] | None:
        """Hold the poll role for one poll, then run what it harvested, in order, before
        polling again -- as a single-threaded reactor would: one ``select`` per batch.
        Returns the run for :meth:`_note_run` (None: nothing to run)."""
        reactor = self._reactor
        assert reactor is not None
        ready = self._ready
        cv = self._cv
        try:
            # strands waiting: only harvest ready I/O, never block in select
            reactor.poll_once(0.0 if ready else None)
        except Exception:
            self._log.exception("%s: error in the reactor loop", self.name)
        with cv:
            count = self._release_poll_role()
            if not count:
                return None
        # Run this batch without the pool lock (deque pops are atomic); a follower may
        # take some of it meanwhile.
        popleft = ready.popleft
        start = perf_counter()
        done = items = 0
        while done < count:
            try:
                strand = popleft()
            except IndexError:
                break
            items += strand._drain()
            done += 1
        end = perf_counter()
        if done:
            self._strand_time += ((end - start) / done - self._strand_time) * 0.125
        return (end, items)
