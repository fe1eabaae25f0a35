"""The pure send queue and read back-pressure books (morsock/_send_queue.py,
morsock/_receive_backlog.py): no sockets, no threads, no clock."""

from __future__ import annotations

from typing import Callable, List

import pytest

from morsock._receive_backlog import ReceiveBacklog
from morsock._send_queue import HOLD_MAX, SendQueue, frames_sent
from morsock.protocol import HEADER_SIZE, FrameDecoder, encode_frame


def _wire(payload: bytes) -> int:
    return HEADER_SIZE + len(payload)


def _model_frames_sent(lengths: List[int], head_left: int, n: int) -> tuple:
    """Byte-by-byte model of frames_sent: a queue of the *head_left* last bytes of one
    frame, then whole frames of *lengths* (wire lengths)."""
    spans = [(-1, head_left)] if head_left else []  # the head began leaving earlier
    pos = head_left
    for length in lengths:
        spans.append((pos, pos + length))
        pos += length
    done = sum(1 for _, end in spans if end <= n)
    # bytes left of the frame that *started* leaving but did not finish (0: none)
    left = next((end - n for start, end in spans if start < n < end), 0)
    return done, left


def _drain(queue: SendQueue, step: int) -> bytes:
    """Let the 'kernel' take the queue *step* bytes at a time; return what left."""
    wire = b""
    while queue.out:
        n = min(step, len(queue.out))
        wire += bytes(queue.out[:n])
        queue.took(n)
    return wire


def _payloads(wire: bytes) -> List[bytes]:
    return [frame.payload for frame in FrameDecoder(1 << 20).feed(wire)]


def test_frames_sent_matches_a_byte_model_at_every_cut() -> None:
    payloads = [b"", b"a", b"x" * 17, b"y" * 300]
    frames = b"".join(encode_frame(p) for p in payloads)
    lengths = [_wire(p) for p in payloads]
    for head_left in (0, 1, 5, 12):
        out = bytearray(b"\xee" * head_left + frames)  # the head's bytes are never parsed
        for n in range(len(out)):  # fewer than all, as the caller guarantees
            assert frames_sent(out, n, head_left) == _model_frames_sent(lengths, head_left, n)


def test_an_empty_queue_takes_any_frame_and_a_full_one_refuses_without_changing() -> None:
    queue = SendQueue(limit=100)
    assert queue.fits(10_000)  # empty: always one frame
    queue.push(encode_frame(b"x" * 80))
    before = (bytes(queue.out), queue.frames, queue.bytes_sent, queue.messages_sent)
    assert not queue.fits(_wire(b"y" * 20))  # 89 + 29 > 100
    assert queue.fits(_wire(b"y" * 2))       # 89 + 11 == 100
    assert (bytes(queue.out), queue.frames, queue.bytes_sent, queue.messages_sent) == before
    assert queue.refused(now=5.0) is True   # the first refusal starts a stall
    assert queue.refused(now=6.0) is False  # ... which goes on
    assert queue.stalled_since == 5.0
    queue.took(1)                           # the peer took a byte: no longer stalled
    assert queue.stalled_since is None


PARTIAL_PAYLOADS = [b"a" * 20, b"b", b"c" * 5, b"d" * 40]
PARTIAL_STREAM = b"".join(encode_frame(p) for p in PARTIAL_PAYLOADS)


def _direct_send_cut(queue: SendQueue, cut: int) -> None:
    queue.sent_part(PARTIAL_STREAM, cut, len(PARTIAL_PAYLOADS))


def _sendmsg_cut(queue: SendQueue, cut: int) -> None:
    buffers = [part for p in PARTIAL_PAYLOADS
               for part in (encode_frame(p)[:HEADER_SIZE], p)]
    queue.sent_part_of(buffers, cut)


@pytest.mark.parametrize("send_part", [_direct_send_cut, _sendmsg_cut],
                         ids=["direct send", "sendmsg"])
def test_a_partial_send_queues_exactly_the_rest_at_every_cut(
        send_part: Callable[[SendQueue, int], None]) -> None:
    stream = PARTIAL_STREAM
    lengths = [_wire(p) for p in PARTIAL_PAYLOADS]
    for cut in range(len(stream)):
        queue = SendQueue(limit=1 << 20)
        send_part(queue, cut)
        assert bytes(queue.out) == stream[cut:]
        assert (queue.messages_sent, queue.head_left) == _model_frames_sent(lengths, 0, cut)
        assert queue.messages_sent + queue.frames == len(PARTIAL_PAYLOADS)
        assert queue.bytes_sent == cut
        # and the queue's own accounting agrees when the rest leaves in pieces
        assert stream[:cut] + _drain(queue, 7) == stream
        assert queue.messages_sent == len(PARTIAL_PAYLOADS) and queue.frames == 0
        assert queue.bytes_sent == len(stream)


def test_held_replies_leave_in_order_behind_what_was_queued() -> None:
    queue = SendQueue(limit=1 << 20)
    queue.push(encode_frame(b"first"))
    queue.corked_by = 1
    assert queue.hold(b"r1") is False
    assert queue.hold(b"r2") is False
    assert queue.held_bytes == _wire(b"r1") + _wire(b"r2")
    assert queue.frames == 1  # held replies are not queued yet
    size = queue.held_bytes
    assert queue.queue_held(queue.take_held(), size)
    assert queue.held == [] and queue.held_bytes == 0
    assert _payloads(_drain(queue, 3)) == [b"first", b"r1", b"r2"]
    assert queue.messages_sent == 3


def test_hold_says_when_the_held_replies_reach_hold_max() -> None:
    queue = SendQueue(limit=1 << 30)
    payload = b"h" * (HOLD_MAX // 4)
    answers = [queue.hold(payload) for _ in range(4)]
    assert answers == [False, False, False, True]


def test_held_replies_that_overflow_the_queue_count_only_the_frames_queued() -> None:
    """A batch's held replies meet a full queue: those that fit are queued and counted
    (one frame each), the first that does not fit is refused with the rest, and once the
    queue drains the frames that left are exactly the ones counted as sent."""
    queued = [b"q" * 30, b"r" * 30]  # already waiting for the peer
    held = [b"a" * 10, b"b" * 10, b"c" * 10]
    limit = sum(_wire(p) for p in queued + held[:2])  # room for a and b only
    queue = SendQueue(limit)
    for p in queued:
        queue.push(encode_frame(p))
    for p in held:
        queue.hold(p)
    size = queue.held_bytes
    assert queue.queue_held(queue.take_held(), size) is False
    assert bytes(queue.out) == b"".join(encode_frame(p) for p in queued + held[:2])
    assert queue.held == [] and queue.held_bytes == 0
    assert _payloads(_drain(queue, len(queue.out))) == queued + held[:2]
    assert queue.messages_sent == 4 and queue.frames == 0
    assert queue.bytes_sent == limit


def test_drop_reports_what_was_queued_and_held() -> None:
    queue = SendQueue(limit=1 << 20)
    queue.sent_part(encode_frame(b"y" * 10), 4, 1)  # sent directly, partly: rest queued
    queue.push(encode_frame(b"x" * 10))
    queue.hold(b"z")
    assert queue.drop() == (3, _wire(b"x" * 10) + _wire(b"y" * 10) - 4 + _wire(b"z"))
    assert not queue.out and queue.frames == 0 and queue.held == []


def test_reading_pauses_past_half_the_limit_and_resumes_at_a_quarter() -> None:
    queue = SendQueue(limit=400)
    queue.push(b"\0" * 200)
    assert queue.pause_reading() is False     # exactly half: not past it
    queue.push(b"\0" * 1)
    assert queue.pause_reading() is True      # past half: pause, once
    assert queue.pause_reading() is False
    queue.took(100)                           # 101 left: above a quarter
    assert queue.resume_reading() is False
    queue.took(1)                             # 100 left: a quarter
    assert queue.resume_reading() is True
    assert queue.resume_reading() is False    # resumed once
    assert queue.reading_paused is False


# -- read back-pressure -------------------------------------------------------------------
def test_one_frame_is_always_accepted_when_nothing_is_pending() -> None:
    backlog = ReceiveBacklog(limit=100)
    assert backlog.posted(1, 10_000) is True  # over the limit: pause after this read
    backlog = ReceiveBacklog(limit=100)
    assert backlog.posted(1, 100) is False    # at the limit: read on
    assert backlog.size == 100


def test_reading_resumes_once_the_handlers_caught_up_to_half() -> None:
    backlog = ReceiveBacklog(limit=100)
    for _ in range(3):                        # three reads of one 40-byte frame each
        paused = backlog.posted(1, 40)
    assert paused is True and backlog.paused  # 120 > 100
    assert backlog.size == 120
    assert backlog.handled(1) is False        # 80 left: more than half
    assert backlog.handled(1) is True         # 40 left: at most half -> ask to resume
    assert backlog.handled(1) is False        # asked once per pause
    assert backlog.resumed() is True and not backlog.paused
    assert backlog.resumed() is False
    assert backlog.size == 0


def test_markers_are_not_counted_as_handled_frames() -> None:
    backlog = ReceiveBacklog(limit=100)
    backlog.posted(2, 60)
    backlog.markers += 1                      # the strand ran CONNECTED first
    backlog.handled(2)                        # ... and one frame
    assert backlog.size == 60                 # the read's two frames are not all handled
    backlog.handled(1)
    assert backlog.size == 0


def test_a_strand_that_caught_up_during_the_read_means_no_pause() -> None:
    backlog = ReceiveBacklog(limit=100)
    backlog.posted(1, 60)
    backlog.handled(1)                        # handled before the next read is noted
    assert backlog.posted(1, 60) is False and not backlog.paused


@pytest.mark.parametrize("reads", [10, 1000])
def test_the_bookkeeping_stays_small_while_handlers_keep_up(reads: int) -> None:
    backlog = ReceiveBacklog(limit=1 << 20)
    for _ in range(reads):
        backlog.posted(1, 64)
        backlog.handled(1)
    assert backlog.entries() <= 1
    assert backlog.size == 0
