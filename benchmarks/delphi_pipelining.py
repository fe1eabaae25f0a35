"""How much pipelining towards a Delphi server is safe: a morsock Client sends N requests
to the original ``mm_echo_server`` (plaintext, mixed sizes) with at most W in flight, and
counts the runs in which the Delphi side dropped the connection.

    python benchmarks/delphi_pipelining.py [--bin DIR] [--requests N] [--runs R]
                                           [--windows 1,4,16,64,256]

DIR defaults to ``MORSOCK_DELPHI_BIN`` or ../shared/delphi_peer/bin (the programs are
copied to a temporary directory first). Prints one line per window.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

from morsock import Client, NotConnectedError

LOCAL = "127.0.0.1"
SIZES = (1, 3, 17, 200, 1500, 9000)


def _free_port() -> int:
    with socket.create_server((LOCAL, 0)) as s:
        return int(s.getsockname()[1])


def one_run(port: int, requests: int, window: int, timeout: float) -> bool:
    """True when all *requests* were answered, False when the connection dropped."""
    slots = threading.Semaphore(window)
    done = threading.Event()
    dropped = threading.Event()
    answered = [0]
    lock = threading.Lock()

    def on_reply(sender: Any, data: bytes) -> None:
        slots.release()
        with lock:
            answered[0] += 1
            if answered[0] == requests:
                done.set()

    def on_disconnect(sender: Any, *args: Any) -> None:
        dropped.set()
        done.set()

    client = Client(LOCAL, port, send_data_replies=True, on_handle_command=on_reply,
                    on_disconnect=on_disconnect, connection_timeout=5)
    client.connect()
    try:
        for i in range(requests):
            while not slots.acquire(timeout=0.5):
                if dropped.is_set():
                    return False
            if dropped.is_set():
                return False
            try:
                client.send_data(b"x" * SIZES[i % len(SIZES)])
            except NotConnectedError:  # dropped between the check and the send
                return False
        done.wait(timeout)
        return not dropped.is_set() and answered[0] == requests
    finally:
        client.on_disconnect = None
        client.disconnect()


def main() -> None:
    default = os.environ.get("MORSOCK_DELPHI_BIN",
                             str(Path(__file__).resolve().parents[2] / "shared"
                                 / "delphi_peer" / "bin"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=default)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--windows", default="1,4,16,64,256")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("mm_echo_server", "mm_client"):
            shutil.copy2(Path(args.bin) / name, Path(tmp) / name)
        port = _free_port()
        proc = subprocess.Popen([str(Path(tmp) / "mm_echo_server"), "--port", str(port)],
                                cwd=tmp, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
        try:
            assert proc.stdout is not None and proc.stdin is not None
            for line in proc.stdout:
                if line.startswith("READY"):
                    break
            proc.stdin.write("quiet 1\n")
            proc.stdin.flush()
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            for window in (int(w) for w in args.windows.split(",")):
                drops = sum(not one_run(port, args.requests, window, 60)
                            for _ in range(args.runs))
                print(f"W={window:4d}: {drops} dropped connections in {args.runs} runs "
                      f"of {args.requests} requests", flush=True)
        finally:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(20)


if __name__ == "__main__":
    main()
