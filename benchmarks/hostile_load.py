#!/usr/bin/env python3
"""A morsock Server under a mix of well-behaved and hostile peers, all on 127.0.0.1.

Run from the repository: ``python benchmarks/hostile_load.py [--duration 30]``.

The server runs in this process; the load runs in a child process (this same script with
``--role load``), so the memory, thread and descriptor figures are the server's own. The
load, for ``--duration`` seconds:

* ``--good`` (1,000) well-behaved peers: raw sockets driven by a few selector threads,
  each one sending a request, checking the echoed reply, sending the next;
* garbage senders: connect, send random bytes, get closed, again (``INVALID_PROTOCOL`` /
  ``MESSAGE_TOO_LARGE``);
* slow-loris peers: connect, send the first byte of a frame, then nothing (``TIMEOUT``
  after the server's ``connection_timeout``);
* never-reading peers: ask for large replies and never read them (``SEND_BUFFER_FULL``);
* connection floods: bursts of connections past ``max_connections`` (``SERVER_FULL``).

It prints requests answered (and whether any good peer lost its connection or got a wrong
reply), the server's errors by ErrorCode name, and the server's RSS, threads and open
file descriptors before, at peak and after.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from morsock import ErrorCode, Server  # noqa: E402
from morsock.protocol import HEADER, MAGIC, FrameDecoder, encode_frame  # noqa: E402

HOST = "127.0.0.1"
BIG = b"BIG"
BIG_REPLY = b"B" * (256 * 1024)


# ===================================================================== the server side

def _rss() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _snapshot() -> Dict[str, int]:
    return dict(rss=_rss(), threads=threading.active_count(),
                fds=len(os.listdir("/proc/self/fd")))


def run_server(args: argparse.Namespace) -> int:
    if not args.verbose:
        logging.getLogger("morsock").setLevel(logging.CRITICAL)
    errors: Counter = Counter()
    lock = threading.Lock()

    def on_error(server: Server, client: Any, message: str, code: int) -> None:
        with lock:
            errors[ErrorCode(code).name if code < 0 else str(code)] += 1

    def handler(server: Server, client: Any, data: bytes) -> bytes:
        return BIG_REPLY if data == BIG else data

    max_connections = args.good + args.headroom
    server = Server(port=0, host=HOST, max_connections=max_connections,
                    thread_pool_size=args.threads, connection_timeout=args.connection_timeout,
                    max_send_buffer=1024 * 1024, on_handle_command=handler, on_error=on_error)
    server.start()
    try:
        before = _snapshot()
        peak = dict(before, clients=0)
        stop_sampling = threading.Event()

        def sample() -> None:
            while not stop_sampling.wait(0.25):
                snap = _snapshot()
                for k, v in snap.items():
                    peak[k] = max(peak[k], v)
                peak["clients"] = max(peak["clients"], server.client_count)

        sampler = threading.Thread(target=sample, name="sampler", daemon=True)
        sampler.start()
        t0 = time.monotonic()
        child = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--role", "load", "--port",
             str(server.port), "--duration", str(args.duration), "--good", str(args.good),
             "--max-connections", str(max_connections)],
            capture_output=True, text=True, timeout=args.duration + 300)
        elapsed = time.monotonic() - t0
        stop_sampling.set()
        sampler.join()
        if child.returncode != 0:
            print(child.stdout, child.stderr, file=sys.stderr)
            return 1
        load = json.loads(child.stdout.strip().splitlines()[-1])
        deadline = time.monotonic() + 30
        while server.client_count and time.monotonic() < deadline:
            time.sleep(0.05)
        after = _snapshot()
        stats = dict(total_connections=server.total_connections,
                     rejected=server.total_rejected_connections,
                     messages_received=server.total_messages_received,
                     messages_sent=server.total_messages_sent,
                     clients_left=server.client_count)
    finally:
        server.stop()
    stopped = _snapshot()

    mib = 1024 * 1024
    print(f"hostile_load: {args.duration:g} s of load ({elapsed:.1f} s with set-up), "
          f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print(f"server: max_connections={max_connections}, thread_pool_size={args.threads}, "
          f"connection_timeout={args.connection_timeout:g} s, max_send_buffer=1 MiB")
    print("")
    print(f"well-behaved peers     {load['good']:>10}")
    print(f"requests answered      {load['answered']:>10}  "
          f"({load['answered'] / args.duration:,.0f}/s; latency p50 {load['p50_ms']:.2f} ms, "
          f"p99 {load['p99_ms']:.2f} ms, max {load['max_ms']:.1f} ms)")
    print(f"wrong replies          {load['wrong']:>10}")
    print(f"good peers disconnected{load['good_lost']:>10}")
    print(f"hostile connections    {load['hostile_connections']:>10}  "
          f"(garbage {load['garbage']}, slow-loris {load['loris']}, "
          f"never-reading {load['nonreaders']}, flood {load['flood']})")
    print(f"flood connects refused {load['flood_refused']:>10}  (closed at once by the server)")
    print("")
    print("server errors by code:")
    for name, n in sorted(errors.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<22}{n:>10}")
    print(f"server totals: {stats}")
    print("")
    print(f"{'':<10}{'before':>12}{'peak':>12}{'after load':>12}{'stopped':>12}")
    print(f"{'RSS MiB':<10}{before['rss'] / mib:>12.1f}{peak['rss'] / mib:>12.1f}"
          f"{after['rss'] / mib:>12.1f}{stopped['rss'] / mib:>12.1f}")
    for key in ("threads", "fds"):
        print(f"{key:<10}{before[key]:>12}{peak[key]:>12}{after[key]:>12}{stopped[key]:>12}")
    print(f"{'clients':<10}{0:>12}{peak['clients']:>12}{stats['clients_left']:>12}{0:>12}")
    ok = (load["wrong"] == 0 and load["good_lost"] == 0 and stats["clients_left"] == 0
          and after["threads"] == before["threads"] and after["fds"] <= before["fds"])
    print("")
    print("result:", "OK" if ok else "PROBLEM (see above)")
    return 0 if ok else 1


# ===================================================================== the load side

class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.c: Counter = Counter()
        self.latencies: List[float] = []

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.c[name] += n


def _connect(port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def good_peers(port: int, n: int, stop: threading.Event, stats: Stats,
               ready: threading.Barrier) -> None:
    """*n* closed-loop request/reply peers on one selector."""
    sel = selectors.DefaultSelector()
    rnd = random.Random()
    peers: Dict[socket.socket, Dict[str, Any]] = {}

    def send_next(sock: socket.socket, st: Dict[str, Any]) -> None:
        st["payload"] = b"req-%d-" % st["id"] + rnd.randbytes(rnd.randrange(8, 512))
        st["sent"] = time.perf_counter()
        sock.setblocking(True)
        sock.sendall(encode_frame(st["payload"]))
        sock.setblocking(False)

    for i in range(n):
        sock = _connect(port)
        sock.setblocking(False)
        st = dict(id=i, decoder=FrameDecoder(), payload=b"", sent=0.0)
        peers[sock] = st
        sel.register(sock, selectors.EVENT_READ, st)
    ready.wait()
    for sock, st in peers.items():
        send_next(sock, st)
    lat: List[float] = []
    try:
        while not stop.is_set():
            for key, _ in sel.select(0.2):
                sock, st = key.fileobj, key.data
                try:
                    data = sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    stats.add("good_lost")
                    sel.unregister(sock)
                    sock.close()
                    continue
                for frame in st["decoder"].feed(data):
                    if frame.payload != st["payload"]:
                        stats.add("wrong")
                    else:
                        stats.add("answered")
                        lat.append(time.perf_counter() - st["sent"])
                    if not stop.is_set():
                        send_next(sock, st)
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        sel.close()
        with stats.lock:
            stats.latencies += lat


def _wait_closed(sock: socket.socket, timeout: float) -> bool:
    """Read and discard until the server closes *sock* (True) or *timeout* (False)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (socket.timeout, TimeoutError):
        return False
    except OSError:
        pass
    return True


def garbage_sender(port: int, stop: threading.Event, stats: Stats, seed: int) -> None:
    rnd = random.Random(seed)
    while not stop.is_set():
        try:
            sock = _connect(port)
        except OSError:
            stats.add("connect_failed")
            continue
        with sock:
            stats.add("garbage")
            kind = rnd.randrange(3)
            if kind == 0:
                data = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + rnd.randbytes(rnd.randrange(100))
            elif kind == 1:
                data = HEADER.pack(MAGIC, rnd.randrange(2 ** 25, 2 ** 32), 0)
            else:
                data = HEADER.pack(MAGIC, 4, rnd.randrange(3, 256)) + b"abcd"
            try:
                sock.sendall(data)
            except OSError:
                pass
            _wait_closed(sock, 10)


def slow_loris(port: int, stop: threading.Event, stats: Stats) -> None:
    while not stop.is_set():
        try:
            sock = _connect(port)
        except OSError:
            stats.add("connect_failed")
            continue
        with sock:
            stats.add("loris")
            try:
                sock.sendall(b"\xBE")  # the first byte of a frame, then nothing
            except OSError:
                continue
            _wait_closed(sock, 30)


def never_reader(port: int, stop: threading.Event, stats: Stats) -> None:
    while not stop.is_set():
        try:
            sock = _connect(port)
        except OSError:
            stats.add("connect_failed")
            continue
        with sock:
            stats.add("nonreaders")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(5.0)
            deadline = time.monotonic() + 30
            try:  # ask for 256 KiB replies, read none, until the server gives up on us
                while not stop.is_set() and time.monotonic() < deadline:
                    sock.sendall(encode_frame(BIG))
                    stop.wait(0.005)
            except OSError:
                pass  # the server closed the connection (our next send met its reset)


def flooder(port: int, stop: threading.Event, stats: Stats, burst: int) -> None:
    while not stop.is_set():
        socks: List[socket.socket] = []
        for _ in range(burst):
            try:
                socks.append(_connect(port, timeout=5))
            except OSError:
                stats.add("connect_failed")
        stats.add("flood", len(socks))
        # the server closes those past max_connections at once
        deadline = time.monotonic() + 1.0
        sel = selectors.DefaultSelector()
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        refused = 0
        while time.monotonic() < deadline:
            for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
                s = key.fileobj
                try:
                    if s.recv(1) == b"":  # type: ignore[union-attr]
                        refused += 1
                except OSError:
                    refused += 1
                sel.unregister(s)
        sel.close()
        stats.add("flood_refused", refused)
        for s in socks:
            s.close()
        stop.wait(1.0)


def run_load(args: argparse.Namespace) -> int:
    stop = threading.Event()
    stats = Stats()
    n_threads = 4
    per = [args.good // n_threads + (1 if i < args.good % n_threads else 0)
           for i in range(n_threads)]
    ready = threading.Barrier(n_threads + 1)
    threads = [threading.Thread(target=good_peers, args=(args.port, n, stop, stats, ready),
                                name=f"good-{i}") for i, n in enumerate(per)]
    for t in threads:
        t.start()
    ready.wait(120)  # every good peer is connected before the hostile ones start
    t0 = time.monotonic()
    hostile = [threading.Thread(target=garbage_sender, args=(args.port, stop, stats, i))
               for i in range(20)]
    hostile += [threading.Thread(target=slow_loris, args=(args.port, stop, stats))
                for _ in range(50)]
    hostile += [threading.Thread(target=never_reader, args=(args.port, stop, stats))
                for _ in range(10)]
    free = args.max_connections - args.good - 80
    hostile += [threading.Thread(target=flooder, args=(args.port, stop, stats, free + 200))]
    for t in hostile:
        t.start()
    stop.wait(args.duration)
    stop.set()
    for t in threads + hostile:
        t.join(60)
    lat = sorted(stats.latencies) or [0.0]
    c = stats.c
    print(json.dumps(dict(
        good=args.good, answered=c["answered"], wrong=c["wrong"], good_lost=c["good_lost"],
        garbage=c["garbage"], loris=c["loris"], nonreaders=c["nonreaders"], flood=c["flood"],
        flood_refused=c["flood_refused"], connect_failed=c["connect_failed"],
        hostile_connections=c["garbage"] + c["loris"] + c["nonreaders"] + c["flood"],
        p50_ms=lat[len(lat) // 2] * 1000, p99_ms=lat[int(len(lat) * 0.99)] * 1000,
        max_ms=lat[-1] * 1000, load_seconds=time.monotonic() - t0)))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load (30)")
    parser.add_argument("--good", type=int, default=1000, help="well-behaved peers (1000)")
    parser.add_argument("--headroom", type=int, default=300,
                        help="max_connections = good + headroom (300)")
    parser.add_argument("--threads", type=int, default=4, help="server thread_pool_size (4)")
    parser.add_argument("--connection-timeout", type=float, default=2.0,
                        help="server connection_timeout in seconds (2)")
    parser.add_argument("--verbose", action="store_true", help="keep the server's log")
    parser.add_argument("--role", choices=["server", "load"], default="server",
                        help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--max-connections", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return run_load(args) if args.role == "load" else run_server(args)


if __name__ == "__main__":
    sys.exit(main())
