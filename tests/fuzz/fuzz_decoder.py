"""Coverage-guided fuzzing of :class:`morsock.protocol.FrameDecoder` with atheris
(libFuzzer for Python). Not collected by pytest and not run in CI.

Run it::

    pip install atheris
    python tests/fuzz/fuzz_decoder.py -atheris_runs=500000       # a fixed number of inputs
    python tests/fuzz/fuzz_decoder.py -max_total_time=300 corpus/   # 5 minutes, keep a corpus

Any libFuzzer option works (``-help=1`` lists them); a crash prints the failing input and
writes it to ``crash-<sha1>``, which ``python tests/fuzz/fuzz_decoder.py crash-<sha1>``
replays. Without atheris, ``python tests/fuzz/fuzz_decoder.py --random 100000`` runs the
same checks on random inputs (no coverage guidance).

Each input is read as: 2 bytes of ``max_message_size`` (0..65535), 1 byte giving the
number of cut points, 2 bytes per cut point, and the rest as the byte stream. For every
input the harness checks that

* decoding the stream in one ``feed``, cut at the given points, and one byte at a time
  give the same frames and the same outcome (error code, or bytes left buffered);
* that outcome matches an independent reference parser written here;
* re-encoding the frames gives back exactly the bytes they were decoded from;
* after a ``ProtocolError`` the decoder stays broken (the next ``feed`` raises again).
"""

from __future__ import annotations

import os
import random
import struct
import sys
from typing import List, Optional, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

try:
    import atheris
except ImportError:  # only --random works without it
    atheris = None

if atheris is not None:
    with atheris.instrument_imports():
        from morsock.protocol import FrameDecoder, ProtocolError, encode_frame
else:
    from morsock.protocol import FrameDecoder, ProtocolError, encode_frame

MAGIC_BYTES = struct.pack("<I", 0xCAFEBABE)
INVALID, TOO_LARGE = "INVALID_PROTOCOL", "MESSAGE_TOO_LARGE"

Outcome = Tuple[List[Tuple[bytes, int]], Optional[str], int]


def reference(stream: bytes, limit: int) -> Outcome:
    """(frames as (payload, flag), error code name or None, bytes left buffered)."""
    frames: List[Tuple[bytes, int]] = []
    pos = 0
    while pos < len(stream):
        rest = stream[pos:]
        k = min(4, len(rest))
        if rest[:k] != MAGIC_BYTES[:k]:
            return frames, INVALID, 0
        if len(rest) < 9:
            return frames, None, len(rest)
        size = int.from_bytes(rest[4:8], "little")
        flag = rest[8]
        if flag not in (0, 1, 2):
            return frames, INVALID, 0
        if size > limit:
            return frames, TOO_LARGE, 0
        if len(rest) < 9 + size:
            return frames, None, len(rest)
        frames.append((rest[9:9 + size], flag))
        pos += 9 + size
    return frames, None, 0


def decode(pieces: List[bytes], limit: int) -> Outcome:
    """Feed *pieces* in order to one decoder; what came out."""
    decoder = FrameDecoder(limit)
    frames: List[Tuple[bytes, int]] = []
    for piece in pieces:
        try:
            frames += [(f.payload, f.flag) for f in decoder.feed(piece)]
        except ProtocolError as exc:
            frames += [(f.payload, f.flag) for f in exc.frames]
            assert decoder.broken
            try:
                decoder.feed(b"more")
            except ProtocolError as again:
                assert again.code == exc.code
            else:
                raise AssertionError("a broken decoder accepted more bytes")
            assert exc.code is not None
            return frames, exc.code.name, 0
    return frames, None, decoder.buffered


def check(limit: int, cuts: List[int], stream: bytes) -> None:
    """Every property in the module docstring, for one input."""
    expected = reference(stream, limit)
    whole = decode([stream], limit)
    assert whole == expected, (whole, expected)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    assert decode([stream[a:b] for a, b in zip(points, points[1:])], limit) == expected
    assert decode([stream[i:i + 1] for i in range(len(stream))], limit) == expected
    frames, error, left = expected
    encoded = b"".join(encode_frame(p, f) for p, f in frames)
    assert stream.startswith(encoded)
    if error is None:
        assert len(encoded) + left == len(stream)


def parse_input(data: bytes) -> Tuple[int, List[int], bytes]:
    """Split a fuzzer input into (max_message_size, cut points, stream)."""
    if len(data) < 3:
        return 0, [], data
    limit = int.from_bytes(data[:2], "little")
    n = data[2] % 9
    cuts = [int.from_bytes(data[3 + 2 * i:5 + 2 * i], "little") for i in range(n)]
    return limit, cuts, data[3 + 2 * n:]


def TestOneInput(data: bytes) -> None:  # noqa: N802 - the name atheris expects
    limit, cuts, stream = parse_input(data)
    check(limit, cuts, stream[:4096])


def _random_inputs(count: int) -> None:
    rnd = random.Random(int.from_bytes(os.urandom(8), "little"))
    frame = encode_frame(b"payload")
    for i in range(count):
        parts = [rnd.choice([frame, frame[:rnd.randrange(1, len(frame))], MAGIC_BYTES,
                             rnd.randbytes(rnd.randrange(0, 20))]) for _ in range(rnd.randrange(6))]
        head = rnd.randrange(0, 65536).to_bytes(2, "little") + bytes([rnd.randrange(256)])
        TestOneInput(head + rnd.randbytes(16) + b"".join(parts))
    print(f"{count} random inputs passed")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--random":
        _random_inputs(int(sys.argv[2]))
    elif atheris is None:
        sys.exit("atheris is not installed: pip install atheris (or use --random N)")
    else:
        atheris.Setup(sys.argv, TestOneInput)
        atheris.Fuzz()
