"""What morsock's per-request path costs in Python alone: the server's read callback,
decoder, strand, batch runner, handler and send, driven in this one thread with the
socket replaced by a stub (no system calls, no other thread).

    python benchmarks/bench_path.py [--requests 100000] [--rounds 5] [--size 64] [--frames 1]

Prints the CPU time per request of the whole path and of its parts (best of the rounds);
``--frames N`` puts N frames in each read, as pipe64's reads hold 16 (the figures are
then per frame, a read's fixed costs shared among its N frames):

* ``whole path``: ``Connection._read`` (one frame per read) -> the strand it schedules ->
  ``Strand._drain`` -> ``Server._run_items`` -> echo handler -> ``send_frame`` -> ``send``
  (a one-frame batch replies uncorked);
* ``read callback``: ``_read`` with the decoder and the strand's scheduling only;
* ``decoder``: ``FrameDecoder.feed_buffer`` of one whole frame in the scratch buffer;
* ``batch runner``: ``Server._run_items`` of a one-frame batch, with the stub ``send``.

It reaches into morsock's internals (the figures explain the harness's, see
benchmarks/README.rst); it is a measurement, not a test. Pin it for steadier figures:
``taskset -c 0 python benchmarks/bench_path.py``.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=100_000, help="calls per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size", type=int, default=64, help="payload bytes")
    ap.add_argument("--frames", type=int, default=1,
                    help="frames per read (pipe64's reads hold up to 16)")
    args = ap.parse_args()

    server = Server(0, "127.0.0.1", on_handle_command=lambda sender, client, data: data)
    # The runtime of a started server (reactor, pool, crypto context), not started: no
    # thread runs, and this thread plays the leader that holds the poll role.
    server._prepare_runtime("bench", 1, leader_follower=True)
    frame = encode_frame(bytes(args.size)) * args.frames
    conn = ServerClient(server, StubSocket(frame), handle=1,  # type: ignore[arg-type]
                        peer=("127.0.0.1", 1))
    pool = server._pool
    reactor = server._reactor
    harvest = pool._harvest
    reactor._leader = threading.get_ident()
    strand = conn._strand
    try:
        def whole() -> None:
            conn._read(1)
            harvest.pop()._drain()

        def read_only() -> None:
            conn._read(1)
            harvest.clear()
            strand._first = None
            strand._scheduled = False

        view = server._scratch_view
        view[:len(frame)] = frame
        decoder = conn._decoder
        size = len(frame)

        def decode() -> None:
            decoder.feed_buffer(view, size)

        payloads = [bytes(args.size)] * args.frames

        def run_items() -> None:
            server._run_items(conn, payloads)

        for name, fn in (("whole path", whole), ("read callback", read_only),
                         ("decoder", decode), ("batch runner", run_items)):
            cost = per_call(fn, args.requests, args.rounds) / args.frames
            print(f"{name:14} {cost:6.3f} us per request")
        assert conn.messages_received and conn.messages_sent, "the path did not run"
    finally:
        reactor._leader = None
        reactor.close()


if __name__ == "__main__":
    main()
