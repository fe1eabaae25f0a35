#!/usr/bin/env python3
"""A small chat: one server, any number of console clients, each line sent to everyone.

Start the server, then a client per person (each in its own terminal)::

    python samples/chat.py server --port 4040
    python samples/chat.py client --port 4040 --name alice
    python samples/chat.py client --port 4040 --name bob

Add ``--key "a passphrase"`` to both sides and every message travels encrypted
(AUTHENTICATED profile). Type a line to send it to everybody else; ``/who`` lists who is
here, ``/nick NEWNAME`` renames you, ``/quit`` (or end of input, Ctrl+D) leaves.

What it shows, beyond echo:

* **Per-client state** in ``ServerClient.custom_data`` (the nickname).
* **Fan-out from a handler**: ``on_handle_command`` runs on a worker thread and calls
  ``send_data`` on *other* clients -- safe from any thread, never blocks on a slow reader
  (a reader that falls ``max_send_buffer`` behind is disconnected, not waited for).
* **Server-initiated close** after a last message: ``/quit`` is answered with a goodbye,
  then ``client.disconnect()``; replies to one connection leave in order, so the goodbye
  arrives first.
* **Auto-reconnect** on the client: stop and restart the server and the clients come
  back by themselves (``on_connect`` sends the nickname again).

Server messages start with ``*``; chat lines look like ``[alice] hello``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import List, Optional

import morsock


class ChatServer:
    """The chat room. ``start()`` / ``stop()``; ``server`` is the :class:`morsock.Server`."""

    def __init__(self, host: str = "0.0.0.0", port: int = 4040, key: str = "",
                 verbose: bool = True) -> None:
        self.encrypted = bool(key)
        self.verbose = verbose
        self.server = morsock.Server(port, host, encryption_key=key,
                                     on_handle_command=self.on_message,
                                     on_connect=self.on_connect,
                                     on_disconnect=self.on_disconnect)

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def _say(self, text: str) -> None:
        if self.verbose:
            print(text, flush=True)

    @staticmethod
    def nick(client: morsock.ServerClient) -> str:
        return str(client.custom_data or f"guest{client.handle}")

    def send_to_others(self, sender: Optional[morsock.ServerClient], text: str) -> None:
        """Send *text* to every client but *sender* (any thread)."""
        for client in self.server.clients.values():
            if client is sender:
                continue
            try:
                client.send_data(text, encrypted=self.encrypted)
            except morsock.MorsockError:
                pass  # it is leaving, or too slow to keep up: the server closes it

    # -- events (library threads) --------------------------------------------------------
    def on_connect(self, server: morsock.Server, client: morsock.ServerClient) -> None:
        self._say(f"+ #{client.handle} from {client.peer_ip}:{client.peer_port}")

    def on_disconnect(self, server: morsock.Server, client: morsock.ServerClient) -> None:
        if client.custom_data:
            self.send_to_others(client, f"* {client.custom_data} left")
        self._say(f"- #{client.handle} {self.nick(client)}")

    def on_message(self, server: morsock.Server, client: morsock.ServerClient,
                   data: bytes) -> Optional[str]:
        text = data.decode("utf-8", errors="replace").strip()
        if text.startswith("/nick "):
            new = text[6:].strip()[:32] or self.nick(client)
            old, client.custom_data = client.custom_data, new
            if old is None:
                self.send_to_others(client, f"* {new} joined")
                self._say(f"  #{client.handle} is {new}")
                return f"* welcome {new}; /who lists who is here"
            self.send_to_others(client, f"* {old} is now {new}")
            return f"* you are now {new}"
        if text == "/who":
            names = sorted(self.nick(c) for c in server.clients.values())
            return "* here: " + ", ".join(names)
        if text == "/quit":
            client.send_data(f"* bye {self.nick(client)}", encrypted=self.encrypted)
            client.disconnect()
            return None
        if text:
            self.send_to_others(client, f"[{self.nick(client)}] {text}")
        return None


def run_server(args: argparse.Namespace) -> int:
    room = ChatServer(args.host, args.port, args.key)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        room.start()
    except morsock.MorsockError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 1
    print(f"chat server listening on {room.server.host}:{room.server.port} "
          f"({room.server.encryption_info})", flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        room.stop()
    print("chat server stopped", flush=True)
    return 0


def run_client(args: argparse.Namespace) -> int:
    encrypted = bool(args.key)
    left = threading.Event()
    quitting = threading.Event()
    welcomed = threading.Event()
    # The nickname the server last confirmed: a reconnection announces this one, not
    # --name, so a /nick survives a lost connection.
    nickname = [args.name]

    def on_connect(client: morsock.Client) -> None:
        # Runs after connect() has returned, and again after every reconnection: the main
        # thread waits for the welcome before it sends lines, so the name comes first.
        client.send_data(f"/nick {nickname[0]}", encrypted=encrypted)

    def on_disconnect(client: morsock.Client) -> None:
        if quitting.is_set():
            left.set()
        else:
            print("* connection lost, reconnecting...", flush=True)

    def on_message(client: morsock.Client, data: bytes) -> None:
        text = data.decode("utf-8", errors="replace")
        print(text, flush=True)
        if text.startswith("* welcome "):
            welcomed.set()
        elif text.startswith("* you are now "):
            nickname[0] = text[len("* you are now "):]

    def on_error(client: morsock.Client, message: str, code: int) -> None:
        if code == morsock.ErrorCode.MAX_RECONNECT_ATTEMPTS:
            print("* giving up: the server is gone", flush=True)
            left.set()

    client = morsock.Client(args.host, args.port, encryption_key=args.key,
                            auto_reconnect=True, reconnect_interval=500,
                            reconnect_max_interval=5000, reconnect_max_attempts=20,
                            on_connect=on_connect, on_disconnect=on_disconnect,
                            on_handle_command=on_message, on_error=on_error)
    try:
        client.connect()
    except morsock.ConnectError as exc:
        print(f"cannot connect: {exc}", file=sys.stderr)
        client.disconnect()
        return 1
    try:
        if not welcomed.wait(10):
            print("* the server did not welcome us", file=sys.stderr)
            return 1
        for line in sys.stdin:
            line = line.rstrip("\r\n")
            if left.is_set():
                break
            if line == "/quit":
                break
            if not line:
                continue
            try:
                client.send_data(line, encrypted=encrypted)
            except morsock.NotConnectedError:
                print("* not connected; message dropped", flush=True)
        if not left.is_set():
            quitting.set()
            try:
                client.send_data("/quit", encrypted=encrypted)
                left.wait(10)  # the server says goodbye, then closes the connection
            except morsock.NotConnectedError:
                pass
    except KeyboardInterrupt:
        pass
    finally:
        client.disconnect()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="role", metavar="ROLE")
    sub.required = True
    srv = sub.add_parser("server", help="run the chat room until Ctrl+C")
    srv.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    srv.add_argument("--port", type=int, default=4040,
                     help="port (default 4040; 0 = any free port, printed on the first line)")
    srv.add_argument("--key", default="", help="encryption passphrase (default: none)")
    cli = sub.add_parser("client", help="join the chat; type lines, /who, /nick, /quit")
    cli.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    cli.add_argument("--port", type=int, default=4040, help="server port (default 4040)")
    cli.add_argument("--key", default="", help="encryption passphrase (default: none)")
    cli.add_argument("--name", default="guest", help="your nickname")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_server(args) if args.role == "server" else run_client(args)


if __name__ == "__main__":
    raise SystemExit(main())
