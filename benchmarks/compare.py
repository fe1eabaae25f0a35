"""morsock's server against an asyncio reference server, measured in the same run.

    python benchmarks/compare.py                 # every scenario, 5 s each
    python benchmarks/compare.py --quick         # 1.5 s each
    python benchmarks/compare.py --repeat 3      # three interleaved rounds, medians
    python benchmarks/compare.py --metrics       # also morsock with --metrics-port
    python benchmarks/compare.py --server 'old=python -m morsock server --port {port}'
    python benchmarks/compare.py --plots docs/images   # the scaling sweeps and their plots

It needs a C compiler (``cc``) and, for ``--plots``, matplotlib (the ``bench`` extra);
nothing outside this repository. The load generator ``benchmarks/loadgen.c`` is built
with ``cc -O2`` into ``$TMPDIR/morsock-bench/``. The servers are ``python -m morsock
server`` (the morsock of this checkout, installed or not) and
``benchmarks/asyncio_echo.py``; both echo each frame's payload.

Scenario by scenario, each server runs in turn on a fresh process (interleaved, so that
every server meets each scenario under the same machine state). With two CPUs or more,
the server is pinned to one and the load generator to another. For each run it reads the
server's CPU time (all its threads, ``/proc/PID/task/*/schedstat``) before and after
the load and samples its resident memory (``VmRSS``) every 50 ms. It prints one table:
per scenario and server the request rate, latency, server CPU per request and peak RSS,
and their ratios to the reference (``asyncio``). Server CPU per request is the steadiest
of these figures: the request rate of two processes on a shared machine moves with the
scheduler's wake-up latency, the CPU a request costs much less so.

Exit status 0 when every run completed without an error, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORK = os.path.join(tempfile.gettempdir(), "morsock-bench")
CLK_TCK = os.sysconf("SC_CLK_TCK")
REFERENCE = "asyncio"


@dataclass(frozen=True)
class Scenario:
    name: str
    mode: str  # loadgen mode: echo or churn
    conns: int
    depth: int
    size: int
    what: str


SCENARIOS = (
    Scenario("lat1", "echo", 1, 1, 64, "latency: 1 connection, 1 request in flight"),
    Scenario("rps64", "echo", 64, 1, 64, "request rate: 64 connections, 1 in flight each"),
    Scenario("pipe64", "echo", 64, 16, 64, "pipelined: 64 connections, 16 in flight each"),
    Scenario("big", "echo", 8, 2, 65536, "big messages: 8 connections, 2 x 64 KiB in flight"),
    Scenario("c1k", "echo", 1000, 1, 64, "1,000 connections, 1 in flight each"),
    Scenario("churn", "churn", 16, 1, 64, "16 loops of connect, 1 request, close"),
)

#: The sweeps behind the plots: connections (64-byte requests) and message sizes.
SWEEP_CONNECTIONS = (1, 10, 100, 1000, 10000)
SWEEP_SIZES = (64, 1024, 16384, 262144, 4194304)
SWEEP_SIZE_CONNS = 8


def log(*args: Any) -> None:
    print("[compare]", *args, file=sys.stderr, flush=True)


# -- building and machine ---------------------------------------------------------------
def build_loadgen(cc: str | None = None) -> str:
    """benchmarks/loadgen.c compiled (once per source version) into WORK with *cc*
    (default: ``$CC``, else ``cc``); its path. Exits with a message without a compiler."""
    cc = cc or os.environ.get("CC") or "cc"
    source = os.path.join(HERE, "loadgen.c")
    with open(source, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    binary = os.path.join(WORK, f"loadgen-{digest}")
    if not os.path.exists(binary):
        os.makedirs(WORK, exist_ok=True)
        partial = f"{binary}.{os.getpid()}"
        try:
            subprocess.run([cc, "-O2", "-o", partial, source], check=True)
        except FileNotFoundError:
            raise SystemExit(f"compare.py builds its load generator with a C compiler: "
                             f"{cc!r} was not found (install one, or set CC)") from None
        except subprocess.CalledProcessError as exc:
            raise SystemExit(f"{cc} could not build {source} (exit status "
                             f"{exc.returncode})") from None
        os.replace(partial, binary)
    return binary


def machine() -> str:
    """One line naming the machine, its kernel and the Python that runs the servers."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cpus = len(os.sched_getaffinity(0))
    return (f"{model}, {cpus} CPUs, Linux {platform.release()}, "
            f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")


def raise_fd_limit() -> None:
    """The soft open-file limit up to the hard one (servers and loadgen inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- /proc ------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float | None:
    """CPU time of every thread of *pid* so far, or None once it is gone: the sum of its
    threads' ``/proc/PID/task/TID/schedstat`` (nanoseconds, so a short run is measured
    too), else utime + stime of ``/proc/PID/stat`` (clock ticks)."""
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except FileNotFoundError:  # that thread just ended
                continue
        return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, ValueError, IndexError):
        return None


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakRSS(threading.Thread):
    """Samples a process's VmRSS every 50 ms until stopped; ``peak`` holds the largest."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = rss_bytes(pid)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def stop(self) -> int:
        self.done.set()
        self.join()
        self.peak = max(self.peak, rss_bytes(self.pid))
        return self.peak


def wait_idle(pid: int, limit: float = 10.0) -> None:
    """Until *pid* uses under 4 % of a CPU over 0.25 s (at most *limit* seconds)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        before = cpu_seconds(pid)
        time.sleep(0.25)
        after = cpu_seconds(pid)
        if before is None or after is None or after - before <= 0.01:
            return


# -- servers ----------------------------------------------------------------------------
@dataclass
class ServerSpec:
    name: str
    argv: list[str]  # "{port}" is replaced by the port
    env: dict[str, str] = field(default_factory=dict)


def default_servers(python: str, with_metrics: bool) -> list[ServerSpec]:
    """morsock of this checkout (PYTHONPATH=the repository), optionally again with its
    metrics endpoint, and the asyncio reference."""
    pythonpath = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    morsock = [python, "-m", "morsock", "server", "--host", "127.0.0.1", "--port", "{port}",
               "--status", "off"]
    servers = [ServerSpec("morsock", morsock, {"PYTHONPATH": pythonpath})]
    if with_metrics:
        servers.append(ServerSpec("morsock+metrics", [*morsock, "--metrics-port", "0"],
                                  {"PYTHONPATH": pythonpath}))
    servers.append(ServerSpec(REFERENCE, [python, os.path.join(HERE, "asyncio_echo.py"),
                                          "--port", "{port}"]))
    return servers


def parse_server(text: str) -> ServerSpec:
    """``NAME=COMMAND`` of ``--server`` (COMMAND split like a shell, with {port})."""
    name, sep, command = text.partition("=")
    if not sep or not name or "{port}" not in command:
        raise argparse.ArgumentTypeError(
            f"--server wants NAME=COMMAND with {{port}} in COMMAND, not {text!r}")
    return ServerSpec(name, shlex.split(command))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_accepting(port: int, proc: subprocess.Popen[bytes], limit: float = 30.0) -> bool:
    end = time.monotonic() + limit
    while time.monotonic() < end and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def pinner(cpu: int | None) -> Any:
    return None if cpu is None else (lambda: os.sched_setaffinity(0, {cpu}))


class RunningServer:
    """One server process on a free port, pinned to *cpu*; stopped on exit (SIGTERM,
    SIGKILL after 10 s). Its output goes to a log file in WORK."""

    def __init__(self, spec: ServerSpec, cpu: int | None) -> None:
        self.spec, self.cpu = spec, cpu

    def __enter__(self) -> RunningServer:
        self.port = free_port()
        argv = [a.replace("{port}", str(self.port)) for a in self.spec.argv]
        os.makedirs(WORK, exist_ok=True)
        self.log_path = os.path.join(WORK, f"server-{self.spec.name}.log")
        self.log_file = open(self.log_path, "wb")
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", **self.spec.env)
        self.proc = subprocess.Popen(argv, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, cwd=WORK,
                                     preexec_fn=pinner(self.cpu), start_new_session=True)
        if not wait_accepting(self.port, self.proc):
            self.__exit__()
            with open(self.log_path, "rb") as f:
                tail = f.read()[-1500:].decode(errors="replace")
            raise RuntimeError(f"{self.spec.name} did not accept connections "
                               f"({' '.join(argv)}); its output:\n{tail}")
        wait_idle(self.proc.pid)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()


# -- one measurement --------------------------------------------------------------------
@dataclass
class Settings:
    secs: float
    warmup: float
    max_conns: int | None  # --tiny caps every scenario's connections
    server_cpu: int | None
    loadgen_cpu: int | None
    loadgen: str


def parse_line(line: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for token in line.split():
        key, _, value = token.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = value
    return out


def measure(spec: ServerSpec, sc: Scenario, st: Settings) -> dict[str, Any]:
    """Run *sc* against a fresh *spec* server; the row of figures (``ok`` False and an
    ``error`` when the loadgen or the server failed)."""
    conns = min(sc.conns, st.max_conns) if st.max_conns else sc.conns
    row: dict[str, Any] = {"server": spec.name, "scenario": sc.name, "conns": conns,
                           "depth": sc.depth, "size": sc.size}
    try:
        with RunningServer(spec, st.server_cpu) as srv:
            pid = srv.proc.pid
            idle = rss_bytes(pid)
            argv = [st.loadgen, sc.mode, "-p", str(srv.port), "-c", str(conns), "-s",
                    str(sc.size), "-t", str(st.secs), "-w", str(st.warmup)]
            if sc.mode == "echo":
                argv += ["-d", str(sc.depth)]
            sampler = PeakRSS(pid)
            sampler.start()
            cpu0, t0 = cpu_seconds(pid), time.monotonic()
            try:
                done = subprocess.run(argv, capture_output=True, text=True,
                                      timeout=st.secs + st.warmup + 120,
                                      preexec_fn=pinner(st.loadgen_cpu))
            finally:
                wall = time.monotonic() - t0
                cpu1 = cpu_seconds(pid)
                peak = sampler.stop()
            alive = srv.proc.poll() is None
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        row.update(ok=False, error=str(exc).splitlines()[0])
        return row
    lines = done.stdout.strip().splitlines()
    row.update(parse_line(lines[-1]) if lines else {})
    row["ok"] = done.returncode == 0 and alive and bool(lines)
    if not row["ok"]:
        row["error"] = (done.stderr.strip().splitlines() or [""])[-1] or (
            "the server died" if not alive else f"loadgen exit status {done.returncode}")
    total = row.get("requests_total") or 0
    if cpu0 is not None and cpu1 is not None:
        row["cpu_s"] = cpu1 - cpu0
        row["cpu_pct"] = 100.0 * (cpu1 - cpu0) / wall
        if total:
            row["us_per_req"] = (cpu1 - cpu0) * 1e6 / total
    row["rss_idle_mb"] = idle / 1e6
    row["rss_peak_mb"] = peak / 1e6
    row["rss_per_conn_kb"] = max(0, peak - idle) / conns / 1024
    return row


# -- interleaved runs -------------------------------------------------------------------
def interleaved(servers: Sequence[ServerSpec], points: Sequence[Scenario], st: Settings,
                repeat: int) -> list[dict[str, Any]]:
    """Every point against every server, server by server within each point; the order
    of the servers turns by one from one point (and round) to the next."""
    rows = []
    step = 0
    for rnd in range(repeat):
        for sc in points:
            order = [servers[(i + step) % len(servers)] for i in range(len(servers))]
            step += 1
            for spec in order:
                row = measure(spec, sc, st)
                row["round"] = rnd
                log(f"{sc.name:<8} {spec.name:<16} " + (
                    f"{row.get('req_per_s', 0):>10.0f} req/s {row.get('us_per_req', 0):>8.1f} "
                    f"us/req {row['rss_peak_mb']:>7.1f} MB" if row["ok"]
                    else f"FAILED: {row.get('error')}"))
                rows.append(row)
    return rows


def median_of(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get("ok") and r.get(key) is not None]
    return statistics.median(values) if values else None


def paired_ratio(rows: list[dict[str, Any]], server: str, scenario: str, key: str,
                 reference: str = REFERENCE) -> float | None:
    """The median over rounds of (server's *key* / the reference's) in the same round."""
    by_round: dict[int, dict[str, float]] = {}
    for r in rows:
        if r["scenario"] == scenario and r.get("ok") and r.get(key) is not None:
            by_round.setdefault(r["round"], {})[r["server"]] = r[key]
    ratios = [v[server] / v[reference] for v in by_round.values()
              if server in v and v.get(reference)]
    return statistics.median(ratios) if ratios else None


COLUMNS = ("scenario", "server", "req/s", "p50 us", "p99 us", "CPU us/req", "RSS MB",
           "rate x", "CPU x", "RSS x")


def table(rows: list[dict[str, Any]], servers: Sequence[str], scenarios: Sequence[str],
          reference: str = REFERENCE) -> str:
    """The results as a reStructuredText simple table: per scenario and server the
    medians, then the ratios to *reference* (``rate x``: request rate, higher is better;
    ``CPU x``: server CPU per request and ``RSS x``: peak RSS, lower is better)."""
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    body = []
    for sc in scenarios:
        for name in servers:
            mine = [r for r in rows if r["scenario"] == sc and r["server"] == name]
            if not mine:
                continue
            if not any(r.get("ok") for r in mine):
                body.append([sc, name, "failed"] + ["-"] * (len(COLUMNS) - 3))
                continue
            body.append([sc, name, fmt(median_of(mine, "req_per_s"), ".0f"),
                         fmt(median_of(mine, "p50_us"), ".0f"),
                         fmt(median_of(mine, "p99_us"), ".0f"),
                         fmt(median_of(mine, "us_per_req"), ".1f"),
                         fmt(median_of(mine, "rss_peak_mb"), ".1f"),
                         fmt(paired_ratio(rows, name, sc, "req_per_s", reference), ".2f"),
                         fmt(paired_ratio(rows, name, sc, "us_per_req", reference), ".2f"),
                         fmt(paired_ratio(rows, name, sc, "rss_peak_mb", reference), ".2f")])
    widths = [max(len(c[i]) for c in [list(COLUMNS), *body]) for i in range(len(COLUMNS))]
    rule = " ".join("=" * w for w in widths)

    def line(cells: Sequence[str]) -> str:
        return " ".join(f"{c:<{w}}" for c, w in zip(cells, widths)).rstrip()

    return "\n".join([rule, line(COLUMNS), rule, *map(line, body), rule])


# -- plots ------------------------------------------------------------------------------
def sweep_points(quick: bool) -> tuple[list[Scenario], list[Scenario]]:
    conns = (1, 100, 1000) if quick else SWEEP_CONNECTIONS
    sizes = (64, 16384, 1048576) if quick else SWEEP_SIZES
    by_conns = [Scenario(f"conns={c}", "echo", c, 1, 64, f"{c} connections") for c in conns]
    by_size = [Scenario(f"size={s}", "echo", SWEEP_SIZE_CONNS, 1, s, f"{s}-byte messages")
               for s in sizes]
    return by_conns, by_size


def size_label(n: float) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n:g} B"


def count_label(n: float) -> str:
    return f"{n / 1000:g}k" if n >= 1000 else f"{n:g}"


def plot(rows: list[dict[str, Any]], servers: Sequence[str], outdir: str, title: str) -> list[str]:
    """Two PNGs in *outdir*: CPU per request and RSS per connection against the number of
    connections, and against the message size; one line per server. Their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    os.makedirs(outdir, exist_ok=True)
    figures = (("bench_connections.png", "conns", count_label,
                "connections (1 request of 64 B in flight each)"),
               ("bench_message_size.png", "size", size_label,
                f"message size ({SWEEP_SIZE_CONNS} connections, 1 request in flight each)"))
    styles = {"morsock": ("tab:blue", "o"), REFERENCE: ("tab:orange", "s"),
              "morsock+metrics": ("tab:green", "^")}
    paths = []
    for filename, key, labeller, xlabel in figures:
        mine = [r for r in rows if r["scenario"].startswith(key + "=")]
        xs = sorted({r[key] for r in mine})
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), constrained_layout=True)
        panels = ((axes[0], "us_per_req", "server CPU per request (µs)",
                   "CPU time per request"),
                  (axes[1], "rss_per_conn_kb", "server RSS per connection (KiB)",
                   "memory per connection\n(RSS counts 4 KiB pages: a small growth is "
                   "mostly rounding)"))
        for ax, metric, ylabel, caption in panels:
            values = []
            for i, name in enumerate(servers):
                points = []
                for x in xs:
                    value = median_of([r for r in mine if r["server"] == name and r[key] == x],
                                      metric)
                    if value is not None and value > 0:
                        points.append((x, value))
                if not points:
                    continue
                values += [p[1] for p in points]
                color, marker = styles.get(name, (f"C{i + 3}", "D"))
                ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker,
                        color=color, label=name, linewidth=2, markersize=7)
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(FixedLocator(xs))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos, f=labeller: f(v)))
            plain = FuncFormatter(lambda v, _pos: f"{v:g}")
            if values and max(values) / min(values) > 20:  # orders of magnitude: log
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(plain)
                ax.grid(True, which="minor", axis="y", alpha=0.12)
            else:  # a narrow range reads best on a linear axis from 0
                ax.set_ylim(bottom=0, top=max(values or [1]) * 1.15)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(caption, fontsize=9)
            ax.grid(True, which="major", alpha=0.35)
            ax.legend()
        fig.suptitle(title, fontsize=10)
        path = os.path.join(outdir, filename)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# -- command line -----------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Scenarios:\n" + "\n".join(
                                     f"  {s.name:<7} {s.what}" for s in SCENARIOS))
    ap.add_argument("--quick", action="store_true", help="1.5 s per run (default 5 s)")
    ap.add_argument("--tiny", action="store_true",
                    help="a smoke run: 0.3 s per run, at most 2 connections")
    ap.add_argument("--secs", type=float, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, help="seconds of load before measuring")
    ap.add_argument("--repeat", type=int, default=1,
                    help="interleaved rounds; the table shows medians (default 1)")
    ap.add_argument("--scenarios", help="comma list (default: all): "
                    + ",".join(s.name for s in SCENARIOS))
    ap.add_argument("--metrics", action="store_true",
                    help="also run morsock with --metrics-port (needs prometheus_client)")
    ap.add_argument("--server", action="append", type=parse_server, default=[],
                    metavar="NAME=COMMAND",
                    help="another server to compare (COMMAND with {port}); repeatable")
    ap.add_argument("--no-morsock", action="store_true",
                    help="leave this checkout's morsock out (compare --server ones only)")
    ap.add_argument("--python", default=sys.executable,
                    help="the interpreter of the servers (default: this one)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin server and loadgen")
    ap.add_argument("--plots", metavar="DIR",
                    help="run the connection and message-size sweeps instead of the "
                         "scenarios and draw their PNGs into DIR (needs matplotlib)")
    ap.add_argument("--replot", metavar="JSON",
                    help="draw the plots (into --plots DIR) from a JSON this script wrote")
    ap.add_argument("--json", metavar="PATH", help="write every measurement here")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")

    servers = [] if args.no_morsock else default_servers(args.python, args.metrics)
    servers += args.server
    names = [s.name for s in servers]
    if len(set(names)) != len(names):
        ap.error(f"server names must differ: {names}")
    reference = REFERENCE if REFERENCE in names else names[0]
    if args.replot:
        if not args.plots:
            ap.error("--replot needs --plots DIR")
        with open(args.replot) as f:
            saved = json.load(f)
        for path in plot(saved["rows"], saved["servers"], args.plots,
                         f"{saved['machine']} — lower is better"):
            print(path)
        return 0

    secs = args.secs or (0.3 if args.tiny else 1.5 if args.quick else 5.0)
    warmup = args.warmup if args.warmup is not None else (
        0.1 if args.tiny else 0.3 if args.quick else 1.0)
    cpus = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(cpus) >= 2
    raise_fd_limit()
    st = Settings(secs, warmup, 2 if args.tiny else None, cpus[0] if pin else None,
                  cpus[1] if pin else None, build_loadgen())
    where = machine()
    header = (f"# {where}; {secs:g} s per run after {warmup:g} s of warm-up, "
              f"{args.repeat} round(s); " + (f"server on CPU {st.server_cpu}, loadgen on "
                                             f"CPU {st.loadgen_cpu}" if pin else "not pinned"))
    if args.plots:
        by_conns, by_size = sweep_points(args.quick)
        if args.tiny:
            by_conns, by_size = by_conns[:2], by_size[:2]
        rows = interleaved(servers, by_conns + by_size, st, args.repeat)
        for r in rows:
            r["size"] = int(r["size"])
        print(header)
        print(table(rows, names, [p.name for p in by_conns + by_size], reference))
        for path in plot(rows, names, args.plots, f"{where} — lower is better"):
            print(path)
    else:
        wanted = args.scenarios.split(",") if args.scenarios else [s.name for s in SCENARIOS]
        unknown = set(wanted) - {s.name for s in SCENARIOS}
        if unknown:
            ap.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
        points = [s for s in SCENARIOS if s.name in wanted]
        rows = interleaved(servers, points, st, args.repeat)
        print(header)
        print(table(rows, names, [p.name for p in points], reference))
        print("# rate x: request rate / the reference's (higher is better); CPU x: server "
              "CPU per request / the reference's, RSS x: peak RSS / the reference's (lower "
              f"is better); reference: {reference}; ratios are medians of same-round pairs")
    path = args.json or os.path.join(WORK, f"compare-{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"machine": where, "settings": header, "servers": names, "rows": rows},
                  f, indent=1)
    log(f"measurements: {path}")
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
