#!/usr/bin/env python3
"""Soak test of auto-reconnection: many clients, a server that keeps cutting them off.

Run from the repository: ``python benchmarks/soak_reconnect.py [--duration 120] [--clients 50]``.

One process, all on 127.0.0.1:

* a :class:`morsock.Server` on a free port whose handler records every payload it receives
  and echoes it; a chaos loop force-disconnects random clients every ``--cut-every``
  seconds and restarts the server (``stop()`` + ``start()`` on the same port, down for
  ``--down-ms``) every ``--restart-every`` seconds;
* ``--clients`` auto-reconnecting clients (half FIXED_INTERVAL, half BACKOFF, small
  intervals, unlimited attempts), each driven by one thread that loops ``request()`` with
  a unique payload and checks that the reply is its own.

Reported at the end: reconnects, requests sent / answered / failed with
NotConnectedError or RequestTimeout (expected around cuts), answered WRONGLY (must be 0),
lost while connected (received by the server handler, never answered, and the
connection never dropped meanwhile: must be 0), time to reconnect (on_disconnect to the
next on_connect: median, max), threads and fds before and after. Exit status 0 when
every check holds.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Set

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import morsock  # noqa: E402
from morsock import (Client, NotConnectedError, ReconnectStrategy, RequestTimeout,  # noqa: E402
                     Server)


#: Set while the chaos loop restarts the server (classifies the clients' drops).
SERVER_DOWN = threading.Event()


def open_fds() -> int:
    """Open file descriptors of this process (Linux; -1 elsewhere)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


class Receipts:
    """Payloads the server handler received and whose reply the client has not yet seen."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: Set[bytes] = set()
        self.total = 0

    def received(self, payload: bytes) -> None:
        with self._lock:
            self._pending.add(payload)
            self.total += 1

    def answered(self, payload: bytes) -> None:
        with self._lock:
            self._pending.discard(payload)

    def seen(self, payload: bytes) -> bool:
        with self._lock:
            return payload in self._pending


class SoakClient:
    """One auto-reconnecting client and the thread that loops request() on it."""

    def __init__(self, index: int, port: int, receipts: Receipts, stop: threading.Event,
                 args: argparse.Namespace) -> None:
        self.index = index
        self.receipts = receipts
        self.stop = stop
        self.timeout = args.request_timeout
        backoff = index % 2 == 1
        self.client = Client(
            "127.0.0.1", port, auto_reconnect=True, reconnect_max_attempts=0,
            connection_timeout=args.connect_timeout,
            reconnect_strategy=(ReconnectStrategy.BACKOFF if backoff
                                else ReconnectStrategy.FIXED_INTERVAL),
            reconnect_interval=args.interval_ms, reconnect_max_interval=args.max_interval_ms,
            on_connect=self._on_connect, on_disconnect=self._on_disconnect,
            on_error=self._on_error)
        self.up = threading.Event()
        self.lock = threading.Condition()
        self.connects = 0
        self.disconnects = 0
        self.down_since: Optional[float] = None
        self.down_cause = "cut"
        self.reconnect_times: List[float] = []
        self.reconnect_causes: List[str] = []
        self.error_codes: Dict[int, int] = {}
        self.sent = self.answered = self.wrong = 0
        self.not_connected = self.timeouts = self.lost_connected = self.unreceived_up = 0
        self.other_errors: List[str] = []
        self.thread = threading.Thread(target=self._loop, name=f"soak-client-{index}",
                                       daemon=True)

    # client events (the client's worker thread)
    def _on_connect(self, sender: Client) -> None:
        with self.lock:
            self.connects += 1
            if self.down_since is not None:
                self.reconnect_times.append(time.monotonic() - self.down_since)
                self.reconnect_causes.append(self.down_cause)
                self.down_since = None
            self.lock.notify_all()
        self.up.set()

    def _on_disconnect(self, sender: Client) -> None:
        with self.lock:
            self.disconnects += 1
            self.down_since = time.monotonic()
            self.down_cause = "restart" if SERVER_DOWN.is_set() else "cut"
        self.up.clear()

    def _on_error(self, sender: Client, message: str, code: int) -> None:
        with self.lock:
            key = code if code <= 0 else 1      # positive codes: retry numbers, pooled
            self.error_codes[key] = self.error_codes.get(key, 0) + 1

    # the request loop (its own thread)
    def _loop(self) -> None:
        seq = 0
        client = self.client
        while not self.stop.is_set():
            if not self.up.wait(0.2) or not client.connected:
                continue
            seq += 1
            payload = f"client {self.index} request {seq} {random.getrandbits(32):08x}".encode()
            with self.lock:
                drops_before = self.disconnects
                generation = self.connects
            self.sent += 1
            try:
                reply = client.request(payload, timeout=self.timeout)
            except NotConnectedError:
                self.not_connected += 1
                with self.lock:   # do not spin until the client has reconnected
                    self.lock.wait_for(lambda: self.connects > generation or self.stop.is_set(),
                                       0.5)
                continue
            except RequestTimeout:
                with self.lock:
                    stayed_up = self.disconnects == drops_before and client.connected
                if not stayed_up:
                    self.timeouts += 1
                elif self.receipts.seen(payload):
                    self.lost_connected += 1      # the server got it; the reply never came
                else:
                    self.unreceived_up += 1       # never reached the handler, yet no drop
                continue
            except Exception as exc:  # noqa: BLE001 - reported, never expected
                self.other_errors.append(f"{type(exc).__name__}: {exc}")
                continue
            self.receipts.answered(payload)
            if reply == payload:
                self.answered += 1
            else:
                self.wrong += 1


def run(args: argparse.Namespace) -> int:
    if not args.log:   # every failed retry is logged at ERROR: thousands of lines
        logging.getLogger("morsock").addHandler(logging.NullHandler())
        logging.getLogger("morsock").propagate = False
    rng = random.Random(args.seed)
    gc.collect()
    threads_before, fds_before = threading.active_count(), open_fds()
    receipts = Receipts()

    def handler(server: Server, client: morsock.ServerClient, data: bytes) -> bytes:
        receipts.received(data)
        return data

    server = Server(port=0, host="127.0.0.1", thread_pool_size=args.server_threads,
                    on_handle_command=handler)
    server.start()
    port = server.port
    stop = threading.Event()
    clients = [SoakClient(i, port, receipts, stop, args) for i in range(args.clients)]
    cuts = restarts = forced = 0
    peak_threads = threading.active_count()
    try:
        for c in clients:
            c.client.connect()
        for c in clients:
            c.thread.start()
        print(f"soak: {args.clients} clients on 127.0.0.1:{port} for {args.duration:g} s "
              f"(cut every {args.cut_every:g} s, restart every {args.restart_every:g} s, "
              f"down {args.down_ms} ms)", flush=True)
        start = time.monotonic()
        end = start + args.duration
        next_restart = start + args.restart_every
        next_report = start + 10
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if now >= next_restart:
                SERVER_DOWN.set()
                server.stop()
                stop.wait(args.down_ms / 1000)
                server.start()
                SERVER_DOWN.clear()
                restarts += 1
                next_restart = time.monotonic() + args.restart_every * rng.uniform(0.7, 1.3)
            else:
                victims = list(server.clients.values())
                if victims:
                    k = rng.randint(1, max(1, min(len(victims), args.cut_max)))
                    for victim in rng.sample(victims, k):
                        forced += 1 if victim.disconnect() else 0
                    cuts += 1
            peak_threads = max(peak_threads, threading.active_count())
            if now >= next_report:
                answered = sum(c.answered for c in clients)
                print(f"  t={now - start:5.0f} s  answered={answered:,}  "
                      f"restarts={restarts}  forced={forced}  "
                      f"connected={sum(c.client.connected for c in clients)}/{len(clients)}",
                      flush=True)
                next_report += 10
            stop.wait(args.cut_every * rng.uniform(0.5, 1.5))
        stop.set()
        for c in clients:
            c.thread.join(args.request_timeout + 5)
        # Every client must come back and answer once more.
        deadline = time.monotonic() + 30
        final_ok = 0
        for c in clients:
            if not c.up.wait(max(0.0, deadline - time.monotonic())):
                continue
            try:
                payload = f"final {c.index}".encode()
                if c.client.request(payload, timeout=args.request_timeout) == payload:
                    final_ok += 1
            except morsock.MorsockError:
                pass
    finally:
        stop.set()
        for c in clients:
            c.client.disconnect()
        server.stop()
    for c in clients:
        c.thread.join(5)
    gc.collect()
    # threads of stopped components are joined already; give the OS a moment for fds
    deadline = time.monotonic() + 5
    while (threading.active_count() > threads_before or open_fds() > fds_before) \
            and time.monotonic() < deadline:
        time.sleep(0.05)   # polling with a deadline, reporting only
    threads_after, fds_after = threading.active_count(), open_fds()

    total = lambda name: sum(getattr(c, name) for c in clients)  # noqa: E731
    reconnect_times = sorted(t for c in clients for t in c.reconnect_times)
    by_cause: Dict[str, List[float]] = {"cut": [], "restart": []}
    for c in clients:
        for t, cause in zip(c.reconnect_times, c.reconnect_causes):
            by_cause[cause].append(t)
    connects = total("connects")
    codes: Dict[int, int] = {}
    for c in clients:
        for code, n in c.error_codes.items():
            codes[code] = codes.get(code, 0) + n
    other = [e for c in clients for e in c.other_errors]
    wrong, lost, unreceived = total("wrong"), total("lost_connected"), total("unreceived_up")
    ok = (wrong == 0 and lost == 0 and unreceived == 0 and not other and final_ok == len(clients)
          and threads_after <= threads_before and fds_after <= fds_before)

    print()
    print("== soak_reconnect report ==")
    print(f"duration                      {args.duration:g} s, {args.clients} clients "
          f"(FIXED_INTERVAL {args.interval_ms} ms / BACKOFF {args.interval_ms}.."
          f"{args.max_interval_ms} ms)")
    print(f"server restarts               {restarts}")
    print(f"forced disconnects            {forced} (in {cuts} cuts)")
    print(f"reconnects                    {connects - len(clients)}")
    print(f"failed attempts (on_error n)  {codes.get(1, 0)}"
          f"   connect() failures (-1): {codes.get(-1, 0)}   -99: {codes.get(-99, 0)}")
    print(f"requests sent                 {total('sent'):,}")
    print(f"requests answered             {total('answered'):,}")
    print(f"failed NotConnectedError      {total('not_connected'):,}")
    print(f"failed RequestTimeout (drop)  {total('timeouts'):,}")
    print(f"answered WRONGLY              {wrong}   (must be 0)")
    print(f"lost while connected          {lost}   (must be 0)")
    print(f"timed out unreceived, no drop {unreceived}   (must be 0)")
    print(f"other exceptions              {len(other)}" + (f"  e.g. {other[0]}" if other else ""))
    print(f"server receipts               {receipts.total:,}")
    if reconnect_times:
        median_ms = statistics.median(reconnect_times) * 1000
        print(f"time to reconnect             median {median_ms:.0f} ms, "
              f"max {reconnect_times[-1] * 1000:.0f} ms  (n={len(reconnect_times)})")
        for cause, label in (("cut", "after a forced disconnect"),
                             ("restart", f"across a restart ({args.down_ms} ms down)")):
            times = sorted(by_cause[cause])
            if times:
                print(f"  {label:<32s}median {statistics.median(times) * 1000:.0f} ms, "
                      f"max {times[-1] * 1000:.0f} ms  (n={len(times)})")
    print(f"final request, every client   {final_ok}/{len(clients)}")
    print(f"threads before/peak/after     {threads_before} / {peak_threads} / {threads_after}")
    print(f"fds before/after              {fds_before} / {fds_after}")
    print(f"RESULT                        {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds (default 120)")
    parser.add_argument("--clients", type=int, default=50, help="clients (default 50)")
    parser.add_argument("--cut-every", type=float, default=0.5,
                        help="mean seconds between forced-disconnect cuts (default 0.5)")
    parser.add_argument("--cut-max", type=int, default=5,
                        help="most clients disconnected by one cut (default 5)")
    parser.add_argument("--restart-every", type=float, default=5.0,
                        help="mean seconds between server restarts (default 5)")
    parser.add_argument("--down-ms", type=int, default=200,
                        help="how long the server stays stopped on a restart (default 200)")
    parser.add_argument("--interval-ms", type=int, default=50,
                        help="reconnect_interval of the clients (default 50)")
    parser.add_argument("--max-interval-ms", type=int, default=400,
                        help="reconnect_max_interval of the BACKOFF clients (default 400)")
    parser.add_argument("--connect-timeout", type=float, default=5.0,
                        help="clients' connection_timeout in seconds (default 5)")
    parser.add_argument("--request-timeout", type=float, default=15.0,
                        help="request() timeout in seconds (default 15)")
    parser.add_argument("--server-threads", type=int, default=4,
                        help="server thread_pool_size (default 4)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the chaos schedule")
    parser.add_argument("--log", action="store_true",
                        help="let the morsock logger print (errors of every failed retry)")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
