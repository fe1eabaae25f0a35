"""ReceiveBacklog against a plain model: the backlog is the bytes of the reads whose frames
are not all handled, whatever the interleaving of reads and handled batches; a pause starts
only past the limit and its resume point is at or below half of it."""

from __future__ import annotations

from typing import List, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st

from morsock._receive_backlog import ReceiveBacklog

#: a step: ("read", frames, bytes) or ("handle", items)
STEPS = st.lists(st.one_of(
    st.tuples(st.just("read"), st.integers(1, 5), st.integers(1, 400)),
    st.tuples(st.just("handle"), st.integers(1, 6), st.just(0)),
), max_size=60)


def _model_size(reads: List[Tuple[int, int]], handled: int, total: int) -> int:
    done = 0
    for frames, nbytes in reads:
        if frames <= handled:
            done = nbytes
    return total - done


@settings(max_examples=300, deadline=None)
@given(STEPS, st.integers(50, 1000))
def test_the_backlog_matches_the_model(steps: List[Tuple[str, int, int]], limit: int) -> None:
    backlog = ReceiveBacklog(limit)
    reads: List[Tuple[int, int]] = []   # (frames in all, bytes in all) after each read
    frames = nbytes = handled = 0
    for kind, n, size in steps:
        if kind == "read":
            before = _model_size(reads, handled, nbytes)
            frames += n
            nbytes += size
            reads.append((frames, nbytes))
            paused = backlog.posted(n, size)
            expected = _model_size(reads, handled, nbytes)
            assert backlog.size == expected
            if paused:
                assert expected > limit and backlog.paused
                # reading resumes once handled reaches a point at or below half the limit
                assert _model_size(reads, backlog._resume_at, nbytes) <= limit // 2
            elif before == 0:
                assert not backlog.paused  # a read on an empty backlog is always taken
            if backlog.paused:
                return  # the reactor reads no more until a resume: the model ends here
            # a read forgets what was handled (the strand never touches the list)
            unhandled_reads = sum(1 for f, _ in reads if f > handled)
            assert backlog.entries() <= unhandled_reads
        else:
            n = min(n, frames - handled)  # only what was posted can be handled
            if n == 0:
                continue
            handled += n
            backlog.handled(n)
            assert backlog.size == _model_size(reads, handled, nbytes)


def test_a_connection_whose_handlers_keep_up_remembers_nothing() -> None:
    backlog = ReceiveBacklog(limit=1 << 20)
    for _ in range(10_000):
        assert not backlog.posted(1, 100)
        backlog.handled(1)
    assert backlog.entries() == 0 and backlog.size == 0
