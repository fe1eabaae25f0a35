"""Tkinter bridge: run morsock events on the Tk thread (API.md §5).

Create the components with ``events_use_main_thread=True`` and call :func:`attach` once,
on the Tk thread, after creating the root window::

    root = tkinter.Tk()
    server = morsock.Server(3434, events_use_main_thread=True, on_connect=...)
    pump = morsock.tk.attach(root)          # pumps morsock.EventQueue.default()
    server.start()
    root.mainloop()

Every event except ``on_handle_command`` (which runs on a worker thread and must not
touch Tk) then runs on the Tk thread, from Tk's ``after`` loop, so handlers may update
widgets freely. Library threads never call Tk: they only append to the
:class:`~morsock.EventQueue`, which this module drains.

This module is not imported by ``import morsock``; it imports :mod:`tkinter` itself.
"""

from __future__ import annotations

import logging
import tkinter
from typing import Any

from .events import EventQueue

__all__ = ["attach", "TkPump"]

_log = logging.getLogger("morsock")


class TkPump:
    """Drains an :class:`~morsock.EventQueue` from a Tk widget's ``after`` loop.

    Made by :func:`attach`. Every tick runs at most ``max_per_tick`` queued callbacks
    on the Tk thread, then gives control back to Tk: when callbacks are still waiting
    the next tick comes after 1 ms (window events are handled in between, so a flood
    of network events never freezes the GUI), otherwise after ``interval_ms``.

    The pump stops by itself when the root window is destroyed, or when
    :meth:`detach` is called. Every method must be called on the Tk thread.
    """

    def __init__(self, root: tkinter.Misc, queue: EventQueue, interval_ms: int,
                 max_per_tick: int) -> None:
        if interval_ms < 1:
            raise ValueError("interval_ms must be >= 1")
        if max_per_tick < 1:
            raise ValueError("max_per_tick must be >= 1")
        self.root = root
        self.queue = queue
        self.interval_ms = int(interval_ms)
        self.max_per_tick = int(max_per_tick)
        #: Callbacks run so far by this pump.
        self.events_run = 0
        self._after_id: str | None = None
        self._active = True
        self._bind_id: str | None = root.bind("<Destroy>", self._on_destroy, add="+")
        self._after_id = root.after(0, self._tick)

    @property
    def active(self) -> bool:
        """True until :meth:`detach` (or the root's destruction) stopped the pump."""
        return self._active

    def _tick(self) -> None:
        self._after_id = None
        if not self._active:
            return
        try:
            self.events_run += self.queue.pump(0.0, self.max_per_tick)
        except Exception:
            # A callback posted by the application raised (handlers run through the
            # components' dispatchers never do): report it and keep pumping.
            _log.exception("morsock.tk: a queued callback raised")
        if self._active:
            delay = 1 if len(self.queue) else self.interval_ms
            try:
                self._after_id = self.root.after(delay, self._tick)
            except tkinter.TclError:  # the root went away inside a callback
                self._active = False

    def _on_destroy(self, event: Any) -> None:
        if event.widget is self.root:
            # Cancel now: once the root is gone, Tk would fire a pending ``after`` whose
            # command no longer exists. The binding disappears with the widget.
            self._bind_id = None
            self.detach()

    def detach(self) -> None:
        """Stop pumping: cancel the pending ``after`` and remove the ``<Destroy>`` binding.

        Idempotent; events still queued stay in the queue. Call it on the Tk thread.
        """
        if not self._active:
            return
        self._active = False
        after_id, self._after_id = self._after_id, None
        if after_id is not None:
            try:
                self.root.after_cancel(after_id)
            except tkinter.TclError:
                pass
        bind_id, self._bind_id = self._bind_id, None
        if bind_id is not None:
            self._unbind_destroy(bind_id)

    def _unbind_destroy(self, bind_id: str) -> None:
        # ``root.unbind(seq, funcid)`` drops *every* binding of the sequence before
        # Python 3.13, so remove only our own line of the binding script.
        try:
            script = self.root.bind("<Destroy>")
            kept = [line for line in str(script).split("\n")
                    if line.strip() and bind_id not in line]
            self.root.bind("<Destroy>", "\n".join(kept))
            self.root.deletecommand(bind_id)
        except tkinter.TclError:
            pass

    def __repr__(self) -> str:
        return (f"<TkPump {'active' if self._active else 'detached'} every "
                f"{self.interval_ms} ms, {self.events_run} events run>")


def attach(root: tkinter.Misc, queue: EventQueue | None = None, interval_ms: int = 15,
           max_per_tick: int = 200) -> TkPump:
    """Pump *queue* (default :meth:`EventQueue.default`) from *root*'s ``after`` loop.

    Call on the Tk thread. Each tick runs at most *max_per_tick* callbacks, then yields
    to Tk; ticks come every *interval_ms* milliseconds while the queue is empty. The
    pump cancels itself when *root* is destroyed; :meth:`TkPump.detach` stops it earlier.
    Raises ValueError for a non-positive *interval_ms* or *max_per_tick*.
    """
    return TkPump(root, queue if queue is not None else EventQueue.default(),
                  interval_ms, max_per_tick)
