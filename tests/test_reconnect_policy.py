"""Tests of the pure reconnection policy (API.md §4, "Reconnection"), in virtual time."""

from __future__ import annotations

from typing import List, Optional, Tuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from morsock.enums import ErrorCode, ReconnectStrategy
from morsock.reconnect import ReconnectPolicy, VirtualClock

MID = lambda: 0.5  # noqa: E731 - jitter factor exactly 1.0


def delays(policy: ReconnectPolicy, count: int) -> List[Optional[float]]:
    return [policy.delay_for(n) for n in range(1, count + 1)]


def test_immediate_and_fixed_interval_sequences() -> None:
    assert delays(ReconnectPolicy("IMMEDIATE", interval_ms=7000), 4) == [0.1] * 4
    assert delays(ReconnectPolicy(ReconnectStrategy.FIXED_INTERVAL, interval_ms=2500), 4) \
        == [2.5] * 4


def test_backoff_without_jitter() -> None:
    policy = ReconnectPolicy("backoff", interval_ms=100, max_interval_ms=400, random=MID)
    assert delays(policy, 5) == [0.1, 0.2, 0.4, 0.4, 0.4]
    default = ReconnectPolicy(random=MID)       # 5000 ms doubling, capped at 30000 ms
    assert delays(default, 5) == [5.0, 10.0, 20.0, 30.0, 30.0]
    assert ReconnectPolicy(jitter=0.0).delay_for(2) == 10.0


def test_backoff_huge_attempt_number_does_not_overflow() -> None:
    policy = ReconnectPolicy(interval_ms=1, max_interval_ms=30000, random=MID)
    assert policy.delay_for(10**6) == 30.0
    assert policy.delay_for(10**18) == 30.0
    assert ReconnectPolicy(interval_ms=0, random=MID).delay_for(10**6) == 0.0


def test_jitter_bounds() -> None:
    low = ReconnectPolicy(interval_ms=1000, max_interval_ms=30000, random=lambda: 0.0)
    high = ReconnectPolicy(interval_ms=1000, max_interval_ms=30000, random=lambda: 0.999999)
    assert low.delay_for(1) == pytest.approx(0.8)
    assert high.delay_for(1) == pytest.approx(1.2, rel=1e-5)
    assert high.delay_for(1) < 1.2                       # type: ignore[operator]
    assert low.delay_for(6) == pytest.approx(24.0)       # at the cap: jitter only lowers it
    assert high.delay_for(6) == 30.0                     # 30 * 1.2 clamped to the cap
    assert high.delay_for(5) == pytest.approx(19.2, rel=1e-5)   # 16 s nominal, below cap
    bad = ReconnectPolicy(interval_ms=1000, random=lambda: -5.0)   # clamped, never negative
    assert bad.delay_for(1) == pytest.approx(0.8)


@given(n=st.integers(1, 10**6), r=st.floats(0.0, 1.0, exclude_max=True),
       interval=st.integers(0, 10**6), cap=st.integers(0, 10**7),
       jitter=st.floats(0.0, 1.0))
def test_backoff_jitter_property(n: int, r: float, interval: int, cap: int,
                                 jitter: float) -> None:
    policy = ReconnectPolicy("rsBackoff", interval_ms=interval, max_interval_ms=cap,
                             jitter=jitter, random=lambda: r)
    nominal = min(cap, interval * 2 ** min(n - 1, 64)) / 1000
    delay = policy.delay_for(n)
    assert delay is not None
    assert 0.0 <= delay <= cap / 1000
    assert nominal * (1 - jitter) * (1 - 1e-12) <= delay <= nominal * (1 + jitter) * (1 + 1e-12)


def test_strategy_none_never_retries() -> None:
    policy = ReconnectPolicy("NONE")
    assert policy.delay_for(1) is None
    assert policy.next_delay() is None
    assert policy.record_failure() == 1
    assert policy.next_delay() is None


def test_max_attempts() -> None:
    policy = ReconnectPolicy("IMMEDIATE", max_attempts=3)
    seen = []
    for _ in range(3):
        assert not policy.exhausted and policy.next_delay() == 0.1
        seen.append(policy.record_failure())
    assert seen == [1, 2, 3] and policy.attempts == 3
    assert policy.exhausted and policy.next_delay() is None


def test_zero_max_attempts_is_unlimited() -> None:
    policy = ReconnectPolicy("FIXED_INTERVAL", interval_ms=10, max_attempts=0)
    for n in range(1, 1001):
        assert policy.record_failure() == n
    assert not policy.exhausted and policy.next_delay() == 0.01


def test_next_delay_follows_attempts_and_reset_restarts() -> None:
    policy = ReconnectPolicy(interval_ms=100, max_interval_ms=400, max_attempts=2, random=MID)
    assert policy.next_delay() == 0.1 and policy.next_delay() == 0.1   # no state change
    policy.record_failure()
    assert policy.next_delay() == 0.2
    policy.record_failure()
    assert policy.exhausted
    policy.reset()
    assert policy.attempts == 0 and not policy.exhausted and policy.next_delay() == 0.1


@pytest.mark.parametrize("kwargs", [
    {"interval_ms": -1}, {"max_attempts": -1}, {"max_interval_ms": -1},
    {"jitter": -0.1}, {"jitter": 1.5}, {"jitter": float("nan")}, {"strategy": "sometimes"},
])
def test_invalid_arguments_raise_value_error(kwargs: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError):
        ReconnectPolicy(**kwargs)


def test_invalid_types_and_attempt_numbers() -> None:
    with pytest.raises(TypeError):
        ReconnectPolicy(interval_ms=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ReconnectPolicy(random=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ReconnectPolicy().delay_for(0)


@pytest.mark.parametrize("text, member", [
    ("backoff", ReconnectStrategy.BACKOFF), ("rsBackoff", ReconnectStrategy.BACKOFF),
    ("immediate", ReconnectStrategy.IMMEDIATE), ("rsFixedInterval",
                                                 ReconnectStrategy.FIXED_INTERVAL),
    ("fixed_interval", ReconnectStrategy.FIXED_INTERVAL), ("rsNone", ReconnectStrategy.NONE),
])
def test_strategy_strings(text: str, member: ReconnectStrategy) -> None:
    assert ReconnectPolicy(text).strategy is member


def test_virtual_clock() -> None:
    clock = VirtualClock(10.0)
    assert clock() == 10.0 and clock.advance(0.5) == 10.5 and clock() == 10.5
    with pytest.raises(ValueError):
        clock.advance(-1)


def simulate(policy: ReconnectPolicy, clock: VirtualClock, succeed_at: int = 0,
             ) -> Tuple[List[float], List[int]]:
    """A client's reconnect loop after a drop at ``clock()``: every attempt fails except
    number *succeed_at* (0 = none). Returns attempt times and on_error codes."""
    times: List[float] = []
    codes: List[int] = []
    delay = policy.next_delay()              # the drop itself is not a failed attempt
    while delay is not None:
        clock.advance(delay)
        times.append(clock())
        if len(times) == succeed_at:
            policy.reset()
            break
        n = policy.record_failure()
        codes.append(n)
        if policy.exhausted:
            codes.append(ErrorCode.MAX_RECONNECT_ATTEMPTS)
            break
        delay = policy.next_delay()
    return times, codes


def test_virtual_time_client_loop() -> None:
    clock = VirtualClock()
    policy = ReconnectPolicy(interval_ms=100, max_interval_ms=400, max_attempts=5, random=MID)
    times, codes = simulate(policy, clock)
    assert times == pytest.approx([0.1, 0.3, 0.7, 1.1, 1.5])
    assert codes == [1, 2, 3, 4, 5, -99]
    assert policy.exhausted and policy.next_delay() is None

    policy.reset()                           # reset_reconnection_state(), then a new drop
    clock.advance(8.5)                       # t = 10.0
    times, codes = simulate(policy, clock, succeed_at=3)
    assert times == pytest.approx([10.1, 10.3, 10.7])
    assert codes == [1, 2] and policy.attempts == 0

    times, codes = simulate(policy, clock, succeed_at=1)   # success reset the backoff
    assert times == pytest.approx([10.8]) and codes == []


def test_virtual_time_none_strategy_makes_no_attempt() -> None:
    clock = VirtualClock()
    assert simulate(ReconnectPolicy("NONE"), clock) == ([], [])
    assert clock() == 0.0
