"""The timers of a ``Server(resume_window > 0)``'s sessions: each session's (a delayed
acknowledgement) and the table's expiry (a session whose connection stayed away past
``resume_window`` ends). They fire on the reactor thread and are armed from any, under
the :class:`~morsock._session_server.ServerSessions` lock.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._session_server import Entry, ServerSessions
    from .reactor import Timer

__all__ = ["SessionTimers"]


class SessionTimers:
    """The timers of *sessions* (made by
    :class:`~morsock._session_server.ServerSessions`)."""

    def __init__(self, sessions: ServerSessions) -> None:
        self._sessions = sessions
        self._expiry: Timer | None = None
        self._expiry_at: float | None = None

    def arm(self, entry: Entry) -> None:
        """Any thread, under the lock: (re)arm the timer of *entry*'s session for its next
        deadline (a delayed ack), unless one fires earlier or the server stops."""
        deadline = entry.session.next_deadline()
        if deadline is None or self._sessions.stopped:
            return
        if entry.timer_at is not None and entry.timer_at <= deadline:
            return
        if entry.timer is not None:
            entry.timer.cancel()
        entry.timer_at = deadline
        entry.timer = self._sessions.server._reactor.call_later(
            deadline - time.monotonic(), self._on_timer, entry)

    def _on_timer(self, entry: Entry) -> None:
        """Reactor thread: what *entry*'s session has due (a delayed ack)."""
        with self._sessions.lock:
            entry.timer = entry.timer_at = None
            if entry.ended:
                return
            entry.session.poll(time.monotonic())
            self._sessions.flush(entry)
            self.arm(entry)

    def arm_expiry(self) -> None:
        """Any thread, under the lock: (re)arm the timer of the table's next expiry."""
        at = self._sessions.table.next_expiry()
        if at is None or self._sessions.stopped:
            return
        if self._expiry_at is not None and self._expiry_at <= at:
            return
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry_at = at
        self._expiry = self._sessions.server._reactor.call_later(at - time.monotonic(),
                                                                 self._expire)

    def _expire(self) -> None:
        """Reactor thread: end the sessions whose resume window passed (SESSION_LOST)."""
        with self._sessions.lock:
            self._expiry = self._expiry_at = None
            for _session, end in self._sessions.table.expire(time.monotonic()):
                entry = self._sessions.by_sid.get(end.session_id)
                if entry is not None:
                    self._sessions.end(entry, end)
            self.arm_expiry()

    def stop(self) -> None:
        """ServerSessions.shutdown, under the lock: cancel the expiry timer."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = self._expiry_at = None
