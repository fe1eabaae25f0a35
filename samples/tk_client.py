#!/usr/bin/env python3
"""Tk client form: the Delphi components' client demo form, in Tkinter/ttk.

Host, port, key, AES mode, key size and profile; Connect/Disconnect; auto-reconnect
(strategy, interval, maximum attempts); Send (plain or encrypted); a log that keeps up
with any message rate; and a status bar (connected time or the reconnection in progress,
bytes and messages sent/received, encryption) refreshed every second.

    python samples/tk_server.py --autostart &
    python samples/tk_client.py --port 3434

Wiring, as in ``tk_server.py``: ``events_use_main_thread=True`` plus
``morsock.tk.attach(root)`` runs ``on_connect``, ``on_disconnect``, ``on_error`` and
``on_state_change`` on the Tk thread. Messages from the server arrive in
``on_handle_command`` on a worker thread, which logs through the thread-safe
``morsock.tk.LogView.message``.
``connect()`` blocks until connected (up to ``connection_timeout``), so the form calls it
from a short-lived helper thread to keep the window responsive.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import tkinter as tk
from tkinter import ttk
from typing import Any, List, Optional

import morsock
import morsock.tk
from morsock.cli import hms, human_bytes

LOG_LINES = 1000
#: The smallest window in which every control stays visible.
MIN_SIZE = (700, 450)
#: How much of a message the log shows.
PREVIEW_CHARS = 120


def preview(data: bytes) -> str:
    """The start of a message as text, with its size when it is cut."""
    text = data[:PREVIEW_CHARS].decode("utf-8", errors="replace")
    return text if len(data) <= PREVIEW_CHARS else f"{text}… ({len(data):,} bytes)"


def parse_int(text: str, what: str, low: int, high: Optional[int] = None) -> int:
    """A whole number typed in a form; ValueError naming the field and the range."""
    span = f"from {low} to {high}" if high is not None else f"of at least {low}"
    try:
        number = int(text.strip())
    except ValueError:
        raise ValueError(f"{what} must be a whole number {span}, not {text!r}") from None
    if number < low or (high is not None and number > high):
        raise ValueError(f"{what} must be a whole number {span}, not {number}")
    return number


def apply_theme(root: tk.Misc) -> ttk.Style:
    """A flat, current look: ttk's "clam" theme and a shaded status bar."""
    style = ttk.Style(root)
    if "clam" in style.theme_names():
        style.theme_use("clam")
    style.configure("Status.TLabel", background="#e8e8e8", padding=(6, 3))
    style.configure("Invalid.TEntry", fieldbackground="#ffe0e0")
    style.configure("Accent.TButton", font="TkHeadingFont")
    return style


class ClientApp:
    """The client form, built inside *root* (a Tk or Toplevel). Use it on the Tk thread.

    Public for scripts and tests: ``client`` (the :class:`morsock.Client`), ``log_view``
    (:class:`morsock.tk.LogView`), the Tk variables (``host_var``, ``port_var``,
    ``key_var``, ``mode_var``, ``key_size_var``, ``profile_var``, ``auto_var``,
    ``strategy_var``, ``interval_var``, ``max_attempts_var``, ``message_var``,
    ``encrypted_var``), the widgets ``connect_button``, ``disconnect_button``,
    ``send_button``, ``port_entry``, ``status_label``, and the actions :meth:`connect`,
    :meth:`disconnect`, :meth:`send`, :meth:`refresh`, :meth:`close`.
    """

    def __init__(self, root: tk.Misc, host: str = "127.0.0.1", port: int = 3434,
                 key: str = "", mode: str = "CBC", profile: str = "AUTHENTICATED",
                 auto_reconnect: bool = True, strategy: str = "BACKOFF",
                 interval_ms: int = 1000, max_attempts: int = 10, key_size: int = 256,
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
        self.key_size_var = tk.StringVar(root, str(int(morsock.KeySize.parse(key_size))))
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
        #: What the form knows from the events: retries are scheduled (or running), or
        #: the client gave up after this many attempts.
        self._retrying = False
        self._gave_up_after = 0
        self._wanted = False  # between Connect and Disconnect
        #: Application messages sent and received by this form. The client's own
        #: ``messages_sent``/``messages_received`` also count the encryption handshake;
        #: the byte counts in the status bar are the client's (all bytes on the wire).
        self.messages_sent = 0
        self.messages_received = 0  # written by the client's one handler thread
        self._build()
        self.pump = morsock.tk.attach(root, self.queue)
        self.refresh()
        self._timer = root.after(1000, self._every_second)
        if isinstance(root, (tk.Tk, tk.Toplevel)):
            root.title("morsock client")
            root.minsize(*MIN_SIZE)
            root.protocol("WM_DELETE_WINDOW", self.close)

    # -- layout ----------------------------------------------------------------------------
    def _build(self) -> None:
        # The status bar first: what is packed last loses its room first.
        self.status_label = ttk.Label(self.root, textvariable=self.status_var,
                                      style="Status.TLabel", anchor="w")
        self.status_label.pack(side="bottom", fill="x")
        outer = ttk.Frame(self.root, padding=(8, 8, 8, 4))
        outer.pack(fill="both", expand=True)

        conn = ttk.LabelFrame(outer, text="Connection", padding=(8, 4))
        conn.pack(fill="x")
        row0 = ttk.Frame(conn)
        row0.pack(fill="x")
        ttk.Label(row0, text="Host").pack(side="left")
        self.host_entry = ttk.Entry(row0, textvariable=self.host_var, width=18)
        self.host_entry.pack(side="left", padx=(4, 12))
        ttk.Label(row0, text="Port").pack(side="left")
        self.port_entry = ttk.Entry(row0, textvariable=self.port_var, width=7)
        self.port_entry.pack(side="left", padx=(4, 12))
        self.disconnect_button = ttk.Button(row0, text="Disconnect", command=self.disconnect)
        self.disconnect_button.pack(side="right", padx=(4, 0))
        self.connect_button = ttk.Button(row0, text="Connect", command=self.connect,
                                         style="Accent.TButton")
        self.connect_button.pack(side="right")

        crypto = ttk.Frame(conn)
        crypto.pack(fill="x", pady=(4, 0))
        ttk.Label(crypto, text="Key").pack(side="left")
        self.key_entry = ttk.Entry(crypto, textvariable=self.key_var, width=16, show="•")
        self.key_entry.pack(side="left", padx=(4, 12))
        ttk.Label(crypto, text="Mode").pack(side="left")
        self.mode_box = ttk.Combobox(crypto, textvariable=self.mode_var, width=5,
                                     state="readonly", values=[m.name for m in morsock.AESMode])
        self.mode_box.pack(side="left", padx=(4, 12))
        ttk.Label(crypto, text="Key size").pack(side="left")
        self.key_size_box = ttk.Combobox(crypto, textvariable=self.key_size_var, width=4,
                                         state="readonly", values=["128", "192", "256"])
        self.key_size_box.pack(side="left", padx=(4, 12))
        ttk.Label(crypto, text="Profile").pack(side="left")
        self.profile_box = ttk.Combobox(crypto, textvariable=self.profile_var, width=15,
                                        state="readonly",
                                        values=[p.name for p in morsock.EncryptionProfile])
        self.profile_box.pack(side="left", padx=(4, 0))
        self._setting_widgets: List[Any] = [self.host_entry, self.port_entry, self.key_entry,
                                            self.mode_box, self.key_size_box,
                                            self.profile_box]

        retry = ttk.Frame(conn)
        retry.pack(fill="x", pady=(4, 0))
        ttk.Checkbutton(retry, text="Auto-reconnect", variable=self.auto_var).pack(side="left")
        ttk.Label(retry, text="Strategy").pack(side="left", padx=(12, 4))
        self.strategy_box = ttk.Combobox(retry, textvariable=self.strategy_var, width=14,
                                         state="readonly",
                                         values=[s.name for s in morsock.ReconnectStrategy])
        self.strategy_box.pack(side="left")
        ttk.Label(retry, text="Every ms").pack(side="left", padx=(12, 4))
        ttk.Entry(retry, textvariable=self.interval_var, width=6).pack(side="left")
        ttk.Label(retry, text="Max tries").pack(side="left", padx=(12, 4))
        ttk.Entry(retry, textvariable=self.max_attempts_var, width=4).pack(side="left")

        send = ttk.LabelFrame(outer, text="Send", padding=(8, 4))
        send.pack(fill="x", pady=(6, 0))
        entry = ttk.Entry(send, textvariable=self.message_var)
        entry.pack(side="left", fill="x", expand=True)
        entry.bind("<Return>", lambda event: self.send())
        ttk.Checkbutton(send, text="Encrypted", variable=self.encrypted_var).pack(
            side="left", padx=6)
        self.send_button = ttk.Button(send, text="Send", command=self.send)
        self.send_button.pack(side="left")

        logs = ttk.LabelFrame(outer, text="Log", padding=(8, 4))
        logs.pack(fill="both", expand=True, pady=(6, 0))
        self.log_view = morsock.tk.LogView(logs, self.queue, max_lines=LOG_LINES, height=10)
        self.log_view.frame.pack(fill="both", expand=True)
        self.log_widget = self.log_view.text

    # -- actions (Tk thread) ---------------------------------------------------------------
    def _apply_settings(self) -> None:
        """Copy the form into the client; ValueError/TypeError naming the field."""
        client = self.client
        self.port_entry.configure(style="TEntry")
        try:
            port = parse_int(self.port_var.get(), "the port", 1, 65535)
        except ValueError:
            self.port_entry.configure(style="Invalid.TEntry")
            self.port_entry.focus_set()
            raise
        client.host = self.host_var.get().strip()
        client.port = port
        client.encryption_key = self.key_var.get()
        client.encryption_mode = morsock.AESMode.parse(self.mode_var.get())
        client.encryption_key_size = morsock.KeySize.parse(self.key_size_var.get())
        client.encryption_profile = morsock.EncryptionProfile.parse(self.profile_var.get())
        client.auto_reconnect = self.auto_var.get()
        client.reconnect_strategy = morsock.ReconnectStrategy.parse(self.strategy_var.get())
        client.reconnect_interval = parse_int(self.interval_var.get(), "the interval", 1)
        client.reconnect_max_attempts = parse_int(self.max_attempts_var.get(),
                                                  "max attempts", 0)

    def _retries_on(self) -> bool:
        c = self.client
        return bool(c.auto_reconnect) and c.reconnect_strategy is not morsock.ReconnectStrategy.NONE

    def connect(self) -> bool:
        """Apply the settings and connect in the background; False if the settings are bad.

        The result arrives as events: ``on_connect``, or ``on_error`` (and, with
        auto-reconnect, numbered retries).
        """
        if self.client.connected or self._retrying or (
                self._connector is not None and self._connector.is_alive()):
            return True
        self.client.disconnect()  # stops retries still running from an earlier attempt
        try:
            self._apply_settings()
        except (TypeError, ValueError, morsock.MorsockError) as exc:
            self.log(f"Cannot connect: {exc}")
            return False
        self._gave_up_after = 0
        self._wanted = True
        self.log(f"Connecting to {self.client.host}:{self.client.port}…")
        self._connector = threading.Thread(target=self._connect_in_background,
                                           name="tk-client-connect", daemon=True)
        self._connector.start()
        self.refresh()
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
        self._wanted = self._retrying = False
        self.client.disconnect()
        self._join_connector()
        self._retrying = False  # events queued before the disconnect may have set it
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
        self.messages_sent += 1
        self.log(f"Sent{' (encrypted)' if encrypted else ''}: {text}")
        return True

    def log(self, text: str, when: morsock.tk.When = None) -> None:
        """Append a line to the log, stamped *when* (default now). Tk thread."""
        if not self._closed:
            self.log_view.log(text, when)

    def log_text(self) -> str:
        """The whole log, as text."""
        return self.log_view.get()

    def status_text(self) -> str:
        """The status bar's text."""
        return self.status_var.get()

    def connection_text(self) -> str:
        """The first part of the status bar: what the connection is doing now."""
        c = self.client
        if c.connected:
            return f"Connected to {c.host}:{c.port} for {hms(c.connected_time)}"
        if self._retrying:
            return f"Reconnecting (attempt {c.reconnect_attempts + 1})…"
        if c.state is morsock.ClientState.CONNECTING or (
                self._connector is not None and self._connector.is_alive()):
            return f"Connecting to {c.host}:{c.port}…"
        if self._gave_up_after:
            return f"Disconnected (gave up after {self._gave_up_after} attempts)"
        return "Disconnected"

    def refresh(self) -> None:
        """Redraw the status bar and the buttons from the client's state."""
        if self._closed:
            return
        c = self.client
        encryption = c.encryption_info
        self.status_var.set(
            f"{self.connection_text()} | "
            f"Sent: {human_bytes(c.total_bytes_sent)} ({self.messages_sent} msg) | "
            f"Received: {human_bytes(c.total_bytes_received)} ({self.messages_received} msg) | "
            f"Encryption: {'off' if encryption == 'DISABLED' else encryption}")
        connected = c.connected
        busy = connected or self._retrying or c.state is not morsock.ClientState.DISCONNECTED \
            or (self._connector is not None and self._connector.is_alive())
        self.connect_button.state(["disabled"] if busy else ["!disabled"])
        for widget in self._setting_widgets:  # they apply at the next Connect
            if isinstance(widget, ttk.Combobox):
                widget.state(["disabled"] if busy else ["!disabled", "readonly"])
            else:
                widget.state(["disabled"] if busy else ["!disabled"])
        self.disconnect_button.state(["!disabled"] if busy else ["disabled"])
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
        self.log_view.close()
        self.pump.detach()
        if destroy:
            self.root.destroy()

    # -- morsock events --------------------------------------------------------------------
    def _on_handle_command(self, client: morsock.Client, data: bytes) -> None:
        self.messages_received += 1
        # Worker thread: never touch Tk here. LogView.message is thread-safe.
        self.log_view.message("Received: " + preview(data))

    def _on_connect(self, client: morsock.Client) -> None:
        self._retrying = False
        self._gave_up_after = 0
        encryption = client.encryption_info
        self.log(f"Connected to {client.remote_ip}:{client.port} (per-message encryption: "
                 f"{'off' if encryption == 'DISABLED' else encryption})")
        self.refresh()

    def _on_disconnect(self, client: morsock.Client) -> None:
        # A drop the user did not ask for: auto-reconnect takes over.
        self._retrying = self._retries_on() and self._wanted and not self._closed
        self.log("Disconnected" + (" (reconnecting)" if self._retrying else ""))
        self.refresh()

    def _on_error(self, client: morsock.Client, message: str, code: int) -> None:
        if code > 0:  # a reconnection attempt failed; the library's text says which
            self._retrying = True
            self.log(message[:1].upper() + message[1:])
        elif code == morsock.ErrorCode.MAX_RECONNECT_ATTEMPTS:
            self._retrying = False
            self._gave_up_after = client.reconnect_attempts
            self.log(f"Gave up reconnecting: {message}")
        else:
            if code == morsock.ErrorCode.CONNECTION_FAILED and self._wanted:
                self._retrying = self._retries_on()
            try:
                name = morsock.ErrorCode(code).name
            except ValueError:
                name = str(code)
            self.log(f"Error ({name}): {message}")
        self.refresh()

    def _on_state_change(self, client: morsock.Client, old: morsock.ClientState,
                         new: morsock.ClientState) -> None:
        self.refresh()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=3434, help="server port (default 3434)")
    parser.add_argument("--key", default="", help="encryption key (default none)")
    parser.add_argument("--mode", default="CBC", type=morsock.AESMode.parse,
                        help="AES mode (default CBC)")
    parser.add_argument("--key-size", type=int, default=256, choices=(128, 192, 256),
                        help="128, 192 or 256 (default 256)")
    parser.add_argument("--profile", default="AUTHENTICATED",
                        type=morsock.EncryptionProfile.parse,
                        help="AUTHENTICATED (default) or MORMOT")
    parser.add_argument("--strategy", default="BACKOFF", type=morsock.ReconnectStrategy.parse,
                        help="reconnect strategy: NONE IMMEDIATE BACKOFF FIXED_INTERVAL")
    parser.add_argument("--connect", action="store_true", help="connect at once")
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
    app = ClientApp(root, host=args.host, port=args.port, key=args.key, mode=args.mode,
                    key_size=args.key_size, profile=args.profile, strategy=args.strategy)
    close_on_signals(root, app.close)
    if args.connect:
        app.connect()
    print("morsock Tk client form open; Ctrl+C here or close the window to quit", flush=True)
    try:
        root.mainloop()
    finally:
        app.close(destroy=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
