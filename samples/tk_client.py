#!/usr/bin/env python3
"""Tk client form: the Delphi components' client demo form, in Tkinter/ttk.

Host/port/key settings, Connect/Disconnect, auto-reconnect (strategy, interval, maximum
attempts), Send (plain or encrypted), a log, and a status bar (state, connected time,
reconnect attempts, bytes sent/received) refreshed every second.

    python samples/tk_server.py --autostart &
    python samples/tk_client.py --port 3434

Wiring, as in ``tk_server.py``: ``events_use_main_thread=True`` plus
``morsock.tk.attach(root)`` runs ``on_connect``, ``on_disconnect``, ``on_error`` and
``on_state_change`` on the Tk thread. Messages from the server arrive in
``on_handle_command`` on a worker thread, which posts its log line to the queue.
``connect()`` blocks until connected (up to ``connection_timeout``), so the form calls it
from a short-lived helper thread to keep the window responsive.
"""

from __future__ import annotations

import argparse
import datetime
import threading
import tkinter as tk
from tkinter import ttk
from typing import List, Optional

import morsock
import morsock.tk

LOG_LINES = 1000


def human_bytes(n: int) -> str:
    """``1234`` -> ``"1.2 KiB"``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def hms(seconds: float) -> str:
    """``3725`` -> ``"01:02:05"``."""
    seconds = int(seconds)
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ClientApp:
    """The client form, built inside *root* (a Tk or Toplevel). Use it on the Tk thread.

    Public for scripts and tests: ``client`` (the :class:`morsock.Client`), the Tk
    variables (``host_var``, ``port_var``, ``key_var``, ``mode_var``, ``profile_var``,
    ``auto_var``, ``strategy_var``, ``interval_var``, ``max_attempts_var``,
    ``message_var``, ``encrypted_var``), and the actions :meth:`connect`,
    :meth:`disconnect`, :meth:`send`, :meth:`refresh`, :meth:`close`.
    """

    def __init__(self, root: tk.Misc, host: str = "127.0.0.1", port: int = 3434,
                 key: str = "", mode: str = "CBC", profile: str = "AUTHENTICATED",
                 auto_reconnect: bool = True, strategy: str = "BACKOFF",
                 interval_ms: int = 1000, max_attempts: int = 10,
                 event_queue: Optional[morsock.EventQueue] = None) -> None:
        self.root = root
        self.queue = event_queue if event_queue is not None else morsock.EventQueue.default()
        self.client = morsock.Client(host, port, connection_timeout=5,
                                     events_use_main_thread=True, event_queue=self.queue,
                                     on_handle_command=self._on_handle_command,
                                     on_connect=self._on_connect,
                                     on_disconnect=self._on_disconnect,
                                     on_error=self._on_error,
                                     on_state_change=self._on_state_change)
        self.host_var = tk.StringVar(root, host)
        self.port_var = tk.StringVar(root, str(port))
        self.key_var = tk.StringVar(root, key)
        self.mode_var = tk.StringVar(root, morsock.AESMode.parse(mode).name)
        self.profile_var = tk.StringVar(root, morsock.EncryptionProfile.parse(profile).name)
        self.auto_var = tk.BooleanVar(root, auto_reconnect)
        self.strategy_var = tk.StringVar(root, morsock.ReconnectStrategy.parse(strategy).name)
        self.interval_var = tk.StringVar(root, str(interval_ms))
        self.max_attempts_var = tk.StringVar(root, str(max_attempts))
        self.message_var = tk.StringVar(root, "Hello morsock")
        self.encrypted_var = tk.BooleanVar(root, False)
        self.status_var = tk.StringVar(root, "")
        self._connector: Optional[threading.Thread] = None
        self._timer: Optional[str] = None
        self._closed = False
        self._build()
        self.pump = morsock.tk.attach(root, self.queue)
        self.refresh()
        self._timer = root.after(1000, self._every_second)
        if isinstance(root, (tk.Tk, tk.Toplevel)):
            root.title("morsock client")
            root.protocol("WM_DELETE_WINDOW", self.close)

    # -- layout ----------------------------------------------------------------------------
    def _build(self) -> None:
        outer = ttk.Frame(self.root, padding=8)
        outer.pack(fill="both", expand=True)

        conn = ttk.LabelFrame(outer, text="Connection", padding=6)
        conn.pack(fill="x")
        fields = [("Host", self.host_var, 14), ("Port", self.port_var, 7),
                  ("Key", self.key_var, 16)]
        for col, (label, var, width) in enumerate(fields):
            ttk.Label(conn, text=label).grid(row=0, column=2 * col, sticky="w")
            entry = ttk.Entry(conn, textvariable=var, width=width,
                              show="•" if label == "Key" else "")
            entry.grid(row=0, column=2 * col + 1, padx=(4, 12), sticky="w")
        ttk.Label(conn, text="Mode").grid(row=0, column=6, sticky="w")
        ttk.Combobox(conn, textvariable=self.mode_var, width=5, state="readonly",
                     values=[m.name for m in morsock.AESMode]).grid(row=0, column=7,
                                                                    padx=(4, 12))
        ttk.Label(conn, text="Profile").grid(row=0, column=8, sticky="w")
        ttk.Combobox(conn, textvariable=self.profile_var, width=15, state="readonly",
                     values=[p.name for p in morsock.EncryptionProfile]).grid(
                         row=0, column=9, padx=(4, 0))

        ttk.Checkbutton(conn, text="Auto-reconnect", variable=self.auto_var).grid(
            row=1, column=0, columnspan=2, sticky="w", pady=(6, 0))
        ttk.Label(conn, text="Strategy").grid(row=1, column=2, sticky="w", pady=(6, 0))
        ttk.Combobox(conn, textvariable=self.strategy_var, width=14, state="readonly",
                     values=[s.name for s in morsock.ReconnectStrategy]).grid(
                         row=1, column=3, padx=(4, 12), pady=(6, 0), sticky="w")
        ttk.Label(conn, text="Interval ms").grid(row=1, column=4, sticky="w", pady=(6, 0))
        ttk.Entry(conn, textvariable=self.interval_var, width=7).grid(
            row=1, column=5, padx=(4, 12), pady=(6, 0), sticky="w")
        ttk.Label(conn, text="Max attempts").grid(row=1, column=6, sticky="w", pady=(6, 0))
        ttk.Entry(conn, textvariable=self.max_attempts_var, width=5).grid(
            row=1, column=7, padx=(4, 12), pady=(6, 0), sticky="w")
        buttons = ttk.Frame(conn)
        buttons.grid(row=1, column=8, columnspan=2, sticky="e", pady=(6, 0))
        self.connect_button = ttk.Button(buttons, text="Connect", command=self.connect)
        self.connect_button.pack(side="left", padx=2)
        self.disconnect_button = ttk.Button(buttons, text="Disconnect",
                                            command=self.disconnect)
        self.disconnect_button.pack(side="left", padx=2)

        send = ttk.LabelFrame(outer, text="Send", padding=6)
        send.pack(fill="x", pady=(8, 0))
        entry = ttk.Entry(send, textvariable=self.message_var)
        entry.pack(side="left", fill="x", expand=True)
        entry.bind("<Return>", lambda event: self.send())
        ttk.Checkbutton(send, text="Encrypted", variable=self.encrypted_var).pack(
            side="left", padx=6)
        self.send_button = ttk.Button(send, text="Send", command=self.send)
        self.send_button.pack(side="left")

        logs = ttk.LabelFrame(outer, text="Log", padding=6)
        logs.pack(fill="both", expand=True, pady=(8, 0))
        self.log_widget = tk.Text(logs, height=14, width=90, state="disabled", wrap="none",
                                  font="TkFixedFont")
        scroll = ttk.Scrollbar(logs, orient="vertical", command=self.log_widget.yview)
        self.log_widget.configure(yscrollcommand=scroll.set)
        self.log_widget.pack(side="left", fill="both", expand=True)
        scroll.pack(side="right", fill="y")

        self.status_label = ttk.Label(self.root, textvariable=self.status_var, relief="sunken",
                                      anchor="w", padding=(6, 2))
        self.status_label.pack(side="bottom", fill="x")

    # -- actions (Tk thread) ---------------------------------------------------------------
    def connect(self) -> bool:
        """Apply the settings and connect in the background; False if the settings are bad.

        The result arrives as events: ``on_connect``, or ``on_error`` (and, with
        auto-reconnect, numbered retries).
        """
        if self.client.connected or (self._connector is not None
                                     and self._connector.is_alive()):
            return True
        self.client.disconnect()  # stops retries still running from an earlier attempt
        try:
            client = self.client
            client.host = self.host_var.get().strip()
            client.port = int(self.port_var.get())
            client.encryption_key = self.key_var.get()
            client.encryption_mode = morsock.AESMode.parse(self.mode_var.get())
            client.encryption_profile = morsock.EncryptionProfile.parse(self.profile_var.get())
            client.auto_reconnect = self.auto_var.get()
            client.reconnect_strategy = morsock.ReconnectStrategy.parse(self.strategy_var.get())
            client.reconnect_interval = int(self.interval_var.get())
            client.reconnect_max_attempts = int(self.max_attempts_var.get())
        except (ValueError, morsock.MorsockError) as exc:
            self.log(f"Bad setting: {exc}")
            return False
        self.log(f"Connecting to {client.host}:{client.port}...")
        self._connector = threading.Thread(target=self._connect_in_background,
                                           name="tk-client-connect", daemon=True)
        self._connector.start()
        return True

    def _connect_in_background(self) -> None:
        # Helper thread: connect() blocks. Failures are reported by on_error.
        try:
            self.client.connect()
        except morsock.ConnectError:
            pass
        except morsock.MorsockError as exc:
            self.queue.post(self.log, f"Connect failed: {exc}")

    def disconnect(self) -> None:
        """Disconnect and stop any reconnection (joins the client's threads)."""
        self.client.disconnect()
        self._join_connector()
        self.refresh()

    def _join_connector(self) -> None:
        connector, self._connector = self._connector, None
        if connector is not None:
            connector.join(15)

    def send(self, text: Optional[str] = None, encrypted: Optional[bool] = None) -> bool:
        """Send *text* (default: the message field); False (and a log line) on failure."""
        text = self.message_var.get() if text is None else text
        encrypted = self.encrypted_var.get() if encrypted is None else encrypted
        try:
            self.client.send_data(text, encrypted=encrypted)
        except morsock.MorsockError as exc:
            self.log(f"Send failed: {exc}")
            return False
        self.log(f"Sent{' (encrypted)' if encrypted else ''}: {text}")
        return True

    def log(self, text: str) -> None:
        """Append a time-stamped line to the log (keeps the last LOG_LINES lines)."""
        if self._closed:
            return
        stamp = datetime.datetime.now().strftime("%H:%M:%S")
        widget = self.log_widget
        widget.configure(state="normal")
        widget.insert("end", f"{stamp}  {text}\n")
        lines = int(widget.index("end-1c").split(".")[0])
        if lines > LOG_LINES:
            widget.delete("1.0", f"{lines - LOG_LINES}.0")
        widget.configure(state="disabled")
        widget.see("end")

    def log_text(self) -> str:
        """The whole log, as text."""
        return self.log_widget.get("1.0", "end-1c")

    def status_text(self) -> str:
        """The status bar's text."""
        return self.status_var.get()

    def refresh(self) -> None:
        """Redraw the status bar and the buttons from the client's state."""
        if self._closed:
            return
        c = self.client
        self.status_var.set(
            f"{c.state.name} | Connected: {hms(c.connected_time)} | "
            f"Reconnect attempts: {c.reconnect_attempts} | "
            f"Sent: {human_bytes(c.total_bytes_sent)} ({c.messages_sent} msg) | "
            f"Received: {human_bytes(c.total_bytes_received)} ({c.messages_received} msg) | "
            f"{c.encryption_info}")
        connected = c.connected
        self.connect_button.state(["disabled"] if connected else ["!disabled"])
        self.send_button.state(["!disabled"] if connected else ["disabled"])

    def _every_second(self) -> None:
        self._timer = None
        if self._closed:
            return
        self.refresh()
        self._timer = self.root.after(1000, self._every_second)

    def close(self, destroy: bool = True) -> None:
        """Disconnect, stop the timers and the pump, destroy the window (idempotent)."""
        if self._closed:
            return
        self.client.disconnect()
        self._join_connector()
        self._closed = True
        if self._timer is not None:
            self.root.after_cancel(self._timer)
            self._timer = None
        self.pump.detach()
        if destroy:
            self.root.destroy()

    # -- morsock events --------------------------------------------------------------------
    def _on_handle_command(self, client: morsock.Client, data: bytes) -> None:
        # Worker thread: never touch Tk here; hand the log line to the Tk thread.
        self.queue.post(self.log, "Received: " + data.decode("utf-8", errors="replace"))

    def _on_connect(self, client: morsock.Client) -> None:
        self.log(f"Connected to {client.remote_ip}:{client.port} "
                 f"(encryption: {client.encryption_info})")
        self.refresh()

    def _on_disconnect(self, client: morsock.Client) -> None:
        self.log("Disconnected")
        self.refresh()

    def _on_error(self, client: morsock.Client, message: str, code: int) -> None:
        if code > 0:
            self.log(f"Reconnect attempt {code} failed: {message}")
        elif code == morsock.ErrorCode.MAX_RECONNECT_ATTEMPTS:
            self.log(f"Gave up reconnecting: {message}")
        else:
            self.log(f"Error (code {code}): {message}")
        self.refresh()

    def _on_state_change(self, client: morsock.Client, old: morsock.ClientState,
                         new: morsock.ClientState) -> None:
        self.refresh()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=3434, help="server port (default 3434)")
    parser.add_argument("--key", default="", help="encryption key (default none)")
    parser.add_argument("--mode", default="CBC", help="AES mode (default CBC)")
    parser.add_argument("--profile", default="AUTHENTICATED",
                        help="AUTHENTICATED (default) or MORMOT")
    parser.add_argument("--strategy", default="BACKOFF",
                        help="reconnect strategy: NONE IMMEDIATE BACKOFF FIXED_INTERVAL")
    parser.add_argument("--connect", action="store_true", help="connect at once")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    root = tk.Tk()
    style = ttk.Style(root)
    if "clam" in style.theme_names():
        style.theme_use("clam")
    app = ClientApp(root, host=args.host, port=args.port, key=args.key, mode=args.mode,
                    profile=args.profile, strategy=args.strategy)
    if args.connect:
        app.connect()
    try:
        root.mainloop()
    finally:
        app.close(destroy=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
