"""Property-based fuzzing of the server's connection handling over real sockets.

Hypothesis builds byte streams -- pure random bytes, valid frames, and valid frames
interleaved with garbage (bad magic, unknown flags, oversize claims, frames of the
encrypted profiles while the server has no key, truncated frames) -- and sends each one,
split at random points, on a fresh connection to one running server. An independent
reference parser (written here, not :mod:`morsock.protocol`) says what the stream holds.

Invariants, for every stream:

* the handler only ever sees payloads of valid plaintext frames that came before the
  first invalid byte (or the first frame the server must refuse), in order -- a prefix
  of them; all of them when the stream holds nothing invalid;
* a stream holding something invalid is closed by the server with exactly one
  ``on_error`` whose code names it; a clean one is never reported;
* the server keeps serving: a healthy connection is answered after every example, and
  nothing is left connected at the end.

A coverage-guided harness of the decoder alone lives in ``tests/fuzz/fuzz_decoder.py``.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Any, Dict, List, Optional, Set, Tuple

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from morsock import ErrorCode, Server, ServerClient
from morsock.protocol import HEADER, MAGIC, encode_frame
from morsock.testing import RawPeer, running_server

from helpers import TIMEOUT

LIMIT = 1000  # the server's max_message_size in these tests
MAGIC_BYTES = struct.pack("<I", MAGIC)
EXAMPLES = 50


# ------------------------------------------------------------------------ reference model

def reference(stream: bytes, limit: int = LIMIT) -> Tuple[List[bytes], Set[int], bool]:
    """What a correct server makes of *stream*.

    Returns ``(plain, codes, invalid)``: the payloads of the plaintext frames the handler
    may see (those before the first invalid byte and before the first encrypted frame,
    which a keyless server refuses), the error codes the close may name (a refused
    encrypted frame and a later stream error race: either may be reported), and whether
    the stream holds anything invalid at all.
    """
    plain: List[bytes] = []
    codes: Set[int] = set()
    refused = False   # an encrypted frame was met: later frames are never handled
    pos = 0
    while pos < len(stream):
        rest = stream[pos:]
        k = min(4, len(rest))
        if rest[:k] != MAGIC_BYTES[:k]:
            codes.add(ErrorCode.INVALID_PROTOCOL)
            break
        if len(rest) < 9:
            break  # a header cut short by the end of the stream: not an error
        _, size, flag = HEADER.unpack_from(rest)
        if flag not in (0, 1, 2):
            codes.add(ErrorCode.INVALID_PROTOCOL)
            break
        if size > limit:
            codes.add(ErrorCode.MESSAGE_TOO_LARGE)
            break
        if len(rest) < 9 + size:
            break  # truncated payload at the end: not an error
        if not refused:
            if flag == 0:
                plain.append(rest[9:9 + size])
            else:
                refused = True
                codes.add(ErrorCode.DECRYPT_FAILED if flag == 1
                          else ErrorCode.AUTHENTICATION_FAILED)
        pos += 9 + size
    return plain, codes, bool(codes)


# ------------------------------------------------------------------------ strategies

payloads = st.binary(max_size=300)
valid_frames = payloads.map(encode_frame)


@st.composite
def garbage(draw: Any) -> bytes:
    kind = draw(st.sampled_from(["bytes", "flag", "size", "magic", "crypto", "cut"]))
    if kind == "bytes":
        return draw(st.binary(min_size=1, max_size=64))
    if kind == "flag":
        return HEADER.pack(MAGIC, draw(st.integers(0, 20)), draw(st.integers(3, 255))) + \
            draw(st.binary(max_size=20))
    if kind == "size":
        return HEADER.pack(MAGIC, draw(st.integers(LIMIT + 1, 2 ** 32 - 1)),
                           draw(st.integers(0, 2))) + draw(st.binary(max_size=20))
    if kind == "magic":
        wrong = bytearray(MAGIC_BYTES)
        wrong[draw(st.integers(0, 3))] ^= draw(st.integers(1, 255))
        return bytes(wrong) + draw(st.binary(max_size=20))
    if kind == "crypto":  # well-formed frame of an encrypted profile: the server has no key
        return encode_frame(draw(st.binary(max_size=64)), draw(st.sampled_from([1, 2])))
    frame = draw(valid_frames)  # a frame cut short (only an error if more bytes follow)
    return frame[:draw(st.integers(1, len(frame) - 1))]


interleaved = st.lists(st.one_of(valid_frames, valid_frames, garbage()), max_size=10).map(
    b"".join)
streams = st.one_of(
    st.binary(max_size=2000),                                  # pure random bytes
    st.lists(valid_frames, max_size=10).map(b"".join),         # only valid frames
    interleaved,                                               # frames and garbage
)


def splits(stream: bytes, cuts: List[int]) -> List[bytes]:
    """*stream* cut at the given offsets (taken modulo its length, sorted, deduplicated)."""
    if not stream:
        return []
    points = sorted({c % len(stream) for c in cuts} | {0, len(stream)})
    return [stream[a:b] for a, b in zip(points, points[1:])]


# ------------------------------------------------------------------------ the harness

class _Observer:
    """Server events, per connection handle."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.handled: Dict[int, List[bytes]] = {}
        self.errors: Dict[Optional[int], List[Tuple[str, int]]] = {}
        self.connected: List[int] = []
        self.disconnected: Set[int] = set()
        self.healthy: Optional[int] = None

    def on_handle_command(self, server: Server, client: ServerClient, data: bytes) -> Any:
        if client.handle == self.healthy:
            return data
        with self.cond:
            self.handled.setdefault(client.handle, []).append(data)
        return None

    def on_connect(self, server: Server, client: ServerClient) -> None:
        with self.cond:
            self.connected.append(client.handle)
            self.cond.notify_all()

    def on_disconnect(self, server: Server, client: ServerClient) -> None:
        with self.cond:
            self.disconnected.add(client.handle)
            self.cond.notify_all()

    def on_error(self, server: Server, client: Optional[ServerClient], message: str,
                 code: int) -> None:
        with self.cond:
            self.errors.setdefault(client.handle if client else None, []).append((message, code))

    def wait(self, predicate: Any, what: str) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, TIMEOUT), f"timed out waiting for {what}"


def _send_all(sock: socket.socket, chunks: List[bytes]) -> None:
    for chunk in chunks:
        try:
            sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            return  # the server closed the connection: the rest is not needed


def _check_stream(server: Server, obs: _Observer, healthy: RawPeer, stream: bytes,
                  cuts: List[int]) -> None:
    plain, codes, invalid = reference(stream)
    with obs.cond:
        known = len(obs.connected)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    try:
        obs.wait(lambda: len(obs.connected) > known, "on_connect")
        handle = obs.connected[known]
        _send_all(sock, splits(stream, cuts))
        if not invalid:
            sock.shutdown(socket.SHUT_WR)  # a clean stream ends with the peer's FIN
        obs.wait(lambda: handle in obs.disconnected, f"on_disconnect of #{handle}")
        try:  # the server's side is closed too
            while sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
    finally:
        sock.close()
    seen = obs.handled.get(handle, [])
    errors = obs.errors.get(handle, [])
    if invalid:
        assert seen == plain[:len(seen)], "the handler saw something not in the valid prefix"
        assert len(errors) == 1, errors
        assert errors[0][1] in codes, (errors, codes)
    else:
        assert seen == plain, "a clean stream must be handled completely, in order"
        assert errors == [], errors
    assert healthy.request(b"still serving") == b"still serving"


def _fuzz(strategy: Any) -> None:
    obs = _Observer()
    with running_server(obs.on_handle_command, max_message_size=LIMIT, thread_pool_size=2,
                        on_connect=obs.on_connect, on_disconnect=obs.on_disconnect,
                        on_error=obs.on_error) as server:
        with RawPeer.to(server) as healthy:
            obs.wait(lambda: len(obs.connected) == 1, "the healthy connection")
            obs.healthy = obs.connected[0]

            @settings(max_examples=EXAMPLES, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.too_slow])
            @given(stream=strategy, cuts=st.lists(st.integers(0, 10_000), max_size=12))
            def run(stream: bytes, cuts: List[int]) -> None:
                _check_stream(server, obs, healthy, stream, cuts)

            run()
            assert healthy.request(b"end") == b"end"
        obs.wait(lambda: server.client_count == 0, "every connection closed")
        assert obs.errors.get(None) is None
        assert obs.handled.get(obs.healthy) is None


def test_fuzz_random_streams_split_anywhere() -> None:
    _fuzz(streams)


def test_fuzz_valid_frames_interleaved_with_garbage() -> None:
    _fuzz(interleaved)


def test_reference_model_sanity() -> None:
    """The model itself: a few streams whose meaning is known by hand."""
    ok = encode_frame(b"a") + encode_frame(b"bc")
    assert reference(ok) == ([b"a", b"bc"], set(), False)
    assert reference(ok + b"\xBE\xBA") == ([b"a", b"bc"], set(), False)
    assert reference(ok + b"GET /") == ([b"a", b"bc"], {ErrorCode.INVALID_PROTOCOL}, True)
    assert reference(HEADER.pack(MAGIC, LIMIT + 1, 0)) == ([], {ErrorCode.MESSAGE_TOO_LARGE},
                                                            True)
    assert reference(encode_frame(b"x", 1) + encode_frame(b"y") + b"\x00") == (
        [], {ErrorCode.DECRYPT_FAILED, ErrorCode.INVALID_PROTOCOL}, True)
    assert splits(b"abcdef", [2, 8, 0]) == [b"ab", b"cdef"]
