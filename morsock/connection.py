"""One TCP connection's I/O: reading and decoding on the reactor, ordered handling on a
strand, direct writes from any thread with a bounded send queue.

Used by both components: the server makes one :class:`Connection` per accepted socket
(behind its :class:`~morsock.ServerClient` facade), the client one per established
connection. A connection reaches its component only through the
:class:`~morsock._owner.ConnectionOwner` it is given.

Threads:

* reactor thread -- :meth:`Connection.on_ready` (read, decode, flush the send queue) and
  :meth:`Connection._finish_close`;
* any thread -- :meth:`Connection.send_frame`, :meth:`Connection.send_sealed`,
  :meth:`Connection.close`;
* the strand (one pool thread at a time) -- frames and life-cycle markers, passed to the
  owner's ``run_item`` (or taken by the owner's batch runner directly).

Statistics: a connection keeps its own counters, each with a single writer -- the
received ones are written by the reactor thread only, the sent ones (in its
:class:`~morsock._send_queue.SendQueue`) under the send lock -- so counting takes no lock
of its own; the component adds them up.
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

from ._connection_send import SendSide
from ._receive_backlog import ReceiveBacklog
from ._send_queue import SendQueue
from .enums import ErrorCode
from .errors import NotConnectedError, ProtocolError, SendBufferFullError
from .protocol import Frame, FrameDecoder
from .reactor import EVENT_READ, EVENT_WRITE, Timer

if TYPE_CHECKING:
    from ._owner import ConnectionOwner
    from .crypto import AuthSession

__all__ = ["Connection", "configure_socket", "CONNECTED", "EOF", "DISCONNECTED", "ErrorReport"]


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
    if keep_alive:
        _keepalive_timing(sock, keepalive_idle, keepalive_interval, keepalive_count)


def _keepalive_timing(sock: socket.socket, keepalive_idle: int, keepalive_interval: int,
                      keepalive_count: int) -> None:
    """The keep-alive timing of :func:`configure_socket`, with the options this platform
    has."""
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


class Connection(SendSide):
    """I/O state of one connected socket (see the module docstring for threads).

    The owner (:class:`~morsock._owner.ConnectionOwner`) is the only way back to the
    component. The send methods are :class:`~morsock._connection_send.SendSide`'s, the
    send queue and its books a :class:`~morsock._send_queue.SendQueue` (under the send
    lock); the read back-pressure a :class:`~morsock._receive_backlog.ReceiveBacklog`.

    Methods for the owner's strand runner (the thread running this connection's items):
    :meth:`cork` / :meth:`uncork` around a batch, :meth:`send_plain` for a handler's
    plaintext reply, :meth:`run_item` for items that are not frames, :meth:`handled`
    after the batch, ``runner`` set while it runs, :meth:`retire_strand` after the last.
    """

    # Slots keep an idle connection small: a server may hold many thousands of them.
    # The first ones are what a request reads and writes (read, hand-off, reply): kept
    # together they share cache lines of the object.
    __slots__ = ("_owner", "_events", "_sock", "_reading", "_tls", "_decoder", "_strand",
                 "_backlog", "frame_hook", "last_activity", "partial_since",
                 "bytes_received", "messages_received", "closing", "_send_lock", "_out",
                 "_queue", "runner", "facade",
                 "peer_ip", "peer_port", "_reactor", "_write_armed", "_broken",
                 "_linger_timer", "_sendmsg", "_read_wants_write", "peer_certificate",
                 "closed", "close_code", "session", "established", "__weakref__")
    _owner: ConnectionOwner

    def __init__(self, owner: ConnectionOwner, sock: socket.socket, *, max_message_size: int,
                 max_send_buffer: int, peer: Any = None) -> None:
        """*peer*: the peer's address as ``accept()`` gave it (else asked of *sock*)."""
        self._owner = owner
        self._events = owner.events
        self._sock = sock
        try:
            if peer is None:
                peer = sock.getpeername()
            self.peer_ip: str = str(peer[0])
            self.peer_port: int = int(peer[1])
        except (OSError, IndexError, TypeError):
            self.peer_ip, self.peer_port = "", 0
        self._reactor = owner.reactor
        self._decoder = FrameDecoder(max_message_size,
                                     plain_as_bytes=owner.plain_frames_as_bytes)
        #: The object the owner's events pass for this connection (the server's
        #: ServerClient), set by whoever made it; None for the client component.
        self.facade: Any = None
        self._send_lock = threading.Lock()
        self._queue = SendQueue(max_send_buffer)
        self._out = self._queue.out  # the same bytearray, for the hot path's emptiness test
        self._backlog = ReceiveBacklog(owner.max_receive_backlog)
        self._strand = owner.strand_for(self)
        self._write_armed = False
        self._broken = False            # the socket failed: close without lingering
        self._linger_timer: Timer | None = None  # set while a graceful close drains
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
        #: The thread running this connection's items right now (set by the owner's
        #: batch runner), else None.
        self.runner: int | None = None
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
        self.messages_received = 0
        self.last_activity = time.monotonic()
        #: monotonic time when the first byte of the frame in progress arrived (or None).
        self.partial_since: float | None = None

    # -- statistics and limits (any thread) ---------------------------------------------
    @property
    def bytes_sent(self) -> int:
        """Bytes that left for the peer (headers included)."""
        return self._queue.bytes_sent

    @property
    def messages_sent(self) -> int:
        """Frames whose last byte left for the peer."""
        return self._queue.messages_sent

    @property
    def max_send_buffer(self) -> int:
        """Most bytes queued for the peer (``max_send_buffer`` when it connected; a
        session raises it, see :mod:`morsock._session_link`)."""
        return self._queue.limit

    @max_send_buffer.setter
    def max_send_buffer(self, limit: int) -> None:
        self._queue.limit = limit

    @property
    def max_receive_backlog(self) -> int:
        """Most bytes read and not yet handled before reading pauses."""
        return self._backlog.limit

    @property
    def send_stalled_since(self) -> float | None:
        """monotonic time a frame was first refused for a full send queue since the peer
        last took any bytes (None: not stalled). The server disconnects a client that
        stays stalled past ``connection_timeout`` (SEND_BUFFER_FULL)."""
        return self._queue.stalled_since

    @property
    def send_queue_size(self) -> int:
        """Bytes accepted but not yet handed to the kernel."""
        return len(self._out)

    @property
    def receive_backlog(self) -> int:
        """Wire bytes of the frames read from the peer and not yet handled (exact on the
        reactor thread; from another thread it may count up to one more read)."""
        return self._backlog.size

    # -- reactor thread ----------------------------------------------------------------
    def start(self, announce: bool = True) -> None:
        """Register with the selector (reactor thread); with *announce*, queue the
        CONNECTED marker (else the owner posts it once the connection is usable)."""
        self._reactor.register(self._sock, EVENT_READ, self._read_callback())
        if announce and self._owner.marker_wanted(CONNECTED):
            self._strand.post(CONNECTED)
        if self._tls:  # bytes that came with the handshake may wait inside the SSL object
            self._reactor.call_soon(self._read_again)

    def _read_callback(self) -> Callable[[int], None]:
        """The selector callback while only reading: the read itself (one call less per
        event), but over TLS :meth:`on_ready`, which knows the handshake's twists."""
        return self.on_ready if self._tls else self._read

    def on_ready(self, mask: int) -> None:
        """Selector callback: read what is ready, flush what is queued."""
        if mask & EVENT_READ and self._may_read():
            self._read()
        if mask & EVENT_WRITE and self._read_wants_write and self._may_read():
            self._read_wants_write = False
            self._update_interest()
            self._read()
        if (mask & EVENT_WRITE or (self._tls and self._write_armed)) and not self.closed:
            self._flush()  # TLS: a write that wanted to read may go on once readable

    def _may_read(self) -> bool:
        """Whether the peer may be read now: not at its end, not closed, not paused.
        :meth:`_read` is only called where this holds: while it does not, the socket is
        not registered for reading (:meth:`_update_interest`), and the other callers ask."""
        return (self._reading and not self.closed and not self._backlog.paused
                and not self._queue.reading_paused)

    def _read_again(self) -> None:
        if self._may_read():
            self._read()

    def _recv_tls(self) -> int:
        """Read decrypted bytes into the read buffer until the SSL object has no more
        (or the buffer is full); return how many, 0 at end of stream. Raises
        BlockingIOError when there is nothing now, OSError/ssl.SSLError on failure.
        Reactor thread."""
        view = self._owner.read_view
        with self._send_lock:  # one SSL object: never read and write it concurrently
            n, again, eof = self._recv_tls_locked(view)
        if self._read_wants_write:
            self._update_interest()
        if again:
            self._reactor.call_soon(self._read_again)
        elif not n and not eof:
            raise BlockingIOError
        return n

    def _recv_tls_locked(self, view: memoryview) -> tuple[int, bool, bool]:
        """:meth:`_recv_tls`'s reads: (bytes read, read again soon, end of stream)."""
        sock = self._sock
        size = len(view)
        n = 0
        while n < size:
            try:
                m = sock.recv_into(view[n:])
            except ssl.SSLWantWriteError:
                self._read_wants_write = True
                return n, False, False
            except (ssl.SSLWantReadError, BlockingIOError, InterruptedError):
                return n, False, False
            except OSError:
                if not n:
                    raise
                return n, True, False  # hand over what came first; the next read raises
            if not m:  # EOF after data: seen again by the next read
                return n, bool(n), not n
            n += m
        return n, sock.pending() > 0, False  # type: ignore[attr-defined]

    def _read(self, mask: int = EVENT_READ) -> None:
        """Read once and hand the frames that completed to the strand (reactor thread;
        also the selector callback while only reading, *mask* then unused). Only called
        while :meth:`_may_read`."""
        try:
            n = self._recv_tls() if self._tls else self._sock.recv_into(self._owner.read_buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._read_failed(exc)
            return
        if n == 0:
            self._end_of_stream()
            return
        self.last_activity = now = self._reactor.now  # when the poll saw the data
        decoder = self._decoder
        partial = decoder.buffered
        try:
            frames = decoder.feed_buffer(self._owner.read_view, n)
        except ProtocolError as exc:
            self._count_received(n, 0)
            self._refuse(exc)
            return
        left = decoder.buffered
        if left:
            self._frame_started(now, bool(frames))
        else:
            self.partial_since = None
        self.bytes_received += n
        self.messages_received += len(frames)
        if self._events.on_data_received is not None:
            self._owner.data_event("on_data_received", self, n)
        if frames:  # to the strand; pause reading if it, or the peer's replies, lag too far
            hook = self.frame_hook
            if hook is not None:
                frames = hook(frames)
                if not frames:
                    return
            self._strand.post_many(frames, True)  # from the poll (it may keep the list)
            pause = self._backlog.posted(len(frames), n + partial - left)
            if self._out and self._queue.pause_reading():
                pause = True
            if pause:
                self._update_interest()

    def _count_received(self, n: int, frames: int) -> None:
        self.bytes_received += n
        self.messages_received += frames
        if self._events.on_data_received is not None:
            self._owner.data_event("on_data_received", self, n)

    def _frame_started(self, now: float, after_frames: bool) -> None:
        """Reactor thread: a read at *now* ended inside a frame; *after_frames*: whole
        frames came before it in that read. Marks when the frame in progress started
        (its ``connection_timeout`` needs watching)."""
        if self.partial_since is None:
            self._owner.watch()
            self.partial_since = now
        elif after_frames:
            self.partial_since = now  # the frame in progress started in this chunk

    def _read_failed(self, exc: OSError) -> None:
        """Reactor thread: reading raised *exc*: close with what it means."""
        if isinstance(exc, ssl.SSLError):
            self.close(ErrorCode.TLS_FAILED, f"TLS error on {self.describe()}: {exc}")
            return
        self._broken = True
        if exc.errno == errno.ETIMEDOUT:  # keep-alive / TCP_USER_TIMEOUT gave up
            self.close(ErrorCode.TIMEOUT, f"{self.describe()}: connection timed out "
                       f"(no answer to keep-alive or unacknowledged data): {exc}")
            return
        self._owner.log.info("%s: connection lost: %s", self, exc)
        self.close()

    def _end_of_stream(self) -> None:
        """Reactor thread: the peer closed its side."""
        self._stop_reading()
        if self._strand.is_idle():
            self.close()  # nothing left to handle: close now, no hand-off
        else:
            self._strand.post(EOF)  # close once the frames already queued are handled

    # -- read back-pressure ------------------------------------------------------------
    def handled(self, items: int) -> None:
        """Strand: *items* more items ran (frames and markers); once the handlers caught
        up to half of ``max_receive_backlog``, the reactor reads again."""
        backlog = self._backlog  # ReceiveBacklog.handled, inline: once per batch
        backlog.items += items
        if backlog.paused and backlog.resume_due():
            self._reactor.call_soon(self._resume_reading)

    def _resume_reading(self) -> None:
        """Reactor thread: the strand caught up; read again."""
        if self._backlog.resumed():
            self._read_on()

    def _read_on(self) -> None:
        """Reactor thread: a pause ended; read again unless another still holds."""
        if self._reading and not self.closed and not self._read_paused():
            self._update_interest()
            self._reactor.call_soon(self._read_again)  # TLS: bytes may wait in the SSL object

    def _read_paused(self) -> bool:
        return self._backlog.paused or self._queue.reading_paused

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
        reading = self._reading and not self._read_paused()
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
        self._update_interest()

    def _flush(self) -> None:
        with self._send_lock:
            sent = self._flush_locked()
            drained = not self._out
            resume = self._queue.resume_reading()
        if resume:
            self._reactor.call_soon(self._read_on)
        if sent and self._events.on_data_sent is not None:
            self._owner.data_event("on_data_sent", self, sent)
        if drained and self._linger_timer is not None:
            self._finish_close()  # a graceful close was waiting for this
        elif drained and self._write_armed:
            self._write_armed = False
            self._update_interest()

    def _send_failed(self, exc: OSError) -> NotConnectedError:
        """Under the send lock: the socket failed while a caller sent on it. Close it (no
        lingering) and return the error to raise to that caller."""
        self.closing = True
        self._broken = True
        self._reactor.call_soon(self._finish_close)
        return NotConnectedError(f"{self.describe()}: send failed: {exc}")

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
            frames, nbytes = self._queue.frames, len(self._out)
        timeout = self._owner.connection_timeout
        self._owner.report(
            self, f"{self.describe()}: {frames} frame(s), {nbytes} bytes queued were not "
                  f"taken by the peer within connection_timeout={timeout:g} s; dropped on "
                  f"close", ErrorCode.TIMEOUT)
        self._broken = True
        self._finish_close()

    def _finish_close(self) -> None:
        """Close the socket and notify the owner. A graceful close (no error code, socket
        healthy) with bytes still queued first lets them drain (:meth:`_start_linger`):
        nothing accepted by :meth:`send_frame` is dropped while the peer reads."""
        if self.closed or self._linger_first():
            return
        with self._send_lock:
            self.closed = True  # under the lock: see post_in_order
            sent = self._flush_locked() if self._out else 0
            frames, unsent = self._queue.drop()
        if sent and self._events.on_data_sent is not None:
            self._owner.data_event("on_data_sent", self, sent)
        if unsent:
            self._owner.log.info("%s: closed with %d unsent bytes", self, unsent)
        self._close_socket()
        self._owner.connection_closed(self)
        self._post_last()

    def _post_last(self) -> None:
        """Reactor thread, the socket closed: the strand's last item."""
        if self._owner.marker_wanted(DISCONNECTED) or not self._strand.is_idle():
            # The last item (also when no on_disconnect wants it but items are still
            # running): the owner retires the strand once it ran.
            self._strand.post(DISCONNECTED)
        else:
            self.retire_strand()  # nothing more will run: freed without the collector

    def _linger_first(self) -> bool:
        """Reactor thread, closing: True when a graceful close (no error code, socket
        healthy) must first let the queue drain (lingering starts now); ends a linger
        that was under way."""
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            return False
        if self._out and not self._broken and self.close_code is None:
            self._start_linger()
            return True
        return False

    def _close_socket(self) -> None:
        """Reactor thread: unregister and close the socket (TLS: close_notify first)."""
        if (self._reading and not self._read_paused()) or self._write_armed:
            self._reactor.unregister(self._sock)
        if self._tls:  # best effort close_notify; never waits for the peer's
            with self._send_lock:
                try:
                    self._sock.unwrap()  # type: ignore[attr-defined]
                except (OSError, ValueError):
                    pass
        self._sock.close()

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
            if self._queue.held and self._queue.corked_by == get_ident():
                try:  # replies this thread's batch made before closing still leave
                    self._release_held_locked()
                except (SendBufferFullError, NotConnectedError):
                    pass
            self.closing = True
            self.close_code = code
        if code is not None:
            self._owner.report(self, message, code)
        if self._reactor.in_thread():
            self._finish_close()
        else:
            self._reactor.call_soon(self._finish_close)
        return True

    # -- strand ----------------------------------------------------------------------
    def run_item(self, item: Any) -> None:
        """Strand: one item -- a life-cycle marker, or a frame for the owner."""
        cls = item.__class__
        if cls is _CloseAfter:  # EOF, or bad bytes after whole frames
            self._backlog.markers += 1
            self.close(item.code, item.message)
            return
        if cls is ErrorReport:
            self._backlog.markers += 1
            self._owner.emit_error(self, item.message, item.code)
            return
        if item is CONNECTED or item is DISCONNECTED:
            self._backlog.markers += 1
        elif self.closing:
            return  # frames left behind by a close are dropped, never handled
        self._owner.run_item(self, item)

    def post(self, item: Any) -> None:
        """Queue *item* on this connection's strand (any thread)."""
        self._strand.post(item)

    def retire_strand(self) -> None:
        """After the DISCONNECTED marker ran (strand), or once closed with nothing left
        to run (reactor thread): nothing more will be posted. Drops the references back
        to the owner's side (strand target, facade), so a closed connection and its
        facade are freed without the garbage collector."""
        self._strand.retire()
        self.facade = None

    def post_in_order(self, item: Any) -> bool:
        """Queue *item* to run in this connection's order, before its DISCONNECTED; return
        False when that already ran or is queued (the caller handles *item* itself).
        On the thread now running this connection's items, False too: it is in order
        there already. Any thread."""
        if self.runner == get_ident():
            return False
        with self._send_lock:
            if self.closed:
                return False
            self._strand.post(item)
            return True

    def adopt(self, other: Connection) -> None:
        r"""Reactor thread, a session resumed (see :mod:`morsock._session_link`): this
        connection, closed, takes over the socket and I/O state of *other* -- accepted,
        not reading anywhere yet -- which is then closed without a trace. This one keeps
        its strand, facade and read accounting, so its items run on, in order. The caller
        then starts it."""
        with self._send_lock, other._send_lock:
            self._sock = other._sock
            self.peer_ip, self.peer_port = other.peer_ip, other.peer_port
            self._tls = other._tls
            self._sendmsg = other._sendmsg
            self._decoder = other._decoder
            self.peer_certificate = other.peer_certificate
            self._queue, other._queue = other._queue, SendQueue(other._queue.limit)
            self._out, other._out = self._queue.out, other._queue.out
            self._write_armed = self._broken = False
            self._linger_timer = None
            self.session = other.session
            self.established = True
            self.bytes_received = other.bytes_received
            self.messages_received = other.messages_received
            self.last_activity = other.last_activity
            self.partial_since = None
            self._reading = True
            self._read_wants_write = False
            self._backlog.unpause()
            self.close_code = None
            self.closed = self.closing = False
            other.closing = other.closed = True
            other.frame_hook = None

    def describe(self) -> str:
        """``ip:port`` of the peer, for messages."""
        return f"{self.peer_ip}:{self.peer_port}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"
