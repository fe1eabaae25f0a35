#!/usr/bin/env python3
"""Echo client: the console counterpart of the Delphi components' "Complete Working Example".

Connects to an echo server (``samples/echo_server.py`` or ``python -m morsock server``),
sends messages, prints every reply and finishes with a statistics line.

    python samples/echo_client.py --port 3434 Hello World     # the given messages
    python samples/echo_client.py --port 3434 --count 100     # "Message 1" ... "Message 100"
    echo hi | python samples/echo_client.py --port 3434       # one message per stdin line
    python samples/echo_client.py --port 3434 --key "my secret" --mode GCM --count 3

With ``--key`` the messages are sent encrypted (``--plain`` sends them in clear anyway).
Exit code 0 when every message got its reply, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Iterable, List, Optional

import morsock


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("messages", nargs="*", metavar="MESSAGE",
                        help="messages to send (default: --count messages, else stdin lines)")
    parser.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=3434, help="server port (default 3434)")
    parser.add_argument("--count", type=int, default=0,
                        help="send COUNT numbered messages instead of MESSAGEs / stdin")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for each reply (default 10)")
    parser.add_argument("--key", default="", help="encryption key (default: no encryption)")
    parser.add_argument("--mode", default="CBC", type=morsock.AESMode.parse,
                        help="AES mode: ECB CBC CFB OFB CTR GCM CFC OFC CTC (default CBC)")
    parser.add_argument("--key-size", default=256, type=morsock.KeySize.parse,
                        help="128, 192 or 256 (default 256)")
    parser.add_argument("--profile", default="AUTHENTICATED",
                        type=morsock.EncryptionProfile.parse,
                        help="AUTHENTICATED (default) or MORMOT (talks to Delphi peers)")
    parser.add_argument("--plain", action="store_true",
                        help="send in clear even when --key is given")
    return parser


def _messages(args: argparse.Namespace) -> Iterable[str]:
    if args.messages:
        messages: List[str] = args.messages
        return messages
    if args.count > 0:
        return (f"Message {i}" for i in range(1, args.count + 1))
    return (line.rstrip("\r\n") for line in sys.stdin)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    encrypted = bool(args.key) and not args.plain
    client = morsock.Client(args.host, args.port, encryption_key=args.key,
                            encryption_mode=args.mode, encryption_key_size=args.key_size,
                            encryption_profile=args.profile)
    try:
        client.connect()
    except morsock.ConnectError as exc:
        print(f"cannot connect: {exc}", file=sys.stderr)
        return 1
    print(f"connected to {client.remote_ip}:{args.port} "
          f"({client.encryption_info if encrypted else 'plain'})", flush=True)
    sent = answered = 0
    started = time.perf_counter()
    try:
        for message in _messages(args):
            sent += 1
            try:
                reply = client.request(message, timeout=args.timeout, encrypted=encrypted)
            except morsock.MorsockError as exc:
                print(f"no reply to {message!r}: {exc}", file=sys.stderr)
                break
            answered += 1
            print(reply.decode("utf-8", errors="replace"), flush=True)
        elapsed = time.perf_counter() - started
        rtt = f"{elapsed / answered * 1000:.2f} ms" if answered else "n/a"
        # Application messages are counted here: the client's own counters also hold the
        # frames of the encryption handshake, so they are shown apart as wire totals.
        print(f"[stats] sent {sent} msg | received {answered} replies | "
              f"{answered}/{sent} answered | average round trip {rtt} | "
              f"on the wire (handshake included): sent {client.messages_sent} frames / "
              f"{client.total_bytes_sent} B, received {client.messages_received} frames / "
              f"{client.total_bytes_received} B", flush=True)
    finally:
        client.disconnect()
    return 0 if answered == sent else 1


if __name__ == "__main__":
    raise SystemExit(main())
