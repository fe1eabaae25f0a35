#!/usr/bin/env python3
"""Scaling curves of the morsock echo server: connections, message size, worker threads.

Run from the repository: ``python benchmarks/scaling.py [--asyncio] [--rounds 3]``
(the default run takes under a minute; ``--asyncio`` doubles parts 1 and 2).

* Load: the shared harness's C load generator (``../shared/bench/loadgen.c``). The binary
  the harness built (``${TMPDIR:-/tmp}/morsock-bench-cache/loadgen-<hash>``) is reused;
  if missing it is compiled there with ``gcc -O2``.
* Server: ``python -m morsock server --threads N`` (the CLI echo server of this
  checkout), a fresh process for every point. With ``--asyncio`` the shared reference
  ``ref/asyncio_proto.py`` runs every point too, right after (or before: the order
  alternates) morsock, so both meet the same machine state.
* Part 1, connections: ``loadgen echo -c N -d 1 -s 64`` for N = 1, 10, 100, 1000, and
  ``loadgen hold -c 10000`` (10,000 connections, one echo each, then held): req/s,
  server CPU us per request, latency, server RSS (peak of VmRSS sampled every 0.1 s) and
  RSS per connection (peak minus the idle RSS before the load, / N).
* Part 2, message size: ``loadgen echo -c 8 -d 2 -s SIZE`` for 64 B ... 4 MiB: MB/s
  (payload both ways), server CPU us per request and per MB, peak RSS.
* Part 3, encrypted MB/s against thread_pool_size (1, 2, 4): 64 KiB encrypted messages
  over 8 connections (the load of ``bench_encrypted.py``), server NOT pinned.

Parts 1 and 2 pin the server to the first allowed CPU and the load generator to the
second, as the harness does (``--no-pin`` leaves placement to the scheduler). Linux only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_encrypted as be  # noqa: E402

CONNS = (1, 10, 100, 1000, 10000)
SIZES = (64, 1024, 16 * 1024, 64 * 1024, 256 * 1024, 1024 * 1024, 4 * 1024 * 1024)
HOLD_FROM = 10000          # connection counts from here on use ``loadgen hold``


# ---------------------------------------------------------------------- environment

def bench_dir(explicit: Optional[str]) -> Path:
    """The shared harness directory (holding loadgen.c and ref/)."""
    candidates = [explicit, os.environ.get("MORSOCK_BENCH_DIR"),
                  str(HERE.parent.parent / "shared" / "bench"),
                  str(HERE.parent / "shared" / "bench")]
    for c in candidates:
        if c and (Path(c) / "loadgen.c").is_file():
            return Path(c)
    raise SystemExit("cannot find the shared bench harness (loadgen.c); use --bench-dir")


def loadgen_binary(bdir: Path) -> str:
    """The harness's compiled loadgen (same cache and name), compiled if missing."""
    src = bdir / "loadgen.c"
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("TMPDIR") or "/tmp") / "morsock-bench-cache"
    out = cache / f"loadgen-{digest}"
    if not out.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f"loadgen-{digest}.tmp{os.getpid()}"
        subprocess.run(["gcc", "-O2", "-o", str(tmp), str(src)], check=True)
        os.rename(tmp, out)
    return str(out)


def raise_nofile() -> int:
    """Lift this process's soft open-file limit to the hard one (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def src_addrs(conns: int) -> int:
    """Source addresses for *conns* client sockets (as the harness: 4 when the ephemeral
    port range is small)."""
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 1
    return 4 if hi - lo < 2 * conns else 1


def parse_kv(line: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for tok in line.split():
        k, _, v = tok.partition("=")
        try:
            out[k] = float(v)
        except ValueError:
            out[k] = v
    return out


class RssSampler(threading.Thread):
    """Peak VmRSS and thread count of a process, sampled every 0.1 s until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, be.rss_bytes(self.pid))
            self.done.wait(0.1)

    def finish(self) -> int:
        self.done.set()
        self.join()
        return max(self.peak, be.rss_bytes(self.pid))


# ---------------------------------------------------------------------- servers

def server_cmd(kind: str, bdir: Path, threads: int) -> List[str]:
    if kind == "morsock":
        return [sys.executable, "-m", "morsock", "server", "--host", "127.0.0.1", "--port",
                "{port}", "--status", "off", "--threads", str(threads)]
    return [sys.executable, str(bdir / "ref" / "asyncio_proto.py"), "--host", "127.0.0.1",
            "--port", "{port}"]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_point(kind: str, args: argparse.Namespace, lg_args: List[str], conns: int,
              server_cpu: Optional[int], load_cpu: Optional[int]) -> Dict[str, Any]:
    """One fresh server, one loadgen run; the loadgen's key=value line plus server figures."""
    port = free_port()
    with be.ServerProcess(server_cmd(kind, args.bench, args.threads), cpu=server_cpu,
                          port_file=False, port=port, env=args.env) as srv:
        time.sleep(0.2)   # let the accept check's connection close before measuring idle RSS
        idle = be.rss_bytes(srv.pid)
        cmd = [args.loadgen, *lg_args, "-H", "127.0.0.1", "-p", str(port)]
        if src_addrs(conns) > 1:
            cmd += ["-S", str(src_addrs(conns))]
        cpu0, _, _ = be.proc_stat(srv.pid)
        sampler = RssSampler(srv.pid)
        sampler.start()
        pre = (lambda: os.sched_setaffinity(0, {load_cpu})) if load_cpu is not None else None
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=pre,
                                  timeout=args.secs + args.warmup + 180)
            out, rc, err = proc.stdout.strip(), proc.returncode, proc.stderr.strip()
        except subprocess.TimeoutExpired:
            out, rc, err = "", 124, "loadgen timed out"
        wall = time.monotonic() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        peak = sampler.finish()
        cpu1, _, _ = be.proc_stat(srv.pid)
        alive = srv.proc is not None and srv.proc.poll() is None
    row = parse_kv(out.splitlines()[-1] if out else "")
    row.update(server=kind, rc=rc, status="ok" if rc == 0 and alive else f"rc={rc}",
               stderr=err[-300:], wall=wall, srv_cpu=cpu1 - cpu0,
               srv_pct=100 * (cpu1 - cpu0) / wall,
               lg_pct=100 * ((ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)) / wall,
               idle_mb=idle / 1e6, rss_mb=peak / 1e6, kb_conn=(peak - idle) / conns / 1024)
    total = row.get("requests_total")
    if total:
        row["us_req"] = (cpu1 - cpu0) * 1e6 / total   # warm-up included, as the harness does
    return row


# ---------------------------------------------------------------------- parts

def kinds(args: argparse.Namespace, i: int) -> List[str]:
    ks = ["morsock", "asyncio"] if args.asyncio else ["morsock"]
    return ks if i % 2 == 0 else ks[::-1]


def part_connections(args: argparse.Namespace, cpus: Tuple[Optional[int], Optional[int]]
                     ) -> Dict[Tuple[str, int], List[Dict[str, Any]]]:
    print("\n== part 1: connections (64 B, 1 in flight per connection)", flush=True)
    res: Dict[Tuple[str, int], List[Dict[str, Any]]] = {}
    i = 0
    for rnd in range(args.rounds):
        for n in args.conns:
            for kind in kinds(args, i):
                if n >= HOLD_FROM:
                    lg = ["hold", "-c", str(n), "-t", str(args.hold_secs)]
                else:
                    lg = ["echo", "-c", str(n), "-d", "1", "-s", "64", "-t", str(args.secs),
                          "-w", str(args.warmup)]
                r = run_point(kind, args, lg, n, *cpus)
                res.setdefault((kind, n), []).append(r)
                print(f"  round {rnd + 1} {kind:8s} conns {n:6d} " + (
                    f"served {r.get('served', 0):.0f} in {r.get('serve_all_secs', 0):.2f} s"
                    if n >= HOLD_FROM else f"{r.get('req_per_s', 0):8.0f} req/s "
                    f"{r.get('us_req', 0):6.1f} us/req") +
                    f" rss {r['rss_mb']:6.1f} MB {r['status']}", flush=True)
            i += 1
    return res


def part_sizes(args: argparse.Namespace, cpus: Tuple[Optional[int], Optional[int]]
               ) -> Dict[Tuple[str, int], List[Dict[str, Any]]]:
    print("\n== part 2: message size (8 connections x 2 in flight)", flush=True)
    res: Dict[Tuple[str, int], List[Dict[str, Any]]] = {}
    i = 0
    for rnd in range(args.rounds):
        for size in args.sizes:
            for kind in kinds(args, i):
                lg = ["echo", "-c", "8", "-d", "2", "-s", str(size), "-t", str(args.secs),
                      "-w", str(args.warmup)]
                r = run_point(kind, args, lg, 8, *cpus)
                res.setdefault((kind, size), []).append(r)
                print(f"  round {rnd + 1} {kind:8s} {be.size_label(size):>7} "
                      f"{r.get('mb_per_s', 0):8.1f} MB/s {r.get('us_req', 0):8.1f} us/req "
                      f"rss {r['rss_mb']:6.1f} MB {r['status']}", flush=True)
            i += 1
    return res


def part_threads(args: argparse.Namespace) -> Dict[Tuple[str, str, int], List[Dict[str, float]]]:
    print(f"\n== part 3: encrypted {be.size_label(args.enc_size)} messages against "
          f"thread_pool_size (8 connections x 2 in flight, not pinned)", flush=True)
    res: Dict[Tuple[str, str, int], List[Dict[str, float]]] = {}
    keys = [(p, m, t) for p, m in args.enc for t in args.thread_counts]
    for rnd in range(args.rounds):
        for key in (keys if rnd % 2 == 0 else keys[::-1]):
            profile, mode, threads = key
            r = be.measure(profile, mode, args.enc_size, threads, 8, 2, args.warmup, args.secs,
                           None, args.env)
            res.setdefault(key, []).append(r)
            print(f"  round {rnd + 1} {profile:13} {mode:3} threads {threads} "
                  f"{r['mb_s']:7.1f} MB/s {r['us_req']:7.1f} us/req srv {r['srv_pct']:4.0f}% "
                  f"lg {r['lg_pct']:4.0f}% err {r['errors']}", flush=True)
    return res


# ---------------------------------------------------------------------- tables

def _med(runs: List[Dict[str, Any]], key: str) -> Optional[float]:
    vals = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else None


def _f(v: Optional[float], spec: str = "{:.0f}") -> str:
    return "-" if v is None else spec.format(v)


def _status(runs: List[Dict[str, Any]]) -> Tuple[str, bool]:
    bad = [r for r in runs if r["status"] != "ok"]
    if not bad:
        return "ok", True
    return ",".join(sorted({r["status"] for r in bad})) + " " + bad[0].get("stderr", "")[:60], False


def print_connections(args: argparse.Namespace, res: Dict) -> bool:
    print(f"\nconnections, 64 B echo, medians of {args.rounds} round(s); N >= {HOLD_FROM}: "
          f"loadgen hold (one echo per connection, then held {args.hold_secs:g} s)")
    print(f"{'conns':>6} {'server':8} {'req/s':>8} {'us/req':>7} {'p50us':>6} {'p99us':>7} "
          f"{'srv%':>5} {'lg%':>5} {'idleMB':>7} {'rssMB':>7} {'KB/conn':>8}  status")
    ok_all = True
    for n in args.conns:
        for kind in kinds(args, 0):
            runs = res.get((kind, n), [])
            if not runs:
                continue
            status, ok = _status(runs)
            ok_all &= ok
            if n >= HOLD_FROM:
                t_est = _f(_med(runs, 'establish_secs'), '{:.2f}')
                t_serve = _f(_med(runs, 'serve_all_secs'), '{:.2f}')
                status = (f"hold: est {_f(_med(runs, 'established'))} served "
                          f"{_f(_med(runs, 'served'))} t_est {t_est} s t_serve {t_serve} s; "
                          f"{status}")
            print(f"{n:6d} {kind:8} {_f(_med(runs, 'req_per_s')):>8} "
                  f"{_f(_med(runs, 'us_req'), '{:.1f}'):>7} {_f(_med(runs, 'p50_us')):>6} "
                  f"{_f(_med(runs, 'p99_us')):>7} {_f(_med(runs, 'srv_pct')):>5} "
                  f"{_f(_med(runs, 'lg_pct')):>5} {_f(_med(runs, 'idle_mb'), '{:.1f}'):>7} "
                  f"{_f(_med(runs, 'rss_mb'), '{:.1f}'):>7} "
                  f"{_f(_med(runs, 'kb_conn'), '{:.1f}'):>8}  {status}")
    return ok_all


def print_sizes(args: argparse.Namespace, res: Dict) -> bool:
    print(f"\nmessage size, 8 connections x 2 in flight, medians of {args.rounds} round(s); "
          "MB/s = payload both ways")
    print(f"{'size':>7} {'server':8} {'req/s':>8} {'MB/s':>8} {'us/req':>8} {'us/MB':>7} "
          f"{'p50us':>7} {'srv%':>5} {'lg%':>5} {'rssMB':>7}  status")
    ok_all = True
    for size in args.sizes:
        for kind in kinds(args, 0):
            runs = res.get((kind, size), [])
            if not runs:
                continue
            status, ok = _status(runs)
            ok_all &= ok
            us = _med(runs, "us_req")
            per_mb = None if us is None else us / (2 * size / 1e6)
            print(f"{be.size_label(size):>7} {kind:8} {_f(_med(runs, 'req_per_s')):>8} "
                  f"{_f(_med(runs, 'mb_per_s'), '{:.1f}'):>8} {_f(us, '{:.1f}'):>8} "
                  f"{_f(per_mb, '{:.0f}'):>7} {_f(_med(runs, 'p50_us')):>7} "
                  f"{_f(_med(runs, 'srv_pct')):>5} {_f(_med(runs, 'lg_pct')):>5} "
                  f"{_f(_med(runs, 'rss_mb'), '{:.1f}'):>7}  {status}")
    return ok_all


def print_threads(args: argparse.Namespace, res: Dict) -> bool:
    print(f"\nencrypted {be.size_label(args.enc_size)} messages against thread_pool_size, "
          f"medians of {args.rounds} round(s); gain = MB/s / MB/s with the first count")
    print(f"{'profile':13} {'mode':4} {'threads':>7} {'req/s':>8} {'MB/s':>8} {'gain':>5} "
          f"{'us/req':>7} {'srv%':>5} {'lg%':>5} {'err':>4}")
    ok_all = True
    for profile, mode in args.enc:
        first = None
        for t in args.thread_counts:
            runs = res[(profile, mode, t)]
            errs = sum(int(r["errors"]) for r in runs)
            ok_all &= errs == 0
            mb = be.med(runs, "mb_s")
            first = first if first is not None else mb
            print(f"{profile:13} {mode:4} {t:7d} {be.med(runs, 'req_s'):8.0f} {mb:8.1f} "
                  f"{mb / first:5.2f} {be.med(runs, 'us_req'):7.1f} {be.med(runs, 'srv_pct'):5.0f} "
                  f"{be.med(runs, 'lg_pct'):5.0f} {errs:4d}")
    return ok_all


# ---------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--asyncio", action="store_true",
                    help="also run ref/asyncio_proto.py at every point of parts 1 and 2")
    ap.add_argument("--rounds", type=int, default=1, help="rounds, medians reported (1)")
    ap.add_argument("--secs", type=float, default=2.0, help="measured seconds per point (2)")
    ap.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per point (0.5)")
    ap.add_argument("--hold-secs", type=float, default=2.0, help="hold time of 10k (2)")
    ap.add_argument("--threads", type=int, default=4,
                    help="morsock thread_pool_size, parts 1, 2 (4)")
    ap.add_argument("--conns", default=",".join(map(str, CONNS)), help="part 1 connection counts")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="part 2 sizes (bytes)")
    ap.add_argument("--enc", default="AUTHENTICATED/CBC",
                    help="part 3 PROFILE/MODE list (AUTHENTICATED/CBC, the defaults of the API)")
    ap.add_argument("--enc-size", type=int, default=64 * 1024, help="part 3 payload (65536)")
    ap.add_argument("--thread-counts", default="1,2,4", help="part 3 thread_pool_size (1,2,4)")
    ap.add_argument("--parts", default="1,2,3", help="which parts to run (1,2,3)")
    ap.add_argument("--no-pin", action="store_true", help="parts 1-2: do not pin to CPUs")
    ap.add_argument("--malloc-tune", action="store_true",
                    help="servers run with glibc MALLOC_TRIM/MMAP_THRESHOLD_ = 256 MiB")
    ap.add_argument("--bench-dir", help="the shared harness directory (default ../shared/bench)")
    ap.add_argument("--json", help="also write the raw results to this file")
    args = ap.parse_args()
    args.conns = [int(x) for x in be._csv(args.conns)]
    args.sizes = [int(x) for x in be._csv(args.sizes)]
    args.enc = [tuple(x.upper().split("/")) for x in be._csv(args.enc)]
    args.thread_counts = [int(x) for x in be._csv(args.thread_counts)]
    parts = set(be._csv(args.parts))
    args.bench = bench_dir(args.bench_dir)
    args.loadgen = loadgen_binary(args.bench)
    args.env = be.MALLOC_TUNE if args.malloc_tune else None
    hard = raise_nofile()
    if max(args.conns) + 100 > hard:
        print(f"warning: RLIMIT_NOFILE hard limit {hard} is too low for {max(args.conns)} "
              "connections", file=sys.stderr)
    cpus = be.pin_cpus(args.no_pin)
    print(f"# {be.env_line()}; loadgen {args.loadgen}; server threads {args.threads}; pinned: "
          + ("no" if cpus[0] is None else f"server CPU {cpus[0]}, loadgen CPU {cpus[1]}")
          + ("; server malloc tuned" if args.malloc_tune else ""), flush=True)
    ok = True
    dump: Dict[str, Any] = {"env": be.env_line()}
    if "1" in parts:
        res = part_connections(args, cpus)
        ok &= print_connections(args, res)
        dump["connections"] = {f"{k[0]}/{k[1]}": v for k, v in res.items()}
    if "2" in parts:
        res2 = part_sizes(args, cpus)
        ok &= print_sizes(args, res2)
        dump["sizes"] = {f"{k[0]}/{k[1]}": v for k, v in res2.items()}
    if "3" in parts:
        res3 = part_threads(args)
        ok &= print_threads(args, res3)
        dump["threads"] = {"/".join(map(str, k)): v for k, v in res3.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(dump, indent=1, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
