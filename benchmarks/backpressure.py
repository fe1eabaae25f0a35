"""Read back-pressure under load: one fast peer in front of a slow handler.

One peer sends 64 KiB frames flat out to a server whose handler takes 2 ms for each of
them (the server's pool: 4 threads), while 100 other clients send 64-byte requests in a
closed loop (the next when the reply came). Prints the server's RSS growth against the
bound ``max_receive_backlog + max_message_size + 32 MiB`` and the other clients' request
latency p50/p99/max, then exits non-zero if either bound (RSS, p99 < 50 ms) is missed.

    python benchmarks/backpressure.py                  # 10 s
    python benchmarks/backpressure.py --secs 3
    python benchmarks/backpressure.py --server-path DIR   # the server imports morsock
                                                          # from DIR (e.g. an older tree)

The server runs in a child process (its RSS is measured from /proc, Linux only); the load
runs in two more: the fast peer in a process of its own (flat out), the 100 clients on one
selector loop in this one.
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time

HEADER = struct.Struct("<IIB")
MAGIC = 0xCAFEBABE
FLOOD_PAYLOAD = 64 * 1024 - HEADER.size

_SERVER = r"""
import sys, time, morsock
def handle(server, client, data):
    if data[:1] == b"F":
        time.sleep(0.002)
        return None
    return data
server = morsock.Server(port=0, host="127.0.0.1", thread_pool_size=4,
                        max_receive_backlog=int(sys.argv[1]), on_handle_command=handle)
server.start()
print(server.port, server.max_message_size, flush=True)
sys.stdin.read()
server.stop()
"""


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


_FLOOD = r"""
import socket, struct, sys, time
port, secs, size = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
frame = struct.pack("<IIB", 0xCAFEBABE, size, 0) + b"F" * size
sent = 0
deadline = time.monotonic() + secs
with socket.create_connection(("127.0.0.1", port)) as sock:
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            sent += sock.send(frame)
        except socket.timeout:
            pass  # the server is not reading: TCP pushes back
print(sent, flush=True)
"""


def requests(port: int, clients: int, stop: threading.Event, latencies: list[float]) -> None:
    payload = b"r" * 64
    frame = HEADER.pack(MAGIC, len(payload), 0) + payload
    reply_len = len(frame)
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(clients):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        socks.append(sock)
        state = {"sent_at": time.perf_counter(), "got": 0}
        sel.register(sock, selectors.EVENT_READ, state)
        sock.send(frame)
    try:
        while not stop.is_set():
            for key, _ in sel.select(0.1):
                state = key.data
                data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                if not data:
                    raise RuntimeError("the server closed a request connection")
                state["got"] += len(data)
                if state["got"] >= reply_len:
                    now = time.perf_counter()
                    latencies.append(now - state["sent_at"])
                    state["got"] -= reply_len
                    state["sent_at"] = now
                    key.fileobj.send(frame)  # type: ignore[union-attr]
    finally:
        sel.close()
        for sock in socks:
            sock.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--secs", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--backlog", type=int, default=1024 * 1024,
                    help="the server's max_receive_backlog (default 1 MiB)")
    ap.add_argument("--server-path", help="PYTHONPATH of the server process")
    args = ap.parse_args()
    env = dict(os.environ)
    if args.server_path:
        env["PYTHONPATH"] = args.server_path
    server = subprocess.Popen([sys.executable, "-c", _SERVER, str(args.backlog)], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline().split()
        port, max_message = int(line[0]), int(line[1])
        rss_start = rss_bytes(server.pid)
        stop = threading.Event()
        latencies: list[float] = []
        flooder = subprocess.Popen([sys.executable, "-c", _FLOOD, str(port), str(args.secs),
                                    str(FLOOD_PAYLOAD)], stdout=subprocess.PIPE, text=True)
        loader = threading.Thread(target=requests, args=(port, args.clients, stop, latencies))
        loader.start()
        peak = rss_start
        deadline = time.monotonic() + args.secs
        while time.monotonic() < deadline:
            peak = max(peak, rss_bytes(server.pid))
            stop.wait(0.1)
        stop.set()
        loader.join(30)
        out, _ = flooder.communicate(timeout=30)
        flooded = [int(out.split()[0])]
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(30)
    latencies.sort()
    if not latencies:
        print("no request was answered")
        return 1
    bound = args.backlog + max_message + 32 * 1024 * 1024
    growth = peak - rss_start
    p50 = latencies[len(latencies) // 2] * 1e3
    p99 = latencies[int(len(latencies) * 0.99)] * 1e3
    print(f"flood: {flooded[0] / 1e6:.1f} MB sent in {args.secs:g} s "
          f"({flooded[0] / 65536 / args.secs:.0f} frames/s)")
    print(f"server RSS: {rss_start / 2**20:.1f} MiB -> peak {peak / 2**20:.1f} MiB, "
          f"growth {growth / 2**20:.1f} MiB (bound {bound / 2**20:.1f} MiB)")
    print(f"{args.clients} clients: {len(latencies)} requests, p50 {p50:.2f} ms, "
          f"p99 {p99:.2f} ms, max {latencies[-1] * 1e3:.2f} ms (bound p99 < 50 ms)")
    ok = growth <= bound and p99 < 50.0
    print("OK" if ok else "BOUND MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
