"""What sessions cost the server: CPU time per request with and without them.

Two servers run side by side in child processes, one with ``resume_window=30`` (and
resumable clients), one without; rounds alternate between them (interleaved, so both
see the same machine state). Each round: ``--threads`` threads of one client each
send ``--requests`` requests of ``--size`` bytes, the next when the reply came; the
server's CPU time (user + system, from /proc, Linux only) over the round divided by the
requests is its cost per request. Prints the median per mode and the ratio.

    python benchmarks/sessions_cost.py                      # 6 rounds of 20,000
    python benchmarks/sessions_cost.py --rounds 4 --requests 5000
    python benchmarks/sessions_cost.py --key secret        # AUTHENTICATED profile
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time

_SERVER = r"""
import sys, morsock
def handle(server, client, data):
    return data
server = morsock.Server(0, "127.0.0.1", resume_window=float(sys.argv[1]),
                        encryption_key=sys.argv[2], on_handle_command=handle)
server.start()
sys.stdout.write("PORT %d\n" % server.port)
sys.stdout.flush()
sys.stdin.read()
server.stop()
"""


def _cpu(pid: int) -> float:
    """User + system seconds of process *pid* (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _round(port: int, resumable: bool, key: str, threads: int, requests: int,
           size: int, encrypted: bool) -> float:
    from morsock import Client
    per_thread = requests // threads
    payload = b"x" * size
    clients = [Client("127.0.0.1", port, resumable=resumable, encryption_key=key)
               for _ in range(threads)]
    for client in clients:
        client.connect()
    start = time.perf_counter()

    def work(client: Client) -> None:
        for _ in range(per_thread):
            client.request(payload, 30.0, encrypted=encrypted)
    workers = [threading.Thread(target=work, args=(c,)) for c in clients]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    for client in clients:
        client.disconnect()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--key", default="")
    parser.add_argument("--encrypted", action="store_true",
                        help="encrypted requests (needs --key)")
    args = parser.parse_args()
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = here + os.pathsep + env.get("PYTHONPATH", "")
    procs = {}
    try:
        for mode, window in (("sessions", "30"), ("plain", "0")):
            proc = subprocess.Popen([sys.executable, "-c", _SERVER, window, args.key],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True, env=env)
            assert proc.stdout is not None
            port = int(proc.stdout.readline().split()[1])
            procs[mode] = (proc, port)
        costs: dict = {"sessions": [], "plain": []}
        rates: dict = {"sessions": [], "plain": []}
        for index in range(args.rounds):
            order = ("sessions", "plain") if index % 2 == 0 else ("plain", "sessions")
            for mode in order:
                proc, port = procs[mode]
                before = _cpu(proc.pid)
                elapsed = _round(port, mode == "sessions", args.key, args.threads,
                                 args.requests, args.size, args.encrypted)
                cpu = _cpu(proc.pid) - before
                costs[mode].append(cpu / args.requests * 1e6)
                rates[mode].append(args.requests / elapsed)
                print(f"round {index + 1} {mode:8s}: server CPU {cpu / args.requests * 1e6:7.1f}"
                      f" us/request, {args.requests / elapsed:8.0f} requests/s", flush=True)
        with_s = statistics.median(costs["sessions"])
        without = statistics.median(costs["plain"])
        print(f"median server CPU per request: sessions {with_s:.1f} us, without "
              f"{without:.1f} us, ratio {with_s / without:.2f}")
        print(f"median requests/s: sessions {statistics.median(rates['sessions']):.0f}, "
              f"without {statistics.median(rates['plain']):.0f}")
    finally:
        for proc, _ in procs.values():
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(30)
            if proc.stdout is not None:
                proc.stdout.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
