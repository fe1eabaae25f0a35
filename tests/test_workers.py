"""Strands and the worker pool on their own: items of a strand run in the order they
were posted, one batch at a time, however many threads post and drain; nothing posted
is lost, with or without a reactor run by the pool (leader/follower)."""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, Iterator, List, Optional, Tuple

import pytest

from morsock import workers
from morsock.reactor import Reactor
from morsock.workers import SPREAD_HOLD, SpreadPolicy, WorkerPool

from helpers import TIMEOUT, wait_until


@pytest.fixture(params=["pool only", "leader/follower"])
def pool(request: pytest.FixtureRequest) -> Iterator[WorkerPool]:
    reactor: Optional[Reactor] = Reactor("test-reactor") if request.param != "pool only" else None
    workers = WorkerPool(4, "test-worker", reactor=reactor)
    workers.start()
    try:
        yield workers
    finally:
        workers.shutdown(TIMEOUT)
        if reactor is not None:
            reactor.close()


@pytest.fixture()
def fast_switching() -> Iterator[None]:
    """Switch threads as often as CPython allows, so interleavings actually happen."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


class Sink:
    """A strand's batch runner that records items, notices overlapping batches, and
    tells when *total* items have run."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.items: List[Any] = []
        self.batches = 0
        self.overlaps = 0
        self._running = False
        self._done = threading.Event()

    def run_batch(self, items: List[Any]) -> None:
        if self._running:
            self.overlaps += 1
        self._running = True
        self.batches += 1
        for item in items:
            self.items.append(item)
            sum(range(50))  # some work, so that a thread switch may fall inside a batch
        self._running = False
        if len(self.items) >= self.total:
            self._done.set()

    def wait(self) -> None:
        assert self._done.wait(TIMEOUT), f"{len(self.items)} of {self.total} items ran"


def test_items_from_many_threads_run_in_order_one_batch_at_a_time(
        pool: WorkerPool, fast_switching: None) -> None:
    producers, per_producer = 4, 3000
    sink = Sink(producers * per_producer)
    strand = pool.strand(sink.run_batch)
    start = threading.Barrier(producers)

    def produce(name: int) -> None:
        start.wait(TIMEOUT)
        seq = 0
        while seq < per_producer:
            for _ in range(20):  # a little work between posts: the strand often runs dry
                pass
            if seq % 3:  # mixed: single posts and lists of up to 4
                strand.post((name, seq))
                seq += 1
            else:
                batch = [(name, n) for n in range(seq, min(seq + 4, per_producer))]
                seq += len(batch)  # before posting: the strand may keep (and extend) the list
                strand.post_many(batch)

    threads = [threading.Thread(target=produce, args=(i,)) for i in range(producers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    sink.wait()
    assert sink.overlaps == 0
    assert len(sink.items) == producers * per_producer
    for name in range(producers):  # each producer's items in the order it posted them
        assert [seq for who, seq in sink.items if who == name] == list(range(per_producer))
    # the strand goes idle once everything ran (its last batch may still be returning)
    wait_until(strand.is_idle, what="the strand idle")


def test_strands_run_in_parallel_but_each_in_order(pool: WorkerPool,
                                                   fast_switching: None) -> None:
    sinks = [Sink(500) for _ in range(8)]
    strands = [pool.strand(s.run_batch) for s in sinks]
    for n in range(500):
        for strand in strands:
            strand.post(n)
    for sink in sinks:
        sink.wait()
        assert sink.items == list(range(500))
        assert sink.overlaps == 0


def test_items_posted_while_a_batch_runs_follow_it_in_order(pool: WorkerPool) -> None:
    batches: List[List[str]] = []
    done = threading.Event()
    strand: Any = None

    def run_batch(items: List[str]) -> None:
        batches.append(list(items))
        if items == ["a"]:  # the first batch posts more while it runs
            strand.post("b")
            strand.post_many(["c", "d"])
            strand.post("e")
            assert not strand.is_idle()
        if items[-1] == "e":
            done.set()

    strand = pool.strand(run_batch)
    strand.post("a")
    assert done.wait(TIMEOUT)
    assert batches == [["a"], ["b", "c", "d", "e"]]
    wait_until(strand.is_idle, what="the strand idle")
    # idle again: the next post starts a new first batch
    done.clear()
    strand.post_many(["x", "e"])
    assert done.wait(TIMEOUT)
    assert batches[-1] == ["x", "e"]


def test_a_batch_that_raises_is_logged_and_the_strand_goes_on(
        pool: WorkerPool, caplog: pytest.LogCaptureFixture) -> None:
    seen: List[Any] = []
    done = threading.Event()

    def run_batch(items: List[Any]) -> None:
        for item in items:
            if item == "boom":
                raise RuntimeError("boom")
            seen.append(item)
            if item == "last":
                done.set()

    strand = pool.strand(run_batch)
    with caplog.at_level(logging.ERROR, logger="morsock"):
        strand.post("boom")
        wait_until(lambda: any(r.exc_info for r in caplog.records), what="the error logged")
        strand.post_many(["after", "last"])
        assert done.wait(TIMEOUT)
    assert seen == ["after", "last"]
    assert any("unhandled error" in r.getMessage() for r in caplog.records)


def test_posting_an_empty_list_schedules_nothing(pool: WorkerPool) -> None:
    calls: List[Tuple[Any, ...]] = []
    strand = pool.strand(lambda items: calls.append(tuple(items)))
    strand.post_many([])
    assert strand.is_idle()
    done = threading.Event()
    strand2 = pool.strand(lambda items: done.set())
    strand2.post("x")  # anything the pool would run for the first strand runs before this
    assert done.wait(TIMEOUT)
    assert calls == []



def test_a_retired_strand_drops_what_is_posted_later_and_says_so(
        pool: WorkerPool, caplog: pytest.LogCaptureFixture) -> None:
    """retire() is for a strand whose owner is gone: its runner (and whatever the runner
    refers to) is released at once; an item posted afterwards would be a bug, so it is
    logged as an error, never run."""
    sink = Sink(2)
    strand = pool.strand(sink.run_batch)
    strand.post("first")
    strand.post("second")
    sink.wait()
    wait_until(strand.is_idle, what="strand idle")
    strand.retire()
    assert strand._run_batch is None and strand._target is None  # the sink is let go
    with caplog.at_level(logging.ERROR, logger="morsock"):
        strand.post("late")
        wait_until(lambda: "retired strand" in caplog.text, what="the drop logged")
    assert sink.items == ["first", "second"]


def test_one_runner_serves_many_strands_through_their_targets(
        pool: WorkerPool, caplog: pytest.LogCaptureFixture) -> None:
    """With a target, a strand calls ``run_batch(target, items)``: one runner for every
    strand, each batch told whose it is, in order per strand; retire() lets the target
    go as well as the runner."""
    sinks = [Sink(50) for _ in range(3)]

    def run_batch(target: Sink, items: List[Any]) -> None:
        target.run_batch(items)

    strands = [pool.strand(run_batch, sink) for sink in sinks]
    for n in range(50):
        for index, strand in enumerate(strands):
            strand.post((index, n))
    for sink in sinks:
        sink.wait()
    for index, sink in enumerate(sinks):
        assert sink.items == [(index, n) for n in range(50)] and not sink.overlaps
    wait_until(lambda: all(strand.is_idle() for strand in strands), what="strands idle")
    strands[0].retire()
    assert strands[0]._target is None and strands[0]._run_batch is None
    with caplog.at_level(logging.ERROR, logger="morsock"):
        strands[0].post("late")
        wait_until(lambda: "retired strand" in caplog.text, what="the drop logged")
    assert len(sinks[0].items) == 50


# ------------------------------------------------------------------------ spread policy

class FakeCPU:
    """The process CPU clock a SpreadPolicy reads, moved by hand."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds


def drive(policy: SpreadPolicy, cpu: FakeCPU, now: float, seconds: float,
          with_spread: Tuple[float, float], alone: Tuple[float, float]) -> Tuple[float, List[bool]]:
    """Feed *policy* a workload for *seconds* from *now*, in 10 ms steps: (items per
    second, CPUs kept busy) while it spreads (*with_spread*) and while it does not
    (*alone*). Returns the time reached and what ``spread`` was at each step."""
    step = 0.01
    seen = []
    for _ in range(round(seconds / step)):
        rate, cpus = with_spread if policy.spread else alone
        now += step
        cpu.seconds += cpus * step
        policy.note(now, round(rate * step))
        seen.append(policy.spread)
    return now, seen


#: workloads as measured with 64 KiB messages (bench_encrypted.py part 2): items per
#: second and CPUs busy, spreading and not
CTR_LIKE = ((1100.0, 1.3), (1250.0, 1.0))    # short C calls: spreading only costs CPU
CBC_LIKE = ((1700.0, 1.75), (1000.0, 1.0))   # long GIL-free calls: spreading pays
BLOCKING = ((4000.0, 0.3), (1000.0, 0.08))   # handlers that wait: the CPU stays idle


def test_spread_policy_stops_spreading_when_one_thread_does_as_much_for_less_cpu() -> None:
    cpu = FakeCPU()
    policy = SpreadPolicy(cpu)
    assert policy.spread
    now, seen = drive(policy, cpu, 100.0, 0.3, *CTR_LIKE)
    assert not policy.spread and seen.count(True) == 10  # one window with, then without
    now, seen = drive(policy, cpu, now, SPREAD_HOLD - 0.2, *CTR_LIKE)
    assert not any(seen)  # held for SPREAD_HOLD seconds
    now, seen = drive(policy, cpu, now, 0.4, *CTR_LIKE)
    assert any(seen) and not policy.spread  # measured again, the same answer
    now, seen = drive(policy, cpu, now, 2 * SPREAD_HOLD - 0.4, *CTR_LIKE)
    assert not any(seen)  # ... held twice as long


@pytest.mark.parametrize("workload", [
    CBC_LIKE,
    ((1700.0, 2.0), (1000.0, 1.0)),  # one thread is cheaper per item, but slower
    ((12000.0, 1.5), (11760.0, 1.0)),  # ... and just 2 % slower
], ids=["cbc-like", "cheaper-but-slower", "cheaper-but-2%-slower"])
def test_spread_policy_keeps_spreading_when_threads_side_by_side_do_more(
        workload: Tuple[Tuple[float, float], Tuple[float, float]]) -> None:
    cpu = FakeCPU()
    policy = SpreadPolicy(cpu)
    now, seen = drive(policy, cpu, 0.0, 0.3, *workload)
    assert seen.count(False) == 10 and policy.spread  # one window without, then with
    now, seen = drive(policy, cpu, now, SPREAD_HOLD - 0.2, *workload)
    assert all(seen)


def test_spread_policy_never_tries_one_thread_for_handlers_that_wait() -> None:
    cpu = FakeCPU()
    policy = SpreadPolicy(cpu)
    now, seen = drive(policy, cpu, 0.0, 10.0, *BLOCKING)
    assert all(seen)


def test_spread_policy_spreads_again_once_one_thread_leaves_the_cpu_idle() -> None:
    """Handlers that start to wait (or the load that falls) while one thread does the
    work: the next window finds the CPU idle and spreading comes back at once, not at the
    end of the hold."""
    cpu = FakeCPU()
    policy = SpreadPolicy(cpu)
    now, _ = drive(policy, cpu, 0.0, 0.3, *CTR_LIKE)
    assert not policy.spread
    now, seen = drive(policy, cpu, now, 0.2, *BLOCKING)
    assert policy.spread and seen[-1]


def test_spread_policy_spreads_again_once_one_thread_does_half_the_items() -> None:
    """The CPU kept busy by something else (another thread of the application), while
    handlers start to wait: the items per second fall, and spreading comes back."""
    cpu = FakeCPU()
    policy = SpreadPolicy(cpu)
    now, _ = drive(policy, cpu, 0.0, 0.3, *CTR_LIKE)
    assert not policy.spread
    now, seen = drive(policy, cpu, now, 0.2, (4000.0, 1.2), (500.0, 1.0))
    assert policy.spread and seen[-1]


def test_spread_policy_keeps_spreading_on_too_few_items() -> None:
    cpu = FakeCPU()
    policy = SpreadPolicy(cpu)
    now, seen = drive(policy, cpu, 0.0, 5.0, (50.0, 1.0), (60.0, 0.9))  # 5 per window
    assert all(seen)


class NotePolicy:
    """A spread policy that records what the pool tells it, and always spreads."""

    spread = True

    def __init__(self) -> None:
        self.items = 0
        self.notes = 0

    def note(self, now: float, items: int) -> None:
        self.items += items  # the pool calls it under its lock
        self.notes += 1


def test_the_pool_tells_its_spread_policy_every_item_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """While strands are slow, every item a pool thread runs -- as a follower, or as the
    leader after its poll -- reaches the spread policy exactly once."""
    monkeypatch.setattr(workers, "SLOW_STRAND", 0.0)  # every run counts as slow
    reactor = Reactor("test-reactor")
    pool = WorkerPool(4, "test-worker", reactor=reactor)
    policy = NotePolicy()
    pool._policy = policy  # type: ignore[assignment]
    pool.start()
    sink = Sink(60)
    try:
        strand = pool.strand(sink.run_batch)
        for n in range(30):
            strand.post(n)  # from this thread: followers run them
        for n in range(30, 60, 10):  # from inside a poll: the leader runs them
            reactor.call_soon(strand.post_many, list(range(n, n + 10)), True)
        sink.wait()
        wait_until(strand.is_idle, what="strand idle")
    finally:
        pool.shutdown(TIMEOUT)
        reactor.close()
    assert sink.items == list(range(60)) and not sink.overlaps
    assert policy.items == 60 and policy.notes >= 1
