#!/usr/bin/env python3
"""Echo server: the console counterpart of the Delphi components' "Complete Working Example".

Every message is answered with ``"Echo: " + message`` (encrypted when the request was).
Connections and errors are printed as they happen, and a statistics line every second.
Ctrl+C (or SIGTERM) stops the server cleanly.

    python samples/echo_server.py --port 3434
    python samples/echo_server.py --port 3434 --key "my secret" --mode GCM
    python samples/echo_server.py --port 0        # any free port (printed on the first line)

Try it with ``python samples/echo_client.py --port 3434 --count 5``.

The first line printed is always ``echo server listening on HOST:PORT (ENCRYPTION)``.
"""

from __future__ import annotations

import argparse
import signal
import threading
from typing import Any, List, Optional

import morsock


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=3434,
                        help="port to listen on (default 3434; 0 = any free port)")
    parser.add_argument("--threads", type=int, default=4, help="worker threads (default 4)")
    parser.add_argument("--key", default="", help="encryption key (default: no encryption)")
    parser.add_argument("--mode", default="CBC", type=morsock.AESMode.parse,
                        help="AES mode: ECB CBC CFB OFB CTR GCM CFC OFC CTC (default CBC)")
    parser.add_argument("--key-size", default=256, type=morsock.KeySize.parse,
                        help="128, 192 or 256 (default 256)")
    parser.add_argument("--profile", default="AUTHENTICATED",
                        type=morsock.EncryptionProfile.parse,
                        help="AUTHENTICATED (default) or MORMOT (talks to Delphi peers)")
    parser.add_argument("--stats-interval", type=float, default=1.0,
                        help="seconds between statistics lines (default 1; 0 = none)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def on_handle_command(server: morsock.Server, client: morsock.ServerClient,
                          data: bytes) -> bytes:
        # Runs on a worker thread; the return value is sent back to that client.
        return b"Echo: " + data

    def on_connect(server: morsock.Server, client: morsock.ServerClient) -> None:
        print(f"+ client #{client.handle} connected from {client.peer_ip}:{client.peer_port}",
              flush=True)

    def on_disconnect(server: morsock.Server, client: morsock.ServerClient) -> None:
        print(f"- client #{client.handle} disconnected after {client.connected_time:.1f} s "
              f"({client.messages_received} messages)", flush=True)

    def on_error(server: morsock.Server, client: Any, message: str, code: int) -> None:
        who = f"client #{client.handle}" if client is not None else "server"
        print(f"! {who}: {message} (code {code})", flush=True)

    server = morsock.Server(args.port, args.host, thread_pool_size=args.threads,
                            encryption_key=args.key, encryption_mode=args.mode,
                            encryption_key_size=args.key_size, encryption_profile=args.profile,
                            on_handle_command=on_handle_command, on_connect=on_connect,
                            on_disconnect=on_disconnect, on_error=on_error)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        server.start()
    except morsock.MorsockError as exc:
        print(f"cannot start: {exc}", flush=True)
        return 1
    print(f"echo server listening on {server.host}:{server.port} ({server.encryption_info})",
          flush=True)
    try:
        show_stats = args.stats_interval > 0
        while not stop.wait(args.stats_interval if show_stats else 1.0):
            if not show_stats:
                continue
            print(f"[stats] clients {server.client_count} | connections "
                  f"{server.total_connections} | received {server.total_messages_received} msg "
                  f"/ {server.total_bytes_received} B | sent {server.total_messages_sent} msg "
                  f"/ {server.total_bytes_sent} B | up {server.up_time} s", flush=True)
    finally:
        server.stop()
    print("server stopped", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
