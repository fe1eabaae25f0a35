#!/usr/bin/env python3
"""Tk server form: the Delphi components' server demo form, in Tkinter/ttk.

Settings (port, key, AES mode, key size, profile), Start/Stop, a live client list
(handle, IP, port, connected since, bytes in/out, messages), a log, a status bar
(clients, total connections, bytes sent/received, uptime) refreshed every second,
Broadcast (plain or encrypted), Disconnect selected / Disconnect all.

Every message is answered with ``"Echo: " + message``.

    python samples/tk_server.py                      # then press Start
    python samples/tk_server.py --port 3434 --autostart
    python samples/tk_client.py --port 3434          # a client form to talk to it

How it is wired (the part to copy into your own Tk tool): the server is created with
``events_use_main_thread=True`` and ``morsock.tk.attach(root)`` pumps its events from
Tk's ``after`` loop, so ``on_connect``, ``on_disconnect``, ``on_error`` and
``on_state_change`` run on the Tk thread and update widgets directly.
``on_handle_command`` runs on a worker thread: it must not touch Tk, so it hands its log
line to the GUI with ``queue.post(...)``. Statistics are read once a second by an
``after`` timer instead of reacting to every ``on_data_*`` event.
"""

from __future__ import annotations

import argparse
import datetime
import tkinter as tk
from tkinter import ttk
from typing import Any, Dict, List, Optional, Tuple

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


class ServerApp:
    """The server form, built inside *root* (a Tk or Toplevel). Use it on the Tk thread.

    Public for scripts and tests: ``server`` (the :class:`morsock.Server`), the Tk
    variables ``port_var``, ``key_var``, ``mode_var``, ``key_size_var``, ``profile_var``,
    ``broadcast_var``, ``encrypted_var``, the widgets ``tree``, ``log_widget``,
    ``status_label``, ``start_button``, ``stop_button``, ``broadcast_button``,
    ``disconnect_selected_button``, ``disconnect_all_button``, and the actions
    :meth:`start`, :meth:`stop`, :meth:`broadcast`, :meth:`disconnect_selected`,
    :meth:`disconnect_all`, :meth:`refresh`, :meth:`close`.
    """

    COLUMNS: Tuple[Tuple[str, str, int], ...] = (
        ("handle", "Handle", 60), ("ip", "IP", 120), ("port", "Port", 70),
        ("since", "Connected since", 120), ("bytes_in", "Bytes in", 90),
        ("bytes_out", "Bytes out", 90), ("messages", "Messages in/out", 110))

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
        self._build()
        self.pump = morsock.tk.attach(root, self.queue)
        self.refresh()
        self._timer = root.after(1000, self._every_second)
        if isinstance(root, (tk.Tk, tk.Toplevel)):
            root.title("morsock server")
            root.protocol("WM_DELETE_WINDOW", self.close)

    # -- layout ----------------------------------------------------------------------------
    def _build(self) -> None:
        outer = ttk.Frame(self.root, padding=8)
        outer.pack(fill="both", expand=True)

        settings = ttk.LabelFrame(outer, text="Server settings", padding=6)
        settings.pack(fill="x")
        ttk.Label(settings, text="Port").grid(row=0, column=0, sticky="w")
        self.port_entry = ttk.Entry(settings, textvariable=self.port_var, width=7)
        self.port_entry.grid(row=0, column=1, padx=(4, 12))
        ttk.Label(settings, text="Key").grid(row=0, column=2, sticky="w")
        self.key_entry = ttk.Entry(settings, textvariable=self.key_var, width=16, show="•")
        self.key_entry.grid(row=0, column=3, padx=(4, 12))
        ttk.Label(settings, text="Mode").grid(row=0, column=4, sticky="w")
        self.mode_box = ttk.Combobox(settings, textvariable=self.mode_var, width=5,
                                     state="readonly",
                                     values=[m.name for m in morsock.AESMode])
        self.mode_box.grid(row=0, column=5, padx=(4, 12))
        ttk.Label(settings, text="Key size").grid(row=0, column=6, sticky="w")
        self.key_size_box = ttk.Combobox(settings, textvariable=self.key_size_var, width=4,
                                         state="readonly", values=["128", "192", "256"])
        self.key_size_box.grid(row=0, column=7, padx=(4, 12))
        ttk.Label(settings, text="Profile").grid(row=0, column=8, sticky="w")
        self.profile_box = ttk.Combobox(settings, textvariable=self.profile_var, width=15,
                                        state="readonly",
                                        values=[p.name for p in morsock.EncryptionProfile])
        self.profile_box.grid(row=0, column=9, padx=(4, 12))
        self.start_button = ttk.Button(settings, text="Start", command=self.start)
        self.start_button.grid(row=0, column=10, padx=2)
        self.stop_button = ttk.Button(settings, text="Stop", command=self.stop)
        self.stop_button.grid(row=0, column=11, padx=2)
        self._setting_widgets: List[Any] = [self.port_entry, self.key_entry, self.mode_box,
                                            self.key_size_box, self.profile_box]

        clients = ttk.LabelFrame(outer, text="Connected clients", padding=6)
        clients.pack(fill="both", expand=True, pady=(8, 0))
        table = ttk.Frame(clients)
        table.pack(fill="both", expand=True)
        self.tree = ttk.Treeview(table, columns=[c[0] for c in self.COLUMNS], show="headings",
                                 height=7, selectmode="extended")
        for name, title, width in self.COLUMNS:
            self.tree.heading(name, text=title)
            self.tree.column(name, width=width, anchor="w" if name in ("ip", "since") else "e")
        scroll = ttk.Scrollbar(table, orient="vertical", command=self.tree.yview)
        self.tree.configure(yscrollcommand=scroll.set)
        self.tree.pack(side="left", fill="both", expand=True)
        scroll.pack(side="right", fill="y")
        actions = ttk.Frame(clients)
        actions.pack(fill="x", pady=(6, 0))
        self.disconnect_selected_button = ttk.Button(actions, text="Disconnect selected",
                                                     command=self.disconnect_selected)
        self.disconnect_selected_button.pack(side="left")
        self.disconnect_all_button = ttk.Button(actions, text="Disconnect all",
                                                command=self.disconnect_all)
        self.disconnect_all_button.pack(side="left", padx=6)
        ttk.Label(actions, text="Message").pack(side="left", padx=(18, 4))
        self.broadcast_entry = ttk.Entry(actions, textvariable=self.broadcast_var, width=30)
        self.broadcast_entry.pack(side="left", fill="x", expand=True)
        self.broadcast_entry.bind("<Return>", lambda event: self.broadcast())
        ttk.Checkbutton(actions, text="Encrypted",
                        variable=self.encrypted_var).pack(side="left", padx=6)
        self.broadcast_button = ttk.Button(actions, text="Broadcast",
                                           command=lambda: self.broadcast())
        self.broadcast_button.pack(side="left")

        logs = ttk.LabelFrame(outer, text="Log", padding=6)
        logs.pack(fill="both", expand=True, pady=(8, 0))
        self.log_widget = tk.Text(logs, height=14, width=100, state="disabled", wrap="none",
                                  font="TkFixedFont")
        log_scroll = ttk.Scrollbar(logs, orient="vertical", command=self.log_widget.yview)
        self.log_widget.configure(yscrollcommand=log_scroll.set)
        self.log_widget.pack(side="left", fill="both", expand=True)
        log_scroll.pack(side="right", fill="y")

        self.status_label = ttk.Label(self.root, textvariable=self.status_var, relief="sunken",
                                      anchor="w", padding=(6, 2))
        self.status_label.pack(side="bottom", fill="x")

    # -- actions (Tk thread) ---------------------------------------------------------------
    def start(self) -> bool:
        """Apply the settings and start listening; False (and a log line) on failure."""
        if self.server.state is not morsock.ServerState.DISCONNECTED:
            return self.server.active
        try:
            self.server.port = int(self.port_var.get())
            self.server.encryption_key = self.key_var.get()
            self.server.encryption_mode = morsock.AESMode.parse(self.mode_var.get())
            self.server.encryption_key_size = morsock.KeySize.parse(self.key_size_var.get())
            self.server.encryption_profile = morsock.EncryptionProfile.parse(
                self.profile_var.get())
            self.server.start()
        except (ValueError, morsock.MorsockError) as exc:
            self.log(f"Cannot start: {exc}")
            self.refresh()
            return False
        self.port_var.set(str(self.server.port))  # the real one when 0 was asked for
        self.log(f"Listening on {self.server.host}:{self.server.port} "
                 f"(encryption: {self.server.encryption_info})")
        self.refresh()
        return True

    def stop(self) -> None:
        """Disconnect every client and stop listening (joins the server's threads)."""
        if self.server.state is morsock.ServerState.DISCONNECTED:
            return
        self.server.stop()
        self.log("Server stopped")
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

    def client_rows(self) -> List[Tuple[str, ...]]:
        """The client list as shown: one tuple of column texts per row."""
        return [tuple(str(v) for v in self.tree.item(iid, "values"))
                for iid in self.tree.get_children()]

    def status_text(self) -> str:
        """The status bar's text."""
        return self.status_var.get()

    def refresh(self) -> None:
        """Redraw the client list, the status bar and the buttons from the server's state."""
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
        self.status_var.set(
            f"{server.state.name} | Clients: {server.client_count} | "
            f"Total connections: {server.total_connections} | "
            f"Sent: {human_bytes(server.total_bytes_sent)} | "
            f"Received: {human_bytes(server.total_bytes_received)} | "
            f"Uptime: {hms(server.up_time)}")
        running = server.state is not morsock.ServerState.DISCONNECTED
        self.start_button.state(["disabled"] if running else ["!disabled"])
        self.stop_button.state(["!disabled"] if running else ["disabled"])
        for widget in self._setting_widgets:
            if isinstance(widget, ttk.Combobox):
                widget.state(["disabled"] if running else ["!disabled", "readonly"])
            else:
                widget.state(["disabled"] if running else ["!disabled"])

    def _every_second(self) -> None:
        self._timer = None
        if self._closed:
            return
        self.refresh()
        self._timer = self.root.after(1000, self._every_second)

    def close(self, destroy: bool = True) -> None:
        """Stop the server, stop the timers and the pump, destroy the window (idempotent)."""
        if self._closed:
            return
        self.server.stop()
        self._closed = True
        if self._timer is not None:
            self.root.after_cancel(self._timer)
            self._timer = None
        self.pump.detach()
        if destroy:
            self.root.destroy()

    # -- morsock events --------------------------------------------------------------------
    def _on_handle_command(self, server: morsock.Server, client: morsock.ServerClient,
                           data: bytes) -> bytes:
        # Worker thread: never touch Tk here; hand the log line to the Tk thread.
        text = data.decode("utf-8", errors="replace")
        self.queue.post(self.log, f"#{client.handle} says: {text}")
        return b"Echo: " + data

    def _on_connect(self, server: morsock.Server, client: morsock.ServerClient) -> None:
        self.log(f"Client #{client.handle} connected from {client.peer_ip}:{client.peer_port}")
        self.refresh()

    def _on_disconnect(self, server: morsock.Server, client: morsock.ServerClient) -> None:
        self.log(f"Client #{client.handle} disconnected ({client.messages_received} messages, "
                 f"{client.connected_time:.1f} s)")
        self.refresh()

    def _on_error(self, server: morsock.Server, client: Optional[morsock.ServerClient],
                  message: str, code: int) -> None:
        who = f"client #{client.handle}" if client is not None else "server"
        self.log(f"Error ({who}, code {code}): {message}")

    def _on_state_change(self, server: morsock.Server, old: morsock.ServerState,
                         new: morsock.ServerState) -> None:
        self.refresh()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=3434,
                        help="initial port (default 3434; 0 = any free port)")
    parser.add_argument("--key", default="", help="initial encryption key (default none)")
    parser.add_argument("--mode", default="CBC", help="initial AES mode (default CBC)")
    parser.add_argument("--key-size", type=int, default=256, help="128, 192 or 256")
    parser.add_argument("--profile", default="AUTHENTICATED",
                        help="AUTHENTICATED (default) or MORMOT")
    parser.add_argument("--autostart", action="store_true", help="start listening at once")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    root = tk.Tk()
    style = ttk.Style(root)
    if "clam" in style.theme_names():
        style.theme_use("clam")
    app = ServerApp(root, port=args.port, host=args.host, key=args.key, mode=args.mode,
                    key_size=args.key_size, profile=args.profile)
    if args.autostart:
        app.start()
    try:
        root.mainloop()
    finally:
        app.close(destroy=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
