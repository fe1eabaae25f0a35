"""Sequence-number accounting of the cluster streams (morsock.cluster's delivery rule).

Every origin numbers its messages 1, 2, ... per stream and per run. A :class:`SeqLedger`
remembers, per ``(stream, origin node, origin's run)``, the last number handled: a
number at or below it is a duplicate (a publish retried after a reconnect), a jump past
it is a gap (messages lost in Redis). It also holds the numbers that heartbeats
announce, so losing the last messages of a stream is found too.

One ledger per attach of a RedisBackplane. The reader thread calls :meth:`accept` and
sets :attr:`drained_mono`; the writer thread calls :meth:`announce`, :meth:`overdue`
and :meth:`trim`. Nothing here raises or reports: callers report what it returns.
"""

from __future__ import annotations

import threading

#: Entries of the duplicate check kept before those of nodes that left the view are
#: dropped.
SEEN_MAX = 4096

#: ``(stream, origin node, origin's run)``
Key = tuple[bytes, str, str]


class SeqLedger:
    """Last sequence numbers handled, and those announced by heartbeats."""

    def __init__(self) -> None:
        self._seen: dict[Key, int] = {}
        self._lock = threading.Lock()  # _seen is shared by the reader and the writer
        self._announced: list[tuple[float, str, str, bytes, int]] = []  # writer only
        #: Start (monotonic) of the reader's last XREAD that returned all it could.
        self.drained_mono = 0.0

    def accept(self, key: Key, seq: int) -> range | None:
        """Record *seq* as handled for *key* (reader thread). None: a duplicate, to be
        dropped; else the numbers skipped since the last one handled (often empty)."""
        with self._lock:
            last = self._seen.get(key)
            if last is not None and seq <= last:
                return None
            self._seen[key] = seq
        return range(0) if last is None else range(last + 1, seq)

    def announce(self, now: float, node: str, run: str, stream: bytes, seq: int) -> None:
        """A heartbeat read at *now* says *node* had *seq* confirmed (writer thread)."""
        self._announced.append((now, node, run, stream, seq))

    def overdue(self, keep: int) -> list[tuple[str, bytes, int, int]]:
        """``(node, stream, first, last)`` of the numbers a heartbeat announced before
        the reader last read all it could and that it still has not seen: those were
        lost. They count as handled from now on. Keeps the last *keep* announcements
        still too recent to judge (writer thread)."""
        drained = self.drained_mono
        later = []
        lost = []
        for entry in self._announced:
            when, node, run, stream, seq = entry
            if when >= drained:
                later.append(entry)
                continue
            with self._lock:
                seen = self._seen.get((stream, node, run))
                if seen is None or seq <= seen:
                    continue
                self._seen[(stream, node, run)] = seq
            lost.append((node, stream, seen + 1, seq))
        self._announced = later[-keep:]
        return lost

    def trim(self, alive: set[str]) -> None:
        """Past SEEN_MAX entries, drop those of the nodes not in *alive* (writer thread).
        Only past it: a node that merely looks gone (Redis lost its data and the
        heartbeats with it) may still resend a message it published before, and its
        entry is what drops that copy."""
        if len(self._seen) <= SEEN_MAX:
            return
        with self._lock:
            for key in [k for k in self._seen if k[1] not in alive]:
                del self._seen[key]
