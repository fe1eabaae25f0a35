"""benchmarks/ stands alone: its load generator builds with ``cc`` and checks replies,
and compare.py runs morsock's server against the asyncio reference and prints its table.

No timing is asserted: these runs are far too short (and the machine too shared) for
their figures to mean anything; what is checked is that every part runs and the table
has one well-formed row per scenario and server.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from helpers import TIMEOUT

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
HEADER = struct.Struct("<IIB")
MAGIC = 0xCAFEBABE


def load_compare():
    spec = importlib.util.spec_from_file_location("compare", BENCHMARKS / "compare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def loadgen(tmp_path_factory: pytest.TempPathFactory) -> str:
    return load_compare().build_loadgen()


def echo_with(listener: socket.socket, reply_header: bytes) -> None:
    """Accept one connection; answer each 64-byte request with *reply_header* and its
    payload until the peer closes."""
    conn, _ = listener.accept()
    with conn:
        data = b""
        while True:
            try:
                chunk = conn.recv(65536)
            except ConnectionResetError:  # the loadgen closes with RST
                return
            if not chunk:
                return
            data += chunk
            while len(data) >= HEADER.size + 64:
                try:
                    conn.sendall(reply_header + data[HEADER.size:HEADER.size + 64])
                except OSError:  # the loadgen gave up on a wrong reply (RST)
                    return
                data = data[HEADER.size + 64:]


@pytest.mark.parametrize("magic, size, good", [(MAGIC, 64, True), (MAGIC, 63, False),
                                               (0xCAFEBABF, 64, False)])
def test_loadgen_checks_every_reply(loadgen: str, magic: int, size: int, good: bool) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        server = threading.Thread(target=echo_with, args=(listener, HEADER.pack(magic, size, 0)))
        server.start()
        done = subprocess.run([loadgen, "echo", "-p", str(listener.getsockname()[1]),
                               "-c", "1", "-d", "4", "-s", "64", "-t", "0.2", "-w", "0"],
                              capture_output=True, text=True, timeout=TIMEOUT)
        server.join(TIMEOUT)
    assert not server.is_alive()
    fields = dict(token.split("=", 1) for token in done.stdout.split())
    assert fields["mode"] == "echo" and fields["connected"] == "1"
    if good:
        assert done.returncode == 0, done.stdout
        assert fields["errors"] == "0" and int(fields["requests_total"]) > 4
    else:
        assert done.returncode == 1
        assert fields["errors"] == "1" and fields["requests_total"] == "0"


def test_loadgen_refuses_bad_arguments(loadgen: str) -> None:
    for argv in (["echo"], ["echo", "-p", "0"], ["nonsense", "-p", "1"],
                 ["echo", "-p", "1", "-x", "2"]):
        done = subprocess.run([loadgen, *argv], capture_output=True, text=True, timeout=TIMEOUT)
        assert done.returncode == 2 and "usage: loadgen" in done.stderr


def test_compare_tiny_prints_a_row_per_scenario_and_server(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "compare.py"), "--tiny",
                           "--json", str(out)],
                          capture_output=True, text=True, timeout=TIMEOUT * 12)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("# ") and "CPUs" in lines[0]
    rule = lines[1]
    assert set(rule) == {"=", " "} and lines[3] == rule and lines[-2] == rule
    assert lines[2].split() == ["scenario", "server", "req/s", "p50", "us", "p99", "us",
                                "CPU", "us/req", "RSS", "MB", "rate", "x", "CPU", "x", "RSS",
                                "x"]
    rows = [line.split() for line in lines[4:-2]]
    compare = load_compare()
    expected = [(s.name, server) for s in compare.SCENARIOS for server in ("morsock", "asyncio")]
    assert [(r[0], r[1]) for r in rows] == expected
    for row in rows:
        assert len(row) == 10
        for cell in (row[2], row[5], row[6], row[7], row[8], row[9]):  # always measured
            assert cell != "-" and float(cell) >= 0, f"{done.stdout}\n{done.stderr}"
        if row[0] != "churn":  # churn has no per-request latency
            assert float(row[3]) > 0 and float(row[4]) > 0
        if row[1] == "asyncio":  # the reference's own ratios
            assert row[7:] == ["1.00", "1.00", "1.00"]
    saved = json.loads(out.read_text())
    assert saved["servers"] == ["morsock", "asyncio"]
    assert all(r["ok"] and r["conns"] <= 2 and r["requests_total"] > 0 for r in saved["rows"])
