"""Fault injection (a): a Client with auto_reconnect talks to a Server through
:class:`chaos.ChaosProxy`, which splits, coalesces, delays and stalls the byte streams and
resets connections in the middle of frames.

Invariants: no message is ever delivered corrupted, twice or out of order (the server's
handler checks a digest and records sequence numbers per connection); every
``request()`` returns its own correct reply or raises ``NotConnectedError`` /
``RequestTimeout``; every cut is followed by an automatic reconnection.
"""

from __future__ import annotations

import hashlib
import random
import threading
from typing import Any, Dict, List, Tuple

import pytest

from morsock import (Client, EncryptionProfile, NotConnectedError, ReconnectStrategy,
                     RequestTimeout, Server, ServerClient)
from morsock.testing import running_server

from chaos import ChaosProxy, FrameBoundaries
from helpers import TIMEOUT, Recorder, wait_until
from morsock.protocol import encode_frame

LOCAL = "127.0.0.1"
KEY = "chaos monkey key"


def _payload(seq: int, rnd: random.Random, kind: bytes = b"Q") -> bytes:
    """``kind`` (Q: a request, N: a note that gets no reply), sequence number, random
    body, and a digest of all that."""
    body = rnd.randbytes(rnd.choice([0, 1, 10, 100, 1000, 5000, 20000]))
    head = kind + b"%08d:" % seq
    return head + body + hashlib.sha256(head + body).digest()[:16]


class _Ledger:
    """What the server's handler received, per connection handle."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seqs: Dict[int, List[int]] = {}
        self.corrupted: List[Tuple[int, bytes]] = []

    def handler(self, server: Server, client: ServerClient, data: bytes) -> Any:
        head, body, digest = data[:10], data[10:-16], data[-16:]
        with self.lock:
            if len(data) < 26 or hashlib.sha256(head + body).digest()[:16] != digest:
                self.corrupted.append((client.handle, data[:64]))
                return None
            self.seqs.setdefault(client.handle, []).append(int(head[1:9]))
        return b"R" + data if head[:1] == b"Q" else None


def test_frame_boundaries_tracker() -> None:
    stream = encode_frame(b"abc") + encode_frame(b"") + encode_frame(b"hello")
    tracker = FrameBoundaries()
    assert tracker.feed(stream[:5]) == {0}
    assert tracker.feed(stream[5:15]) == {12 - 5}            # end of frame 1
    assert tracker.feed(stream[15:]) == {21 - 15, 35 - 15}   # ends of frames 2 and 3


@pytest.mark.parametrize("seed, encrypted", [(1, False), (2, False), (3, True)])
def test_requests_through_a_chaos_proxy(seed: int, encrypted: bool) -> None:
    rnd = random.Random(seed)
    ledger = _Ledger()
    srec = Recorder()
    crec = Recorder()
    key = dict(encryption_key=KEY, encryption_profile=EncryptionProfile.AUTHENTICATED) \
        if encrypted else {}
    n_requests = 150 if encrypted else 250
    outcomes: Dict[str, int] = dict(ok=0, not_connected=0, timeout=0)
    with running_server(ledger.handler, on_disconnect=srec.handler("on_disconnect"),
                        on_connect=srec.handler("on_connect"), **key) as server, \
            ChaosProxy(server.port, seed=seed, cut_prob=0.0) as proxy:
        client = Client(LOCAL, proxy.port, auto_reconnect=True,
                        reconnect_strategy=ReconnectStrategy.IMMEDIATE,
                        reconnect_max_attempts=0, connection_timeout=5,
                        on_connect=crec.handler("on_connect"),
                        on_disconnect=crec.handler("on_disconnect"),
                        on_error=crec.handler("on_error"), **key)
        with client:
            proxy.cut_prob = 0.03  # connected: from now on, cut now and then
            def settled_connection() -> bool:  # connected, and its on_connect has run
                return client.connected and crec.count("on_connect") == crec.count(
                    "on_disconnect") + 1

            seq = 0
            for i in range(n_requests):
                wait_until(settled_connection, what=f"reconnection before #{i}")
                for _ in range(rnd.randrange(4)):  # notes, pipelined ahead of the request
                    seq += 1
                    try:
                        client.send_data(_payload(seq, rnd, b"N"), encrypted=encrypted)
                    except NotConnectedError:
                        pass
                seq += 1
                payload = _payload(seq, rnd)
                try:
                    reply = client.request(payload, timeout=TIMEOUT, encrypted=encrypted)
                except NotConnectedError:
                    outcomes["not_connected"] += 1
                    continue
                except RequestTimeout:
                    outcomes["timeout"] += 1
                    continue
                assert reply == b"R" + payload, f"request #{seq} got another reply (seed {seed})"
                outcomes["ok"] += 1
            proxy.cut_prob = 0.0  # calm down; every cut so far must end in a reconnection

            def settled() -> bool:
                cuts = proxy.stats["cuts"]
                failed = sum(1 for e in crec.named("on_error") if e[2] > 0)
                return (client.connected and crec.count("on_connect") == crec.count(
                    "on_disconnect") + 1 and crec.count("on_disconnect") + failed == cuts)

            wait_until(settled, timeout=TIMEOUT * 2, what=f"reconnected after every cut: "
                       f"{proxy.stats}, {crec.count('on_connect')} connects")
            final = _payload(seq + 1, rnd)
            assert client.request(final, timeout=TIMEOUT, encrypted=encrypted) == b"R" + final
            wait_until(lambda: server.client_count == 1, what="the dead connections closed")
        stats = dict(proxy.stats)
    # the chaos really happened
    assert stats["cuts"] >= 2 and stats["coalesced"] > 0 and stats["stalls"] > 0, stats
    assert stats["pieces"] > stats["chunks"], stats
    assert outcomes["ok"] > n_requests // 2 and outcomes["timeout"] == 0, outcomes
    assert outcomes["ok"] + outcomes["not_connected"] == n_requests
    # nothing corrupted, duplicated or reordered on the server
    assert ledger.corrupted == []
    everything: List[int] = []
    for handle in sorted(ledger.seqs):
        seqs = ledger.seqs[handle]
        assert seqs == sorted(set(seqs)), f"connection #{handle} out of order or twice: {seqs}"
        everything += seqs
    assert everything == sorted(set(everything))  # connections follow each other in time
    assert everything[-1] == seq + 1
    assert outcomes["ok"] + 1 <= len(everything) <= seq + 1
    if encrypted:  # the server also saw the connections cut during the handshake
        assert srec.count("on_connect") >= crec.count("on_connect")
    else:
        assert srec.count("on_connect") == crec.count("on_connect")
