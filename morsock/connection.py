"""One TCP connection's I/O: reading and decoding on the reactor, ordered handling on a
strand, direct writes from any thread with a bounded send queue.

Used by both components: the server makes a :class:`~morsock.ServerClient` (a subclass)
per accepted socket, the client one :class:`Connection` per established connection.

Threads:

* reactor thread -- :meth:`Connection.on_ready` (read, decode, flush the send queue) and
  :meth:`Connection._finish_close`;
* any thread -- :meth:`Connection.send_frame`, :meth:`Connection.send_sealed`,
  :meth:`Connection.close`;
* the strand (one pool thread at a time) -- frames and life-cycle markers, passed to the
  owner's ``_run_item``.

The owner (the component) provides ``_reactor``, ``_pool``, ``_log``, ``_scratch``,
``_scratch_view``, ``_strand_for``, ``_run_item``, ``_report``, ``_connection_closed``, the
``on_data_received`` / ``on_data_sent`` attributes and ``_emit_data_event``.

Statistics: a connection keeps its own counters, each with a single writer -- the
received ones are written by the reactor thread only, the sent ones under the send lock
-- so counting takes no lock of its own; the component adds them up.
"""

from __future__ import annotations

import errno
import socket
import ssl
import sys
import threading
import time
from threading import get_ident
from typing import TYPE_CHECKING, Any, Callable

from .enums import ErrorCode
from .errors import NotConnectedError, ProtocolError, SendBufferFullError
from .protocol import HEADER, HEADER_SIZE, MAGIC, Frame, FrameDecoder
from .reactor import EVENT_READ, EVENT_WRITE, Timer

if TYPE_CHECKING:
    from ._component import Component
    from .crypto import AuthSession

_pack_header = HEADER.pack
_unpack_header = HEADER.unpack_from
#: Replies at least this large skip the cork and leave at once with sendmsg (no copy).
DIRECT_SEND_MIN = 32 * 1024
#: A strand batch holds at most about this many reply bytes before queueing them.
HOLD_MAX = 256 * 1024
#: Most frames sent with one sendmsg (two buffers each; Linux takes at most 1024).
_SENDMSG_MAX_FRAMES = 256
#: Headers of plaintext frames with payloads shorter than this are prebuilt: a lookup
#: costs less than ``HEADER.pack`` for every reply (about 16 against 39 ns). The header
#: of an *n*-byte payload: ``PLAIN_HEADERS[n] if n < HEADER_CACHE_MAX else
#: HEADER.pack(MAGIC, n, 0)`` (written out where it runs once per reply).
HEADER_CACHE_MAX = 512
PLAIN_HEADERS = tuple(_pack_header(MAGIC, n, 0) for n in range(HEADER_CACHE_MAX))

__all__ = ["Connection", "configure_socket", "CONNECTED", "EOF", "DISCONNECTED", "ErrorReport"]

#: Most bytes handed to one ``SSLSocket.send``: OpenSSL writes all or nothing and a retry
#: must repeat the same bytes, so the queue's head is sent in slices of at most this.
TLS_WRITE_CHUNK = 256 * 1024
_TLS_WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError)


class _Marker:
    """A life-cycle item passed through a connection's strand."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


class _CloseAfter(_Marker):
    """Close the connection once the items queued before it are handled -- with *code*
    (``on_error`` reports *message*), or gracefully without one."""

    __slots__ = ("code", "message")

    def __init__(self, name: str, code: ErrorCode | None = None, message: str = "") -> None:
        super().__init__(name)
        self.code = code
        self.message = message


class ErrorReport(_Marker):
    """``on_error`` for this connection, run in the connection's order: after its
    on_connect, never beside its handlers, before its on_disconnect."""

    __slots__ = ("message", "code")

    def __init__(self, message: str, code: int) -> None:
        super().__init__("ERROR")
        self.message = message
        self.code = code


CONNECTED = _Marker("CONNECTED")        # first item of every strand: fire on_connect
EOF = _CloseAfter("EOF")                # the peer closed its side: close after what is queued
DISCONNECTED = _Marker("DISCONNECTED")  # last item: fire on_disconnect


#: Keep-alive defaults: first probe after 10 s idle, then every 5 s, give up after 3.
KEEPALIVE_IDLE = 10
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3


def configure_socket(sock: socket.socket, *, no_delay: bool, keep_alive: bool,
                     keepalive_idle: int = KEEPALIVE_IDLE,
                     keepalive_interval: int = KEEPALIVE_INTERVAL,
                     keepalive_count: int = KEEPALIVE_COUNT) -> None:
    """Make *sock* non-blocking and apply TCP_NODELAY / keep-alive where supported.

    With *keep_alive*, the first probe goes out after *keepalive_idle* seconds without
    traffic, then one every *keepalive_interval* seconds, and the connection is dropped
    after *keepalive_count* unanswered probes. On Linux, TCP_USER_TIMEOUT is also set to
    ``idle + interval * count`` seconds, so data the peer does not acknowledge (or a
    receive window it keeps closed) fails the connection within the same bound instead
    of the kernel's ~15 minutes of retransmissions. A connection dropped that way is
    reported as ``TIMEOUT``. Raises OSError if the socket is already dead.
    """
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if no_delay else 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1 if keep_alive else 0)
    if not keep_alive:
        return
    if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux: unacknowledged data fails in time too
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                        (keepalive_idle + keepalive_interval * keepalive_count) * 1000)
    if hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, keepalive_idle)
    elif sys.platform == "darwin" and hasattr(socket, "TCP_KEEPALIVE"):  # pragma: no cover
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPALIVE, keepalive_idle)
    if hasattr(socket, "TCP_KEEPINTVL"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, keepalive_interval)
    if hasattr(socket, "TCP_KEEPCNT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, keepalive_count)
    ioctl = getattr(sock, "ioctl", None)
    if ioctl is not None and hasattr(socket, "SIO_KEEPALIVE_VALS"):  # pragma: no cover
        ioctl(socket.SIO_KEEPALIVE_VALS,
              (1, keepalive_idle * 1000, keepalive_interval * 1000))


def plain_frame(payload: bytes) -> bytes:
    """The plaintext frame of *payload* (``encode_frame(payload)``, with the header looked
    up for short payloads)."""
    n = len(payload)
    return (PLAIN_HEADERS[n] if n < HEADER_CACHE_MAX else _pack_header(MAGIC, n, 0)) + payload


def _frames_sent(out: bytes | bytearray, n: int, head_left: int) -> tuple[int, int]:
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


class Connection:
    """I/O state of one connected socket (see the module docstring for threads)."""

    # Slots keep an idle connection small (10,000 held connections are a benchmark case);
    # ServerClient adds a __dict__ of its own, so applications may still set attributes.
    # The first 18 are what a request reads and writes (read, hand-off, reply): kept
    # together they span 3 cache lines of the object instead of all 5, which counts with
    # a thousand connections, where a request finds its connection out of the cache.
    __slots__ = ("_owner", "_sock", "_reading", "_tls", "_decoder", "_strand", "frame_hook",
                 "last_activity", "partial_since", "bytes_received", "messages_received",
                 "closing", "_send_lock", "_out", "_cork_owner", "bytes_sent", "messages_sent",
                 "send_stalled_since",
                 "peer_ip", "peer_port", "_reactor", "_queued_frames", "_head_left", "_held",
                 "_held_bytes", "_write_armed", "_broken", "_linger_timer", "_sendmsg",
                 "_read_wants_write", "peer_certificate", "max_send_buffer", "closed",
                 "close_code", "session", "established", "max_receive_backlog",
                 "_rx_log", "_rx_frames", "_rx_bytes", "_rx_done_bytes", "_rx_items",
                 "_rx_markers", "_paused", "_resume_at", "_resume_asked", "_send_paused", "_runner",
                 "__weakref__")

    def __init__(self, owner: Component, sock: socket.socket, *, max_message_size: int,
                 max_send_buffer: int, peer: Any = None) -> None:
        """*peer*: the peer's address as ``accept()`` gave it (else asked of *sock*)."""
        self._owner = owner
        self._sock = sock
        try:
            if peer is None:
                peer = sock.getpeername()
            self.peer_ip: str = str(peer[0])
            self.peer_port: int = int(peer[1])
        except (OSError, IndexError, TypeError):
            self.peer_ip, self.peer_port = "", 0
        self._reactor = owner._reactor
        self._decoder = FrameDecoder(max_message_size,
                                     plain_as_bytes=owner._PLAIN_FRAMES_AS_BYTES)
        self._strand = owner._strand_for(self)
        self._send_lock = threading.Lock()
        self._out = bytearray()
        # _out holds the rest of one frame (_head_left bytes; 0: none) then whole frames:
        # _queued_frames of them in all, counted as sent once their last byte leaves.
        self._queued_frames = 0
        self._head_left = 0
        # Plaintext frames held back by the thread that corked the connection, not yet in
        # _out, as header, payload, header, payload ... (_held_bytes in all). Only that
        # thread touches them: Server._run_items appends; uncork, or a send or close() by
        # that thread, moves them to _out (_release_held_locked).
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._write_armed = False
        self._broken = False            # the socket failed: close without lingering
        self._linger_timer: Timer | None = None  # set while a graceful close drains
        self._cork_owner: int | None = None  # thread whose sends are held until uncork()
        #: TLS: the socket is an ``ssl.SSLSocket``; byte counts are then the application
        #: bytes passed to/from the TLS layer (record overhead not counted).
        self._tls = tls = isinstance(sock, ssl.SSLSocket)
        # scatter/gather send of header + payload (not on Windows, not over TLS)
        self._sendmsg = None if tls else getattr(sock, "sendmsg", None)
        self._reading = True
        self._read_wants_write = False  # TLS: a read must be retried once writable
        #: TLS: the peer's verified certificate (``getpeercert()``), else None.
        self.peer_certificate: dict[str, Any] | None = None
        if tls:
            try:
                self.peer_certificate = sock.getpeercert() or None  # type: ignore[attr-defined]
            except (OSError, ValueError):
                pass
        self.max_send_buffer = max_send_buffer
        # Read back-pressure (see _note_posted / handled): frames read and not yet handled
        # are at most about max_receive_backlog bytes; past it the socket is not read
        # until the handlers caught up to half of it. The reactor thread writes the _rx_
        # counters of what it posted and _paused/_resume_at; the strand writes _rx_items
        # and _rx_markers (every item it ran, and the markers among them).
        self.max_receive_backlog: int = owner.max_receive_backlog
        # (frames posted, bytes) at each read whose frames are not all handled yet
        self._rx_log: list[tuple[int, int]] = []
        self._rx_frames = 0         # frames posted to the strand, in all
        self._rx_bytes = 0          # their wire bytes
        self._rx_done_bytes = 0     # wire bytes of the frames known to be handled
        self._rx_items = 0          # items the strand ran (frames and markers)
        self._rx_markers = 0        # life-cycle markers among them
        self._paused = False        # reading paused: too much read and not yet handled
        self._resume_at = 0         # ... until this many frames have been handled
        self._resume_asked = False
        # Reading paused while the replies queued for the peer pass half of
        # max_send_buffer (a peer that sends faster than it reads): resumed by the reactor
        # once the queue drained to a quarter of it.
        self._send_paused = False
        #: The thread running this connection's items right now (set by the owner's
        #: batch runner), else None.
        self._runner: int | None = None
        #: Set once a close has been asked for; nothing is sent or handled after it.
        self.closing = False
        self.closed = False
        self.close_code: ErrorCode | None = None
        self.session: AuthSession | None = None
        #: False while a client's connection is still in its handshake (client only).
        self.established = True
        #: Reactor-thread hook that sees decoded frames first (the client's handshake).
        self.frame_hook: Callable[[list[Frame]], list[Frame]] | None = None
        self.bytes_received = 0
        self.bytes_sent = 0
        self.messages_received = 0
        self.messages_sent = 0
        self.last_activity = time.monotonic()
        #: monotonic time when the first byte of the frame in progress arrived (or None).
        self.partial_since: float | None = None
        #: monotonic time a frame was first refused for a full send queue since the peer
        #: last took any bytes (None: not stalled). The server disconnects a client that
        #: stays stalled past ``connection_timeout`` (SEND_BUFFER_FULL).
        self.send_stalled_since: float | None = None

    # -- reactor thread ----------------------------------------------------------------
    def start(self, announce: bool = True) -> None:
        """Register with the selector (reactor thread); with *announce*, queue the
        CONNECTED marker (else the owner posts it once the connection is usable)."""
        self._reactor.register(self._sock, EVENT_READ, self._read_callback())
        if announce and self._owner._marker_wanted(CONNECTED):
            self._strand.post(CONNECTED)
        if self._tls:  # bytes that came with the handshake may wait inside the SSL object
            self._reactor.call_soon(self._read_again)

    def _read_callback(self) -> Callable[[int], None]:
        """The selector callback while only reading: the read itself (one call less per
        event), but over TLS :meth:`on_ready`, which knows the handshake's twists."""
        return self.on_ready if self._tls else self._read

    def on_ready(self, mask: int) -> None:
        """Selector callback: read what is ready, flush what is queued."""
        if mask & EVENT_READ and self._reading:
            self._read()
        if mask & EVENT_WRITE and self._read_wants_write and self._reading:
            self._read_wants_write = False
            self._update_interest()
            self._read()
        if (mask & EVENT_WRITE or (self._tls and self._write_armed)) and not self.closed:
            self._flush()  # TLS: a write that wanted to read may go on once readable

    def _read_again(self) -> None:
        if self._reading and not self.closed:
            self._read()

    def _recv_tls(self) -> int:
        """Read decrypted bytes into the scratch buffer until the SSL object has no more
        (or the buffer is full); return how many, 0 at end of stream. Raises
        BlockingIOError when there is nothing now, OSError/ssl.SSLError on failure.
        Reactor thread."""
        sock = self._sock
        view = self._owner._scratch_view
        size = len(view)
        n = 0
        again = eof = False
        with self._send_lock:  # one SSL object: never read and write it concurrently
            while n < size:
                try:
                    m = sock.recv_into(view[n:])
                except ssl.SSLWantWriteError:
                    self._read_wants_write = True
                    break
                except (ssl.SSLWantReadError, BlockingIOError, InterruptedError):
                    break
                except OSError:
                    if not n:
                        raise
                    again = True  # hand over what came first; the next read raises again
                    break
                if not m:
                    eof = not n
                    again = bool(n)  # EOF after data: seen again by the next read
                    break
                n += m
            else:
                again = sock.pending() > 0  # type: ignore[attr-defined]
        if self._read_wants_write:
            self._update_interest()
        if again:
            self._reactor.call_soon(self._read_again)
        elif not n and not eof:
            raise BlockingIOError
        return n

    def _read(self, mask: int = EVENT_READ) -> None:
        """Read once and hand the frames that completed to the strand (reactor thread;
        also the selector callback while only reading, *mask* then unused)."""
        if not self._reading or self._paused or self._send_paused:
            return
        owner = self._owner
        scratch = owner._scratch
        try:
            n = self._recv_tls() if self._tls else self._sock.recv_into(scratch)
        except (BlockingIOError, InterruptedError):
            return
        except ssl.SSLError as exc:
            self.close(ErrorCode.TLS_FAILED, f"TLS error on {self.describe()}: {exc}")
            return
        except OSError as exc:
            self._broken = True
            if exc.errno == errno.ETIMEDOUT:  # keep-alive / TCP_USER_TIMEOUT gave up
                self.close(ErrorCode.TIMEOUT, f"{self.describe()}: connection timed out "
                           f"(no answer to keep-alive or unacknowledged data): {exc}")
                return
            owner._log.info("%s: connection lost: %s", self, exc)
            self.close()
            return
        if n == 0:
            self._stop_reading()
            if self._strand.is_idle():
                self.close()  # nothing left to handle: close now, no hand-off
            else:
                self._strand.post(EOF)  # close once the frames already queued are handled
            return
        self.last_activity = now = self._reactor.now  # when the poll saw the data
        decoder = self._decoder
        partial = decoder.buffered
        try:
            frames = decoder.feed_buffer(owner._scratch_view, n)
        except ProtocolError as exc:
            self.bytes_received += n
            if owner.on_data_received is not None:
                owner._emit_data_event("on_data_received", self, n)
            self._refuse(exc)
            return
        if not decoder._buf:
            self.partial_since = None
        elif frames or self.partial_since is None:
            if self.partial_since is None:
                owner._watch()  # its connection_timeout needs watching
            self.partial_since = now  # the frame in progress started in this chunk
        self.bytes_received += n
        self.messages_received += len(frames)
        if owner.on_data_received is not None:
            owner._emit_data_event("on_data_received", self, n)
        if frames:
            hook = self.frame_hook
            if hook is not None:
                frames = hook(frames)
            if frames:
                self._note_posted(len(frames), n + partial - decoder.buffered)
                self._strand.post_many(frames, True)  # from the poll
                self._check_backlog()

    # -- read back-pressure ------------------------------------------------------------
    def _note_posted(self, frames: int, nbytes: int) -> None:
        """Reactor thread: *frames* frames of *nbytes* wire bytes go to the strand."""
        self._rx_frames += frames
        self._rx_bytes += nbytes
        log = self._rx_log
        if log:  # entries stay only while their frames are unhandled
            self._forget_handled()
        log.append((self._rx_frames, self._rx_bytes))

    def _forget_handled(self) -> int:
        """Reactor thread: drop the log entries whose frames were handled; return the
        receive backlog."""
        handled = self._rx_items - self._rx_markers
        log = self._rx_log
        done = 0
        for frames, nbytes in log:
            if frames > handled:
                break
            self._rx_done_bytes = nbytes
            done += 1
        if done:
            del log[:done]
        return self._rx_bytes - self._rx_done_bytes

    @property
    def receive_backlog(self) -> int:
        """Wire bytes of the frames read from the peer and not yet handled (exact on the
        reactor thread; from another thread it may count up to one more read)."""
        handled = self._rx_items - self._rx_markers
        done = self._rx_done_bytes
        for frames, nbytes in tuple(self._rx_log):  # the reactor may change the list
            if frames > handled:
                break
            done = nbytes
        return self._rx_bytes - done

    def _check_backlog(self) -> None:
        """Reactor thread, after posting frames: pause reading while more than
        ``max_receive_backlog`` bytes wait for the strand (never for one frame alone)."""
        if len(self._out) > self.max_send_buffer // 2 and not self._send_paused:
            self._send_paused = True  # its replies wait: read no more requests for now
            self._update_interest()
        limit = self.max_receive_backlog
        if self._rx_bytes - self._rx_done_bytes <= limit or self._forget_handled() <= limit:
            return
        half = limit // 2
        total = self._rx_bytes
        resume_at = self._rx_frames
        for frames, nbytes in self._rx_log:  # the first point at or below half of it
            if total - nbytes <= half:
                resume_at = frames
                break
        self._resume_at = resume_at
        self._paused = True
        self._update_interest()
        if self._rx_items - self._rx_markers >= resume_at:  # the strand caught up meanwhile
            self._resume_reading()

    def _handled(self, items: int) -> None:
        """Strand thread: *items* more items ran (frames and markers). Asks the reactor
        to read again once the handlers caught up to half of ``max_receive_backlog``."""
        self._rx_items += items
        if (self._paused and not self._resume_asked
                and self._rx_items - self._rx_markers >= self._resume_at):
            self._resume_asked = True
            self._reactor.call_soon(self._resume_reading)

    def _resume_reading(self) -> None:
        """Reactor thread: the strand caught up; read again."""
        self._resume_asked = False
        if not self._paused:
            return
        self._paused = False
        self._read_on()

    def _read_on(self) -> None:
        """Reactor thread: a pause ended; read again unless another still holds."""
        if self._reading and not self.closed and not (self._paused or self._send_paused):
            self._update_interest()
            self._reactor.call_soon(self._read_again)  # TLS: bytes may wait in the SSL object

    def _refuse(self, exc: ProtocolError) -> None:
        """The peer's bytes broke the framing (reactor thread): close with the error's
        code. The whole frames that came before the bad bytes in the same read are
        handled first, as they would be had they come in an earlier read: reading stops
        at once, the close waits behind them in the strand."""
        message = f"{exc} from {self.describe()}"
        frames: list[Any] = exc.frames
        self.messages_received += len(frames)
        hook = self.frame_hook
        if frames and hook is not None:
            frames = hook(frames)
        if not frames or self.closing:
            self.close(exc.code, message)
            return
        self.partial_since = None
        self._stop_reading()
        frames.append(_CloseAfter("REFUSED", exc.code, message))
        self._strand.post_many(frames, True)

    def _stop_reading(self) -> None:
        """Read nothing more from the peer (reactor thread)."""
        self._reading = False
        self._read_wants_write = False
        self._update_interest()

    def _update_interest(self) -> None:
        if self.closed:
            return
        reading = self._reading and not (self._paused or self._send_paused)
        events = ((EVENT_READ if reading else 0)
                  | (EVENT_WRITE if self._write_armed or self._read_wants_write else 0))
        if events == EVENT_READ:
            self._reactor.modify(self._sock, events, self._read_callback())
        elif events:
            self._reactor.modify(self._sock, events, self.on_ready)
        else:
            self._reactor.unregister(self._sock)

    def _arm_write(self) -> None:
        if self.closed or self._write_armed or not self._out:
            return
        self._write_armed = True
        if self._reading and not (self._paused or self._send_paused):
            self._reactor.modify(self._sock, EVENT_READ | EVENT_WRITE, self.on_ready)
        else:
            self._reactor.modify(self._sock, EVENT_WRITE, self.on_ready)

    def _flush(self) -> None:
        with self._send_lock:
            sent = self._flush_locked()
            drained = not self._out
            if self._send_paused and len(self._out) <= self.max_send_buffer // 4:
                self._send_paused = False
                self._reactor.call_soon(self._read_on)
        if sent and self._owner.on_data_sent is not None:
            self._owner._emit_data_event("on_data_sent", self, sent)
        if drained and self._linger_timer is not None:
            self._finish_close()  # a graceful close was waiting for this
        elif drained and self._write_armed:
            self._write_armed = False
            self._update_interest()

    def _on_send_error(self) -> None:
        """Reactor thread: the socket failed while sending; close without lingering."""
        self._broken = True
        if not self.close():
            self._finish_close()  # already closing (lingering): finish now

    def _start_linger(self) -> None:
        """Reactor thread: a graceful close with bytes still queued -- stop reading, let
        the queue drain, then close; give up after ``connection_timeout``."""
        self._reading = False
        self._write_armed = True
        self._reactor.modify(self._sock, EVENT_WRITE, self.on_ready)
        self._linger_timer = self._reactor.call_later(self._owner.connection_timeout,
                                                      self._linger_expired)

    def _linger_expired(self) -> None:
        """Reactor thread: the peer did not take the queue within connection_timeout;
        report what is dropped (``on_error(TIMEOUT)``) and close."""
        if self.closed:
            return
        with self._send_lock:
            frames, nbytes = self._queued_frames, len(self._out)
        self._owner._report(
            self, f"{self.describe()}: {frames} frame(s), {nbytes} bytes queued were not "
                  f"taken by the peer within connection_timeout="
                  f"{self._owner.connection_timeout:g} s; dropped on close", ErrorCode.TIMEOUT)
        self._broken = True
        self._finish_close()

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
            self._owner._log.info("%s: send failed: %s", self, exc)
            self._reactor.call_soon(self._on_send_error)
            return 0
        if not n:
            return 0
        self.send_stalled_since = None
        self.bytes_sent += n
        if n == len(out):
            out.clear()
            self.messages_sent += self._queued_frames
            self._queued_frames = self._head_left = 0
            return n
        done, self._head_left = _frames_sent(out, n, self._head_left)
        del out[:n]
        self._queued_frames -= done
        self.messages_sent += done
        return n

    def _finish_close(self) -> None:
        """Close the socket and notify the owner. A graceful close (no error code, socket
        healthy) with bytes still queued first lets them drain (:meth:`_start_linger`):
        nothing accepted by :meth:`send_frame` is dropped while the peer reads."""
        if self.closed:
            return
        if self._linger_timer is None:
            if self._out and not self._broken and self.close_code is None:
                self._start_linger()
                return
        else:
            self._linger_timer.cancel()
        with self._send_lock:
            self.closed = True  # under the lock: see _post_in_order
            if self._out:
                sent = self._flush_locked()
                if sent and self._owner.on_data_sent is not None:
                    self._owner._emit_data_event("on_data_sent", self, sent)
                if self._out:
                    self._owner._log.info("%s: closed with %d unsent bytes", self, len(self._out))
                    self._out.clear()
        if (self._reading and not (self._paused or self._send_paused)) or self._write_armed:
            self._reactor.unregister(self._sock)
        if self._tls:  # best effort close_notify; never waits for the peer's
            with self._send_lock:
                try:
                    self._sock.unwrap()  # type: ignore[attr-defined]
                except (OSError, ValueError):
                    pass
        self._sock.close()
        self._owner._connection_closed(self)
        if self._owner._marker_wanted(DISCONNECTED) or not self._strand.is_idle():
            # The last item (also when no on_disconnect wants it but items are still
            # running): the owner retires the strand once it ran.
            self._strand.post(DISCONNECTED)
        else:
            self._strand.retire()  # nothing more will run: freed without the collector

    # -- any thread ------------------------------------------------------------------
    def close(self, code: ErrorCode | None = None, message: str = "") -> bool:
        """Close the connection: nothing is sent or handled after this call; the socket is
        closed by the reactor and ``on_disconnect`` fires after the items already running.

        With *code*, ``on_error`` reports *message* first. Returns False if the connection
        was already closing. Thread-safe.
        """
        with self._send_lock:
            if self.closing:
                return False
            if self._held and self._cork_owner == get_ident():
                try:  # replies this thread's batch made before closing still leave
                    self._release_held_locked()
                except (SendBufferFullError, NotConnectedError):
                    pass
            self.closing = True
            self.close_code = code
        if code is not None:
            self._owner._report(self, message, code)
        if self._reactor.in_thread():
            self._finish_close()
        else:
            self._reactor.call_soon(self._finish_close)
        return True

    def send_frame(self, frame: bytes) -> None:
        """Send one complete frame: written at once if nothing is queued, else queued.

        Raises NotConnectedError when closing or closed, SendBufferFullError when queued
        bytes plus the frame would exceed ``max_send_buffer`` (an empty queue always
        takes the frame). Thread-safe; never blocks on the peer.
        """
        with self._send_lock:
            if self._out or self._cork_owner is not None or self.closing:
                sent = self._send_locked(frame)
            else:  # the common case, a call less: nothing queued or held
                sent = self._send_now_locked(frame, 1)
        if sent and self._owner.on_data_sent is not None:
            self._owner._emit_data_event("on_data_sent", self, sent)

    def send_sealed(self, seal: Callable[[bytes], bytes], data: bytes, size: int) -> None:
        """Like :meth:`send_frame` with ``seal(data)`` built under the send lock, so frames
        that carry sequence numbers leave in the order they were sealed. *size* is the
        sealed frame's length: a frame refused for a full queue is refused before it is
        sealed, so a refusal uses up no sequence number and leaves the connection as it
        was."""
        with self._send_lock:
            if self.closing:
                raise NotConnectedError(f"{self.describe()} is not connected")
            out = self._out
            if out and len(out) + size > self.max_send_buffer:
                raise self._full_locked()
            sent = self._send_locked(seal(data))
        if sent and self._owner.on_data_sent is not None:
            self._owner._emit_data_event("on_data_sent", self, sent)

    def _send_locked(self, frame: bytes) -> int:
        """Send or queue *frame* (under the send lock); count and return the bytes sent."""
        if self.closing:
            raise NotConnectedError(f"{self.describe()} is not connected")
        out = self._out
        if out or self._cork_owner == get_ident():
            if out and len(out) + len(frame) > self.max_send_buffer:
                raise self._full_locked()
            sent = 0
            if self._held and self._cork_owner == get_ident():
                sent = self._release_held_locked()  # this thread's replies go first
            out += frame
            self._queued_frames += 1
            return sent
        return self._send_now_locked(frame, 1)

    def _full_locked(self) -> SendBufferFullError:
        """Under the send lock: a frame does not fit; note the stall, return the error."""
        if self.send_stalled_since is None:
            self.send_stalled_since = time.monotonic()
            self._reactor.call_soon(self._owner._watch)
        return SendBufferFullError(
            f"send buffer of {self.describe()} is full ({len(self._out)} bytes queued, "
            f"max_send_buffer={self.max_send_buffer})")

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
        if n == len(data):
            self.bytes_sent += n
            self.send_stalled_since = None
            self.messages_sent += frames
            return n
        done = 0
        if n:
            self.bytes_sent += n
            self.send_stalled_since = None
            done, self._head_left = _frames_sent(data, n, 0)
            self.messages_sent += done
        self._out += memoryview(data)[n:]
        self._queued_frames = frames - done
        self._reactor.call_soon(self._arm_write)
        return n

    def _send_failed(self, exc: OSError) -> NotConnectedError:
        """Under the send lock: the socket failed while a caller sent on it. Close it (no
        lingering) and return the error to raise to that caller."""
        self.closing = True
        self._broken = True
        self._reactor.call_soon(self._finish_close)
        return NotConnectedError(f"{self.describe()}: send failed: {exc}")

    def release_held(self) -> None:
        """Cork owner, mid-batch: queue (or send) the replies held so far, e.g. once they
        pass :data:`HOLD_MAX` bytes. Raises SendBufferFullError / NotConnectedError like
        :meth:`send_frame`."""
        with self._send_lock:
            if self.closing:
                self._held = []
                self._held_bytes = 0
                raise NotConnectedError(f"{self.describe()} is not connected")
            sent = self._release_held_locked()
        if sent and self._owner.on_data_sent is not None:
            self._owner._emit_data_event("on_data_sent", self, sent)

    def _release_held_locked(self) -> int:
        """Under the send lock, on the corking thread: frame the held replies and queue
        them in order -- or, when nothing is queued and they are large, hand them to the
        kernel at once with one scatter/gather ``sendmsg`` (no copy). Returns the bytes
        sent. Raises SendBufferFullError at the first reply that does not fit (the rest
        are dropped: the caller closes the connection), NotConnectedError if the socket
        failed."""
        held = self._held
        size = self._held_bytes
        self._held = []
        self._held_bytes = 0
        out = self._out
        if (not out and size >= DIRECT_SEND_MIN and self._sendmsg is not None
                and len(held) <= 2 * _SENDMSG_MAX_FRAMES):
            return self._send_frames(held, size)
        limit = self.max_send_buffer
        if out and len(out) + size > limit:
            for index in range(0, len(held), 2):
                if len(out) + len(held[index + 1]) + HEADER_SIZE > limit:
                    self._queued_frames += index // 2
                    if self.send_stalled_since is None:
                        self.send_stalled_since = time.monotonic()
                        self._reactor.call_soon(self._owner._watch)
                    raise SendBufferFullError(
                        f"send buffer of {self.describe()} is full ({len(out)} bytes queued, "
                        f"max_send_buffer={limit})")
                out += held[index]
                out += held[index + 1]
        else:
            out += b"".join(held)
        self._queued_frames += len(held) // 2
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
        if sent:
            self.bytes_sent += sent
            self.send_stalled_since = None
        frames = len(buffers) // 2
        if sent == size:
            self.messages_sent += frames
            return sent
        out = self._out
        pos = done = 0
        for index in range(frames):
            payload = buffers[2 * index + 1]
            length = len(payload) + HEADER_SIZE
            if pos + length <= sent:  # this frame left whole
                pos += length
                done += 1
                continue
            skip = sent - pos  # bytes of this frame that left (0 for the ones after it)
            if skip <= 0:
                out += buffers[2 * index]
                out += payload
            else:
                if skip < HEADER_SIZE:
                    out += buffers[2 * index][skip:]
                    out += payload
                else:
                    out += memoryview(payload)[skip - HEADER_SIZE:]
                self._head_left = length - skip
            pos = sent
        self.messages_sent += done
        self._queued_frames = frames - done
        self._reactor.call_soon(self._arm_write)
        return sent

    def cork(self) -> None:
        """Hold this thread's sends in the queue until :meth:`uncork` (strand batch start):
        the replies to a batch of frames leave in one ``send``. Other threads' sends are
        not held, but queue behind what is held, so the wire order stays the call order."""
        self._cork_owner = get_ident()

    def uncork(self) -> None:
        """End of a strand batch: queue the replies it held, then send the queue at once if
        the kernel takes it. A reply that overflows ``max_send_buffer`` disconnects the
        peer (SEND_BUFFER_FULL), as :meth:`send_frame` would."""
        full: SendBufferFullError | None = None
        sent = 0
        pending = False
        lock = self._send_lock
        lock.acquire()  # not ``with``: pool threads only, see workers.Strand._drain
        try:
            self._cork_owner = None
            held = self._held
            if held and not self.closing and not self._out and self._held_bytes < DIRECT_SEND_MIN:
                # The common case in one go: frame the few replies and send them (what the
                # kernel does not take is queued, and EVENT_WRITE armed, by _send_now_locked).
                self._held = []
                self._held_bytes = 0
                try:
                    sent = self._send_now_locked(b"".join(held), len(held) // 2)
                except NotConnectedError:
                    pass  # the socket failed: it is being closed
            else:
                if held:
                    if self.closing:  # close() from another thread: nothing is sent after it
                        self._held = []
                        self._held_bytes = 0
                    else:
                        try:
                            sent = self._release_held_locked()
                        except SendBufferFullError as exc:
                            full = exc
                        except NotConnectedError:
                            pass  # the socket failed: it is being closed
                if self._out and not self._write_armed and not self.closing:
                    sent += self._flush_locked()
                    pending = bool(self._out)
        finally:
            lock.release()
        if sent and self._owner.on_data_sent is not None:
            self._owner._emit_data_event("on_data_sent", self, sent)
        if pending:
            self._reactor.call_soon(self._arm_write)
        if full is not None:
            self.drop_for_full_queue(full)

    def drop_for_full_queue(self, exc: SendBufferFullError) -> None:
        """A reply did not fit in the send queue: the peer does not read, so close the
        connection with SEND_BUFFER_FULL (any thread)."""
        self.close(ErrorCode.SEND_BUFFER_FULL, f"{exc}: the peer does not read; disconnected")

    @property
    def send_queue_size(self) -> int:
        """Bytes accepted but not yet handed to the kernel."""
        return len(self._out)

    # -- strand ----------------------------------------------------------------------
    def _run_item(self, item: Any) -> None:
        if item.__class__ is _CloseAfter:  # EOF, or bad bytes after whole frames
            self._rx_markers += 1
            self.close(item.code, item.message)
            return
        if item.__class__ is ErrorReport:
            self._rx_markers += 1
            self._owner._emit_error(self, item.message, item.code)
            return
        if item is CONNECTED or item is DISCONNECTED:
            self._rx_markers += 1
        elif self.closing:
            return  # frames left behind by a close are dropped, never handled
        self._owner._run_item(self, item)

    def post(self, item: Any) -> None:
        """Queue *item* on this connection's strand (any thread)."""
        self._strand.post(item)

    def _post_in_order(self, item: Any) -> bool:
        """Queue *item* to run in this connection's order, before its DISCONNECTED; return
        False when that already ran or is queued (the caller handles *item* itself).
        On the thread now running this connection's items, False too: it is in order
        there already. Any thread."""
        if self._runner == get_ident():
            return False
        with self._send_lock:
            if self.closed:
                return False
            self._strand.post(item)
            return True

    def describe(self) -> str:
        """``ip:port`` of the peer, for messages."""
        return f"{self.peer_ip}:{self.peer_port}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"
