"""What morsock's per-request path costs in Python alone: the server's read callback,
decoder, strand, batch runner, handler and send, driven in this one thread with the
socket replaced by a stub (no system calls, no other thread).

    python benchmarks/bench_path.py [--requests 100000] [--rounds 5] [--size 64] [--frames 1]
                                    [--connections 1] [--pollute 0]

Prints the CPU time per request of the whole path and of its parts (best of the rounds);
``--frames N`` puts N frames in each read, as pipe64's reads hold 16 (the figures are
then per frame, a read's fixed costs shared among its N frames):

* ``whole path``: ``Connection._read`` (one frame per read) -> the strand it schedules ->
  ``Strand._drain`` -> ``Server._run_items`` -> echo handler -> ``send_frame`` -> ``send``
  (a one-frame batch replies uncorked);
* ``read callback``: ``_read`` with the decoder and the strand's scheduling only;
* ``decoder``: ``FrameDecoder.feed_buffer`` of one whole frame in the scratch buffer;
* ``batch runner``: ``Server._run_items`` of a one-frame batch, with the stub ``send``;
* ``reference``: the read callback of a minimal single-threaded ``selectors`` echo
  reactor (below: recv into a scratch buffer, parse in place, reply, send) on the same
  stub reads -- the pure-Python floor of a selectors design.

``--connections K`` spreads the requests of ``whole path`` and ``reference`` over K
connections in turn (c1k: 1,000), each request finding its connection's objects colder;
``--pollute B`` copies B bytes between two requests, a stand-in for the caches the
kernel's share of a real request evicts (its own cost, measured alone, is subtracted).

It reaches into morsock's internals (the figures explain compare.py's, see
benchmarks/README.rst); it is a measurement, not a test. Pin it for steadier figures:
``taskset -c 0 python benchmarks/bench_path.py``.
"""

from __future__ import annotations

import argparse
import itertools
import struct
import threading
import time
from typing import Any, Callable

from morsock import Server, ServerClient
from morsock.protocol import encode_frame


class StubSocket:
    """Just what a plaintext server connection calls on its socket."""

    def __init__(self, chunk: bytes) -> None:
        self.chunk = chunk
        self.size = len(chunk)

    def recv_into(self, buffer: Any) -> int:
        buffer[:self.size] = self.chunk
        return self.size

    def send(self, data: Any) -> int:
        return len(data)

    def close(self) -> None:
        pass


def per_call(fn: Callable[[], None], count: int, rounds: int) -> float:
    """Best CPU time per call of *fn* over *rounds* rounds of *count* calls, in us."""
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(count):
            fn()
        best = min(best, time.process_time() - start)
    return best / count * 1e6


class ReferenceConnection:
    """A connection of the minimal selectors reactor."""

    __slots__ = ("sock", "inbuf", "outbuf")

    def __init__(self, sock: StubSocket) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf: bytearray | None = None


def reference_reader() -> Callable[[ReferenceConnection], None]:
    """``on_read`` of the minimal selectors reactor (its error paths cut: a stub never fails)."""
    magic_ = 0xCAFEBABE
    hdr = struct.Struct("<IIB")
    unpack_from = hdr.unpack_from
    pack = hdr.pack
    scratch = bytearray(262144)
    smv = memoryview(scratch)

    def parse(src: Any, n: int) -> tuple[bytearray, int] | None:
        pos = 0
        out = bytearray()
        with memoryview(src) as mv:
            while n - pos >= 9:
                magic, size, _enc = unpack_from(src, pos)
                if magic != magic_:
                    return None
                end = pos + 9 + size
                if end > n:
                    break
                out += pack(magic_, size, 0)
                out += mv[pos + 9:end]
                pos = end
        return out, pos

    def on_read(c: ReferenceConnection) -> None:
        n = c.sock.recv_into(scratch)
        inbuf = c.inbuf
        if inbuf:
            inbuf += smv[:n]
            r = parse(inbuf, len(inbuf))
            assert r is not None
            out, pos = r
            if pos:
                del inbuf[:pos]
        else:
            r = parse(scratch, n)
            assert r is not None
            out, pos = r
            if pos < n:
                inbuf += smv[pos:n]
        if not out:
            return
        if c.outbuf is not None:
            c.outbuf += out
            return
        c.sock.send(out)

    return on_read


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=100_000, help="calls per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size", type=int, default=64, help="payload bytes")
    ap.add_argument("--frames", type=int, default=1,
                    help="frames per read (pipe64's reads hold up to 16)")
    ap.add_argument("--connections", type=int, default=1,
                    help="connections the requests take turns on (c1k: 1000)")
    ap.add_argument("--pollute", type=int, default=0, metavar="BYTES",
                    help="bytes copied between two requests (cache pollution)")
    ap.add_argument("--metrics", action="store_true",
                    help="also measure the whole path with morsock.metrics registered "
                         "(needs prometheus_client)")
    args = ap.parse_args()

    server = Server(0, "127.0.0.1", on_handle_command=lambda sender, client, data: data)
    # The runtime of a started server (reactor, pool, crypto context), not started: no
    # thread runs, and this thread plays the leader that holds the poll role.
    server._prepare_runtime("bench", 1, leader_follower=True)
    frame = encode_frame(bytes(args.size)) * args.frames
    clients = [ServerClient(server, StubSocket(frame), handle=i + 1,  # type: ignore[arg-type]
                            peer=("127.0.0.1", 1)) for i in range(args.connections)]
    conns = [client._conn for client in clients]
    conn = conns[0]
    references = [ReferenceConnection(StubSocket(frame)) for _ in range(args.connections)]
    on_read = reference_reader()
    dirty = bytes(args.pollute)
    polluted = bytearray(args.pollute)
    pool = server._pool
    reactor = server._reactor
    harvest = pool._harvest
    reactor._leader = threading.get_ident()
    strand = conn._strand
    try:
        turn = itertools.cycle(conns).__next__
        reference_turn = itertools.cycle(references).__next__

        def overhead() -> None:  # what the two below cost besides the request itself
            polluted[:] = dirty
            reference_turn()

        def whole() -> None:
            polluted[:] = dirty
            turn()._read(1)
            harvest.pop()._drain()

        def reference() -> None:
            polluted[:] = dirty
            on_read(reference_turn())

        def read_only() -> None:
            conn._read(1)
            harvest.clear()
            strand._first = None
            strand._scheduled = False
            conn.handled(args.frames)  # as if the strand ran them: no read back-pressure

        view = server._conn_owner.read_view
        view[:len(frame)] = frame
        decoder = conn._decoder
        size = len(frame)

        def decode() -> None:
            decoder.feed_buffer(view, size)

        payloads = [bytes(args.size)] * args.frames

        def run_items() -> None:
            server._run_items(conn, payloads)

        base = per_call(overhead, args.requests, args.rounds)
        costs = {}
        for name, fn in (("whole path", whole), ("read callback", read_only),
                         ("decoder", decode), ("batch runner", run_items),
                         ("reference", reference)):
            cost = per_call(fn, args.requests, args.rounds)
            if fn is whole or fn is reference:
                cost -= base
            costs[name] = cost = cost / args.frames
            print(f"{name:14} {cost:6.3f} us per request")
        print(f"whole path / reference: {costs['whole path'] / costs['reference']:.2f}")
        if args.metrics:
            from prometheus_client import CollectorRegistry

            from morsock.metrics import register

            best = {False: float("inf"), True: float("inf")}
            for _ in range(3):  # alternated, so that both meet the same machine state
                for metrics in (False, True):
                    registration = register(server, CollectorRegistry()) if metrics else None
                    cost = (per_call(whole, args.requests, args.rounds) - base) / args.frames
                    if registration is not None:
                        registration.unregister()
                    best[metrics] = min(best[metrics], cost)
            with_metrics, without = best[True], best[False]
            print(f"whole path with metrics registered {with_metrics:6.3f} us per request, "
                  f"without {without:6.3f}: {with_metrics / without:.3f} x")
        assert all(c.messages_received == c.messages_sent > 0 for c in conns), \
            "the path did not run on every connection"
    finally:
        reactor._leader = None
        reactor.close()


if __name__ == "__main__":
    main()
