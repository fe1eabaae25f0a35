"""Tkinter bridge: run morsock events on the Tk thread (docs/guide/tk.rst).

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

:class:`LogView` is a scrolling log for such tools that keeps up with a flood of messages:
each line is stamped when it arrives, and past a few dozen message lines per second the
rest are counted into one line ("… 12,345 more messages") instead of being queued.

This module is not imported by ``import morsock``; it imports :mod:`tkinter` itself.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
import tkinter
from tkinter import font as tkfont
from tkinter import ttk
from typing import Any, Union

from .events import EventQueue

__all__ = ["attach", "TkPump", "LogView"]

_log = logging.getLogger("morsock")


def _cancel_after(widget: tkinter.Misc, after_id: str | None) -> None:
    """Cancel *widget*'s pending ``after`` callback *after_id* (None: there is none).
    Tk thread; a widget already destroyed has nothing left to cancel (no error)."""
    if after_id is None:
        return
    try:
        widget.after_cancel(after_id)
    except tkinter.TclError:
        pass


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
        _cancel_after(self.root, after_id)
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


#: When a line happened: a datetime, a ``time.time()`` value, or None for "now".
When = Union[datetime.datetime, float, None]


class _Summary:
    """The message lines of one window that were counted instead of shown."""

    __slots__ = ("count", "first", "index", "drawn")

    def __init__(self, first: float, index: int) -> None:
        self.count = 0
        self.first = first  # time.time() of the first one
        self.index = index  # tells its tag apart in the widget
        self.drawn = 0      # the count the widget shows


class LogView:
    """A scrolling, time-stamped log in a Tk window that keeps up with any message rate.

    Two kinds of lines:

    * :meth:`log` -- events and actions (connects, errors, "Server stopped"): always
      shown, in call order. Tk thread only.
    * :meth:`message` -- one line per network message, from any thread (typically
      ``on_handle_command`` on a worker). Each is stamped when :meth:`message` is called,
      not when it is drawn. At most *burst* of them are shown per *window* seconds; the
      others of that window are only counted, into one line ``… 12,345 more messages``
      that takes the place of the first one counted and is updated as the count grows.
      So a flood costs a counter increment per message, the event queue never fills
      with log lines, and the log never runs behind.

    Message lines reach the Tk thread through *queue* (the components' event queue), so
    they keep their order relative to the components' events. Long lines wrap (never
    clipped); only the newest *max_lines* are kept. Put :attr:`frame` into your layout.
    """

    STAMP_FORMAT = "%H:%M:%S.%f"

    def __init__(self, parent: tkinter.Misc, queue: EventQueue, max_lines: int = 1000,
                 burst: int = 50, window: float = 1.0, height: int = 10,
                 width: int = 80) -> None:
        if max_lines < 1 or burst < 1 or window <= 0:
            raise ValueError("max_lines and burst must be >= 1, window > 0")
        self.queue = queue
        self.max_lines = int(max_lines)
        self.burst = int(burst)
        self.window = float(window)
        self.frame = ttk.Frame(parent)
        self.text = tkinter.Text(self.frame, height=height, width=width, wrap="word",
                                 state="disabled", font="TkFixedFont", borderwidth=0,
                                 highlightthickness=0, padx=4, pady=2)
        scroll = ttk.Scrollbar(self.frame, orient="vertical", command=self._scroll)
        self.text.configure(yscrollcommand=scroll.set)
        scroll.pack(side="right", fill="y")
        self.text.pack(side="left", fill="both", expand=True)
        # The view follows the newest line until the user scrolls back to read, and
        # again once they scroll to the end; a resize keeps following.
        self._follow = True
        for sequence in ("<MouseWheel>", "<Button-4>", "<Button-5>", "<KeyRelease>"):
            self.text.bind(sequence, lambda event: self.text.after_idle(self._check_follow),
                           add="+")
        self.text.bind("<Configure>", self._on_resize, add="+")
        # Continuation lines start under the text, not under the stamp.
        indent = tkfont.nametofont("TkFixedFont").measure("00:00:00.000  ")
        self.text.tag_configure("line", lmargin2=indent)
        self.text.tag_configure("stamp", foreground="#666666")
        self.text.tag_configure("summary", foreground="#8a5a00")
        #: Lines drawn so far (a summary line counts once, however often it is updated).
        self.lines_drawn = 0
        #: Message lines drawn one by one so far (see also :attr:`messages_counted`).
        self.messages_shown = 0
        self._lock = threading.Lock()  # guards the window, the summaries' counts, _counted
        self._window_end = 0.0
        self._shown = 0
        self._summary: _Summary | None = None  # of the current window, once one is counted
        self._summaries = 0
        self._counted = 0
        self._live: list[_Summary] = []  # drawn, and maybe still counting (Tk thread)
        self._closed = False
        self._timer: str | None = self.text.after(self._tick_ms, self._tick)

    @property
    def _tick_ms(self) -> int:
        return max(50, min(250, int(self.window * 250)))

    # -- any thread ----------------------------------------------------------------------
    def message(self, text: str) -> None:
        """Log one message line, stamped now. Thread-safe, never blocks on Tk."""
        now = time.time()
        with self._lock:
            if now >= self._window_end:
                self._window_end = now + self.window
                self._shown = 0
                self._summary = None
            if self._shown < self.burst:
                self._shown += 1
                summary = None
            else:
                self._counted += 1
                summary = self._summary
                if summary is not None:
                    summary.count += 1
                    return
                self._summaries += 1
                summary = self._summary = _Summary(now, self._summaries)
                summary.count = 1
        if summary is None:
            self.queue.post(self._draw_message, now, text)
        else:  # its place in the log: after what is queued now
            self.queue.post(self._draw_summary, summary)

    # -- Tk thread -----------------------------------------------------------------------
    def log(self, text: str, when: When = None) -> None:
        """Log *text* (always shown), stamped *when* (default: now). Tk thread."""
        self._draw(when, text)

    def get(self) -> str:
        """The whole log, as text (summary lines with their count so far)."""
        self._update_summaries()
        return self.text.get("1.0", "end-1c")

    @property
    def messages_counted(self) -> int:
        """Message lines counted into summary lines (not shown one by one) so far."""
        with self._lock:
            return self._counted

    def close(self) -> None:
        """Stop the timer (the widget goes with its parent). Idempotent; Tk thread."""
        self._closed = True
        timer, self._timer = self._timer, None
        _cancel_after(self.text, timer)

    def _on_resize(self, event: Any) -> None:
        if self._follow:
            self.text.see("end")

    def _scroll(self, *args: Any) -> None:
        self.text.yview(*args)
        self._check_follow()

    def _check_follow(self) -> None:
        try:
            self._follow = self.text.yview()[1] >= 0.999
        except tkinter.TclError:
            pass

    def _tick(self) -> None:
        self._timer = None
        if self._closed:
            return
        self._update_summaries()
        try:
            self._timer = self.text.after(self._tick_ms, self._tick)
        except tkinter.TclError:  # the widget is gone
            self._closed = True

    def _draw_message(self, when: float, text: str) -> None:
        self.messages_shown += 1
        self._draw(when, text)

    @staticmethod
    def _summary_text(count: int) -> str:
        return f"\u2026 {count:,} more {'message' if count == 1 else 'messages'}"

    def _draw_summary(self, summary: _Summary) -> None:
        with self._lock:
            count = summary.count
        summary.drawn = count
        self._live.append(summary)
        self._draw(summary.first, self._summary_text(count), "summary",
                   f"summary{summary.index}")

    def _update_summaries(self) -> None:
        """Show the latest count of each summary line that may still grow."""
        if self._closed or not self._live:
            return
        now = time.time()
        with self._lock:
            # The current window's summary may still grow: until a new window replaces
            # it, or (no message since) a second after its window ended.
            counts = [(s, s.count, s is self._summary and now < self._window_end + 1.0)
                      for s in self._live]
        widget = self.text
        keep: list[_Summary] = []
        try:
            for summary, count, growing in counts:
                tag = f"summary{summary.index}"
                ranges = widget.tag_ranges(tag)
                if not ranges:
                    continue  # trimmed away
                if count != summary.drawn:
                    widget.configure(state="normal")
                    widget.delete(ranges[0], ranges[1])
                    widget.insert(ranges[0], self._summary_text(count),
                                  ("line", "summary", tag))
                    widget.configure(state="disabled")
                    summary.drawn = count
                if growing:
                    keep.append(summary)
        except tkinter.TclError:  # the widget is gone
            self._closed = True
            return
        self._live = keep

    def _stamp(self, when: When) -> str:
        if when is None:
            moment = datetime.datetime.now()
        elif isinstance(when, datetime.datetime):
            moment = when
        else:
            moment = datetime.datetime.fromtimestamp(when)
        return moment.strftime(self.STAMP_FORMAT)[:-3]  # milliseconds

    def _draw(self, when: When, text: str, *tags: str) -> None:
        if self._closed:
            return
        widget = self.text
        try:
            widget.configure(state="normal")
            widget.insert("end", self._stamp(when) + "  ", ("line", "stamp"), text,
                          ("line", *tags), "\n", ("line",))
            lines = int(widget.index("end-1c").split(".")[0]) - 1
            if lines > self.max_lines:
                widget.delete("1.0", f"{lines - self.max_lines + 1}.0")
            widget.configure(state="disabled")
            if self._follow:
                widget.see("end")
        except tkinter.TclError:  # the widget is gone
            self._closed = True
            return
        self.lines_drawn += 1
