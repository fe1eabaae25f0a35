"""The frame codec (API §2): encode, decode under any split, limits and errors."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from morsock import ErrorCode, ProtocolError
from morsock.protocol import (FLAG_AUTHENTICATED, FLAG_MORMOT, FLAG_PLAIN, HEADER_SIZE, MAGIC,
                              Frame, FrameDecoder, encode_frame)


def test_header_layout_is_little_endian_magic_size_flag():
    frame = encode_frame(b"abc", FLAG_MORMOT)
    assert MAGIC == 0xCAFEBABE and HEADER_SIZE == 9
    assert frame[:4] == b"\xbe\xba\xfe\xca"
    assert frame[4:8] == (3).to_bytes(4, "little")
    assert frame[8] == 1 and frame[9:] == b"abc"


def test_empty_payload_frame():
    assert encode_frame(b"") == bytes.fromhex("bebafeca0000000000")
    assert FrameDecoder().feed(encode_frame(b"")) == [Frame(b"", FLAG_PLAIN)]


def test_byte_at_a_time():
    frames = [encode_frame(bytes([i]) * i, i % 3) for i in range(40)]
    decoder = FrameDecoder()
    out = []
    for byte in b"".join(frames):
        out += decoder.feed(bytes([byte]))
    assert out == [Frame(bytes([i]) * i, i % 3) for i in range(40)]
    assert decoder.buffered == 0


@pytest.mark.parametrize("cut", range(1, HEADER_SIZE + 4))
def test_header_cut_anywhere(cut):
    stream = encode_frame(b"hello") + encode_frame(b"world", FLAG_AUTHENTICATED)
    decoder = FrameDecoder()
    first = decoder.feed(stream[:cut])
    rest = decoder.feed(stream[cut:])
    assert first + rest == [Frame(b"hello"), Frame(b"world", FLAG_AUTHENTICATED)]


def test_trailing_bytes_of_next_frame_do_not_break_the_stream():
    # The Delphi original closed a valid connection on 1-3 trailing bytes of the next frame.
    stream = encode_frame(b"one") + encode_frame(b"two")
    for extra in (1, 2, 3):
        decoder = FrameDecoder()
        cut = len(encode_frame(b"one")) + extra
        assert decoder.feed(stream[:cut]) == [Frame(b"one")]
        assert decoder.feed(stream[cut:]) == [Frame(b"two")]


def test_ten_thousand_frames_in_one_chunk():
    payloads = [str(i).encode() * (i % 7) for i in range(10_000)]
    blob = b"".join(encode_frame(p) for p in payloads)
    frames = FrameDecoder().feed(blob)
    assert [f.payload for f in frames] == payloads


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=300), st.sampled_from([0, 1, 2])), max_size=30),
       st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=50))
def test_random_splits(messages, cuts):
    blob = b"".join(encode_frame(p, f) for p, f in messages)
    decoder = FrameDecoder()
    out, pos, i = [], 0, 0
    while pos < len(blob):
        step = cuts[i % len(cuts)]
        out += decoder.feed(blob[pos:pos + step])
        pos += step
        i += 1
    assert out == [Frame(p, f) for p, f in messages]
    assert decoder.buffered == 0


def test_bad_magic_detected_from_first_byte():
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError) as err:
        decoder.feed(b"G")
    assert err.value.code is ErrorCode.INVALID_PROTOCOL
    with pytest.raises(ProtocolError):
        decoder.feed(encode_frame(b"later"))  # broken for good


def test_http_request_is_invalid_protocol():
    with pytest.raises(ProtocolError) as err:
        FrameDecoder().feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert err.value.code is ErrorCode.INVALID_PROTOCOL


@pytest.mark.parametrize("flag", [3, 7, 255])
def test_unknown_flag(flag):
    bad = struct.pack("<IIB", MAGIC, 1, flag) + b"x"
    with pytest.raises(ProtocolError) as err:
        FrameDecoder().feed(encode_frame(b"ok") + bad)
    assert err.value.code is ErrorCode.INVALID_PROTOCOL
    assert err.value.frames == [Frame(b"ok")]  # the valid frame before it is not lost


def test_oversize_rejected_from_header_before_payload():
    decoder = FrameDecoder(max_message_size=1024)
    with pytest.raises(ProtocolError) as err:
        decoder.feed(struct.pack("<IIB", MAGIC, 1025, 0))
    assert err.value.code is ErrorCode.MESSAGE_TOO_LARGE
    assert decoder.buffered == 0


def test_four_gib_claim_rejected_without_allocating():
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError) as err:
        decoder.feed(struct.pack("<IIB", MAGIC, 0xFFFFFFFF, 0))
    assert err.value.code is ErrorCode.MESSAGE_TOO_LARGE


def test_exact_limit_is_accepted():
    decoder = FrameDecoder(max_message_size=100)
    assert decoder.feed(encode_frame(b"x" * 100)) == [Frame(b"x" * 100)]


def test_large_frame_in_small_chunks():
    """A 4 MiB frame fed in 1 KiB chunks: buffered incrementally, delivered once, intact."""
    payload = random.Random(7).randbytes(4 << 20)
    blob = encode_frame(payload)
    decoder = FrameDecoder()
    out = []
    for i in range(0, len(blob), 1024):
        out += decoder.feed(blob[i:i + 1024])
        assert decoder.buffered == (i + len(blob[i:i + 1024])) % len(blob)
    assert out == [Frame(payload)]


def test_encode_rejects_bad_flag():
    with pytest.raises(ValueError):
        encode_frame(b"", 256)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=1, max_value=17))
def test_garbage_never_yields_garbage(data, step):
    """Random bytes either decode to well-formed frames or raise ProtocolError."""
    decoder = FrameDecoder(max_message_size=1 << 16)
    try:
        for i in range(0, len(data), step):
            for frame in decoder.feed(data[i:i + step]):
                assert frame.flag in (0, 1, 2)
    except ProtocolError as exc:
        assert exc.code in (ErrorCode.INVALID_PROTOCOL, ErrorCode.MESSAGE_TOO_LARGE)


# -- plain_as_bytes: what the server's connections use ------------------------------------

def _as_items(messages):
    return [p if f == 0 else Frame(p, f) for p, f in messages]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=300), st.sampled_from([0, 0, 1, 2])), max_size=30),
       st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=50),
       st.booleans())
def test_plain_as_bytes_random_splits_and_whole_frames(messages, cuts, whole):
    decoder = FrameDecoder(plain_as_bytes=True)
    out = []
    if whole:  # one frame per chunk: the decoder's one-frame shortcut
        for p, f in messages:
            out += decoder.feed(memoryview(encode_frame(p, f)))
    else:
        blob = b"".join(encode_frame(p, f) for p, f in messages)
        pos, i = 0, 0
        while pos < len(blob):
            step = cuts[i % len(cuts)]
            out += decoder.feed(blob[pos:pos + step])
            pos += step
            i += 1
    assert out == _as_items(messages)
    assert all(type(item) is bytes for item, (_, f) in zip(out, messages) if f == 0)
    assert decoder.buffered == 0


@pytest.mark.parametrize("plain_as_bytes", [False, True])
def test_chunks_on_both_sides_of_the_copy_threshold_from_a_reused_buffer(plain_as_bytes):
    """Chunks up to _COPY_MAX are parsed from one bytes copy, larger ones through a
    memoryview: either way every payload is an independent ``bytes`` object, intact after
    the caller's receive buffer (reused, like the components' scratch) is overwritten."""
    from morsock.protocol import _COPY_MAX
    rng = random.Random(1234)
    sizes = [rng.choice([0, 1, 63, 64, 1000, 9000, 17000, 40000]) for _ in range(300)]
    messages = [(rng.randbytes(n), rng.choice([0, 0, 1, 2])) for n in sizes]
    blob = b"".join(encode_frame(p, f) for p, f in messages)
    scratch = bytearray(64 * 1024)
    view = memoryview(scratch)
    decoder = FrameDecoder(plain_as_bytes=plain_as_bytes)
    out, pos, seen = [], 0, set()
    while pos < len(blob):
        step = rng.choice([1, 9, 100, _COPY_MAX - 1, _COPY_MAX, _COPY_MAX + 1, 30000, 65536])
        chunk = blob[pos:pos + step]
        scratch[:len(chunk)] = chunk
        out += decoder.feed(view[:len(chunk)])
        scratch[:len(chunk)] = b"\xee" * len(chunk)  # the next recv_into overwrites it
        seen.add(min(len(chunk), _COPY_MAX + 1))
        pos += step
    assert {_COPY_MAX, _COPY_MAX + 1} <= seen
    expected = _as_items(messages) if plain_as_bytes else [Frame(p, f) for p, f in messages]
    assert out == expected
    payloads = [item if type(item) is bytes else item.payload for item in out]
    assert all(type(p) is bytes for p in payloads)
    assert decoder.buffered == 0


def test_plain_as_bytes_whole_frame_still_checks_limit_and_magic():
    with pytest.raises(ProtocolError) as err:
        FrameDecoder(max_message_size=100, plain_as_bytes=True).feed(encode_frame(b"x" * 101))
    assert err.value.code is ErrorCode.MESSAGE_TOO_LARGE
    bad = struct.pack("<IIB", MAGIC ^ 1, 3, 0) + b"abc"
    with pytest.raises(ProtocolError) as err:
        FrameDecoder(plain_as_bytes=True).feed(bad)
    assert err.value.code is ErrorCode.INVALID_PROTOCOL
    assert FrameDecoder(max_message_size=3, plain_as_bytes=True).feed(
        encode_frame(b"abc")) == [b"abc"]


def _feed_from_scratch(decoder, chunk):
    """FrameDecoder.feed_buffer as the components call it: *chunk* at the start of a
    larger reused buffer, which is overwritten afterwards (as the next recv_into does)."""
    scratch = bytearray(len(chunk) + 100)
    scratch[:len(chunk)] = chunk
    scratch[len(chunk):] = encode_frame(b"never read") * 5 + b"\xee" * 5
    try:
        return decoder.feed_buffer(memoryview(scratch), len(chunk))
    finally:
        scratch[:] = b"\xee" * len(scratch)


def _feed(decoder, chunk):
    return decoder.feed(memoryview(chunk))


@pytest.mark.parametrize("feed", [_feed, _feed_from_scratch])
@pytest.mark.parametrize("plain_as_bytes", [False, True])
def test_one_whole_frame_per_chunk_of_every_flag(plain_as_bytes, feed):
    """A chunk that is exactly one frame (the decoder's shortcut): encrypted frames come
    out as Frame(payload, flag) in both modes, an unknown flag or an oversize frame is
    refused there as it is inside a longer chunk, and nothing stays buffered."""
    decoder = FrameDecoder(max_message_size=64, plain_as_bytes=plain_as_bytes)
    for flag in (FLAG_MORMOT, FLAG_AUTHENTICATED):
        for payload in (b"", b"x", bytes(range(64))):
            out = feed(decoder, encode_frame(payload, flag))
            assert out == [Frame(payload, flag)]
            assert type(out[0]) is Frame and type(out[0].payload) is bytes
    for payload in (b"", b"x", bytes(range(64))):
        out = feed(decoder, encode_frame(payload))
        assert out == [payload if plain_as_bytes else Frame(payload, FLAG_PLAIN)]
        assert type(out[0]) is (bytes if plain_as_bytes else Frame)
    assert decoder.buffered == 0
    for flag in (3, 4, 255):
        with pytest.raises(ProtocolError) as err:
            feed(FrameDecoder(plain_as_bytes=plain_as_bytes),
                 struct.pack("<IIB", MAGIC, 2, flag) + b"ab")
        assert err.value.code is ErrorCode.INVALID_PROTOCOL
    with pytest.raises(ProtocolError) as err:
        feed(FrameDecoder(max_message_size=64, plain_as_bytes=plain_as_bytes),
             encode_frame(bytes(65), FLAG_MORMOT))
    assert err.value.code is ErrorCode.MESSAGE_TOO_LARGE
    with pytest.raises(ProtocolError) as err:
        feed(FrameDecoder(plain_as_bytes=plain_as_bytes),
             struct.pack("<IIB", MAGIC ^ 1, 2, 0) + b"ab")
    assert err.value.code is ErrorCode.INVALID_PROTOCOL


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=300), st.sampled_from([0, 0, 1, 2])), max_size=30),
       st.lists(st.integers(min_value=1, max_value=700), min_size=1, max_size=50),
       st.booleans())
def test_feed_buffer_from_a_reused_scratch_under_any_split(messages, cuts, plain_as_bytes):
    """feed_buffer(view, n) reads only view[:n] and copies what it returns, whatever the
    split: chunks of one whole frame, several, parts of one, after a partial frame."""
    decoder = FrameDecoder(plain_as_bytes=plain_as_bytes)
    blob = b"".join(encode_frame(p, f) for p, f in messages)
    out, pos, i = [], 0, 0
    while pos < len(blob):
        step = cuts[i % len(cuts)]
        out += _feed_from_scratch(decoder, blob[pos:pos + step])
        pos += step
        i += 1
    assert out == (_as_items(messages) if plain_as_bytes
                   else [Frame(p, f) for p, f in messages])
    assert decoder.buffered == 0
