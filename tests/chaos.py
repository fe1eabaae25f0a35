"""A small chaos proxy for fault-injection tests (127.0.0.1 only, threads and sockets).

:class:`ChaosProxy` listens on 127.0.0.1 and forwards every accepted connection to a
target port, misbehaving on purpose in both directions:

* **split** -- a chunk read from one side leaves in up to ``max_pieces`` writes;
* **coalesce** -- with ``coalesce_prob``, it waits a moment for more bytes and forwards
  two reads as one write;
* **delay / stall** -- each piece may wait up to ``delay_max`` seconds; with
  ``stall_prob`` a chunk is held for up to ``stall_max`` seconds first;
* **cut** -- with ``cut_prob`` per chunk, it forwards part of the chunk, ending strictly
  inside a frame (the proxy tracks morsock frame boundaries), then resets both
  connections (SO_LINGER 0: RST, not FIN).

Each connection is served by one thread (``selectors`` over its two sockets and a shared
stop socket), so a cut closes both sockets on the thread that uses them. The decisions
come from a seeded :class:`random.Random`; :attr:`ChaosProxy.stats` counts what was
done. ``with ChaosProxy(port) as proxy:`` starts it; :meth:`ChaosProxy.stop` closes every
socket and joins every thread. Delays wait on an Event, so ``stop()`` cuts them short.
"""

from __future__ import annotations

import random
import selectors
import socket
import struct
import threading
from typing import Any, Dict, List, Optional, Set

from helpers import scaled

__all__ = ["ChaosProxy", "FrameBoundaries"]

_LINGER_RST = struct.pack("ii", 1, 0)


class FrameBoundaries:
    """Tracks where frames end in one direction of a morsock byte stream."""

    def __init__(self) -> None:
        self._header = bytearray()
        self._left = 0  # payload bytes still to come in the current frame

    def feed(self, data: bytes) -> Set[int]:
        """Consume *data*; return the offsets in it (0..len) that are frame boundaries."""
        bounds: Set[int] = set()
        if not self._header and self._left == 0:
            bounds.add(0)
        i, n = 0, len(data)
        while i < n:
            if self._left:
                take = min(self._left, n - i)
                self._left -= take
                i += take
            else:
                take = min(9 - len(self._header), n - i)
                self._header += data[i:i + take]
                i += take
                if len(self._header) == 9:
                    self._left = struct.unpack_from("<I", self._header, 4)[0]
                    self._header.clear()
            if self._left == 0 and not self._header:
                bounds.add(i)
        return bounds


class _Pair:
    __slots__ = ("client", "upstream", "bounds")

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.bounds = {client: FrameBoundaries(), upstream: FrameBoundaries()}


class ChaosProxy:
    """Forward 127.0.0.1:``port`` to 127.0.0.1:*target_port*, splitting, coalescing,
    delaying, stalling and cutting (see the module docstring). Settings are plain
    attributes and may be changed while it runs (e.g. ``cut_prob = 0`` to calm down)."""

    def __init__(self, target_port: int, *, seed: int = 0, max_pieces: int = 4,
                 coalesce_prob: float = 0.2, delay_max: float = 0.002,
                 stall_prob: float = 0.02, stall_max: float = 0.15,
                 cut_prob: float = 0.03) -> None:
        self.target_port = target_port
        self.max_pieces = max_pieces
        self.coalesce_prob = coalesce_prob
        self.delay_max = delay_max
        self.stall_prob = stall_prob
        self.stall_max = stall_max
        self.cut_prob = cut_prob
        self._rnd = random.Random(seed)
        self._rnd_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self.stats: Dict[str, int] = dict(connections=0, chunks=0, pieces=0, coalesced=0,
                                          stalls=0, cuts=0, peer_resets=0, send_failures=0,
                                          upstream_failures=0)
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._threads: List[threading.Thread] = []
        self._threads_lock = threading.Lock()
        self._acceptor: Optional[threading.Thread] = None

    # -- life cycle ------------------------------------------------------------------
    def start(self) -> "ChaosProxy":
        self._acceptor = threading.Thread(target=self._accept_loop, name="chaos-accept")
        self._acceptor.start()
        return self

    def stop(self) -> None:
        """Stop accepting, reset every connection, join every thread (idempotent)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._acceptor is not None:
            self._acceptor.join(scaled(10))
        while True:
            with self._threads_lock:
                threads, self._threads = self._threads, []
            if not threads:
                break
            for t in threads:
                t.join(scaled(10))
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> "ChaosProxy":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[name] += n

    def _random(self) -> float:
        with self._rnd_lock:
            return self._rnd.random()

    def _randint(self, a: int, b: int) -> int:
        with self._rnd_lock:
            return self._rnd.randint(a, b)

    # -- accepting -------------------------------------------------------------------
    def _accept_loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping.is_set():
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r:
                        return
                    try:
                        client, _ = self._listener.accept()
                    except OSError:
                        continue
                    self._count("connections")
                    try:
                        upstream = socket.create_connection(("127.0.0.1", self.target_port),
                                                            timeout=scaled(5))
                    except OSError:
                        self._count("upstream_failures")
                        self._reset(client)
                        continue
                    t = threading.Thread(target=self._serve, args=(_Pair(client, upstream),),
                                         name=f"chaos-pair-{self.stats['connections']}")
                    with self._threads_lock:
                        self._threads = [x for x in self._threads if x.is_alive()]
                        self._threads.append(t)
                    t.start()
        finally:
            sel.close()

    # -- one connection ----------------------------------------------------------------
    @staticmethod
    def _reset(*socks: socket.socket) -> None:
        for sock in socks:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            except OSError:
                pass
            sock.close()

    def _serve(self, pair: _Pair) -> None:
        a, b = pair.client, pair.upstream
        for sock in (a, b):
            sock.settimeout(5)  # a sendall to a peer that stopped reading gives up
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sel = selectors.DefaultSelector()
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        open_dirs = 2
        try:
            while open_dirs:
                for key, _ in sel.select():
                    dst = key.data
                    if dst is None:  # stop()
                        return
                    src = key.fileobj
                    assert isinstance(src, socket.socket)
                    try:
                        data = src.recv(65536)
                    except OSError:  # reset by that side: reset the other one too
                        self._count("peer_resets")
                        return
                    if not data:
                        sel.unregister(src)
                        open_dirs -= 1
                        try:
                            dst.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                        continue
                    if not self._forward(pair, src, dst, data):
                        return
        finally:
            sel.close()
            self._reset(a, b)

    def _forward(self, pair: _Pair, src: socket.socket, dst: socket.socket,
                 data: bytes) -> bool:
        """Forward one chunk with the configured mischief; False once the pair is cut."""
        self._count("chunks")
        if self._random() < self.coalesce_prob and not self._stopping.wait(0.003):
            try:
                src.setblocking(False)
                more = src.recv(65536)
            except (BlockingIOError, InterruptedError):
                more = b""
            except OSError:
                return False
            finally:
                if src.fileno() >= 0:
                    src.settimeout(5)
            if more:
                data += more
                self._count("coalesced")
        bounds = pair.bounds[src].feed(data)
        if self._random() < self.stall_prob:
            self._count("stalls")
            if self._stopping.wait(self._random() * self.stall_max):
                return False
        if self._random() < self.cut_prob:
            inside = [k for k in range(1, len(data)) if k not in bounds]
            if inside:
                cut = inside[self._randint(0, len(inside) - 1)]
                try:
                    dst.sendall(data[:cut])
                except OSError:
                    pass
                self._count("cuts")
                return False
        pieces = self._randint(1, max(1, min(self.max_pieces, len(data))))
        points = sorted({self._randint(1, len(data) - 1) for _ in range(pieces - 1)}
                        if len(data) > 1 else set())
        start = 0
        for end in points + [len(data)]:
            if self.delay_max and self._stopping.wait(self._random() * self.delay_max):
                return False
            try:
                dst.sendall(data[start:end])
            except OSError:
                self._count("send_failures")
                return False
            self._count("pieces")
            start = end
        return True
