"""The sessions chaos run: both sides stream through a proxy that cuts every connection
at random moments; what arrived is checked against what was accepted.

:func:`run_chaos` is used by tests/test_sessions_chaos.py (a small volume) and by
benchmarks/sessions_chaos.py (the full run). One client and one server on 127.0.0.1:

* the client streams ``messages`` plain messages (``send_data``; mixed sizes, one in five
  encrypted when a key is set) and, on two more threads, requests (``request()``) whose
  replies must name them;
* the server pushes ``messages`` messages to the client (``ServerClient.send_data``);
* a cutter ends the connection every 50-500 ms (RST, FIN, or an orphaned server side).

Every message carries ``kind:source:sequence:``; each side records what its application
got. *lost*: accepted by a send (no exception) and never delivered; *refused*: the send
raised (the application knows); *duplicated*, *out_of_order*, *wrong_replies* count
what must be 0.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any, Dict, List, Optional

from morsock import (
    Client,
    ClientState,
    MorsockError,
    NotConnectedError,
    RequestTimeout,
    SendBufferFullError,
    Server,
)

from session_proxy import CutProxy

KEY = "sessions chaos"
LOCAL = "127.0.0.1"


def _size(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.70:
        return rng.randint(0, 200)
    if roll < 0.95:
        return rng.randint(1000, 8000)
    return rng.randint(32_000, 64_000)


def _message(kind: str, source: str, seq: int, size: int) -> bytes:
    return f"{kind}:{source}:{seq}:".encode() + b"." * size


def _parse(data: bytes) -> tuple:
    kind, source, seq, _ = data.split(b":", 3)
    return kind.decode(), source.decode(), int(seq)


class _Book:
    """What one side's application received, per source."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.seqs: Dict[str, List[int]] = {}
        self.count = 0

    def add(self, source: str, seq: int) -> None:
        with self.lock:
            self.seqs.setdefault(source, []).append(seq)
            self.count += 1
            self.lock.notify_all()

    def check(self, accepted: Dict[str, set]) -> Dict[str, int]:
        with self.lock:
            lost = dup = disorder = 0
            for source, want in accepted.items():
                got = self.seqs.get(source, [])
                lost += len(want - set(got))
                dup += len(got) - len(set(got))
                disorder += sum(1 for a, b in zip(got, got[1:]) if b <= a)
            return {"lost": lost, "duplicated": dup, "out_of_order": disorder}


def run_chaos(messages: int, *, sessions: bool = True, seed: int = 1, key: str = KEY,
              requests: Optional[int] = None, cut_min: float = 0.05, cut_max: float = 0.5,
              rate: float = 1000.0, deadline: float = 120.0, drain: float = 3.0
              ) -> Dict[str, Any]:
    """Run once; return the counts (see the module docstring) and the timings. Each
    stream sends at most *rate* messages a second (so the run spans many cuts)."""
    rng = random.Random(seed)
    requests = messages // 20 if requests is None else requests
    at_server, at_client = _Book(), _Book()
    faces: List[Any] = []
    face_ready = threading.Event()
    stop = threading.Event()

    def handle(server: Server, client: Any, data: bytes) -> Optional[bytes]:
        kind, source, seq = _parse(data)
        at_server.add(source, seq)
        if kind == "Q":
            return b"A:" + data[:40]
        return None

    def on_connect(server: Server, client: Any) -> None:
        faces.append(client)
        face_ready.set()

    server = Server(0, LOCAL, resume_window=30 if sessions else 0, encryption_key=key,
                    on_handle_command=handle, on_connect=on_connect, thread_pool_size=2,
                    max_send_buffer=4 * 1024 * 1024)
    server.start()
    proxy = CutProxy(server.port).start()
    states: List[tuple] = []

    def on_state(client: Client, old: ClientState, new: ClientState) -> None:
        states.append((time.monotonic(), old, new))

    def on_push(client: Client, data: bytes) -> None:
        kind, source, seq = _parse(data)
        at_client.add(source, seq)

    client = Client(LOCAL, proxy.port, resumable=sessions, encryption_key=key,
                    auto_reconnect=True, reconnect_strategy="IMMEDIATE",
                    reconnect_max_attempts=0, connection_timeout=5,
                    max_send_buffer=4 * 1024 * 1024,
                    on_handle_command=on_push, on_state_change=on_state)
    accepted: Dict[str, Dict[str, set]] = {"to_server": {}, "to_client": {}}
    counts = {"refused": 0, "wrong_replies": 0, "request_errors": 0, "cuts": 0}
    counts_lock = threading.Lock()

    def note(direction: str, source: str, seq: int) -> None:
        with counts_lock:
            accepted[direction].setdefault(source, set()).add(seq)

    def refused() -> None:
        with counts_lock:
            counts["refused"] += 1

    def send_with_retry(send: Any, data: bytes, encrypted: bool) -> bool:
        """True when accepted; waits out a full buffer (back-pressure)."""
        while not stop.is_set():
            try:
                send(data, encrypted=encrypted)
                return True
            except SendBufferFullError:
                stop.wait(0.005)
            except MorsockError:
                refused()
                return False
        return False

    def pace(seq: int, begun: float) -> None:
        """Hold a stream to *rate* messages a second."""
        ahead = begun + seq / rate - time.monotonic()
        if ahead > 0.002:
            stop.wait(ahead)

    def client_stream() -> None:
        r = random.Random(seed + 1)
        begun = time.monotonic()
        for seq in range(messages):
            pace(seq, begun)
            data = _message("D", "c", seq, _size(r))
            if send_with_retry(client.send_data, data, bool(key) and r.random() < 0.2):
                note("to_server", "c", seq)

    def client_requests(name: str, n: int) -> None:
        r = random.Random(sum(name.encode()) + seed)
        for seq in range(n):
            data = _message("Q", name, seq, _size(r) // 4)
            try:
                reply = client.request(data, 30.0, encrypted=bool(key) and r.random() < 0.2)
            except (NotConnectedError, RequestTimeout, MorsockError):
                with counts_lock:
                    counts["request_errors"] += 1
                continue
            note("to_server", name, seq)
            if reply != b"A:" + data[:40]:
                with counts_lock:
                    counts["wrong_replies"] += 1

    def server_stream() -> None:
        r = random.Random(seed + 2)
        face_ready.wait(30)
        begun = time.monotonic()
        for seq in range(messages):
            pace(seq, begun)
            data = _message("P", "s", seq, _size(r))
            face = faces[-1]
            if send_with_retry(face.send_data, data, bool(key) and r.random() < 0.2):
                note("to_client", "s", seq)

    def cutter() -> None:
        modes = ["reset", "close", "orphan"]
        while not stop.wait(rng.uniform(cut_min, cut_max)):
            proxy.cut(rng.choice(modes))
            counts["cuts"] += 1

    started = time.monotonic()
    try:
        client.connect()
        workers = [threading.Thread(target=client_stream),
                   threading.Thread(target=server_stream),
                   threading.Thread(target=client_requests, args=("q0", requests // 2)),
                   threading.Thread(target=client_requests, args=("q1", requests // 2))]
        cut = threading.Thread(target=cutter)
        for t in workers:
            t.start()
        cut.start()
        for t in workers:
            t.join(deadline)
        stop.set()
        cut.join(10)
        sent_done = time.monotonic()

        def want(direction: str) -> int:
            with counts_lock:
                return sum(len(v) for v in accepted[direction].values())
        # let what was accepted arrive (a session resumes once more; without sessions
        # it is lost for good: wait a fixed time)
        end = time.monotonic() + (deadline if sessions else drain)
        for book, direction in ((at_server, "to_server"), (at_client, "to_client")):
            with book.lock:
                book.lock.wait_for(lambda: book.count >= want(direction),
                                   max(0.0, end - time.monotonic()))
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        client.disconnect()
        server.stop()
        proxy.stop()
    to_server = at_server.check(accepted["to_server"])
    to_client = at_client.check(accepted["to_client"])
    resumes = []     # drop seen -> resumed (includes the 100 ms reconnect delay)
    handshakes = []  # TCP connect started -> resumed
    down = connecting = None
    for at, old, new in states:
        if new is ClientState.DISCONNECTED and old is ClientState.CONNECTED:
            down = at
        elif new is ClientState.CONNECTING:
            connecting = at
        elif new is ClientState.CONNECTED:
            if down is not None:
                resumes.append(at - down)
            if connecting is not None and down is not None:
                handshakes.append(at - connecting)
            down = None
    return {
        "sessions": sessions, "messages_each_way": messages, "requests": requests,
        "accepted_to_server": sum(len(v) for v in accepted["to_server"].values()),
        "accepted_to_client": sum(len(v) for v in accepted["to_client"].values()),
        "lost": to_server["lost"] + to_client["lost"],
        "duplicated": to_server["duplicated"] + to_client["duplicated"],
        "out_of_order": to_server["out_of_order"] + to_client["out_of_order"],
        "refused": counts["refused"], "request_errors": counts["request_errors"],
        "wrong_replies": counts["wrong_replies"], "cuts": counts["cuts"],
        "reconnections": len(resumes), "seconds": round(elapsed, 2),
        "send_seconds": round(sent_done - started, 2),
        "resume_p50": _pct(resumes, 50), "resume_p99": _pct(resumes, 99),
        "handshake_p50": _pct(handshakes, 50), "handshake_p99": _pct(handshakes, 99),
    }


def _pct(values: List[float], p: int) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] * 1000, 1)
