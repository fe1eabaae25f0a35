"""Fault injection (b): real packet loss and a half-open connection, made with nftables
inside a private user + network namespace (``unshare -rn``: no real root needed).

Each test runs this file as a child process under ``unshare -rn``; the child brings up
``lo``, starts a Server and a Client on 127.0.0.1 inside the namespace, installs nft rules,
and prints one JSON line of observations that the test then checks:

* ``loss`` -- ``numgen random mod 100 < 10 drop`` on the server port, both directions:
  every message still arrives, once, in order, and so does every answer;
* ``halfopen`` -- every packet of the server port dropped while a connection is
  established: keep-alive / TCP_USER_TIMEOUT detect it on both ends within
  idle + interval * count seconds (``on_error(TIMEOUT)``, then ``on_disconnect``); the
  client's reconnection attempts fail while the rule is there and succeed once it is gone.

Skipped, with the reason, where ``unshare`` or ``nft`` is missing or not permitted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional

import pytest

from helpers import scaled

CHILD_TIMEOUT = scaled(180)
# keep-alive settings of the half-open scenario: dead after about 1 + 1 * 2 = 3 s
KA_IDLE, KA_INTERVAL, KA_COUNT = 1, 1, 2
KA_BOUND = KA_IDLE + KA_INTERVAL * KA_COUNT


def _unavailable() -> Optional[str]:
    """Why these tests cannot run here (None: they can)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux-only"
    for tool in ("unshare", "nft", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install util-linux nftables iproute2)"
    probe = subprocess.run(["unshare", "-rn", "sh", "-c",
                            "ip link set lo up && nft add table inet probe"],
                           capture_output=True, text=True, timeout=scaled(30))
    if probe.returncode != 0:
        return f"unshare -rn / nft not permitted here: {probe.stderr.strip()[:200]}"
    return None


def _run_child(scenario: str) -> Dict[str, Any]:
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(["unshare", "-rn", sys.executable, os.path.abspath(__file__),
                           scenario], capture_output=True, text=True, timeout=CHILD_TIMEOUT,
                          env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, (
        f"child failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result: Dict[str, Any] = json.loads(lines[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    return result


def test_random_packet_loss_keeps_every_message_in_order() -> None:
    r = _run_child("loss")
    n = r["n"]
    assert r["dropped_packets"] > 0, "the loss rule dropped nothing: the test proves nothing"
    assert r["server_seqs"] == list(range(n)), "server: lost, duplicated or reordered"
    assert r["client_acks"] == list(range(n)), "client: lost, duplicated or reordered"
    assert r["requests_ok"] == r["requests"] and r["extra_seqs"]
    assert r["server_errors"] == [] and r["client_errors"] == []
    assert r["disconnects"] == 0


def test_half_open_connection_is_detected_and_the_client_reconnects() -> None:
    r = _run_child("halfopen")
    assert r["dropped_packets"] > 0
    # detected on both ends, by keep-alive / TCP_USER_TIMEOUT, within the configured bound
    for side in ("server", "client"):
        dt = r[f"{side}_detected_after"]
        assert dt is not None, f"{side} never noticed the dead connection"
        assert KA_BOUND * 0.6 <= dt <= KA_BOUND + 6.0, (side, dt)  # wide sanity margins
        assert "TIMEOUT" in r[f"{side}_error_codes"], r
    assert r["failed_attempts_while_blocked"] >= 1
    assert r["reconnected"] and r["request_after_reconnect"] == "pong"
    assert r["server_clients_at_end"] == 1


# =====================================================================================
# The child: runs inside the namespace (python tests/test_netns.py loss|halfopen).
# =====================================================================================

def _sh(*args: str, stdin: Optional[str] = None) -> str:
    out = subprocess.run(list(args), input=stdin, capture_output=True, text=True,
                         timeout=scaled(30))
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


def _nft_drop(table: str, port: int, rule: str) -> None:
    """Drop packets to or from *port* on output (lo traffic) that match *rule*."""
    _sh("nft", "-f", "-", stdin=f"""
table inet {table} {{
    chain out {{
        type filter hook output priority 0; policy accept;
        tcp dport {port} {rule} counter drop
        tcp sport {port} {rule} counter drop
    }}
}}
""")


def _nft_dropped(table: str) -> int:
    text = _sh("nft", "list", "table", "inet", table)
    return sum(int(part.split()[1]) for part in text.split("counter")[1:]
               if part.split()[0] == "packets")


class _Log:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.events: List[Any] = []

    def add(self, *item: Any) -> None:
        with self.cond:
            self.events.append((time.monotonic(),) + item)
            self.cond.notify_all()

    def wait(self, predicate: Any, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self.events), timeout)

    def named(self, name: str) -> List[Any]:
        with self.cond:
            return [e for e in self.events if e[1] == name]


def _child_loss() -> Dict[str, Any]:
    import morsock
    n = 1500
    seqs: List[int] = []
    acks: List[int] = []
    log = _Log()
    done = threading.Event()

    def handle(server: Any, client: Any, data: bytes) -> bytes:
        seqs.append(int(data[:8]))
        return b"%08d" % int(data[:8]) + (b"ack" if data[8:9] == b"." else b"")

    def on_reply(client: Any, data: bytes) -> None:
        acks.append(int(data[:8]))
        if len(acks) == n:
            done.set()

    server = morsock.Server(port=0, host="127.0.0.1", on_handle_command=handle,
                            on_error=lambda s, c, m, code: log.add("server_error", code),
                            on_disconnect=lambda s, c: log.add("server_disconnect"))
    with server:
        port = server.port
        client = morsock.Client("127.0.0.1", port, on_handle_command=on_reply,
                                on_error=lambda c, m, code: log.add("client_error", code),
                                on_disconnect=lambda c: log.add("client_disconnect"))
        with client:
            _nft_drop("loss", port, "numgen random mod 100 < 10")
            for i in range(n):  # pipelined messages of many sizes
                client.send_data(b"%08d." % i + b"x" * (i * 37 % 3000))
            requests_ok = 0
            if done.wait(scaled(120)):  # then strictly sequential requests (each waits its reply)
                for i in range(n, n + 30):
                    if client.request(b"%08d?" % i, timeout=scaled(60)) == b"%08d" % i:
                        requests_ok += 1
            dropped = _nft_dropped("loss")
            disconnects = len(log.named("client_disconnect"))
        return dict(n=n, server_seqs=seqs[:n], client_acks=acks, dropped_packets=dropped,
                    requests=30, requests_ok=requests_ok,
                    extra_seqs=seqs[n:] == list(range(n, n + 30)),
                    server_errors=[e[2] for e in log.named("server_error")],
                    client_errors=[e[2] for e in log.named("client_error")],
                    disconnects=disconnects)


def _child_halfopen() -> Dict[str, Any]:
    import morsock
    from morsock import ErrorCode, ReconnectStrategy
    log = _Log()
    ka = dict(keepalive_idle=KA_IDLE, keepalive_interval=KA_INTERVAL, keepalive_count=KA_COUNT)

    def name(code: int) -> str:
        return ErrorCode(code).name if code < 0 else "ATTEMPT"

    server = morsock.Server(port=0, host="127.0.0.1", on_handle_command=lambda s, c, d: d,
                            on_error=lambda s, c, m, code: log.add("server_error", name(code)),
                            on_disconnect=lambda s, c: log.add("server_disconnect"), **ka)
    with server:
        port = server.port
        client = morsock.Client(
            "127.0.0.1", port, auto_reconnect=True,
            reconnect_strategy=ReconnectStrategy.FIXED_INTERVAL, reconnect_interval=300,
            reconnect_max_attempts=0, connection_timeout=1,
            on_error=lambda c, m, code: log.add("client_error", name(code)),
            on_connect=lambda c: log.add("client_connect"),
            on_disconnect=lambda c: log.add("client_disconnect"), **ka)
        with client:
            assert client.request(b"ping", timeout=scaled(10)) == b"ping"
            _nft_drop("halfopen", port, "")
            t0 = time.monotonic()
            client.send_data(b"into the void")  # unacknowledged data: TCP_USER_TIMEOUT
            both = log.wait(lambda ev: {"server_disconnect", "client_disconnect"}
                            <= {e[1] for e in ev}, scaled(30))

            def after(event: str) -> Optional[float]:
                found = log.named(event)
                return round(found[0][0] - t0, 3) if found else None

            failed = 0
            if both:  # reconnection attempts fail while every packet is dropped...
                log.wait(lambda ev: any(e[1] == "client_error" and e[2] == "ATTEMPT"
                                        for e in ev), scaled(30))
                failed = sum(1 for e in log.named("client_error") if e[2] == "ATTEMPT")
            dropped = _nft_dropped("halfopen")
            _sh("nft", "delete", "table", "inet", "halfopen")
            # ... and succeed once the rule is gone
            reconnected = log.wait(lambda ev: sum(1 for e in ev if e[1] == "client_connect")
                                   >= 2, scaled(30))
            pong = client.request(b"pong", timeout=scaled(10)).decode() if reconnected else ""
            clients = server.client_count
        return dict(server_detected_after=after("server_disconnect"),
                    client_detected_after=after("client_disconnect"),
                    server_error_codes=[e[2] for e in log.named("server_error")],
                    client_error_codes=[e[2] for e in log.named("client_error")],
                    failed_attempts_while_blocked=failed, dropped_packets=dropped,
                    reconnected=reconnected, request_after_reconnect=pong,
                    server_clients_at_end=clients)


def _child_main(scenario: str) -> int:
    try:
        _sh("ip", "link", "set", "lo", "up", "mtu", "1500")  # Ethernet-sized packets
        _sh("nft", "list", "ruleset")
    except (OSError, RuntimeError) as exc:
        print(json.dumps({"skip": f"cannot set up the namespace: {exc}"}))
        return 0
    result = {"loss": _child_loss, "halfopen": _child_halfopen}[scenario]()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))
