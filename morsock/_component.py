"""What the server and client components share: settings, statistics, event dispatch,
the encryption context, and turning frames into data (and data into frames).

Not public: :class:`~morsock.Server` and :class:`~morsock.Client` are the facades.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
import time
from collections.abc import Iterable
from operator import attrgetter
from time import perf_counter
from typing import TYPE_CHECKING, Any, Callable, Union

from ._internals import level_cache
from ._settings import (
    Setting,
    _boolean,
    _enum,
    _event_queue,
    _logger,
    _passphrase,
    _positive_int,
    _seconds,
    _ssl_context,
)
from .connection import Connection
from .enums import AESMode, EncryptionProfile, ErrorCode, KeySize
from .errors import (
    CryptoError,
    MorsockError,
    NotConnectedError,
    ProtocolError,
    SendBufferFullError,
)
from .events import EventDispatcher, EventQueue
from .protocol import FLAG_MORMOT, FLAG_PLAIN, HEADER_SIZE, Frame, encode_frame
from .reactor import Reactor
from .workers import WorkerPool

if TYPE_CHECKING:
    from ._owner import DataEvents, StrandLike

__all__ = ["Component", "ComponentLink", "Setting", "CryptoContext", "as_bytes"]

_LOGGER = logging.getLogger("morsock")
Data = Union[bytes, bytearray, memoryview, str]


def as_bytes(data: Data) -> bytes:
    """Payload bytes of *data*; ``str`` is sent as UTF-8 (as the Delphi components do)."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"data must be bytes-like or str, not {type(data).__name__}")


_COUNTERS = tuple(attrgetter(name) for name in
                  ("bytes_received", "bytes_sent", "messages_received", "messages_sent"))


class Tally:
    """A component's statistics totals, exact at every moment without a lock per byte:
    each connection counts its own traffic (see :mod:`morsock.connection`); a total is
    what closed connections had counted plus what the live ones hold now, less the offset
    :meth:`clear` leaves. *live* returns the live connections; it is called, and
    :meth:`closed` must be called, under *lock*. Index 0..3: bytes received, bytes sent,
    messages received, messages sent."""

    def __init__(self, lock: Any, live: Callable[[], Iterable[Connection]]) -> None:
        self._lock = lock
        self._live = live
        self._closed = [0, 0, 0, 0]
        self._offset = [0, 0, 0, 0]

    def clear(self) -> None:
        """Start every total from zero again; live connections' own counters go on."""
        with self._lock:
            live = list(self._live())
            self._closed = [0, 0, 0, 0]
            self._offset = [sum(map(get, live)) for get in _COUNTERS]

    def closed(self, conn: Connection) -> None:
        """*conn* just left the live set (its counters are final): keep its counts."""
        closed = self._closed
        for index, get in enumerate(_COUNTERS):
            closed[index] += get(conn)

    def total(self, index: int) -> int:
        """One total (see the class docstring for *index*). Any thread."""
        with self._lock:
            live = sum(map(_COUNTERS[index], self._live()))
            return int(self._closed[index] + live - self._offset[index])


def describe_encryption(key: str, mode: AESMode, key_size: KeySize,
                        profile: EncryptionProfile) -> str:
    """``"AES-256-CBC"`` (``"AES-256-CBC (MORMOT)"`` in that profile) or ``"DISABLED"``."""
    if not key:
        return "DISABLED"
    text = f"AES-{int(key_size)}-{mode.value}"
    return text + (" (MORMOT)" if profile is EncryptionProfile.MORMOT else "")


class CryptoContext:
    """The encryption settings of a running component, with keys derived once."""

    def __init__(self, key: str, mode: AESMode, key_size: KeySize,
                 profile: EncryptionProfile) -> None:
        self.key = key
        self.mode = mode
        self.key_size = key_size
        self.profile = profile
        self.mormot: Any = None
        if key and profile is EncryptionProfile.MORMOT:
            from .crypto import MormotCipher
            self.mormot = MormotCipher(key, mode, key_size)
        elif key:
            from .crypto import authenticated_master_key
            authenticated_master_key(key)  # stretch once, now, not on the first connection

    @property
    def enabled(self) -> bool:
        return bool(self.key)

    @property
    def authenticated(self) -> bool:
        return bool(self.key) and self.profile is EncryptionProfile.AUTHENTICATED



#: Bytes the reactor thread reads at once (one buffer per component, reused by every read).
READ_BUFFER_SIZE = 256 * 1024


class ComponentLink:
    """A component as its connections see it: the
    :class:`~morsock._owner.ConnectionOwner` each :class:`~morsock.connection.Connection`
    is given, over the component's own (private) hooks. One per component, made with it;
    its read buffer serves every connection of the component (reactor thread only)."""

    __slots__ = ("_component", "events", "read_buffer", "read_view", "plain_frames_as_bytes")

    def __init__(self, component: Component) -> None:
        self._component = component
        self.events: DataEvents = component
        self.read_buffer = bytearray(READ_BUFFER_SIZE)
        self.read_view = memoryview(self.read_buffer)
        self.plain_frames_as_bytes = component._PLAIN_FRAMES_AS_BYTES

    @property
    def reactor(self) -> Reactor:
        reactor: Reactor = self._component._reactor
        return reactor

    @property
    def log(self) -> logging.Logger:
        return self._component._log

    @property
    def connection_timeout(self) -> float:
        return self._component.connection_timeout

    @property
    def max_receive_backlog(self) -> int:
        return self._component.max_receive_backlog

    def strand_for(self, conn: Connection) -> StrandLike:
        strand: StrandLike = self._component._strand_for(conn)
        return strand

    def marker_wanted(self, marker: Any) -> bool:
        return self._component._marker_wanted(marker)

    def run_item(self, conn: Connection, item: Any) -> None:
        self._component._run_item(conn, item)

    def emit_error(self, conn: Connection, message: str, code: int) -> None:
        self._component._emit_error(conn, message, code)

    def report(self, conn: Connection | None, message: str, code: int) -> None:
        self._component._report(conn, message, code)

    def data_event(self, name: str, conn: Connection, nbytes: int) -> None:
        self._component._emit_data_event(name, conn, nbytes)

    def watch(self) -> None:
        self._component._watch()

    def connection_closed(self, conn: Connection) -> None:
        self._component._connection_closed(conn)


class Component:
    """Base of Server and Client (see their docstrings for the public surface)."""

    # Settings both components have.
    connection_timeout: Setting[float] = Setting(
        10.0, _seconds, live=True,
        doc="Seconds: the bound of a connect attempt (client), of a TLS handshake, and of a "
            "frame once its first byte arrived; past it the connection fails (TIMEOUT).")
    events_use_main_thread: Setting[bool] = Setting(
        False, _boolean,
        doc="Run every event except on_handle_command on the thread that pumps "
            "event_queue (EventQueue.pump, morsock.tk.attach), not on library threads.")
    event_queue: Setting[EventQueue | None] = Setting(
        None, _event_queue,
        doc="The EventQueue of events_use_main_thread (None: EventQueue.default()).")
    encryption_key: Setting[str] = Setting(
        "", _passphrase,
        doc="Passphrase of the per-message AES encryption (empty: no encryption); the "
            "keys are derived from it once, at start.")
    encryption_mode: Setting[AESMode] = Setting(
        AESMode.CBC, _enum(AESMode.parse), doc="AES mode: an AESMode or its name ('cbc', 'amCBC').")
    encryption_key_size: Setting[KeySize] = Setting(
        KeySize.AES256, _enum(KeySize.parse), doc="AES key size: a KeySize or 128, 192, 256.")
    encryption_profile: Setting[EncryptionProfile] = Setting(
        EncryptionProfile.AUTHENTICATED, _enum(EncryptionProfile.parse),
        doc="AUTHENTICATED (flag 2: authenticated, replay-proof) or MORMOT (flag 1: "
            "byte-compatible with the Delphi components, unauthenticated).")
    require_encryption: Setting[bool] = Setting(
        False, _boolean, live=True,
        doc="Refuse plaintext frames: a peer that sends one is disconnected "
            "(ENCRYPTION_REQUIRED).")
    keep_alive: Setting[bool] = Setting(
        True, _boolean, doc="TCP keep-alive on every socket (timing: the keepalive_* settings).")
    #: Keep-alive timing (whole seconds, applied to every socket when ``keep_alive``):
    #: first probe after ``keepalive_idle`` (default 10) idle seconds, then one every
    #: ``keepalive_interval`` (5), dropped after ``keepalive_count`` (3) unanswered probes;
    #: on Linux unacknowledged data also fails after idle + interval * count (25 s).
    keepalive_idle: Setting[int] = Setting(
        10, _positive_int, doc="Seconds without traffic before the first keep-alive probe.")
    keepalive_interval: Setting[int] = Setting(
        5, _positive_int, doc="Seconds between keep-alive probes.")
    keepalive_count: Setting[int] = Setting(
        3, _positive_int,
        doc="Unanswered keep-alive probes after which the connection fails (TIMEOUT).")
    no_delay: Setting[bool] = Setting(
        True, _boolean, doc="TCP_NODELAY on every socket: small messages leave at once.")
    max_message_size: Setting[int] = Setting(
        16 * 1024 * 1024, _positive_int,
        doc="Largest payload accepted from a peer, in bytes, checked from the frame header "
            "before anything is allocated (a larger frame: MESSAGE_TOO_LARGE).")
    max_send_buffer: Setting[int] = Setting(
        8 * 1024 * 1024, _positive_int, live=True,
        doc="Most bytes queued for one connection: past it send_data raises "
            "SendBufferFullError (an empty queue always takes one frame).")
    max_receive_backlog: Setting[int] = Setting(
        1024 * 1024, _positive_int,
        doc="Most bytes of frames read from one connection and not yet handled: past it "
            "that socket is not read until its handler has caught up to half of it, so "
            "TCP slows the sender down (one frame is always accepted).")
    ssl_context: Setting[Any] = Setting(
        None, _ssl_context, doc="An ssl.SSLContext: every connection is TLS (None: plain TCP).")
    logger: Setting[logging.Logger | None] = Setting(
        None, _logger, doc="The logger of this component (None: logging.getLogger('morsock')).")

    #: Set by :func:`morsock.metrics.register` (None: no metrics). The components call
    #: ``_observer.handler_done(seconds, calls)`` after ``on_handle_command`` calls (their
    #: duration, also when one raised; a server's batch of plaintext frames at once) and
    #: ``_observer.error(code)`` wherever ``on_error`` is reported; while it is None the
    #: hot path pays an ``is not None`` check.
    _observer: Any = None
    #: (handler, observer, the handler timed for it): see _observed
    _timed: tuple[Any, Any, Callable[..., Any]] | None = None
    #: The time base of the reactor's timers (a test sets a VirtualClock on an instance
    #: before it starts, and moves it itself).
    _clock: Callable[[], float] = staticmethod(time.monotonic)
    _EVENTS: tuple[str, ...] = ()
    #: Strand items for plaintext frames are their payloads (``bytes``), not Frames.
    _PLAIN_FRAMES_AS_BYTES = False
    # set by __init__ from _EVENTS; read by every connection, so declared here
    on_data_received: Callable[..., Any] | None
    on_data_sent: Callable[..., Any] | None

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        self = super().__new__(cls)
        Setting.fill_defaults(self)  # before any __init__ reads a setting
        return self

    def __init__(self, settings: dict[str, Any], events: dict[str, Any]) -> None:
        self._lock = threading.RLock()           # guards life cycle and the client set
        self._stats_lock = threading.Lock()      # guards every statistics counter
        self._reactor: Any = None
        self._pool: Any = None
        self._crypto: CryptoContext | None = None
        #: What every connection of this component knows of it (see ComponentLink).
        self._conn_owner = ComponentLink(self)
        for name in self._EVENTS:
            setattr(self, name, None)
        for name, value in settings.items():
            setattr(self, name, value)
        for name, value in events.items():
            if name not in self._EVENTS:
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword "
                                f"argument {name!r}")
            setattr(self, name, value)
        self._dispatcher = EventDispatcher(self, None, self._handler_failed, self._log)
        self._debug = functools.partial(self._log.isEnabledFor, logging.DEBUG)

    # -- helpers for subclasses --------------------------------------------------------
    def _is_running(self) -> bool:
        raise NotImplementedError

    def _own_run(self) -> WorkerPool | None:
        """The pool of the current run when the caller is one of that run's threads (its
        reactor thread or a worker: a handler in direct event mode), else None. Such a
        caller must not wait for the run to stop, nor for work the run would do next."""
        reactor, pool = self._reactor, self._pool
        if reactor is not None and (reactor.in_thread() or pool.owns_current_thread()):
            return pool  # type: ignore[no-any-return]
        return None

    def _before_change(self, name: str) -> None:
        """A setting that is not ``live`` is being assigned while :meth:`_is_running`:
        raise MorsockError, or make the change safe (caller's thread)."""
        raise MorsockError(f"{type(self).__name__}.{name} cannot change while it is "
                           f"active; stop it first")

    @property
    def _log(self) -> logging.Logger:
        return self.__dict__.get("_setting_logger") or _LOGGER

    def _prepare_runtime(self, name: str, pool_size: int, leader_follower: bool = False) -> None:
        """Build crypto context, dispatcher, reactor and pool (not started). With
        *leader_follower* the pool threads run the reactor (no reactor thread)."""
        self._crypto = CryptoContext(self.encryption_key, self.encryption_mode,
                                     self.encryption_key_size, self.encryption_profile)
        queue = None
        if self.events_use_main_thread:
            # not ``or``: an empty EventQueue is falsy (it has __len__)
            queue = self.event_queue if self.event_queue is not None else EventQueue.default()
        self._dispatcher = EventDispatcher(self, queue, self._handler_failed, self._log)
        #: ``self._debug()``: whether the component's logger takes per-message DEBUG records
        self._debug = functools.partial(self._log.isEnabledFor, logging.DEBUG)
        #: ``isEnabledFor(level)``'s answers (see :func:`morsock._internals.level_cache`):
        #: lets the per-message and per-connection paths skip a log call.
        self._log_levels = level_cache(self._log)
        #: every connection's strand runner (one bound method for all: see Strand's target)
        self._batch_runner = self._run_items
        self._reactor = Reactor(f"{name}-reactor", self._log, clock=self._clock)
        self._pool = WorkerPool(pool_size, f"{name}-worker", self._log,
                                self._reactor if leader_follower else None)

    def _observed(self, handler: Callable[..., Any] | None) -> Callable[..., Any] | None:
        """*handler* (``on_handle_command``) timed for the observer, each call recorded
        into the calling thread's shard; itself when there is no observer or no handler.
        Made once per handler and observer, then reused (any strand thread)."""
        observer = self._observer
        if observer is None or handler is None:
            return handler
        made = self._timed
        if made is not None and made[0] is handler and made[1] is observer:
            return made[2]
        shard = observer.shard  # a threading.local: the calling thread's recorder

        def timed(*args: Any) -> Any:
            start = perf_counter()
            try:
                return handler(*args)
            finally:
                shard.handler_done(perf_counter() - start)
        self._timed = (handler, observer, timed)
        return timed

    def _emit(self, name: str, *args: Any) -> None:
        self._dispatcher.emit(name, *args)

    def _live_connections(self) -> list[Connection]:
        """A snapshot of the connections counted in the statistics (any thread)."""
        raise NotImplementedError

    def _receive_backlog_bytes(self) -> int:
        """Bytes of frames read and not yet handled, over every live connection (any
        thread; see :attr:`Connection.receive_backlog`)."""
        return sum(conn.receive_backlog for conn in self._live_connections())

    def _send_queue_bytes(self) -> int:
        """Bytes accepted for sending and not yet taken by the kernel, over every live
        connection (any thread)."""
        return sum(conn.send_queue_size for conn in self._live_connections())

    def _handler_failed(self, name: str, exc: BaseException, args: tuple[Any, ...] = ()) -> None:
        """A handler raised: report ``HANDLER_EXCEPTION`` (*args*: the event's arguments)."""
        raise NotImplementedError

    def _report(self, conn: Connection | None, message: str, code: int) -> None:
        raise NotImplementedError

    def _watch(self) -> None:
        """Reactor thread: a connection has a frame in progress or a refused send, so its
        time limits need watching (the server's sweep; the client has none)."""

    def _emit_error(self, conn: Connection, message: str, code: int) -> None:
        """A connection's ordered ``on_error`` (see :class:`~morsock.connection.ErrorReport`)."""
        raise NotImplementedError

    def _configure(self, sock: socket.socket) -> None:
        """Socket options from the settings (non-blocking, TCP_NODELAY, keep-alive)."""
        from .connection import configure_socket
        configure_socket(sock, no_delay=self.no_delay, keep_alive=self.keep_alive,
                         keepalive_idle=self.keepalive_idle,
                         keepalive_interval=self.keepalive_interval,
                         keepalive_count=self.keepalive_count)

    @property
    def encryption_info(self) -> str:
        """The cipher in use, e.g. ``"AES-256-CBC"``, or ``"DISABLED"`` without a key."""
        return describe_encryption(self.encryption_key, self.encryption_mode,
                                   self.encryption_key_size, self.encryption_profile)

    # -- frames in -------------------------------------------------------------------
    def _open_frame(self, conn: Connection, frame: Frame) -> bytes | None:
        """Plaintext of *frame*, or None if it was consumed (handshake) or rejected (the
        connection is then closed with the matching error). Runs on the strand."""
        flag = frame.flag
        if flag == FLAG_PLAIN:
            if self.require_encryption:
                conn.close(ErrorCode.ENCRYPTION_REQUIRED,
                           f"plaintext frame from {conn.describe()} but encryption is required")
                return None
            return frame.payload
        ctx = self._crypto
        assert ctx is not None
        try:
            if flag == FLAG_MORMOT:
                if ctx.mormot is None:
                    raise CryptoError(self._profile_mismatch("MORMOT", ctx),
                                      ErrorCode.DECRYPT_FAILED)
                return bytes(ctx.mormot.decrypt(frame.payload))
            if not ctx.authenticated:
                if conn.session is None:
                    self._refuse_hello(conn, frame.payload, self._hello_mismatch(ctx))
                raise CryptoError(self._profile_mismatch("AUTHENTICATED", ctx),
                                  ErrorCode.AUTHENTICATION_FAILED)
            session = conn.session
            if session is None:
                self._authenticated_hello(conn, frame.payload)
                return None
            return bytes(session.open(frame.payload))
        except CryptoError as exc:
            conn.close(exc.code or ErrorCode.DECRYPT_FAILED,
                       f"frame from {conn.describe()} rejected: {exc}")
            return None

    @staticmethod
    def _profile_mismatch(kind: str, ctx: CryptoContext) -> str:
        if not ctx.key:
            return f"{kind}-profile encrypted frame, but no encryption_key is set"
        return f"{kind}-profile encrypted frame, but this side uses the {ctx.profile.name} profile"

    @staticmethod
    def _hello_mismatch(ctx: CryptoContext) -> str:
        """What a client asking for the AUTHENTICATED profile has to change to talk to
        this side (which does not use it)."""
        if not ctx.key:
            return ("the server has no encryption_key (it takes plaintext only): connect "
                    "without encryption_key, or give the server the same key, mode and "
                    "key size")
        return ("the server uses encryption_profile=MORMOT (the Delphi-compatible "
                "profile): set encryption_profile='MORMOT' on the client too, with the "
                "same key, mode and key size")

    def _refuse_hello(self, conn: Connection, payload: bytes, reason: str) -> None:
        """A flag-2 frame came first on *conn* and cannot start a session: a server tells
        a morsock client why (see :func:`morsock.crypto.refusal_frame`) before the
        connection is closed; a client never answers. Strand."""

    def _authenticated_hello(self, conn: Connection, payload: bytes) -> None:
        """A flag-2 frame before any session: only the server accepts it (a ClientHello)."""
        raise CryptoError("unexpected AUTHENTICATED handshake frame",
                          ErrorCode.AUTHENTICATION_FAILED)

    # -- frames out ------------------------------------------------------------------
    def _check_size(self, payload: bytes, encrypted: bool) -> None:
        """Raise ProtocolError(MESSAGE_TOO_LARGE) when the frame of *payload* would carry
        more than ``max_message_size`` bytes (the limit a peer with the same setting
        refuses): refused here, before anything is sent. Any thread."""
        size = len(payload)
        limit = self.max_message_size
        if size <= limit - 64:  # no cipher adds 64 bytes: the common case, no lookup
            return
        ctx = self._crypto
        if encrypted and ctx is not None and ctx.enabled:
            from .crypto import authenticated_payload_size, mormot_payload_size
            size = (mormot_payload_size(size) if ctx.mormot is not None
                    else authenticated_payload_size(ctx.mode, size))
        if size > limit:
            wire = f" ({size} once encrypted)" if size != len(payload) else ""
            raise ProtocolError(
                f"message of {len(payload)} bytes{wire} is over max_message_size "
                f"({limit}): not sent. A peer with the same limit would close the "
                f"connection; raise max_message_size on both sides, or split the message",
                ErrorCode.MESSAGE_TOO_LARGE)

    def _send_on(self, conn: Connection, data: Data, encrypted: bool) -> None:
        """Frame *data* (encrypted as configured) and send it on *conn* (any thread).
        Raises ProtocolError(MESSAGE_TOO_LARGE) over ``max_message_size``."""
        payload = as_bytes(data)
        self._check_size(payload, encrypted)
        if not encrypted:
            conn.send_frame(encode_frame(payload))
            return
        ctx = self._crypto
        if ctx is None or not ctx.enabled:
            raise CryptoError("encrypted=True but no encryption_key is set",
                              ErrorCode.ENCRYPTION_REQUIRED)
        if ctx.mormot is not None:
            conn.send_frame(ctx.mormot.seal_frame(payload))
            return
        session = conn.session
        if session is None:
            raise CryptoError(f"no AUTHENTICATED session with {conn.describe()}: the peer has "
                              f"not completed the morsock handshake (is it a morsock client "
                              f"with the same key?)", ErrorCode.AUTHENTICATION_FAILED)
        conn.send_sealed(session.seal, payload, HEADER_SIZE + session.payload_size(len(payload)))

    def _reply(self, conn: Connection, reply: Any, encrypted: bool) -> None:
        """Send a handler's return value; a full queue disconnects that peer."""
        try:
            self._send_on(conn, reply, encrypted)
        except NotConnectedError:
            pass
        except SendBufferFullError as exc:
            conn.drop_for_full_queue(exc)
        except (CryptoError, ProtocolError, TypeError, ValueError) as exc:
            self._report(conn, f"reply to {conn.describe()} not sent: {exc}",
                         getattr(exc, "code", None) or ErrorCode.HANDLER_EXCEPTION)

    # -- statistics ------------------------------------------------------------------
    def _emit_data_event(self, name: str, conn: Connection, nbytes: int) -> None:
        """``on_data_received`` / ``on_data_sent`` for *nbytes* on *conn*; called only
        while that event is set, from the thread that moved the bytes."""
        raise NotImplementedError

    def _run_item(self, conn: Connection, item: Any) -> None:
        raise NotImplementedError

    def _marker_wanted(self, marker: Any) -> bool:
        """Whether a connection's strand needs the life-cycle *marker* (CONNECTED or
        DISCONNECTED) at all; reactor thread."""
        return True

    def _run_items(self, conn: Connection, items: list[Any]) -> None:
        """Strand batch runner (a pool thread): *conn*'s items in order (a batch of
        several corked, ``conn.cork()`` ... ``conn.uncork()``, so its replies leave in one
        ``send``); an item that raises is logged without stopping the rest."""
        raise NotImplementedError

    def _strand_for(self, conn: Connection) -> Any:
        """The strand that runs *conn*'s items (default: one of its own)."""
        return self._pool.strand(self._batch_runner, conn)

    def _connection_closed(self, conn: Connection) -> None:
        raise NotImplementedError

