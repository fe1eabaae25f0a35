"""Pure reconnection policy of :class:`~morsock.Client` (docs/guide/reconnection.rst).

No sockets, no threads, no sleeping: :class:`ReconnectPolicy` only counts failed attempts
and computes delays, so it is tested in virtual time (:class:`VirtualClock`).
"""

from __future__ import annotations

import math
import random as _random
from typing import Callable

from .enums import ReconnectStrategy

__all__ = ["ReconnectPolicy", "VirtualClock", "IMMEDIATE_DELAY"]

#: Delay in seconds before every attempt under :attr:`ReconnectStrategy.IMMEDIATE`.
IMMEDIATE_DELAY = 0.1


def _non_negative_int(name: str, value: int) -> int:
    """Return *value* if it is an ``int`` (not ``bool``) >= 0; raise TypeError/ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


class ReconnectPolicy:
    """Decides whether and when the next reconnection attempt happens.

    Not thread-safe: the owning client's reactor thread is its only caller.

    Delay before attempt *n* (n = 1, 2, ...): ``IMMEDIATE`` 0.1 s; ``FIXED_INTERVAL``
    ``interval_ms / 1000``; ``BACKOFF`` ``min(max_interval_ms, interval_ms * 2 ** (n - 1))
    / 1000`` scaled by a random factor in ``[1 - jitter, 1 + jitter)`` and then clamped to
    ``[0, max_interval_ms / 1000]`` (jitter never takes a delay past the cap); ``NONE``
    never. ``max_attempts == 0`` means unlimited.

    How a client uses it (only with ``auto_reconnect=True``)::

        # An established connection dropped (not by disconnect()). The drop is not
        # itself a failed attempt: schedule attempt attempts+1 (= 1).
        delay = policy.next_delay()
        if delay is not None:
            schedule(attempt, delay)

        # An attempt failed:
        n = policy.record_failure()
        fire on_error(message, n)                    # positive code = attempt number
        if policy.exhausted:
            fire on_error(..., ErrorCode.MAX_RECONNECT_ATTEMPTS)   # once, then stop
        else:
            delay = policy.next_delay()               # never None here unless NONE
            if delay is not None:
                schedule(attempt, delay)

        # An attempt (or connect()) succeeded, or reset_reconnection_state():
        policy.reset()

    ``disconnect()`` cancels any scheduled attempt; the policy itself holds no timer.
    """

    def __init__(self, strategy: ReconnectStrategy | str = ReconnectStrategy.BACKOFF,
                 interval_ms: int = 5000, max_attempts: int = 10,
                 max_interval_ms: int = 30000, *, jitter: float = 0.2,
                 random: Callable[[], float] = _random.random) -> None:
        """Validate and store the settings; ``attempts`` starts at 0.

        *strategy* accepts a member, its name or the Delphi spelling (``"rsBackoff"``).
        *interval_ms*, *max_attempts* and *max_interval_ms* must be ints >= 0, *jitter* a
        finite number in ``[0, 1]``, *random* a callable returning a float in ``[0, 1)``
        (values outside are clamped). Raises ValueError (TypeError for wrong types).
        """
        self._strategy = ReconnectStrategy.parse(strategy)
        self._interval_ms = _non_negative_int("interval_ms", interval_ms)
        self._max_attempts = _non_negative_int("max_attempts", max_attempts)
        self._max_interval_ms = _non_negative_int("max_interval_ms", max_interval_ms)
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)):
            raise TypeError(f"jitter must be a number, not {type(jitter).__name__}")
        if not (math.isfinite(jitter) and 0.0 <= jitter <= 1.0):
            raise ValueError(f"jitter must be within [0, 1], got {jitter!r}")
        self._jitter = float(jitter)
        if not callable(random):
            raise TypeError("random must be a callable returning a float in [0, 1)")
        self._random = random
        self._attempts = 0

    @property
    def strategy(self) -> ReconnectStrategy:
        """The delay rule."""
        return self._strategy

    @property
    def interval_ms(self) -> int:
        """Base interval in milliseconds (FIXED_INTERVAL, BACKOFF)."""
        return self._interval_ms

    @property
    def max_attempts(self) -> int:
        """Failed attempts after which retrying stops; 0 = unlimited."""
        return self._max_attempts

    @property
    def max_interval_ms(self) -> int:
        """Cap of a BACKOFF delay in milliseconds, jitter included."""
        return self._max_interval_ms

    @property
    def jitter(self) -> float:
        """Maximum relative jitter of a BACKOFF delay (0.2 = ±20%)."""
        return self._jitter

    @property
    def attempts(self) -> int:
        """Failed attempts since the last :meth:`reset` (``Client.reconnect_attempts``)."""
        return self._attempts

    @property
    def exhausted(self) -> bool:
        """True when ``max_attempts > 0`` and ``attempts >= max_attempts``."""
        return self._max_attempts > 0 and self._attempts >= self._max_attempts

    def _nominal_backoff_ms(self, n: int) -> int:
        """``min(max_interval_ms, interval_ms * 2 ** (n - 1))`` without huge integers."""
        if self._interval_ms == 0:
            return 0
        # Once the shift exceeds the cap's bit length the product is past the cap anyway.
        shift = min(n - 1, self._max_interval_ms.bit_length())
        return min(self._max_interval_ms, self._interval_ms << shift)

    def delay_for(self, n: int) -> float | None:
        """Seconds to wait before attempt *n* (an int >= 1); None under strategy NONE.

        Ignores ``attempts`` and ``max_attempts``. Under BACKOFF it draws one random value.
        """
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"attempt number must be an int, not {type(n).__name__}")
        if n < 1:
            raise ValueError(f"attempt number must be >= 1, got {n}")
        if self._strategy is ReconnectStrategy.NONE:
            return None
        if self._strategy is ReconnectStrategy.IMMEDIATE:
            return IMMEDIATE_DELAY
        if self._strategy is ReconnectStrategy.FIXED_INTERVAL:
            return self._interval_ms / 1000
        nominal = self._nominal_backoff_ms(n) / 1000
        r = min(1.0, max(0.0, float(self._random())))
        delay = nominal * (1.0 + self._jitter * (2.0 * r - 1.0))
        return min(self._max_interval_ms / 1000, max(0.0, delay))

    def next_delay(self) -> float | None:
        """Seconds before the next attempt (number ``attempts + 1``), or None if none
        should be made (strategy NONE or :attr:`exhausted`). Does not change the state."""
        if self.exhausted:
            return None
        return self.delay_for(self._attempts + 1)

    def record_failure(self) -> int:
        """Count one failed attempt and return its number *n* (the ``on_error`` code)."""
        self._attempts += 1
        return self._attempts

    def reset(self) -> None:
        """Zero the count (successful connection or ``reset_reconnection_state()``)."""
        self._attempts = 0

    def __repr__(self) -> str:
        return (f"ReconnectPolicy({self._strategy.name}, interval_ms={self._interval_ms}, "
                f"max_attempts={self._max_attempts}, max_interval_ms={self._max_interval_ms}, "
                f"jitter={self._jitter}, attempts={self._attempts})")


class VirtualClock:
    """A manual monotonic clock for tests: ``clock()`` returns the current virtual time."""

    def __init__(self, start: float = 0.0) -> None:
        """Start at *start* seconds."""
        self._now = float(start)

    def __call__(self) -> float:
        """Current virtual time in seconds."""
        return self._now

    def advance(self, seconds: float) -> float:
        """Move time forward by *seconds* (>= 0, finite; else ValueError); return the new time."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"cannot advance a clock by {seconds!r}")
        self._now += seconds
        return self._now
