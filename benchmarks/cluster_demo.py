#!/usr/bin/env python3
"""The cluster backplane end to end (issue 29's "done means"), on 127.0.0.1. Not a test.

Run from the repository: ``python benchmarks/cluster_demo.py [--clients 1000]
[--rounds 20] [--skip-multicore]``. Needs redis-server and redis-py
(``pip install -e '.[redis]'``), ``cc`` for the load generator; Linux.

1. One redis-server (a fresh one on a free port, no persistence) and three server
   processes (this script with ``node``: a morsock Server with a RedisBackplane whose
   handler runs control commands), 1,000 clients spread round-robin over them (raw
   sockets on one selector thread of this process).
2. Broadcasts from node 0 (``--rounds`` of them): each must reach all 1,000 clients
   (counted); latency from the command leaving this process to each client's receipt,
   p50/p99, for the clients of node 0 (local) and of nodes 1-2 (across Redis).
3. ``send_to`` from node 0 to a client of every other node; its latency.
4. SIGKILL of node 2: how long until node 0's ``cluster_client_count`` is right.
5. Redis killed and restarted (empty) in the middle of a stream of broadcasts: every
   broadcast is delivered to node 1's clients, or reported (by node 0: not handed to
   Redis in time; by node 1: lost in Redis); "unaccounted" must be 0.
6. Multi-core: ``python -m morsock server --processes 1`` vs ``--processes 2`` (both
   with ``--redis``) under the C load generator of benchmarks/loadgen.c (``loadgen echo
   -c 64 -d 1 -s 64``, unpinned), interleaved: req/s and server CPU microseconds per
   request (utime+stime of every server process).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from morsock.protocol import FrameDecoder, encode_frame  # noqa: E402


# -- node process ----------------------------------------------------------------------
def run_node(url: str, channel: str, port_file: str) -> int:
    """A cluster node whose clients send commands: B<body> broadcast, S<cid> <body>
    send_to, W who am I, C counts, R what was reported undelivered."""
    import morsock
    from morsock.cluster import RedisBackplane, Undelivered

    lost_out: List[str] = []
    lost_in = [0]
    lock = threading.Lock()

    def on_undelivered(bp: Any, report: Undelivered) -> None:
        with lock:
            if report.direction == "incoming":
                lost_in[0] += report.messages
            elif report.kind == "broadcast" and report.payload is not None:
                lost_out.append(report.payload.decode())

    backplane = RedisBackplane(url, channel=channel, on_undelivered=on_undelivered)

    def handle(server: Any, client: Any, data: bytes) -> Optional[bytes]:
        op, body = data[:1], data[1:]
        if op == b"B":
            server.broadcast_data(body)
        elif op == b"S":
            cid, _, payload = body.partition(b" ")
            server.send_to(cid.decode(), payload)
        elif op == b"W":
            return b"W" + client.client_id.encode()
        elif op == b"C":
            return b"C" + json.dumps({"count": server.cluster_client_count,
                                      "nodes": server.cluster_nodes}).encode()
        elif op == b"R":
            with lock:
                return b"R" + json.dumps({"out": lost_out, "in": lost_in[0]}).encode()
        return None

    server = morsock.Server(0, "127.0.0.1", backplane=backplane, max_connections=5000,
                            on_handle_command=handle)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    server.start()
    backplane.wait_joined(10)
    Path(port_file + ".tmp").write_text(str(server.port))
    os.replace(port_file + ".tmp", port_file)
    stop.wait()
    server.stop()
    return 0


# -- the client fleet --------------------------------------------------------------------
class Fleet:
    """N raw framed connections read by one selector thread; records receipts."""

    def __init__(self, ports: List[int], n: int) -> None:
        self.socks: List[socket.socket] = []
        self.node_of: List[int] = []
        self.decoders: List[FrameDecoder] = []
        self.sel = selectors.DefaultSelector()
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.got: Dict[bytes, List[Tuple[int, int]]] = {}  # payload -> [(client, ns)]
        self.replies: Dict[int, "queue.Queue[bytes]"] = {}
        for i in range(n):
            node = i % len(ports)
            sock = socket.create_connection(("127.0.0.1", ports[node]), timeout=10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.socks.append(sock)
            self.node_of.append(node)
            self.decoders.append(FrameDecoder())
            self.replies[i] = queue.Queue()
            self.sel.register(sock, selectors.EVENT_READ, i)
        self.dead: set = set()
        self.running = True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while self.running:
            for key, _ in self.sel.select(0.2):
                i = key.data
                try:
                    data = self.socks[i].recv(65536)
                except OSError:
                    data = b""
                now = time.perf_counter_ns()
                if not data:
                    self.sel.unregister(self.socks[i])
                    self.dead.add(i)
                    continue
                for frame in self.decoders[i].feed(data):
                    p = frame.payload
                    if p[:1] in (b"W", b"C", b"R"):
                        self.replies[i].put(p)
                        continue
                    with self.cond:
                        self.got.setdefault(p, []).append((i, now))
                        self.cond.notify_all()

    def send(self, i: int, payload: bytes) -> int:
        t = time.perf_counter_ns()
        self.socks[i].sendall(encode_frame(payload))
        return t

    def ask(self, i: int, payload: bytes, timeout: float = 10.0) -> bytes:
        self.send(i, payload)
        return self.replies[i].get(timeout=timeout)

    def wait_count(self, payload: bytes, n: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.got.get(payload, ())) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            return len(self.got.get(payload, ()))

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        for sock in self.socks:
            sock.close()
        self.sel.close()


def pct(values: List[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def start_node(url: str, channel: str, tmp: Path, index: int) -> Tuple[subprocess.Popen, int]:
    port_file = tmp / f"node{index}.port"
    proc = subprocess.Popen([sys.executable, __file__, "node", "--redis", url,
                             "--channel", channel, "--port-file", str(port_file)])
    deadline = time.monotonic() + 30
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"node {index} did not start")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def raise_nofile() -> None:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- parts 1-5 -------------------------------------------------------------------------
def cluster_part(args: argparse.Namespace, tmp: Path) -> None:
    from redis_server import RedisServer
    rs = RedisServer()
    rs.start()
    channel = "demo"
    nodes: List[subprocess.Popen] = []
    fleet: Optional[Fleet] = None
    try:
        ports = []
        for i in range(3):
            proc, port = start_node(rs.url, channel, tmp, i)
            nodes.append(proc)
            ports.append(port)
        print(f"redis-server on {rs.url}; nodes on ports {ports} (pids "
              f"{[p.pid for p in nodes]})")
        t0 = time.monotonic()
        fleet = Fleet(ports, args.clients)
        print(f"{args.clients} clients connected in {time.monotonic() - t0:.2f} s "
              f"({[fleet.node_of.count(n) for n in range(3)]} per node)")
        ctrl = {n: fleet.node_of.index(n) for n in range(3)}  # a client of each node
        deadline = time.monotonic() + 15
        while True:
            counts = [json.loads(fleet.ask(ctrl[n], b"C")[1:]) for n in range(3)]
            if all(c["count"] == args.clients and len(c["nodes"]) == 3 for c in counts):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"counts did not converge: {counts}")
            time.sleep(0.1)
        print(f"cluster_client_count on every node: {counts[0]['count']} "
              f"(nodes: {len(counts[0]['nodes'])}) after {time.monotonic() - t0:.2f} s")

        # 2. broadcasts
        local, remote, complete = [], [], 0
        for r in range(args.rounds):
            body = b"b%d" % r
            sent = fleet.send(ctrl[0], b"B" + body)
            n = fleet.wait_count(body, args.clients, 10)
            complete += n == args.clients
            for i, t in fleet.got.get(body, []):
                (local if fleet.node_of[i] == 0 else remote).append((t - sent) / 1000)
            time.sleep(0.05)
        print(f"broadcasts from node 0: {complete}/{args.rounds} reached all "
              f"{args.clients} clients (counted per client)")
        print(f"  latency command->client, node 0's own clients: p50 {pct(local, 50):.0f} us, "
              f"p99 {pct(local, 99):.0f} us ({len(local)} receipts)")
        print(f"  latency command->client, across Redis (nodes 1,2): p50 "
              f"{pct(remote, 50):.0f} us, p99 {pct(remote, 99):.0f} us ({len(remote)} receipts)")

        # 3. send_to across nodes
        lat = []
        for r in range(args.rounds):
            for n in (1, 2):
                target = ctrl[n]
                cid = fleet.ask(target, b"W")[1:]
                body = b"s%d-%d" % (r, n)
                sent = fleet.send(ctrl[0], b"S" + cid + b" " + body)
                if fleet.wait_count(body, 1, 10) == 1:
                    lat.append((fleet.got[body][0][1] - sent) / 1000)
        print(f"send_to from node 0 to clients of nodes 1 and 2: {len(lat)}/{2 * args.rounds} "
              f"delivered; p50 {pct(lat, 50):.0f} us, p99 {pct(lat, 99):.0f} us")

        # 4. SIGKILL node 2
        expected = fleet.node_of.count(0) + fleet.node_of.count(1)
        nodes[2].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        nodes[2].wait()
        while True:
            c = json.loads(fleet.ask(ctrl[0], b"C")[1:])
            if c["count"] == expected and len(c["nodes"]) == 2:
                break
            if time.monotonic() - killed > 15:
                break
            time.sleep(0.1)
        took = time.monotonic() - killed
        print(f"node 2 killed (SIGKILL): node 0's cluster_client_count {c['count']} "
              f"(expected {expected}), nodes {len(c['nodes'])}, after {took:.2f} s "
              f"({'OK' if c['count'] == expected and took < 10 else 'NOT MET'}: within 10 s)")

        # 5. Redis restart mid-stream
        total, restart_at = args.stream, args.stream // 3
        n1 = [i for i, node in enumerate(fleet.node_of) if node == 1 and i not in fleet.dead]
        for k in range(total):
            if k == restart_at:
                rs.restart()
                print(f"  redis-server killed and restarted (empty) after {k} broadcasts")
            fleet.send(ctrl[0], b"B" + b"r%d" % k)
            time.sleep(0.005)
        time.sleep(4.0)  # heartbeats and gap checks have run a few times
        delivered_all = sum(1 for k in range(total)
                            if {i for i, _ in fleet.got.get(b"r%d" % k, [])} >= set(n1))
        rep0 = json.loads(fleet.ask(ctrl[0], b"R")[1:])
        rep1 = json.loads(fleet.ask(ctrl[1], b"R")[1:])
        out = {int(p[1:]) for p in rep0["out"] if p.startswith("r")}
        missing = [k for k in range(total)
                   if not {i for i, _ in fleet.got.get(b"r%d" % k, [])} >= set(n1)]
        unaccounted = max(0, len([k for k in missing if k not in out]) - rep1["in"])
        print(f"redis restart mid-stream: {total} broadcasts; delivered to all of node 1's "
              f"{len(n1)} clients: {delivered_all}; reported by node 0 (not handed to "
              f"Redis): {len(out)}; reported lost in Redis by node 1: {rep1['in']}; "
              f"unaccounted: {unaccounted}")
        c = json.loads(fleet.ask(ctrl[0], b"C")[1:])
        print(f"  after the restart: node 0 sees {len(c['nodes'])} nodes, "
              f"cluster_client_count {c['count']} (expected {expected})")
    finally:
        if fleet is not None:
            fleet.close()
        for proc in nodes:
            if proc.poll() is None:
                proc.terminate()
        for proc in nodes:
            proc.wait(30)
        rs.close()


# -- part 6 ----------------------------------------------------------------------------
def loadgen_binary() -> str:
    """benchmarks/loadgen.c, built as compare.py builds it (with ``cc``)."""
    sys.path.insert(0, str(HERE))
    from compare import build_loadgen
    return str(build_loadgen())


def tree_cpu(pid: int) -> float:
    """utime+stime seconds of *pid* and its children (the workers)."""
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / os.sysconf("SC_CLK_TCK")


def loadgen_cpu() -> float:
    """CPU seconds of the waited-for children of this process (the load generator runs)."""
    import resource
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def multicore_part(args: argparse.Namespace, tmp: Path) -> None:
    from redis_server import RedisServer
    loadgen = loadgen_binary()
    rs = RedisServer()
    rs.start()
    rows: Dict[int, List[Tuple[float, float, float, float]]] = {1: [], 2: []}
    try:
        for rnd in range(args.mc_rounds):
            for nproc in ((1, 2) if rnd % 2 == 0 else (2, 1)):
                port_file = tmp / f"mc{nproc}-{rnd}.port"
                proc = subprocess.Popen(
                    [sys.executable, "-m", "morsock", "server", "--host", "127.0.0.1",
                     "--port", "0", "--processes", str(nproc), "--redis", rs.url,
                     "--redis-channel", f"mc{rnd}{nproc}", "--port-file", str(port_file),
                     "--status", "off"], cwd=str(HERE.parent), stdout=subprocess.DEVNULL)
                try:
                    deadline = time.monotonic() + 30
                    while not port_file.exists():
                        if proc.poll() is not None or time.monotonic() > deadline:
                            raise SystemExit("server did not start")
                        time.sleep(0.05)
                    port = port_file.read_text().strip()
                    time.sleep(0.5)
                    cpu0 = tree_cpu(proc.pid)
                    lg0 = loadgen_cpu()
                    t0 = time.monotonic()
                    out = subprocess.run([loadgen, "echo", "-H", "127.0.0.1", "-p", port,
                                          "-c", "64", "-d", "1", "-s", "64",
                                          "-t", str(args.mc_secs), "-w", "0"],
                                         capture_output=True, text=True, check=True).stdout
                    wall = time.monotonic() - t0
                    cpu = tree_cpu(proc.pid) - cpu0
                    lg = loadgen_cpu() - lg0
                    kv = dict(item.split("=", 1) for item in out.split())
                    reqs = int(kv["requests_total"])
                    rows[nproc].append((reqs / wall, cpu / max(reqs, 1) * 1e6,
                                        100 * cpu / wall, 100 * lg / wall))
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(30)
    finally:
        rs.close()
    print(f"multi-core, loadgen echo -c 64 -d 1 -s 64, {args.mc_secs} s x {args.mc_rounds} "
          f"interleaved rounds, loadgen unpinned, servers with --redis:")
    print(f"  {'':14}{'req/s':>9}{'srv us/req':>11}{'srv CPU%':>9}{'loadgen CPU%':>13}"
          f"   per round (req/s, us/req)")
    for nproc in (1, 2):
        n = len(rows[nproc])
        rps, us, srv, lg = (sum(row[k] for row in rows[nproc]) / n for k in range(4))
        each = ", ".join(f"({row[0]:.0f}, {row[1]:.1f})" for row in rows[nproc])
        print(f"  --processes {nproc}{rps:9.0f}{us:11.1f}{srv:9.0f}{lg:13.0f}   {each}")
    print(f"  machine: {os.cpu_count()} CPUs")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    node = sub.add_parser("node")
    node.add_argument("--redis", required=True)
    node.add_argument("--channel", required=True)
    node.add_argument("--port-file", required=True)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--stream", type=int, default=300,
                        help="broadcasts in the Redis-restart stream (5 ms apart)")
    parser.add_argument("--skip-multicore", action="store_true")
    parser.add_argument("--only-multicore", action="store_true")
    parser.add_argument("--mc-secs", type=int, default=4)
    parser.add_argument("--mc-rounds", type=int, default=2)
    args = parser.parse_args()
    if args.cmd == "node":
        return run_node(args.redis, args.channel, args.port_file)
    raise_nofile()
    import tempfile
    with tempfile.TemporaryDirectory(prefix="morsock-cluster-demo-") as tmp:
        if not args.only_multicore:
            cluster_part(args, Path(tmp))
        if not args.skip_multicore:
            multicore_part(args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
