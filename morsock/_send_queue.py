"""What one connection has to send: a pure object, no socket, no lock, no clock.

:class:`SendQueue` holds the bytes accepted for the peer and not yet taken by the
kernel, and counts what left:

* ``out`` -- a bytearray: the rest of the frame that is partly sent (its last
  ``head_left`` bytes; 0: none), then whole frames, ``frames`` of them in all (the partly
  sent one included). A frame is counted as sent (``messages_sent``) once its last byte
  left; ``bytes_sent`` counts every byte that left, also those sent without queueing.
* ``held`` -- plaintext frames held back while a strand batch is corked (``corked_by``:
  the thread ident of the batch), as header, payload, header, payload ... of
  ``held_bytes`` in all (one list for the queue's life, emptied in place). They are not
  in ``out`` yet and not counted against the limit until :meth:`queue_held` moves them
  there. The corked batch runner appends its replies itself, by :meth:`hold`'s rule
  (see ``Connection.cork``).
* ``limit`` -- ``max_send_buffer``: a frame that would take ``out`` past it is refused
  (:meth:`fits`), except into an empty queue. A refusal changes nothing; the caller
  checks :meth:`fits` *before* it seals a frame, so a refused frame uses up no sequence
  number. ``stalled_since`` remembers when a frame was first refused since the peer last
  took a byte (the caller's clock, passed to :meth:`refused`).
* send back-pressure (docs/guide/flow_control.rst):
  while more than half of ``limit`` waits in ``out``, the
  connection stops reading the peer (:meth:`pause_reading`) until it drained to a quarter
  of it (:meth:`resume_reading`) -- a peer that sends requests faster than it reads the
  replies is slowed down by TCP instead of being dropped.

The caller (:class:`morsock.connection.Connection`) serialises every call under its send
lock and does the system calls; this object only says what to send and keeps the books.
The exception: :meth:`pause_reading` and :meth:`resume_reading` are called by the one
thread that reads the peer (the reactor), which alone writes ``reading_paused``.
Its fields are public so the connection's hot path may read them without a call; they are
written only through the methods below, except ``corked_by`` (the connection's cork) and
the counters of a whole direct send, which the connection writes as :meth:`sent_whole`
does.
"""

from __future__ import annotations

from .protocol import HEADER, HEADER_SIZE, MAGIC

__all__ = ["SendQueue", "frames_sent", "HOLD_MAX", "HEADER_CACHE_MAX", "PLAIN_HEADERS",
           "plain_header"]

_pack_header = HEADER.pack
_unpack_header = HEADER.unpack_from

#: A strand batch holds at most about this many reply bytes before queueing them.
HOLD_MAX = 256 * 1024
#: Headers of plaintext frames with payloads shorter than this are prebuilt (a tuple
#: lookup instead of a ``struct`` pack per reply).
HEADER_CACHE_MAX = 512
PLAIN_HEADERS = tuple(_pack_header(MAGIC, n, 0) for n in range(HEADER_CACHE_MAX))


def plain_header(size: int) -> bytes:
    """The header of a plaintext frame of *size* payload bytes."""
    return PLAIN_HEADERS[size] if size < HEADER_CACHE_MAX else _pack_header(MAGIC, size, 0)


def frames_sent(out: bytes | bytearray | memoryview, n: int, head_left: int) -> tuple[int, int]:
    """For a send queue *out* -- the last *head_left* bytes of one frame, then whole
    frames -- that just sent its first *n* bytes (fewer than all): how many frames that
    completed, and how many bytes are left of the frame then in progress."""
    done = 0
    pos = head_left
    if pos:
        if n < pos:
            return 0, pos - n
        done = 1
    while pos < n:  # a frame (whole, header included) starts at pos
        end = pos + HEADER_SIZE + _unpack_header(out, pos)[1]
        if end > n:
            return done, end - n
        pos = end
        done += 1
    return done, 0


class SendQueue:
    """The send queue of one connection (see the module docstring). Not thread-safe: the
    owner calls it under one lock."""

    __slots__ = ("out", "frames", "head_left", "held", "held_bytes", "corked_by", "limit",
                 "bytes_sent", "messages_sent", "stalled_since", "reading_paused")

    def __init__(self, limit: int) -> None:
        self.out = bytearray()
        self.frames = 0
        self.head_left = 0
        self.held: list[bytes] = []
        self.held_bytes = 0
        self.corked_by: int | None = None
        self.limit = limit
        self.bytes_sent = 0
        self.messages_sent = 0
        self.stalled_since: float | None = None
        #: Reading the peer is paused because too much waits here (see pause_reading).
        self.reading_paused = False

    # -- taking frames ---------------------------------------------------------------
    def fits(self, size: int) -> bool:
        """Whether a frame of *size* bytes may be queued: it fits ``limit``, or the queue
        is empty (an empty queue always takes one frame)."""
        out = self.out
        return not out or len(out) + size <= self.limit

    def refused(self, now: float) -> bool:
        """A frame did not fit at time *now*: note the stall; True if it is a new one (the
        owner then starts watching how long it lasts)."""
        if self.stalled_since is None:
            self.stalled_since = now
            return True
        return False

    def push(self, frame: bytes) -> None:
        """Queue one whole frame behind what is queued (the caller checked :meth:`fits`)."""
        self.out += frame
        self.frames += 1

    def hold(self, payload: bytes) -> bool:
        """Hold the plaintext frame of *payload* for the cork's end; True once the held
        replies reach :data:`HOLD_MAX` bytes (the owner then queues them)."""
        n = len(payload)
        held = self.held
        held.append(PLAIN_HEADERS[n] if n < HEADER_CACHE_MAX else _pack_header(MAGIC, n, 0))
        held.append(payload)
        self.held_bytes += n + HEADER_SIZE
        return self.held_bytes >= HOLD_MAX

    def take_held(self) -> list[bytes]:
        """The held frames (header, payload ...), which this queue forgets: ``held`` is
        emptied in place (a corked batch keeps appending to the same list)."""
        held = self.held
        frames = held.copy()
        held.clear()
        self.held_bytes = 0
        return frames

    def queue_held(self, held: list[bytes], size: int) -> bool:
        """Queue the frames of *held* (as :meth:`take_held` returned them, *size* bytes in
        all) in order. Returns False if one did not fit: those before it are queued, it
        and the rest are not (the owner drops the connection)."""
        out = self.out
        if out and len(out) + size > self.limit:
            limit = self.limit
            for index in range(0, len(held), 2):
                if len(out) + len(held[index + 1]) + HEADER_SIZE > limit:
                    self.frames += index // 2
                    return False
                out += held[index]
                out += held[index + 1]
        else:
            out += b"".join(held)
        self.frames += len(held) // 2
        return True

    # -- what the kernel took ----------------------------------------------------------
    def sent_whole(self, n: int, frames: int) -> None:
        """*frames* whole frames of *n* bytes left without being queued."""
        self.bytes_sent += n
        self.stalled_since = None
        self.messages_sent += frames

    def sent_part(self, data: bytes, n: int, frames: int) -> None:
        """Nothing was queued, and the kernel took only the first *n* bytes of *data*
        (*frames* whole frames): count them and queue the rest."""
        done = 0
        if n:
            self.bytes_sent += n
            self.stalled_since = None
            done, self.head_left = frames_sent(data, n, 0)
            self.messages_sent += done
        self.out += memoryview(data)[n:]
        self.frames = frames - done

    def sent_part_of(self, buffers: list[bytes], n: int) -> None:
        """Nothing was queued, and the kernel took only the first *n* bytes of the frames
        in *buffers* (header, payload, header, payload ...): count them and queue the
        rest."""
        if n:
            self.bytes_sent += n
            self.stalled_since = None
        out = self.out
        frames = len(buffers) // 2
        pos = done = 0
        for index in range(frames):
            payload = buffers[2 * index + 1]
            length = len(payload) + HEADER_SIZE
            if pos + length <= n:  # this frame left whole
                pos += length
                done += 1
                continue
            skip = n - pos  # bytes of this frame that left (0 for the ones after it)
            if skip <= 0:
                out += buffers[2 * index]
                out += payload
            else:
                if skip < HEADER_SIZE:
                    out += buffers[2 * index][skip:]
                    out += payload
                else:
                    out += memoryview(payload)[skip - HEADER_SIZE:]
                self.head_left = length - skip
            pos = n
        self.messages_sent += done
        self.frames = frames - done

    def took(self, n: int) -> None:
        """The kernel took the first *n* bytes of ``out`` (0 < n <= len(out))."""
        out = self.out
        self.stalled_since = None
        self.bytes_sent += n
        if n == len(out):
            out.clear()
            self.messages_sent += self.frames
            self.frames = self.head_left = 0
            return
        done, self.head_left = frames_sent(out, n, self.head_left)
        del out[:n]
        self.frames -= done
        self.messages_sent += done

    def drop(self) -> tuple[int, int]:
        """Forget everything queued and held (the connection closes); return the frames
        and bytes dropped."""
        dropped = self.frames + len(self.held) // 2, len(self.out) + self.held_bytes
        self.out.clear()
        self.frames = self.head_left = 0
        self.take_held()
        return dropped

    # -- send back-pressure (docs/guide/flow_control.rst) -----------------------------------------
    def pause_reading(self) -> bool:
        """True when reading the peer must pause now: more than half of ``limit`` waits
        (and it was not paused yet)."""
        if not self.reading_paused and len(self.out) > self.limit // 2:
            self.reading_paused = True
            return True
        return False

    def resume_reading(self) -> bool:
        """True when a pause of :meth:`pause_reading` ends now: the queue drained to a
        quarter of ``limit``."""
        if self.reading_paused and len(self.out) <= self.limit // 4:
            self.reading_paused = False
            return True
        return False
