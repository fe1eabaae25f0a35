"""Read back-pressure of one connection (``max_receive_backlog``): a pure object
(docs/guide/flow_control.rst).

The reactor thread reads frames from the peer and posts them to the connection's strand;
a pool thread handles them later. :class:`ReceiveBacklog` counts the wire bytes of the
frames read and not yet handled, and says when reading must pause (past ``limit``) and
when it may resume (once the handlers caught up to half of it). A frame is always
accepted when nothing is pending: a pause starts only after a read that took the backlog
past the limit.

Two writers, no lock: the reactor thread calls :meth:`posted` and :meth:`resumed`; the
strand calls :meth:`handled` and counts the life-cycle markers it ran in ``markers``
(items that are not frames). Each field has one writer; the pause/resume hand-off is
ordered so that one of the two sides always sees the other (see :meth:`posted`).
"""

from __future__ import annotations

__all__ = ["ReceiveBacklog"]


class ReceiveBacklog:
    """Frames read from one peer and not yet handled (see the module docstring)."""

    __slots__ = ("limit", "_log", "_frames", "_bytes", "_done_bytes", "items", "markers",
                 "paused", "_resume_at", "_resume_asked")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # (frames posted in all, their bytes in all) after each read but the last whose
        # frames are not all handled yet (the last read's point is the totals
        # themselves): an entry is forgotten once its frames are. Empty while the
        # handlers keep up, so a read then costs a few additions.
        # A list, not a deque: an empty deque costs a 64-slot block per connection.
        self._log: list[tuple[int, int]] = []
        self._frames = 0          # frames posted, in all
        self._bytes = 0           # their wire bytes
        self._done_bytes = 0      # wire bytes of the frames known to be handled
        #: Items the strand ran (frames and markers); written by the strand only.
        self.items = 0
        #: Life-cycle markers among them; written by the strand only.
        self.markers = 0
        #: Reading is paused (written by the reactor thread only).
        self.paused = False
        self._resume_at = 0       # ... until this many frames have been handled
        self._resume_asked = False

    @property
    def size(self) -> int:
        """Wire bytes of the frames posted and not yet handled (exact on the reactor
        thread; from another thread it may count up to one more read). Any thread: it
        changes nothing."""
        handled = self.items - self.markers
        total = self._bytes
        if handled >= self._frames:
            return 0
        done = self._done_bytes
        for frames, nbytes in tuple(self._log):  # the reactor thread may change the list
            if frames > handled:
                break
            done = nbytes
        return total - done

    def _forget_handled(self) -> int:
        """Reactor thread: drop the entries whose frames were handled; return the
        backlog."""
        handled = self.items - self.markers
        log = self._log
        if handled >= self._frames:  # all of it
            self._done_bytes = self._bytes
            del log[:]
            return 0
        done = 0
        for frames, nbytes in log:
            if frames > handled:
                break
            self._done_bytes = nbytes
            done += 1
        if done:
            del log[:done]
        return self._bytes - self._done_bytes

    def posted(self, frames: int, nbytes: int) -> bool:
        """Reactor thread: one read posted *frames* frames of *nbytes* wire bytes to the
        strand. Returns True when reading must pause now (the caller stops reading until
        :meth:`resumed`)."""
        if self.items - self.markers >= self._frames:  # every earlier read handled
            self._done_bytes = self._bytes
            if self._log:
                del self._log[:]
        else:  # the previous read's point is remembered until its frames are handled
            self._log.append((self._frames, self._bytes))
            self._forget_handled()
        self._frames += frames
        self._bytes += nbytes
        limit = self.limit
        if self._bytes - self._done_bytes <= limit or self._forget_handled() <= limit:
            return False
        half = limit // 2
        total = self._bytes
        resume_at = self._frames  # at the latest: once this read's frames are handled
        for frames_then, bytes_then in self._log:  # the first point at or below half of it
            if total - bytes_then <= half:
                resume_at = frames_then
                break
        self._resume_at = resume_at
        # paused first, then the strand's progress read: a strand that finishes between
        # the two either sees the pause (and asks to resume) or is seen here.
        self.paused = True
        if self.items - self.markers >= resume_at:
            self.paused = False
            return False
        return True

    def handled(self, items: int) -> bool:
        """Strand: *items* more items ran (frames and markers). Returns True once per
        pause, when the handlers caught up to half of ``limit``: the caller asks the
        reactor thread to call :meth:`resumed`."""
        self.items += items  # first, then the pause read: see posted
        return self.paused and self.resume_due()

    def resume_due(self) -> bool:
        """Strand, after counting what ran in ``items``, while ``paused``: whether to ask
        for the resume now (:meth:`handled` is ``items += n`` then this)."""
        if not self._resume_asked and self.items - self.markers >= self._resume_at:
            self._resume_asked = True
            return True
        return False

    def resumed(self) -> bool:
        """Reactor thread, asked by :meth:`handled`: end the pause; False if there was
        none."""
        self._resume_asked = False
        if not self.paused:
            return False
        self.paused = False
        return True

    def unpause(self) -> None:
        """Reactor thread: forget a pause (the connection's socket was replaced)."""
        self.paused = self._resume_asked = False
        self._resume_at = 0

    def entries(self) -> int:
        """How many reads are remembered (their frames not all handled): bounded by the
        backlog, never by the connection's age."""
        return len(self._log) + (self.items - self.markers < self._frames)
