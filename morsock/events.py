"""Event delivery: direct calls on library threads, or an :class:`EventQueue` pumped by
the application (Delphi's ``EventsUseMainThread``).

A component owns one :class:`EventDispatcher`. :meth:`EventDispatcher.emit` looks up the
event attribute (``on_connect`` ...) at call time, so handlers may be (re)assigned at
any moment. A handler that raises never kills a thread or a connection: the dispatcher
reports it as ``on_error(..., HANDLER_EXCEPTION)`` (or logs it, if ``on_error`` itself
raised).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Callable, ClassVar

__all__ = ["EventQueue", "EventDispatcher"]


class EventQueue:
    """A thread-safe FIFO of callbacks that run when the application pumps it.

    Library threads call :meth:`post`; the application's own thread (usually the main or
    GUI thread) calls :meth:`pump`, which runs the queued callbacks on that thread.
    ``morsock.tk.attach(root)`` pumps it from Tk's ``after`` loop.
    """

    _default: ClassVar[EventQueue | None] = None
    _default_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        self._items: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._cond = threading.Condition(threading.Lock())

    @classmethod
    def default(cls) -> EventQueue:
        """The process-wide queue used when a component gets no ``event_queue``."""
        with cls._default_lock:
            if cls._default is None:
                cls._default = cls()
            return cls._default

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)`` to run on the pumping thread. Thread-safe, never blocks."""
        with self._cond:
            self._items.append((fn, args))
            self._cond.notify()

    def pump(self, timeout: float = 0.0, max_events: int | None = None) -> int:
        """Run queued callbacks on the calling thread; return how many ran.

        Waits up to *timeout* seconds for the first callback when the queue is empty
        (0: do not wait), then runs those already queued, at most *max_events* (None: all
        that are queued when pumping starts, so a callback that posts more cannot keep
        the pump forever). Exceptions from a callback propagate after it is removed.
        """
        with self._cond:
            if not self._items and timeout > 0:
                deadline = time.monotonic() + timeout
                while not self._items:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._cond.wait(left):
                        break
            budget = len(self._items)
        if max_events is not None:
            budget = min(budget, max_events)
        ran = 0
        while ran < budget:
            with self._cond:
                if not self._items:
                    break
                fn, args = self._items.popleft()
            ran += 1
            fn(*args)
        return ran

    def __len__(self) -> int:
        """Number of callbacks waiting."""
        return len(self._items)

    def clear(self) -> int:
        """Drop every waiting callback; return how many were dropped."""
        with self._cond:
            n = len(self._items)
            self._items.clear()
            return n


class EventDispatcher:
    """Calls a component's event handlers directly or through an :class:`EventQueue`.

    ``on_failure(event_name, exc, args)`` is the component's hook for a handler exception
    (*args*: the event's arguments after the sender, e.g. the server's client).
    """

    def __init__(self, owner: Any, queue: EventQueue | None,
                 on_failure: Callable[[str, BaseException, tuple[Any, ...]], None],
                 logger: logging.Logger) -> None:
        self._owner = owner
        self.queue = queue
        self._on_failure = on_failure
        self._log = logger

    def emit(self, name: str, *args: Any) -> None:
        """Fire event *name* (e.g. ``"on_connect"``) with ``(owner, *args)``.

        Direct mode: runs now, on the calling thread. Queue mode: posted to the queue.
        Does nothing when no handler is assigned.
        """
        fn = getattr(self._owner, name, None)
        if fn is None:
            return
        if self.queue is not None:
            self.queue.post(self.call, name, fn, args)
        else:
            self.call(name, fn, args)

    def call(self, name: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        """Run one handler now, turning an exception into a reported failure."""
        try:
            return fn(self._owner, *args)
        except Exception as exc:
            if name == "on_error":
                self._log.exception("on_error handler raised")
            else:
                self._on_failure(name, exc, args)
            return None
