"""The timers of a ``Server(resume_window > 0)``'s sessions: each session's (a delayed
acknowledgement) and the table's expiry (a session whose connection stayed away past
``resume_window`` ends). They fire on the reactor thread and are armed from any, under
the :class:`~morsock._session_server.ServerSessions` lock.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ._session_link import EarliestCall

if TYPE_CHECKING:
    from ._session_server import Entry, ServerSessions

__all__ = ["SessionTimers"]


class SessionTimers:
    """The timers of *sessions* (made by
    :class:`~morsock._session_server.ServerSessions`)."""

    def __init__(self, sessions: ServerSessions) -> None:
        self._sessions = sessions
        self._expiry = EarliestCall()

    def arm(self, entry: Entry) -> None:
        """Any thread, under the lock: (re)arm the timer of *entry*'s session for its next
        deadline (a delayed ack), unless one fires earlier or the server stops."""
        deadline = entry.session.next_deadline()
        if deadline is not None and not self._sessions.stopped:
            entry.timer.arm(self._sessions.server._reactor, deadline, self._on_timer, entry)

    def _on_timer(self, entry: Entry) -> None:
        """Reactor thread: what *entry*'s session has due (a delayed ack)."""
        with self._sessions.lock:
            entry.timer.fired()
            if entry.ended:
                return
            entry.session.poll(time.monotonic())
            self._sessions.flush(entry)
            self.arm(entry)

    def arm_expiry(self) -> None:
        """Any thread, under the lock: (re)arm the timer of the table's next expiry."""
        at = self._sessions.table.next_expiry()
        if at is not None and not self._sessions.stopped:
            self._expiry.arm(self._sessions.server._reactor, at, self._expire)

    def _expire(self) -> None:
        """Reactor thread: end the sessions whose resume window passed (SESSION_LOST)."""
        with self._sessions.lock:
            self._expiry.fired()
            for _session, end in self._sessions.table.expire(time.monotonic()):
                entry = self._sessions.by_sid.get(end.session_id)
                if entry is not None:
                    self._sessions.end(entry, end)
            self.arm_expiry()

    def stop(self) -> None:
        """ServerSessions.shutdown, under the lock: cancel the expiry timer."""
        self._expiry.cancel()
