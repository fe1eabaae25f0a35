#!/usr/bin/env python3
"""TLS echo benchmark: a morsock TLS server against an asyncio TLS server, same work, same run.

Run from the repository: ``python benchmarks/tls_echo.py [--secs 5] [--rounds 3]``.

* A throw-away CA and server certificate are made with the ``openssl`` command in a
  temporary directory.
* Servers, each in a subprocess of its own, started fresh for every measurement:
  ``morsock`` -- ``python -m morsock server --certfile ... --keyfile ...`` (the CLI echo
  server, this checkout); ``asyncio`` -- an ``asyncio.Protocol`` with the same framing
  (every complete frame of a ``data_received`` parsed, one ``transport.write`` per batch),
  served with ``loop.create_server(..., ssl=context)``.
* The load: this process, one ``selectors`` loop over non-blocking TLS client sockets,
  each connection keeping ``depth`` frames in flight (a reply is answered at once by a new
  request, batched per read). Scenarios: ``small`` 64-byte frames (32 connections x 16 in
  flight) and ``big`` 64 KiB frames (8 connections x 2 in flight).
* Interleaved: each round runs every scenario on every server (the order alternates
  between rounds), so all servers meet the same machine state. Results are the median
  over the rounds.
* Measured after a warm-up: ``req/s`` (replies in the window / seconds), ``MB/s``
  (payload both ways), ``srv%`` (server CPU / wall time; 100 = one core), ``us/req``
  (server user+system CPU from ``/proc/PID/stat``, all threads, per reply) and ``lg%``
  (this load generator's CPU / wall time: near 100 means the numbers are a lower bound
  limited by the load generator, not the server's capacity).

With 2+ CPUs the server is pinned to the first allowed CPU and the load generator to the
second (``--no-pin`` leaves placement to the scheduler). Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import selectors
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
HEADER = struct.Struct("<IIB")
MAGIC = 0xCAFEBABE
SCENARIOS: Dict[str, Tuple[int, int, int]] = {  # name: (connections, depth, payload size)
    "small": (32, 16, 64),
    "big": (8, 2, 64 * 1024),
}


# ------------------------------------------------------------------ asyncio server

def serve_asyncio(host: str, port: int, certfile: Optional[str], keyfile: Optional[str]) -> None:
    """The asyncio TLS echo server (runs in its own process, until SIGINT/SIGTERM);
    without *certfile*, plain TCP."""
    unpack_from, pack = HEADER.unpack_from, HEADER.pack

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.t = transport
            self.buf = bytearray()

        def data_received(self, data: bytes) -> None:
            buf = self.buf
            buf += data
            n, pos, out = len(buf), 0, bytearray()
            with memoryview(buf) as mv:
                while n - pos >= 9:
                    magic, size, _ = unpack_from(buf, pos)
                    if magic != MAGIC:
                        self.t.abort()
                        return
                    end = pos + 9 + size
                    if end > n:
                        break
                    out += pack(MAGIC, size, 0)
                    out += mv[pos + 9:end]
                    pos = end
            if pos:
                del buf[:pos]
            if out:
                self.t.write(out)

    async def serve() -> None:
        ctx = None
        if certfile:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(certfile, keyfile)
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
        server = await loop.create_server(Echo, host, port, ssl=ctx, backlog=4096,
                                          reuse_address=True)
        async with server:
            await stop

    asyncio.run(serve())


# ------------------------------------------------------------------------ helpers

def make_pki(d: Path) -> Tuple[Path, Path, Path]:
    """(ca.pem, server.pem, server.key) for localhost / 127.0.0.1, made with openssl."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=bench CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (d / "server.ext").write_text("basicConstraints=CA:FALSE\n"
                                  "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                  "extendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-set_serial", "1", "-days", "1", "-extfile", "server.ext", "-out", "server.pem")
    return d / "ca.pem", d / "server.pem", d / "server.key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process *pid* (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15)


def start_server(kind: str, port: int, cert: Path, key: Path, ctx: Optional[ssl.SSLContext],
                 cpu: Optional[int], threads: int) -> subprocess.Popen:
    """Start a *kind* server (TLS with *cert*/*key*, plain TCP when *ctx* is None) and
    return once it answers a handshake."""
    tls_args = ["--certfile", str(cert), "--keyfile", str(key)] if ctx is not None else []
    if kind == "morsock":
        cmd = [sys.executable, "-m", "morsock", "server", "--host", "127.0.0.1", "--port",
               str(port), "--status", "off", "--threads", str(threads), *tls_args]
    else:
        cmd = [sys.executable, __file__, "--serve-asyncio", "--port", str(port), *tls_args]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if cpu is not None:
        os.sched_setaffinity(proc.pid, {cpu})
    deadline = time.monotonic() + 30
    while True:  # listening and speaking TLS?
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
                if ctx is not None:
                    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                        tls.unwrap()
            return proc
        except (OSError, ssl.SSLError):
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                proc.kill()
                raise RuntimeError(f"{kind} server did not start: {err}")
            time.sleep(0.05)


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


# ------------------------------------------------------------------ load generator

class _Conn:
    __slots__ = ("sock", "buf", "out", "want_write", "inflight")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.out = bytearray()
        self.want_write = False
        self.inflight = 0


def drive(port: int, ctx: Optional[ssl.SSLContext], conns: int, depth: int, size: int,
          warmup: float, secs: float, server_pid: int) -> Dict[str, float]:
    """Run one scenario against the server on *port*; return the measured figures."""
    request = HEADER.pack(MAGIC, size, 0) + os.urandom(size)
    frame_len = len(request)
    sel = selectors.DefaultSelector()
    clients: List[_Conn] = []
    for _ in range(conns):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = ctx.wrap_socket(raw, server_hostname="localhost") if ctx else raw  # blocking
        tls.setblocking(False)
        c = _Conn(tls)
        clients.append(c)
        sel.register(tls, selectors.EVENT_READ, c)
    replies = errors = 0
    scratch = bytearray(256 * 1024)
    view = memoryview(scratch)

    def flush(c: _Conn) -> None:
        nonlocal errors
        try:
            n = c.sock.send(c.out)  # all or nothing; a retry repeats the same head
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            n = 0
        except OSError:
            errors += 1
            return
        if n:
            del c.out[:n]
        want = bool(c.out)
        if want != c.want_write:
            c.want_write = want
            sel.modify(c.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0), c)

    def on_read(c: _Conn) -> int:
        nonlocal errors
        got = 0
        while True:
            try:
                n = c.sock.recv_into(scratch)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                break
            except OSError:
                errors += 1
                return 0
            if not n:
                errors += 1
                sel.unregister(c.sock)
                return 0
            c.buf += view[:n]
        buf = c.buf
        full = len(buf) // frame_len  # every reply is one frame of the request's size
        if full:
            magic, length, _ = HEADER.unpack_from(buf, (full - 1) * frame_len)
            if magic != MAGIC or length != size:
                errors += 1
            del buf[:full * frame_len]
            got = full
        return got

    for c in clients:
        c.out += request * depth
        c.inflight = depth
        flush(c)
    start = time.monotonic()
    t_warm = start + warmup
    t_end = t_warm + secs
    measuring = False
    base_replies = 0
    cpu0 = lg0 = t0 = 0.0
    while True:
        now = time.monotonic()
        if not measuring and now >= t_warm:
            measuring = True
            base_replies, cpu0, lg0, t0 = replies, cpu_seconds(server_pid), time.process_time(), now
        if now >= t_end:
            break
        for key, mask in sel.select(0.2):
            c = key.data
            if mask & selectors.EVENT_READ:
                got = on_read(c)
                if got:
                    replies += got
                    c.out += request * got
                    flush(c)
            if mask & selectors.EVENT_WRITE and c.out:
                flush(c)
    t1 = time.monotonic()
    cpu1, lg1 = cpu_seconds(server_pid), time.process_time()
    for c in clients:
        sel.unregister(c.sock) if c.sock.fileno() in sel.get_map() else None
        c.sock.close()
    sel.close()
    done = replies - base_replies
    wall = t1 - t0
    return {"req_s": done / wall, "mb_s": done * size * 2 / wall / 1e6,
            "us_req": (cpu1 - cpu0) / max(done, 1) * 1e6, "srv_pct": (cpu1 - cpu0) / wall * 100,
            "lg_pct": (lg1 - lg0) / wall * 100, "errors": errors, "replies": done}


# ---------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serve-asyncio", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--certfile", help=argparse.SUPPRESS)
    ap.add_argument("--keyfile", help=argparse.SUPPRESS)
    ap.add_argument("--secs", type=float, default=5.0, help="measured seconds per run (5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per run (1)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help="comma-separated, from: " + ", ".join(SCENARIOS))
    ap.add_argument("--servers", default="morsock,asyncio", help="morsock,asyncio")
    ap.add_argument("--threads", type=int, default=4, help="morsock worker threads (4)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin server / load to CPUs")
    ap.add_argument("--no-tls", action="store_true",
                    help="the same measurement over plain TCP (to see what TLS costs)")
    ap.add_argument("--json", help="also write the raw results to this file")
    args = ap.parse_args()
    if args.serve_asyncio:
        serve_asyncio("127.0.0.1", args.port, args.certfile, args.keyfile)
        return 0

    cpus = sorted(os.sched_getaffinity(0))
    server_cpu: Optional[int] = None
    if not args.no_pin and len(cpus) >= 2:
        server_cpu = cpus[0]
        os.sched_setaffinity(0, {cpus[1]})
    scenarios = [s for s in args.scenarios.split(",") if s]
    servers = [s for s in args.servers.split(",") if s]
    results: Dict[str, Dict[str, List[Dict[str, float]]]] = {
        s: {k: [] for k in servers} for s in scenarios}
    with tempfile.TemporaryDirectory(prefix="morsock-tls-bench-") as tmp:
        ca, cert, key = make_pki(Path(tmp))
        ctx: Optional[ssl.SSLContext] = ssl.create_default_context(cafile=str(ca))
        if args.no_tls:
            ctx = None
        pinned = "no" if server_cpu is None else f"server CPU {server_cpu}, load CPU {cpus[1]}"
        print(f"{'plain TCP' if args.no_tls else 'TLS'} echo: {ssl.OPENSSL_VERSION}, "
              f"Python {sys.version.split()[0]}, "
              f"{args.rounds} rounds x {args.secs:g} s (+{args.warmup:g} s warm-up), "
              f"pinned: {pinned}",
              flush=True)
        for rnd in range(args.rounds):
            for scenario in scenarios:
                conns, depth, size = SCENARIOS[scenario]
                order = servers if rnd % 2 == 0 else servers[::-1]
                for kind in order:
                    port = free_port()
                    proc = start_server(kind, port, cert, key, ctx, server_cpu, args.threads)
                    try:
                        r = drive(port, ctx, conns, depth, size, args.warmup, args.secs, proc.pid)
                    finally:
                        stop_server(proc)
                    results[scenario][kind].append(r)
                    print(f"  round {rnd + 1} {scenario:5s} {kind:8s} {r['req_s']:9.0f} req/s "
                          f"{r['us_req']:7.1f} us/req srv {r['srv_pct']:4.0f}% "
                          f"lg {r['lg_pct']:4.0f}% err {r['errors']}", flush=True)
    print()
    print(f"{'scenario':24s} {'server':8s} {'req/s':>9s} {'MB/s':>8s} {'us/req':>8s} "
          f"{'srv%':>5s} {'lg%':>5s} {'err':>4s}  (medians of {args.rounds} rounds)")
    status = 0
    for scenario in scenarios:
        conns, depth, size = SCENARIOS[scenario]
        label = f"{scenario} c{conns} d{depth} {size}B"
        for kind in servers:
            runs = results[scenario][kind]
            med = {k: statistics.median(r[k] for r in runs)
                   for k in ("req_s", "mb_s", "us_req", "srv_pct", "lg_pct")}
            errs = sum(int(r["errors"]) for r in runs)
            status |= errs > 0
            print(f"{label:24s} {kind:8s} {med['req_s']:9.0f} {med['mb_s']:8.1f} "
                  f"{med['us_req']:8.1f} {med['srv_pct']:5.0f} {med['lg_pct']:5.0f} {errs:4d}")
        if len(servers) == 2:
            a, b = (statistics.median(r["req_s"] for r in results[scenario][k]) for k in servers)
            ca_, cb = (statistics.median(r["us_req"] for r in results[scenario][k])
                       for k in servers)
            print(f"{'':24s} {servers[0]}/{servers[1]}: req/s x{a / b:.2f}, "
                  f"CPU per request x{ca_ / cb:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
