#!/usr/bin/env python3
"""Tk server form: the Delphi components' server demo form, in Tkinter/ttk.

Settings (port, key, AES mode, key size, profile), Start/Stop, a live client list
(handle, IP, port, connected since, bytes in/out, messages), the server's metrics
(messages and bytes in and out, clients, errors by code, handler durations, and a
messages/s and bytes/s chart), a log that keeps up with any message rate, a status bar,
Broadcast (plain or encrypted), Disconnect selected / Disconnect all.

Every message is answered with ``"Echo: " + message``.

    python samples/tk_server.py                      # then press Start
    python samples/tk_server.py --port 3434 --autostart
    python samples/tk_client.py --port 3434          # a client form to talk to it

How it is wired (the part to copy into your own Tk tool): the server is created with
``events_use_main_thread=True`` and ``morsock.tk.attach(root)`` pumps its events from
Tk's ``after`` loop, so ``on_connect``, ``on_disconnect``, ``on_error`` and
``on_state_change`` run on the Tk thread and update widgets directly.
``on_handle_command`` runs on a worker thread: it must not touch Tk, so it logs through
``morsock.tk.LogView.message``, which is thread-safe and coalesces a flood. The figures
are read once a second by an ``after`` timer instead of reacting to every message; with
``prometheus_client`` installed (``pip install 'morsock[metrics]'``) they come from
``morsock.metrics`` -- the same figures a Prometheus server would scrape.
"""

from __future__ import annotations

import argparse
import collections
import signal
import sys
import time
import tkinter as tk
from tkinter import ttk
from typing import Any, Deque, Dict, List, Optional, Tuple

import morsock
import morsock.tk
from morsock.cli import hms, human_bytes

try:  # optional: the metrics extra
    from prometheus_client import CollectorRegistry

    import morsock.metrics as morsock_metrics
except ImportError:  # pragma: no cover - depends on the environment
    CollectorRegistry = None  # type: ignore[assignment,misc]
    morsock_metrics = None  # type: ignore[assignment]

LOG_LINES = 1000
#: The smallest window in which every control stays visible.
MIN_SIZE = (700, 450)
#: Seconds of history in the rate chart.
CHART_SECONDS = 60
#: How much of a message the log shows.
PREVIEW_CHARS = 120


def human_seconds(seconds: Optional[float]) -> str:
    """``0.00042`` -> ``"0.42 ms"``; None -> ``"-"``."""
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def preview(data: bytes) -> str:
    """The start of a message as text, with its size when it is cut."""
    text = data[:PREVIEW_CHARS].decode("utf-8", errors="replace")
    return text if len(data) <= PREVIEW_CHARS else f"{text}… ({len(data):,} bytes)"


def error_name(code: int) -> str:
    """``-5`` -> ``"DECRYPT_FAILED"`` (the number as text when it is no ErrorCode)."""
    try:
        return morsock.ErrorCode(code).name
    except ValueError:
        return str(code)


def parse_port(text: str) -> int:
    """The port typed in a form; ValueError saying what a port is."""
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"the port must be a whole number from 0 to 65535 "
                         f"(0: any free port), not {text!r}") from None


def apply_theme(root: tk.Misc) -> ttk.Style:
    """A flat, current look: ttk's "clam" theme with roomier rows and a bold heading."""
    style = ttk.Style(root)
    if "clam" in style.theme_names():
        style.theme_use("clam")
    style.configure("Treeview", rowheight=22)
    style.configure("Treeview.Heading", font="TkHeadingFont")
    style.configure("Status.TLabel", background="#e8e8e8", padding=(6, 3))
    style.configure("Figure.TLabel", font="TkDefaultFont")
    style.configure("Invalid.TEntry", fieldbackground="#ffe0e0")
    style.configure("Accent.TButton", font="TkHeadingFont")
    return style


class Figures:
    """The server's figures, as ``morsock.metrics`` exposes them to Prometheus.

    With ``prometheus_client`` the server is registered in a private registry and every
    :meth:`read` is one scrape of it. Without it the counters are the server's own
    statistics, errors are counted from ``on_error`` by the form, and handler durations
    are not available. Tk thread.
    """

    def __init__(self, server: morsock.Server) -> None:
        self.server = server
        self.registration: Any = None
        self.registry: Any = None
        self.own_errors: Dict[str, int] = {}
        if morsock_metrics is not None:
            self.registry = CollectorRegistry()
            self.registration = morsock_metrics.register(server, self.registry,
                                                         name="tk_server")

    @property
    def available(self) -> bool:
        """True when the figures come from morsock.metrics."""
        return self.registration is not None

    def count_error(self, code: int) -> None:
        """Without morsock.metrics: count an on_error *code* (Tk thread)."""
        if self.registration is None:
            name = error_name(code)
            self.own_errors[name] = self.own_errors.get(name, 0) + 1

    def read(self) -> Dict[str, Any]:
        """``{"messages_received", "messages_sent", "bytes_received", "bytes_sent",
        "connections", "connections_total", "rejected", "errors" ({code: n}),
        "handled", "handler_seconds", "p50", "p99"}``."""
        if self.registration is None:
            s = self.server
            return dict(messages_received=s.total_messages_received,
                        messages_sent=s.total_messages_sent,
                        bytes_received=s.total_bytes_received, bytes_sent=s.total_bytes_sent,
                        connections=s.client_count, connections_total=s.total_connections,
                        rejected=s.total_rejected_connections, errors=dict(self.own_errors),
                        handled=None, handler_seconds=None, p50=None, p99=None)
        values: Dict[str, float] = {}
        errors: Dict[str, int] = {}
        for metric in self.registry.collect():
            for sample in metric.samples:
                if sample.name == "morsock_errors_total":
                    errors[sample.labels["code"]] = int(sample.value)
                elif "le" not in sample.labels:
                    values[sample.name] = sample.value
        observer = self.registration.observer
        return dict(messages_received=int(values["morsock_messages_received_total"]),
                    messages_sent=int(values["morsock_messages_sent_total"]),
                    bytes_received=int(values["morsock_bytes_received_total"]),
                    bytes_sent=int(values["morsock_bytes_sent_total"]),
                    connections=int(values["morsock_connections"]),
                    connections_total=int(values["morsock_connections_total"]),
                    rejected=int(values["morsock_connections_rejected_total"]),
                    errors=errors,
                    handled=int(values["morsock_handler_duration_seconds_count"]),
                    handler_seconds=values["morsock_handler_duration_seconds_sum"],
                    p50=self._bound(observer.quantile(0.5)),
                    p99=self._bound(observer.quantile(0.99)))

    def _bound(self, estimate: Optional[float]) -> Optional[float]:
        """The histogram bucket bound at or above a quantile *estimate*: what the
        histogram really tells (an estimate within a bucket is only an interpolation)."""
        if estimate is None:
            return None
        buckets = self.registration.observer.buckets
        return next((b for b in buckets if b >= estimate), buckets[-1])

    def close(self) -> None:
        if self.registration is not None:
            self.registration.unregister()
            self.registration = None


class RateChart:
    """A canvas with the last CHART_SECONDS of messages/s (line) and bytes/s (shaded),
    in and out together, each scaled to its own peak. Tk thread."""

    COLORS = ("#1f6fb2", "#b85c00")
    AREA = "#f6d8b8"

    def __init__(self, parent: tk.Misc, width: int = 240, height: int = 70) -> None:
        self.canvas = tk.Canvas(parent, width=width, height=height, background="white",
                                highlightthickness=1, highlightbackground="#c0c0c0")
        self.history: Deque[Tuple[float, float]] = collections.deque(maxlen=CHART_SECONDS)
        self.canvas.bind("<Configure>", lambda event: self.draw())

    def add(self, messages_per_s: float, bytes_per_s: float) -> None:
        self.history.append((messages_per_s, bytes_per_s))
        self.draw()

    def draw(self) -> None:
        c = self.canvas
        c.delete("all")
        w = max(c.winfo_width(), int(c["width"])) if c.winfo_ismapped() else int(c["width"])
        h = max(c.winfo_height(), int(c["height"])) if c.winfo_ismapped() else int(c["height"])
        for y in (h // 3, 2 * h // 3):
            c.create_line(0, y, w, y, fill="#eeeeee")
        points = list(self.history)
        if len(points) >= 2:
            # The time axis grows with the history, up to CHART_SECONDS.
            step = (w - 4) / (max(len(points), 10) - 1)
            x0 = w - 2 - step * (len(points) - 1)
            for index in (1, 0):  # bytes/s as a shaded area, messages/s as a line on top
                peak = max(p[index] for p in points) or 1.0
                coords: List[float] = []
                for i, p in enumerate(points):
                    coords += [x0 + i * step, h - 3 - (h - 16) * p[index] / peak]
                if index == 1:
                    c.create_polygon(x0, h - 2, *coords, coords[-2], h - 2,
                                     fill=self.AREA, outline="")
                else:
                    c.create_line(*coords, fill=self.COLORS[0], width=2)
        last = points[-1] if points else (0.0, 0.0)
        c.create_text(4, 2, anchor="nw", fill=self.COLORS[0],
                      text=f"{last[0]:,.0f} msg/s", font="TkSmallCaptionFont")
        c.create_text(w - 4, 2, anchor="ne", fill=self.COLORS[1],
                      text=f"{human_bytes(last[1])}/s", font="TkSmallCaptionFont")


class ServerApp:
    """The server form, built inside *root* (a Tk or Toplevel). Use it on the Tk thread.

    Public for scripts and tests: ``server`` (the :class:`morsock.Server`), ``figures``
    (:class:`Figures`), ``log_view`` (:class:`morsock.tk.LogView`), the Tk variables
    ``port_var``, ``key_var``, ``mode_var``, ``key_size_var``, ``profile_var``,
    ``broadcast_var``, ``encrypted_var``, the widgets ``tree``, ``status_label``,
    ``start_button``, ``stop_button``, ``broadcast_button``,
    ``disconnect_selected_button``, ``disconnect_all_button``, ``port_entry``,
    ``metric_labels`` (name -> ttk.Label), ``chart``, and the actions :meth:`start`,
    :meth:`stop`, :meth:`broadcast`, :meth:`disconnect_selected`, :meth:`disconnect_all`,
    :meth:`refresh`, :meth:`close`.
    """

    COLUMNS: Tuple[Tuple[str, str, int], ...] = (
        ("handle", "#", 36), ("ip", "IP", 100), ("port", "Port", 56),
        ("since", "Since", 70), ("bytes_in", "In", 76),
        ("bytes_out", "Out", 76), ("messages", "Messages", 84))

    METRICS: Tuple[Tuple[str, str], ...] = (
        ("received", "Received"), ("sent", "Sent"), ("clients", "Clients"),
        ("errors", "Errors"), ("handler", "Handler"), ("handler_quantiles", ""))

    def __init__(self, root: tk.Misc, port: int = 3434, host: str = "0.0.0.0",
                 key: str = "", mode: str = "CBC", key_size: int = 256,
                 profile: str = "AUTHENTICATED",
                 event_queue: Optional[morsock.EventQueue] = None) -> None:
        self.root = root
        self.queue = event_queue if event_queue is not None else morsock.EventQueue.default()
        self.server = morsock.Server(port, host, events_use_main_thread=True,
                                     event_queue=self.queue,
                                     on_handle_command=self._on_handle_command,
                                     on_connect=self._on_connect,
                                     on_disconnect=self._on_disconnect,
                                     on_error=self._on_error,
                                     on_state_change=self._on_state_change)
        self.figures = Figures(self.server)
        self.port_var = tk.StringVar(root, str(port))
        self.key_var = tk.StringVar(root, key)
        self.mode_var = tk.StringVar(root, morsock.AESMode.parse(mode).name)
        self.key_size_var = tk.StringVar(root, str(int(morsock.KeySize.parse(key_size))))
        self.profile_var = tk.StringVar(root, morsock.EncryptionProfile.parse(profile).name)
        self.broadcast_var = tk.StringVar(root, "Hello from the server")
        self.encrypted_var = tk.BooleanVar(root, False)
        self.status_var = tk.StringVar(root, "")
        self._timer: Optional[str] = None
        self._closed = False
        self._last_rates: Optional[Tuple[float, int, int]] = None
        self._build()
        self.pump = morsock.tk.attach(root, self.queue)
        self.refresh()
        self._timer = root.after(1000, self._every_second)
        if isinstance(root, (tk.Tk, tk.Toplevel)):
            root.title("morsock server")
            root.minsize(*MIN_SIZE)
            root.protocol("WM_DELETE_WINDOW", self.close)

    # -- layout ----------------------------------------------------------------------------
    def _build(self) -> None:
        # The status bar first: what is packed last loses its room first when the window
        # is small, and the status bar must never be the one.
        self.status_label = ttk.Label(self.root, textvariable=self.status_var,
                                      style="Status.TLabel", anchor="w")
        self.status_label.pack(side="bottom", fill="x")
        outer = ttk.Frame(self.root, padding=(8, 8, 8, 4))
        outer.pack(fill="both", expand=True)

        settings = ttk.LabelFrame(outer, text="Server settings", padding=(8, 4))
        settings.pack(fill="x")
        ttk.Label(settings, text="Port").grid(row=0, column=0, sticky="w")
        self.port_entry = ttk.Entry(settings, textvariable=self.port_var, width=7)
        self.port_entry.grid(row=0, column=1, padx=(4, 12), sticky="w")
        ttk.Label(settings, text="Key").grid(row=0, column=2, sticky="w")
        self.key_entry = ttk.Entry(settings, textvariable=self.key_var, width=22, show="•")
        self.key_entry.grid(row=0, column=3, padx=(4, 12), sticky="w")
        self.start_button = ttk.Button(settings, text="Start", command=self.start,
                                       style="Accent.TButton")
        self.start_button.grid(row=0, column=5, padx=2, sticky="e")
        self.stop_button = ttk.Button(settings, text="Stop", command=self.stop)
        self.stop_button.grid(row=0, column=6, padx=2, sticky="e")
        row1 = ttk.Frame(settings)
        row1.grid(row=1, column=0, columnspan=7, sticky="w", pady=(4, 0))
        ttk.Label(row1, text="Mode").pack(side="left")
        self.mode_box = ttk.Combobox(row1, textvariable=self.mode_var, width=5,
                                     state="readonly", values=[m.name for m in morsock.AESMode])
        self.mode_box.pack(side="left", padx=(4, 12))
        ttk.Label(row1, text="Key size").pack(side="left")
        self.key_size_box = ttk.Combobox(row1, textvariable=self.key_size_var, width=4,
                                         state="readonly", values=["128", "192", "256"])
        self.key_size_box.pack(side="left", padx=(4, 12))
        ttk.Label(row1, text="Profile").pack(side="left")
        self.profile_box = ttk.Combobox(row1, textvariable=self.profile_var, width=15,
                                        state="readonly",
                                        values=[p.name for p in morsock.EncryptionProfile])
        self.profile_box.pack(side="left", padx=(4, 0))
        settings.columnconfigure(4, weight=1)
        self._setting_widgets: List[Any] = [self.port_entry, self.key_entry, self.mode_box,
                                            self.key_size_box, self.profile_box]

        panes = ttk.PanedWindow(outer, orient="vertical")
        panes.pack(fill="both", expand=True, pady=(6, 0))
        top = ttk.Frame(panes)
        panes.add(top, weight=1)

        metrics = ttk.LabelFrame(top, text="Metrics", padding=(8, 4))
        metrics.pack(side="right", fill="y", padx=(6, 0))
        self.metric_labels: Dict[str, ttk.Label] = {}
        for row, (name, title) in enumerate(self.METRICS):
            ttk.Label(metrics, text=title, padding=0).grid(row=row, column=0, sticky="nw",
                                                          padx=(0, 6))
            label = ttk.Label(metrics, text="", style="Figure.TLabel", justify="left",
                              wraplength=220, padding=0)
            label.grid(row=row, column=1, sticky="nw")
            self.metric_labels[name] = label
        self.chart = RateChart(metrics)
        self.chart.canvas.grid(row=len(self.METRICS), column=0, columnspan=2, sticky="nsew",
                               pady=(6, 0))
        metrics.rowconfigure(len(self.METRICS), weight=1)

        clients = ttk.LabelFrame(top, text="Connected clients", padding=(8, 4))
        clients.pack(side="left", fill="both", expand=True)
        actions = ttk.Frame(clients)
        actions.pack(side="bottom", fill="x", pady=(6, 0))
        table = ttk.Frame(clients)
        table.pack(fill="both", expand=True)
        self.tree = ttk.Treeview(table, columns=[c[0] for c in self.COLUMNS], show="headings",
                                 height=5, selectmode="extended")
        for name, title, width in self.COLUMNS:
            self.tree.heading(name, text=title)
            self.tree.column(name, width=width, minwidth=30, stretch=True,
                             anchor="w" if name in ("ip", "since") else "e")
        yscroll = ttk.Scrollbar(table, orient="vertical", command=self.tree.yview)
        xscroll = ttk.Scrollbar(table, orient="horizontal", command=self.tree.xview)
        self.tree.configure(yscrollcommand=yscroll.set, xscrollcommand=xscroll.set)
        xscroll.pack(side="bottom", fill="x")
        yscroll.pack(side="right", fill="y")
        self.tree.pack(side="left", fill="both", expand=True)
        self.disconnect_selected_button = ttk.Button(actions, text="Disconnect selected",
                                                     command=self.disconnect_selected)
        self.disconnect_selected_button.pack(side="left")
        self.disconnect_all_button = ttk.Button(actions, text="Disconnect all",
                                                command=self.disconnect_all)
        self.disconnect_all_button.pack(side="left", padx=6)

        logs = ttk.LabelFrame(panes, text="Log", padding=(8, 4))
        panes.add(logs, weight=1)
        bar = ttk.Frame(logs)
        bar.pack(side="bottom", fill="x", pady=(4, 0))
        ttk.Label(bar, text="Broadcast").pack(side="left", padx=(0, 4))
        self.broadcast_entry = ttk.Entry(bar, textvariable=self.broadcast_var, width=24)
        self.broadcast_entry.pack(side="left", fill="x", expand=True)
        self.broadcast_entry.bind("<Return>", lambda event: self.broadcast())
        ttk.Checkbutton(bar, text="Encrypted", variable=self.encrypted_var).pack(
            side="left", padx=6)
        self.broadcast_button = ttk.Button(bar, text="Broadcast",
                                           command=lambda: self.broadcast())
        self.broadcast_button.pack(side="left")
        self.log_view = morsock.tk.LogView(logs, self.queue, max_lines=LOG_LINES, height=8)
        self.log_view.frame.pack(fill="both", expand=True)
        self.log_widget = self.log_view.text

    # -- actions (Tk thread) ---------------------------------------------------------------
    def start(self) -> bool:
        """Apply the settings and start listening; False (and a log line) on failure."""
        if self.server.state is not morsock.ServerState.DISCONNECTED:
            return self.server.active
        self.port_entry.configure(style="TEntry")
        try:
            self.server.port = parse_port(self.port_var.get())
        except (TypeError, ValueError) as exc:
            self.port_entry.configure(style="Invalid.TEntry")
            self.port_entry.focus_set()
            self.log(f"Cannot start: {exc}")
            return False
        try:
            self.server.encryption_key = self.key_var.get()
            self.server.encryption_mode = morsock.AESMode.parse(self.mode_var.get())
            self.server.encryption_key_size = morsock.KeySize.parse(self.key_size_var.get())
            self.server.encryption_profile = morsock.EncryptionProfile.parse(
                self.profile_var.get())
            self.server.start()
        except (TypeError, ValueError, morsock.MorsockError) as exc:
            self.log(f"Cannot start: {exc}")
            self.refresh()
            return False
        self.port_var.set(str(self.server.port))  # the real one when 0 was asked for
        encryption = self.server.encryption_info
        self.log(f"Listening on {self.server.host}:{self.server.port} (per-message "
                 f"encryption: {'off' if encryption == 'DISABLED' else encryption})")
        self._last_rates = None
        self.refresh()
        return True

    def stop(self) -> None:
        """Disconnect every client and stop listening (joins the server's threads)."""
        if self.server.state is morsock.ServerState.DISCONNECTED:
            return
        self.server.stop()
        # The clients' on_disconnect events are queued by now: log after them.
        self.queue.post(self.log, "Server stopped", time.time())
        self.refresh()

    def broadcast(self, text: Optional[str] = None, encrypted: Optional[bool] = None) -> int:
        """Send *text* (default: the message field) to every client; return how many."""
        text = self.broadcast_var.get() if text is None else text
        encrypted = self.encrypted_var.get() if encrypted is None else encrypted
        if not self.server.active:
            self.log("Broadcast: the server is not running")
            return 0
        try:
            count = self.server.broadcast_data(text, encrypted=encrypted)
        except morsock.MorsockError as exc:
            self.log(f"Broadcast failed: {exc}")
            return 0
        self.log(f"Broadcast{' (encrypted)' if encrypted else ''} to {count} client(s): "
                 f"{text!r}")
        return count

    def disconnect_selected(self) -> int:
        """Disconnect the clients selected in the list; return how many."""
        count = sum(1 for iid in self.tree.selection()
                    if self.server.disconnect_client(int(iid)))
        if count:
            self.log(f"Disconnecting {count} selected client(s)")
        return count

    def disconnect_all(self) -> int:
        """Disconnect every client; return how many."""
        count = self.server.disconnect_all_clients()
        self.log(f"Disconnecting all {count} client(s)")
        return count

    def log(self, text: str, when: morsock.tk.When = None) -> None:
        """Append a line to the log, stamped *when* (default now). Tk thread."""
        if not self._closed:
            self.log_view.log(text, when)

    def log_text(self) -> str:
        """The whole log, as text."""
        return self.log_view.get()

    def client_rows(self) -> List[Tuple[str, ...]]:
        """The client list as shown: one tuple of column texts per row."""
        return [tuple(str(v) for v in self.tree.item(iid, "values"))
                for iid in self.tree.get_children()]

    def status_text(self) -> str:
        """The status bar's text."""
        return self.status_var.get()

    def metrics_text(self) -> Dict[str, str]:
        """The metrics panel as shown: name -> text."""
        return {name: str(label.cget("text")) for name, label in self.metric_labels.items()}

    def refresh(self) -> None:
        """Redraw the client list, the figures, the status bar and the buttons."""
        if self._closed:
            return
        server = self.server
        rows: Dict[str, Tuple[Any, ...]] = {}
        for handle, client in sorted(server.clients.items()):
            rows[str(handle)] = (
                handle, client.peer_ip, client.peer_port,
                client.connected_at.strftime("%H:%M:%S"), human_bytes(client.bytes_received),
                human_bytes(client.bytes_sent),
                f"{client.messages_received}/{client.messages_sent}")
        for iid in self.tree.get_children():
            if iid not in rows:
                self.tree.delete(iid)
        for iid, values in rows.items():
            if self.tree.exists(iid):
                self.tree.item(iid, values=values)
            else:
                self.tree.insert("", "end", iid=iid, values=values)
        self._show_figures(self.figures.read())
        running = server.state is not morsock.ServerState.DISCONNECTED
        where = f" on {server.host}:{server.port}" if server.active else ""
        self.status_var.set(
            f"{server.state.name}{where} | Clients: {server.client_count} | "
            f"Total connections: {server.total_connections} | "
            f"Uptime: {hms(server.up_time)}")
        self.start_button.state(["disabled"] if running else ["!disabled"])
        self.stop_button.state(["!disabled"] if running else ["disabled"])
        for button in (self.broadcast_button, self.disconnect_all_button,
                       self.disconnect_selected_button):
            button.state(["!disabled"] if server.active else ["disabled"])
        for widget in self._setting_widgets:
            if isinstance(widget, ttk.Combobox):
                widget.state(["disabled"] if running else ["!disabled", "readonly"])
            else:
                widget.state(["disabled"] if running else ["!disabled"])

    def _show_figures(self, f: Dict[str, Any]) -> None:
        labels = self.metric_labels
        labels["received"].configure(
            text=f"{f['messages_received']:,} msg · {human_bytes(f['bytes_received'])}")
        labels["sent"].configure(
            text=f"{f['messages_sent']:,} msg · {human_bytes(f['bytes_sent'])}")
        rejected = f" · {f['rejected']:,} refused" if f["rejected"] else ""
        labels["clients"].configure(
            text=f"{f['connections']:,} now · {f['connections_total']:,} total{rejected}")
        errors = f["errors"]
        labels["errors"].configure(
            text="none" if not errors else
            "\n".join(f"{code} {n:,}" for code, n in sorted(errors.items())))
        if f["handled"] is None:
            labels["handler"].configure(text="durations need:")
            labels["handler_quantiles"].configure(text="pip install 'morsock[metrics]'")
        else:
            handled = f["handled"]
            mean = f["handler_seconds"] / handled if handled else None
            labels["handler"].configure(text=f"{handled:,} calls · mean {human_seconds(mean)}")
            labels["handler_quantiles"].configure(
                text=f"p50 ≤ {human_seconds(f['p50'])} · p99 ≤ {human_seconds(f['p99'])}")

    def _sample_rates(self) -> None:
        s = self.server
        now = time.monotonic()
        msgs = s.total_messages_received + s.total_messages_sent
        nbytes = s.total_bytes_received + s.total_bytes_sent
        if self._last_rates is not None and s.active:
            t, m, b = self._last_rates
            dt = max(now - t, 1e-3)
            self.chart.add(max(0, msgs - m) / dt, max(0, nbytes - b) / dt)
        self._last_rates = (now, msgs, nbytes)

    def _every_second(self) -> None:
        self._timer = None
        if self._closed:
            return
        self._sample_rates()
        self.refresh()
        self._timer = self.root.after(1000, self._every_second)

    def close(self, destroy: bool = True) -> None:
        """Stop the server, the timers and the pump, destroy the window (idempotent)."""
        if self._closed:
            return
        self.server.stop()
        self._closed = True
        if self._timer is not None:
            self.root.after_cancel(self._timer)
            self._timer = None
        self.log_view.close()
        self.pump.detach()
        self.figures.close()
        if destroy:
            self.root.destroy()

    # -- morsock events --------------------------------------------------------------------
    def _on_handle_command(self, server: morsock.Server, client: morsock.ServerClient,
                           data: bytes) -> bytes:
        # Worker thread: never touch Tk here. LogView.message is thread-safe.
        how = "says (encrypted)" if client.message_encrypted else "says"
        self.log_view.message(f"#{client.handle} {how}: {preview(data)}")
        return b"Echo: " + data

    def _on_connect(self, server: morsock.Server, client: morsock.ServerClient) -> None:
        self.log(f"Client #{client.handle} connected from {client.peer_ip}:{client.peer_port}",
                 client.connected_at)
        self.refresh()

    def _on_disconnect(self, server: morsock.Server, client: morsock.ServerClient) -> None:
        n = client.messages_received
        self.log(f"Client #{client.handle} disconnected after {client.connected_time:.1f} s "
                 f"({n:,} message{'' if n == 1 else 's'} received)")
        self.refresh()

    def _on_error(self, server: morsock.Server, client: Optional[morsock.ServerClient],
                  message: str, code: int) -> None:
        self.figures.count_error(code)
        who = f"client #{client.handle}" if client is not None else "server"
        self.log(f"Error ({who}, {error_name(code)}): {message}")

    def _on_state_change(self, server: morsock.Server, old: morsock.ServerState,
                         new: morsock.ServerState) -> None:
        self.refresh()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=3434,
                        help="initial port (default 3434; 0 = any free port)")
    parser.add_argument("--key", default="", help="initial encryption key (default none)")
    parser.add_argument("--mode", default="CBC", type=morsock.AESMode.parse,
                        help="initial AES mode (default CBC)")
    parser.add_argument("--key-size", type=int, default=256, choices=(128, 192, 256),
                        help="128, 192 or 256")
    parser.add_argument("--profile", default="AUTHENTICATED",
                        type=morsock.EncryptionProfile.parse,
                        help="AUTHENTICATED (default) or MORMOT")
    parser.add_argument("--autostart", action="store_true", help="start listening at once")
    return parser


def close_on_signals(root: tk.Tk, close: Any) -> None:
    """Ctrl+C (SIGINT) or SIGTERM in the terminal closes the window cleanly. Without
    this, Tk reports the KeyboardInterrupt as a callback traceback and carries on."""
    def on_signal(signum: int, frame: Any) -> None:
        root.after(0, close)

    for name in ("SIGINT", "SIGTERM"):
        signum = getattr(signal, name, None)
        if signum is not None:
            signal.signal(signum, on_signal)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    root = tk.Tk()
    apply_theme(root)
    app = ServerApp(root, port=args.port, host=args.host, key=args.key, mode=args.mode,
                    key_size=args.key_size, profile=args.profile)
    close_on_signals(root, app.close)
    if args.autostart and app.start():
        print(f"morsock Tk server listening on {app.server.host}:{app.server.port}; "
              f"Ctrl+C here or close the window to stop", flush=True)
    else:
        print("morsock Tk server form open; Ctrl+C here or close the window to quit",
              flush=True)
    try:
        root.mainloop()
    finally:
        app.close(destroy=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
