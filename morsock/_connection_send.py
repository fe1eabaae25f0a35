"""The sending half of a :class:`~morsock.connection.Connection`: frames handed to the
kernel at once when nothing is queued, else queued in its
:class:`~morsock._send_queue.SendQueue`; a strand batch's replies held (corked) and sent
together.

:class:`SendSide` is a base class of :class:`~morsock.connection.Connection` only; it
holds no state of its own (the connection's slots) and reaches the component through the
connection's owner. The socket and the queue are touched under the send lock (the
``*_locked`` methods expect it held); the replies held by a cork belong to the corking
thread and are appended to without it.

Threads: :meth:`SendSide.send_frame` and :meth:`SendSide.send_sealed` from any thread;
:meth:`SendSide.cork`, :meth:`SendSide.uncork`, :meth:`SendSide.send_plain` and
:meth:`SendSide.release_held` on the connection's strand; :meth:`SendSide._flush_locked`
on the reactor thread as well. A send raises NotConnectedError once the connection is
closing, SendBufferFullError when the frame does not fit ``max_send_buffer``; the strand's
reply paths close the connection (SEND_BUFFER_FULL) instead of raising.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from threading import get_ident
from typing import TYPE_CHECKING, Any, Callable, Protocol

from ._send_queue import HEADER_CACHE_MAX, PLAIN_HEADERS, SendQueue, plain_header
from .enums import ErrorCode
from .errors import NotConnectedError, SendBufferFullError

if TYPE_CHECKING:
    import logging

    from ._owner import DataEvents
    from .reactor import Reactor

__all__ = ["SendSide", "SendOwner", "DIRECT_SEND_MIN", "TLS_WRITE_CHUNK", "plain_frame"]

#: Replies at least this large skip the cork and leave at once with sendmsg (no copy).
DIRECT_SEND_MIN = 32 * 1024
#: Most frames sent with one sendmsg (two buffers each; Linux takes at most 1024).
_SENDMSG_MAX_FRAMES = 256
#: Most bytes handed to one ``SSLSocket.send``: OpenSSL writes all or nothing and a retry
#: must repeat the same bytes, so the queue's head is sent in slices of at most this.
TLS_WRITE_CHUNK = 256 * 1024
_TLS_WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError)


def plain_frame(payload: bytes) -> bytes:
    """The plaintext frame of *payload* (``encode_frame(payload)``, with the header looked
    up for short payloads)."""
    return plain_header(len(payload)) + payload


class SendOwner(Protocol):
    """What the send side needs of the connection's owner (a part of
    :class:`~morsock._owner.ConnectionOwner`)."""

    @property
    def log(self) -> logging.Logger:
        """The component's logger."""

    def data_event(self, name: str, conn: Any, nbytes: int) -> None:
        """``on_data_sent`` (*name*) for *nbytes* on the connection *conn*."""

    def watch(self) -> None:
        """Reactor thread: a send was refused; the connection's time limits need
        watching."""


class SendSide:
    """The send methods of :class:`~morsock.connection.Connection` (see the module
    docstring); its state is the connection's."""

    __slots__ = ()

    # The connection's state this side reads and writes (slots of Connection).
    _owner: SendOwner
    _events: DataEvents
    _reactor: Reactor
    _sock: socket.socket
    _tls: bool
    _sendmsg: Callable[[list[bytes]], int] | None
    _send_lock: threading.Lock
    _queue: SendQueue
    _out: bytearray
    _write_armed: bool
    closing: bool

    if TYPE_CHECKING:  # the connection's own methods this side calls
        def close(self, code: ErrorCode | None = None, message: str = "") -> bool: ...

        def describe(self) -> str: ...

        def _arm_write(self) -> None: ...

        def _on_send_error(self) -> None: ...

        def _send_failed(self, exc: OSError) -> NotConnectedError: ...

    def send_frame(self, frame: bytes) -> None:
        """Send one complete frame: written at once if nothing is queued, else queued.

        Raises NotConnectedError when closing or closed, SendBufferFullError when queued
        bytes plus the frame would exceed ``max_send_buffer`` (an empty queue always
        takes the frame). Thread-safe; never blocks on the peer.
        """
        with self._send_lock:
            if self._out or self._queue.corked_by is not None or self.closing:
                sent = self._send_locked(frame)
            else:  # the common case, a call less: nothing queued or held
                sent = self._send_now_locked(frame, 1)
        if sent and self._events.on_data_sent is not None:
            self._owner.data_event("on_data_sent", self, sent)

    def send_sealed(self, seal: Callable[[bytes], bytes], data: bytes, size: int) -> None:
        """Like :meth:`send_frame` with ``seal(data)`` built under the send lock, so frames
        that carry sequence numbers leave in the order they were sealed. *size* is the
        sealed frame's length: a frame refused for a full queue is refused before it is
        sealed, so a refusal uses up no sequence number and leaves the connection as it
        was."""
        with self._send_lock:
            if self.closing:
                raise NotConnectedError(f"{self.describe()} is not connected")
            if not self._queue.fits(size):
                raise self._full_locked()
            sent = self._send_locked(seal(data))
        if sent and self._events.on_data_sent is not None:
            self._owner.data_event("on_data_sent", self, sent)

    def send_plain(self, payload: bytes) -> None:
        """Strand, not corked: send a handler's plaintext reply *payload* (framed here) at
        once, a large one with ``sendmsg`` (no copy). A reply that does not fit the send
        queue disconnects the peer (SEND_BUFFER_FULL); one to a closed connection is
        dropped."""
        n = len(payload)
        try:
            if n >= DIRECT_SEND_MIN and self._sendmsg is not None:
                self.cork()
                self._queue.hold(payload)
                self.uncork()
            else:  # plain_frame(payload), inline: once per reply
                self.send_frame((PLAIN_HEADERS[n] if n < HEADER_CACHE_MAX
                                 else plain_header(n)) + payload)
        except NotConnectedError:
            pass
        except SendBufferFullError as exc:
            self.drop_for_full_queue(exc)

    def release_held(self) -> None:
        """Strand, corked: the held replies grew large; queue (or send) them now. A reply
        that does not fit disconnects the peer (SEND_BUFFER_FULL)."""
        with self._send_lock:
            if self.closing:
                self._queue.take_held()
                return
            try:
                sent = self._release_held_locked()
            except NotConnectedError:
                return
            except SendBufferFullError as exc:
                full: SendBufferFullError | None = exc
                sent = 0
            else:
                full = None
        if sent and self._events.on_data_sent is not None:
            self._owner.data_event("on_data_sent", self, sent)
        if full is not None:
            self.drop_for_full_queue(full)

    def _send_locked(self, frame: bytes) -> int:
        """Send or queue *frame* (under the send lock); count and return the bytes sent."""
        if self.closing:
            raise NotConnectedError(f"{self.describe()} is not connected")
        queue = self._queue
        corked_here = queue.corked_by == get_ident()
        if not self._out and not corked_here:
            return self._send_now_locked(frame, 1)
        if not queue.fits(len(frame)):
            raise self._full_locked()
        sent = 0
        if queue.held and corked_here:
            sent = self._release_held_locked()  # this thread's replies go first
        queue.push(frame)
        return sent

    def _full_locked(self) -> SendBufferFullError:
        """Under the send lock: a frame does not fit; note the stall, return the error."""
        if self._queue.refused(time.monotonic()):
            self._reactor.call_soon(self._owner.watch)
        return SendBufferFullError(
            f"send buffer of {self.describe()} is full ({len(self._out)} bytes queued, "
            f"max_send_buffer={self._queue.limit})")

    def _send_now_locked(self, data: bytes, frames: int) -> int:
        """Under the send lock, nothing queued: send *data* (*frames* whole frames) now,
        queue what the kernel did not take; count and return the bytes sent. Raises
        NotConnectedError if the socket failed (it is then being closed)."""
        try:
            if self._tls and len(data) > TLS_WRITE_CHUNK:
                n = self._sock.send(memoryview(data)[:TLS_WRITE_CHUNK])
            else:
                n = self._sock.send(data)
        except (BlockingIOError, InterruptedError) + _TLS_WANT:
            n = 0
        except OSError as exc:
            raise self._send_failed(exc) from exc
        queue = self._queue
        if n == len(data):  # SendQueue.sent_whole, inline: once per reply
            queue.bytes_sent += n
            queue.stalled_since = None
            queue.messages_sent += frames
            return n
        queue.sent_part(data, n, frames)
        self._reactor.call_soon(self._arm_write)
        return n

    def _release_held_locked(self) -> int:
        """Under the send lock, on the corking thread: queue the held replies in order --
        or, when nothing is queued and they are large, hand them to the kernel at once
        with one scatter/gather ``sendmsg`` (no copy). Returns the bytes sent. Raises
        SendBufferFullError at the first reply that does not fit (the rest are dropped:
        the caller closes the connection), NotConnectedError if the socket failed."""
        queue = self._queue
        size = queue.held_bytes
        held = queue.take_held()
        if (not self._out and size >= DIRECT_SEND_MIN and self._sendmsg is not None
                and len(held) <= 2 * _SENDMSG_MAX_FRAMES):
            return self._send_frames(held, size)
        if not queue.queue_held(held, size):
            raise self._full_locked()
        return 0

    def _send_frames(self, buffers: list[bytes], size: int) -> int:
        """Under the send lock, nothing queued: send the frames of *buffers* (header,
        payload, header, payload ...: *size* bytes in all) with one ``sendmsg``, queue
        what the kernel did not take; count and return the bytes sent."""
        assert self._sendmsg is not None
        sent: int
        try:
            sent = self._sendmsg(buffers)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            raise self._send_failed(exc) from exc
        if sent == size:
            self._queue.sent_whole(sent, len(buffers) // 2)
            return sent
        self._queue.sent_part_of(buffers, sent)
        self._reactor.call_soon(self._arm_write)
        return sent

    def cork(self) -> SendQueue:
        """Strand batch start: until :meth:`uncork`, this thread's sends are held, so the
        replies to a batch of frames leave in one ``send``. Returns the send queue whose
        ``held`` list and ``held_bytes`` the batch runner appends its plaintext replies
        to (:meth:`SendQueue.hold <morsock._send_queue.SendQueue.hold>`'s rule, inline),
        calling :meth:`release_held` once ``held_bytes`` reaches ``HOLD_MAX``. Other
        threads' sends are not held, but queue behind what is held, so the wire order
        stays the call order."""
        queue = self._queue
        queue.corked_by = get_ident()
        return queue

    def uncork(self) -> None:
        """End of a strand batch: queue the replies it held, then send the queue at once if
        the kernel takes it. A reply that overflows ``max_send_buffer`` disconnects the
        peer (SEND_BUFFER_FULL), as :meth:`send_frame` would."""
        full: SendBufferFullError | None = None
        lock = self._send_lock
        lock.acquire()  # not ``with``: pool threads only, see workers.Strand._drain
        try:
            queue = self._queue
            queue.corked_by = None
            held = queue.held
            if held and not self.closing and not self._out and queue.held_bytes < DIRECT_SEND_MIN:
                # The common case in one go: frame the few replies and send them (what
                # the kernel does not take is queued, and EVENT_WRITE armed).
                data = b"".join(held)  # SendQueue.take_held, inline: once per batch
                frames = len(held) // 2
                held.clear()
                queue.held_bytes = 0
                pending = False
                try:
                    sent = self._send_now_locked(data, frames)
                except NotConnectedError:
                    sent = 0  # the socket failed: it is being closed
            else:
                sent, full = self._uncork_locked()
                pending = bool(self._out) and not self._write_armed and not self.closing
        finally:
            lock.release()
        if sent and self._events.on_data_sent is not None:
            self._owner.data_event("on_data_sent", self, sent)
        if pending:
            self._reactor.call_soon(self._arm_write)
        if full is not None:
            self.drop_for_full_queue(full)

    def _uncork_locked(self) -> tuple[int, SendBufferFullError | None]:
        """:meth:`uncork`'s other cases: (bytes sent, the error if a reply did not fit)."""
        sent = 0
        if self._queue.held:
            if self.closing:  # close() from another thread: nothing is sent after it
                self._queue.take_held()
                return 0, None
            try:
                sent = self._release_held_locked()
            except SendBufferFullError as exc:
                return 0, exc
            except NotConnectedError:
                return 0, None  # the socket failed: it is being closed
        if self._out and not self._write_armed and not self.closing:
            sent += self._flush_locked()
        return sent, None

    def drop_for_full_queue(self, exc: SendBufferFullError) -> None:
        """A reply did not fit in the send queue: the peer does not read, so close the
        connection with SEND_BUFFER_FULL (any thread)."""
        self.close(ErrorCode.SEND_BUFFER_FULL, f"{exc}: the peer does not read; disconnected")

    def _flush_locked(self) -> int:
        """Send what the kernel takes from the queue and count it; return the bytes sent."""
        out = self._out
        if not out:
            return 0
        try:
            if self._tls and len(out) > TLS_WRITE_CHUNK:
                with memoryview(out) as view, view[:TLS_WRITE_CHUNK] as head:
                    n = self._sock.send(head)
            else:
                n = self._sock.send(out)
        except (BlockingIOError, InterruptedError) + _TLS_WANT:
            return 0
        except OSError as exc:
            self._owner.log.info("%s: send failed: %s", self, exc)
            self._reactor.call_soon(self._on_send_error)
            return 0
        if n:
            self._queue.took(n)
        return n
