"""Sessions: acknowledged, resumable delivery between morsock peers (docs/guide/sessions.rst).

Sans-I/O like :mod:`morsock.protocol` and :mod:`morsock.crypto`: frames in, events and
bytes out; no sockets, no threads, no clock (every call that needs the time is given
``now``, in seconds of one monotonic clock). The shell (Server/Client) pumps it.

Opt-in, morsock peers only
    A client made with ``resumable=True`` sends a session HELLO as its first frame (after
    the TLS handshake and the AUTHENTICATED handshake, when there are any); only a server
    with ``resume_window > 0`` answers it with a WELCOME. Nothing else changes on the
    wire until both have done so: a Delphi peer or a morsock peer without sessions never
    sends a HELLO, so a server with sessions on treats its connection exactly as today
    and it never sees a byte of this layer. A server without sessions refuses the HELLO's
    flag (INVALID_PROTOCOL, the connection closes); a Delphi server hands it to its
    handler as data and answers, if at all, with something that is not a WELCOME: in both
    cases the resumable client's connect fails (ConnectError).

Wire format
    The records, the HELLO and WELCOME and what protects a resume:
    :mod:`morsock._session_wire`.

Sequence numbers and acknowledgements
    Each direction numbers its application messages 1, 2, 3 ... across every connection
    of the session (never sent: the n-th message is number n). A raw flag-0 frame and a
    DATA, REQUEST or REPLY record are messages; control records are not. An *ack* is the
    count of the peer's messages this side has delivered to its application (with
    ``ack_when_handled``, the components' choice: whose handler returned; cumulative;
    never decreases; never more than the peer has sent). It rides on any record this side
    sends (``type | 0x80``), or alone in an ACK record: at once when 64 messages or a
    quarter of the peer's announced window (bytes of message payload) are unacknowledged,
    otherwise ``ack_delay`` seconds after the first unacknowledged delivery.

    The sender keeps every message until it is acknowledged (its plaintext and whether it
    was encrypted: AUTHENTICATED keys are per TCP connection, so a resent message is
    sealed again on the new connection). That *resend buffer* holds at most
    ``max_send_buffer`` bytes of payload: past it a send raises SendBufferFullError
    (back-pressure, nothing is dropped); a message is always accepted into an empty one.
    While there is no connection, sends go into the same buffer.

Ordering with the handshakes
    TCP connect -> TLS handshake (if any) -> AUTHENTICATED ClientHello/ServerHello (if
    that profile has a key) -> HELLO -> WELCOME -> resent messages -> new messages.

Request ids
    The client numbers its requests 1, 2, 3 ... for its life (never reused); a REPLY names
    the request it answers, in any order. A pending request's reply is a reply; a reply to
    an id that was issued but is no longer pending (it timed out: :meth:`Session.abandon`)
    is a :class:`LateReply`; a reply to an id never issued is a protocol error. DATA is
    never taken for a reply.

Going away
    Either side may end the session: it sends GOING_AWAY whose ack is final (it delivers
    nothing of the peer's after it). The peer answers with its own GOING_AWAY (its final
    ack) and both end the session; each side's messages past the other's final ack were
    certainly not delivered and come back in :class:`SessionEnded` (``graceful=True``).
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple, Union

from ._session_wire import (
    ACK,
    ACK_EVERY,
    CAPS,
    DATA,
    GOING_AWAY,
    PROOF_SIZE,
    REPLY,
    REPLY_ACK_BYTE,
    REQUEST,
    REQUEST_ACK,
    REQUEST_ACK_BYTE,
    SESSION_ID_SIZE,
    VERSION,
    WELCOME,
    WITH_ACK,
    Channel,
    get_varint,
    hello_frame,
    malformed,
    parse_record,
    parse_welcome,
    put_varint,
    welcome_frame,
    welcome_secret,
)
from .enums import ErrorCode
from .errors import CryptoError, ProtocolError, SendBufferFullError
from .protocol import FLAG_PLAIN, FLAG_SESSION, Frame, encode_frame

__all__ = [
    "Channel", "Message", "LateReply", "SessionStarted", "SessionEnded", "Event",
    "Session", "SESSION_ID_SIZE", "PROOF_SIZE", "VERSION", "CAPS",
    "ACK_EVERY",
]

# Session states
_DETACHED = "DETACHED"   # no connection (yet, or since a drop)
_HELLO_SENT = "HELLO"    # client: HELLO sent, waiting for the WELCOME
_OPEN = "OPEN"
_CLOSING = "CLOSING"     # GOING_AWAY sent, waiting for the peer's
_ENDED = "ENDED"


# ---------------------------------------------------------------------------- events

class Message(NamedTuple):
    """One application message: as delivered (an event of :meth:`Session.receive`), as
    kept for resending, and as handed back in :class:`SessionEnded`.

    ``request_id`` > 0: a request (client to server) with that id; ``reply_to`` > 0: the
    reply to the client's request with that id; both 0: a plain message (``send``).
    """

    data: bytes
    encrypted: bool = False
    request_id: int = 0
    reply_to: int = 0


class LateReply(NamedTuple):
    """Client: the reply to a request that was abandoned (timed out) before it came."""

    request_id: int
    data: bytes
    encrypted: bool


class SessionStarted(NamedTuple):
    """The session is open on this connection: new, or resumed (same session id)."""

    session_id: bytes
    resumed: bool


class SessionEnded(NamedTuple):
    """The session is over; nothing of it will be delivered any more.

    ``unacknowledged``: this side's messages the peer never acknowledged, in send order.
    With ``graceful`` (a GOING_AWAY exchange) they were certainly NOT delivered; otherwise
    (SESSION_LOST: window passed, server restarted, connection lost while closing) each
    may or may not have been. ``unanswered``: ids of the client's requests that were
    acknowledged but never replied to (their replies will not come).
    """

    session_id: bytes
    unacknowledged: tuple[Message, ...]
    unanswered: tuple[int, ...]
    graceful: bool
    reason: str


Event = Union[Message, LateReply, SessionStarted, SessionEnded]

#: ``Message(data, encrypted, request_id, reply_to)`` without the Python-level
#: ``__new__`` of a NamedTuple (one per message each way).
_new_message = tuple.__new__


# --------------------------------------------------------------------------- session

class Session:
    """One side of a session. The client makes one for its life (``Session(client=True,
    ...)``: it carries session after session); the server gets one per session from
    :class:`morsock._session_table.SessionTable`.

    Not thread-safe: the shell holds one lock per session around every call AND the
    :meth:`data_to_send` that follows it, and hands those bytes to the connection in that
    order (AUTHENTICATED frames must leave in the order they were sealed). Any call may
    queue bytes: after each, call :meth:`data_to_send` and write the result.

    Raises ProtocolError / CryptoError (from :meth:`receive`) for a peer that breaks the
    rules: close that connection, then call :meth:`connection_lost`; the session stays
    resumable. ValueError for a caller's mistake.

    Two attributes are read by the shell without a call (its per-request path): ``out``,
    the frames queued (only :meth:`frames_to_send`, :meth:`data_to_send` or the shell
    under its lock empty it, by replacing it with a new list), and ``ack_deadline``, when
    a delayed ack is due (None: none; read-only outside).
    """

    __slots__ = ("_client", "max_send_buffer", "ack_delay", "session_id", "_secret",
                 "_bound", "_state", "_channel", "_unacked", "_next_seq", "_acked",
                 "_sent_upto", "_buffered", "_delivered", "_ack_sent", "_ack_bytes",
                 "ack_deadline", "_peer_window", "_next_rid", "_pending", "_max_rid_seen",
                 "_resume_window", "_detached_at", "out", "ack_when_handled", "_unhandled",
                 "_skip", "_resume_sent")

    def __init__(self, *, client: bool, max_send_buffer: int, ack_delay: float = 0.1,
                 ack_when_handled: bool = False) -> None:
        """*ack_when_handled*: acknowledge a message only once :meth:`handled` says its
        handler returned (a process that dies in between then gets it back), instead of
        on delivery."""
        if max_send_buffer < 1:
            raise ValueError(f"max_send_buffer must be >= 1, got {max_send_buffer}")
        if not ack_delay > 0:
            raise ValueError(f"ack_delay must be > 0, got {ack_delay}")
        self._client = client
        self.max_send_buffer = max_send_buffer
        self.ack_delay = ack_delay
        self.ack_when_handled = ack_when_handled
        self._unhandled = 0   # delivered messages whose handler has not returned yet
        self._next_rid = 1
        self._resume_window = 0.0
        self.out: list[bytes] = []
        self._state = _DETACHED
        self._channel: Channel | None = None
        self._detached_at: float | None = None
        self._reset(None, None, False)

    def _reset(self, session_id: bytes | None, secret: bytes | None, bound: bool) -> None:
        """Start the counters of a new session (or of none yet: client)."""
        self._unhandled = 0
        self._skip = 0          # resent messages to drop: delivered, not yet handled
        self._resume_sent = 0   # the resume point this side told the peer
        self.session_id: bytes | None = session_id
        self._secret = secret
        self._bound = bound
        # sending: (seq, message, size) of every unacknowledged message, oldest first
        self._unacked: deque[tuple[int, Message, int]] = deque()
        self._next_seq = 1
        self._acked = 0        # the peer's ack: our messages it delivered
        self._sent_upto = 0    # highest seq written to the current channel
        self._buffered = 0
        # receiving
        self._delivered = 0
        self._ack_sent = 0
        self._ack_bytes = 0
        self.ack_deadline: float | None = None
        self._peer_window = self.max_send_buffer
        self._pending: set[int] = set()   # client: requests waiting for their reply
        self._max_rid_seen = 0            # server: highest request id received

    # -- the server's table ---------------------------------------------------------------
    def start_new(self, session_id: bytes, secret: bytes, channel: Channel, window: int,
                  resume_window: float, now: float) -> None:
        """Server, SessionTable only: open the new session *session_id* on *channel* for
        a peer of *window*; queue its WELCOME (telling *resume_window*, in seconds)."""
        self._reset(session_id, secret, channel.binding is not None)
        self._channel = channel
        self._peer_window = max(1, window)
        self.out.append(self._welcome(False, resume_window))
        self._open(0, now)

    def resume_on(self, channel: Channel, window: int, delivered: int,
                  resume_window: float, now: float) -> None:
        """Server, SessionTable only: the session resumes on *channel*, the peer having
        delivered *delivered* of its messages; queue the WELCOME and the resent messages.
        ProtocolError (nothing changed) for a resume point outside [acknowledged, sent].
        """
        if not self._acked <= delivered <= self._next_seq - 1:
            raise malformed(f"resume point {delivered} outside {self._acked}.."
                             f"{self._next_seq - 1}")
        self._channel = channel
        self.out = []
        self._peer_window = max(1, window)
        self._sent_upto = self._next_seq - 1
        self._on_ack(delivered)
        self.out.append(self._welcome(True, resume_window))
        self._open(delivered, now)

    def _welcome(self, resumed: bool, resume_window: float) -> bytes:
        channel = self._channel
        sid = self.session_id
        assert channel is not None and sid is not None and self._secret is not None
        return welcome_frame(self.max_send_buffer, round(resume_window * 1000), resumed,
                             sid, self._take_resume_point(), channel.binding, self._secret)

    @property
    def secret(self) -> bytes | None:
        """The session's secret (what proves a resume, see :mod:`morsock._session_wire`);
        None before the first session."""
        return self._secret

    @property
    def bound(self) -> bool:
        """True when the session was created on an AUTHENTICATED connection (it resumes
        only on one)."""
        return self._bound

    # -- state --------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        """True while the session is open on a connection (messages flow)."""
        return self._state == _OPEN

    @property
    def ended(self) -> bool:
        """Server: True once the session is over (table entry to remove)."""
        return self._state == _ENDED

    @property
    def channel(self) -> Channel | None:
        """The connection the session is on, if any."""
        return self._channel

    @property
    def unacknowledged(self) -> int:
        """Messages sent (or queued) and not yet acknowledged by the peer."""
        return len(self._unacked)

    @property
    def buffered_bytes(self) -> int:
        """Payload bytes in the resend buffer (bounded by ``max_send_buffer``)."""
        return self._buffered

    def data_to_send(self) -> bytes:
        """Every frame queued by the calls so far, in order; empties the queue."""
        out, self.out = self.out, []
        return b"".join(out)

    def frames_to_send(self) -> list[bytes]:
        """:meth:`data_to_send` as one complete frame per item (the shell writes them one
        by one, so each counts as a frame sent); empties the queue."""
        out, self.out = self.out, []
        return out

    @property
    def has_output(self) -> bool:
        """True when frames wait for :meth:`frames_to_send`."""
        return bool(self.out)

    # -- connections -------------------------------------------------------------------
    def connection_made(self, channel: Channel, now: float) -> list[Event]:
        """Client: a new connection (after its TLS and AUTHENTICATED handshakes) carries
        the session: queues the HELLO. Returns a SessionEnded if the session cannot be
        resumed on this kind of connection (bound to AUTHENTICATED, or not)."""
        if not self._client:
            raise ValueError("connection_made() is the client's; servers use SessionTable")
        events: list[Event] = []
        if self.session_id is not None and self._bound != (channel.binding is not None):
            events.append(self.lose("the session cannot resume on a connection with "
                                     "another encryption profile"))
        self._channel = channel
        self._state = _HELLO_SENT
        sid = self.session_id
        point = self._take_resume_point() if sid is not None else 0
        self.out.append(hello_frame(self.max_send_buffer, sid, point, channel.binding,
                                    self._secret))
        return events

    def connection_lost(self, channel: Channel, now: float) -> list[Event]:
        """The connection of *channel* is gone (ignored if the session moved on to
        another). Open sessions wait to be resumed; one that was closing is over."""
        if channel is not self._channel:
            return []
        self._channel = None
        self.out = []
        if self._state == _CLOSING:
            return [self._end("the connection was lost while the session was closing",
                              graceful=False)]
        if self._state in (_OPEN, _HELLO_SENT):
            self._state = _DETACHED
            self._detached_at = now
        return []

    # -- sending -----------------------------------------------------------------------
    def send(self, data: bytes, encrypted: bool, now: float) -> None:
        """Accept one plain message (``send_data``, a handler's reply to a non-request).

        Raises SendBufferFullError past ``max_send_buffer`` (nothing changes), CryptoError
        for ``encrypted`` on an open connection without a key."""
        self._accept(_new_message(Message, (data, encrypted, 0, 0)), now)

    def request(self, data: bytes, encrypted: bool, now: float) -> int:
        """Client: accept a request; return its id (its reply comes as a Message with
        that ``reply_to``). Raises as :meth:`send`."""
        if not self._client:
            raise ValueError("only the client sends requests")
        rid = self._next_rid
        self._accept(_new_message(Message, (data, encrypted, rid, 0)), now)
        self._next_rid = rid + 1
        self._pending.add(rid)
        return rid

    def reply(self, request_id: int, data: bytes, encrypted: bool, now: float) -> None:
        """Server: accept the reply to the request *request_id*. Raises as :meth:`send`,
        ValueError for an id that never came."""
        if self._client or not 0 < request_id <= self._max_rid_seen:
            raise ValueError(f"no request {request_id} to reply to")
        self._accept(_new_message(Message, (data, encrypted, 0, request_id)), now)

    def abandon(self, request_id: int) -> None:
        """Client: the request timed out; its reply, if it comes, is a LateReply."""
        self._pending.discard(request_id)

    def _accept(self, message: Message, now: float) -> None:
        if self._state == _ENDED or self._state == _CLOSING:
            raise ValueError("the session is ending: it accepts no more messages")
        size = len(message.data)
        if self._buffered and self._buffered + size > self.max_send_buffer:
            raise SendBufferFullError(
                f"{self._buffered} bytes wait for an acknowledgement; {size} more would "
                f"exceed max_send_buffer={self.max_send_buffer}")
        if (message.encrypted and self._channel is not None
                and self._channel.flag == FLAG_PLAIN):
            raise CryptoError("encrypted=True but this connection has no encryption key",
                              ErrorCode.ENCRYPTION_REQUIRED)
        seq = self._next_seq
        self._next_seq = seq + 1
        self._unacked.append((seq, message, size))
        self._buffered += size
        if self._state == _OPEN:
            self._transmit(seq, message, now)

    def _transmit(self, seq: int, message: Message, now: float) -> None:
        """Queue the frame of message *seq* on the open channel (ack piggybacked)."""
        channel = self._channel
        assert channel is not None
        self._sent_upto = seq
        kind = REQUEST if message.request_id else REPLY if message.reply_to else DATA
        ack = self._delivered - self._unhandled > self._ack_sent
        if kind == DATA and not message.encrypted and not (ack and channel.binding is None):
            self.out.append(encode_frame(message.data, FLAG_PLAIN))
            return
        piggyback = ack and (message.encrypted or channel.binding is None)
        record = bytearray((kind | WITH_ACK if piggyback else kind,))
        if piggyback:
            self._put_ack(record)
        if kind != DATA:
            put_varint(record, message.request_id or message.reply_to)
        record += message.data
        if message.encrypted:
            self.out.append(channel.seal(bytes(record)))
        else:
            self.out.append(encode_frame(record, FLAG_SESSION))

    def _put_ack(self, record: bytearray, final: bool = False) -> None:
        """Append the ack: what was handled (never less than an ack already sent);
        *final* (GOING_AWAY): everything delivered, handled or about to be."""
        value = self._delivered if final else self._delivered - self._unhandled
        if value < self._ack_sent:
            value = self._ack_sent
        put_varint(record, value)
        self._ack_sent = value
        self._ack_bytes = 0
        self.ack_deadline = None

    def handled(self, now: float) -> None:
        """``ack_when_handled``: the handler of one delivered message (Message or
        LateReply, in delivery order) returned; its acknowledgement may go."""
        if self._unhandled:
            self._unhandled -= 1
            if self._state != _OPEN:
                return
            if self._delivered - self._unhandled - self._ack_sent >= ACK_EVERY:
                self._send_control(ACK)   # queued: the caller writes data_to_send()
            elif self.ack_deadline is None:
                self.ack_deadline = now + self.ack_delay

    def _send_control(self, kind: int) -> None:
        """Queue an ACK or GOING_AWAY (sealed on a bound channel)."""
        channel = self._channel
        assert channel is not None
        record = bytearray((kind | WITH_ACK,))
        self._put_ack(record, final=kind == GOING_AWAY)
        if channel.binding is not None:
            self.out.append(channel.seal(bytes(record)))
        else:
            self.out.append(encode_frame(record, FLAG_SESSION))

    # -- timers ------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """When :meth:`poll` has work (a delayed ack, the client's resume window), if
        ever. Re-read after every call."""
        if self._state == _OPEN:
            return self.ack_deadline
        if (self._client and self._state == _DETACHED and self.session_id is not None
                and self._detached_at is not None):
            return self._detached_at + self._resume_window
        return None

    def poll(self, now: float) -> list[Event]:
        """Run what is due at *now*: a delayed ack; on a client that has been without a
        connection past the server's resume window, the session's end (SESSION_LOST)."""
        if self._state == _OPEN:
            if self.ack_deadline is not None and now >= self.ack_deadline:
                self._send_control(ACK)
            return []
        deadline = self.next_deadline()
        if deadline is not None and now >= deadline:
            return [self.lose(f"no connection for more than the server's resume window "
                               f"({self._resume_window:g} s)")]
        return []

    def going_away(self, now: float) -> list[Event]:
        """End the session (Server.stop(), Client.disconnect()): queue GOING_AWAY, deliver
        nothing more, wait for the peer's. Without an open connection the session ends at
        once (not gracefully: what the peer delivered is unknown)."""
        if self._state == _OPEN:
            self._send_control(GOING_AWAY)
            self._state = _CLOSING
            return []
        if self._state in (_DETACHED, _HELLO_SENT) and self.session_id is not None:
            return [self._end("the session was closed without a connection",
                              graceful=False)]
        return []

    # -- receiving ---------------------------------------------------------------------
    def receive(self, frame: Frame, now: float) -> list[Event]:
        """Handle one frame of the session's connection (flag 0-3, still encrypted);
        return what it means, in order. Raises ProtocolError/CryptoError (see the class
        docstring): on a client still waiting for the WELCOME, anything else is a
        ProtocolError (the server does not speak sessions: fail the connect)."""
        state = self._state
        flag = frame.flag
        if state == _HELLO_SENT:
            if flag != FLAG_SESSION or not frame.payload or frame.payload[0] != WELCOME:
                raise ProtocolError("the server did not answer the session hello (is it "
                                    "a morsock server with resume_window > 0?)",
                                    ErrorCode.INVALID_PROTOCOL)
            return self._on_welcome(frame.payload, now)
        if state not in (_OPEN, _CLOSING):
            return []   # ended or detached: nothing more belongs to this session
        channel = self._channel
        assert channel is not None
        if flag == FLAG_PLAIN:
            if self._skip:
                self._skip -= 1   # delivered before the resume, its handler runs
                return []
            return self._deliver(_new_message(Message, (frame.payload, False, 0, 0)), now)
        if flag == FLAG_SESSION:
            return self._record(frame.payload, False, channel.binding is not None, now)
        return self._record(channel.open(frame), True, False, now)

    def _record(self, record: bytes, encrypted: bool, unauthenticated: bool, now: float
                ) -> list[Event]:
        if not record:
            raise malformed("empty")
        if (record[0] == REQUEST_ACK and not unauthenticated and not self._client
                and self._state == _OPEN and not self._skip):
            rid, body = self._take_request(record, now)   # the commonest, on a server
            return [_new_message(Message, (body, encrypted, rid, 0))]
        kind, ack, rid, pos = parse_record(record, unauthenticated, self._client)
        if ack is not None:
            self._on_ack(ack)
        if kind == ACK:
            return []
        if kind == GOING_AWAY:
            return self._on_going_away()
        if self._state == _CLOSING:
            return []   # past our final ack: the peer gets it back
        if self._skip:
            self._skip -= 1   # delivered before the resume, its handler runs
            return []
        return self._message(kind, rid, record[pos:], encrypted, now)

    def _message(self, kind: int, rid: int, body: bytes, encrypted: bool, now: float
                 ) -> list[Event]:
        """The event of a DATA, REQUEST or REPLY record to deliver (its ack applied)."""
        if kind == REPLY:
            if rid >= self._next_rid:
                raise malformed(f"reply to request {rid}, which was never sent")
            if rid not in self._pending:
                self._count_delivery(len(body), now)
                return [LateReply(rid, body, encrypted)]
            self._pending.discard(rid)
            return self._deliver(_new_message(Message, (body, encrypted, 0, rid)), now)
        if kind == REQUEST:
            if rid > self._max_rid_seen:
                self._max_rid_seen = rid
            return self._deliver(_new_message(Message, (body, encrypted, rid, 0)), now)
        return self._deliver(_new_message(Message, (body, encrypted, 0, 0)), now)

    # -- the server's commonest exchange, in two calls -------------------------------------
    def take_request(self, record: bytes, now: float) -> tuple[int, bytes] | None:
        """Server: :meth:`receive` of the commonest frame -- a plaintext (flag 3) REQUEST
        with its ack, on an open session over an unbound channel -- returning ``(request
        id, body)``, the Message that :meth:`receive` would deliver. None for any other
        record or session state: nothing changed, call :meth:`receive`. Raises as
        :meth:`receive`."""
        channel = self._channel
        if (record[:1] != REQUEST_ACK_BYTE or self._client or self._state != _OPEN
                or self._skip or channel is None or channel.binding is not None):
            return None
        return self._take_request(record, now)

    def _take_request(self, record: bytes, now: float) -> tuple[int, bytes]:
        """A REQUEST-with-ack record on an open session with nothing to skip: the rules of
        :meth:`_record`, in the order that applies to it."""
        peer_ack, pos = get_varint(record, 1)
        rid, pos = get_varint(record, pos)
        if rid == 0:
            raise malformed("request id 0")
        self._on_ack(peer_ack)
        if rid > self._max_rid_seen:
            self._max_rid_seen = rid
        body = record[pos:]
        self._count_delivery(len(body), now)
        return rid, body

    def reply_frame(self, request_id: int, data: bytes) -> bytes | None:
        """Server, ``ack_when_handled``: :meth:`handled` then a plaintext :meth:`reply`,
        in the commonest case -- an open session over an unbound channel, the reply
        carrying a new ack, room in the resend buffer -- returning the reply's frame to
        write (nothing is queued in :meth:`frames_to_send`). None in any other case:
        nothing changed, call those two."""
        size = len(data)
        channel = self._channel
        ack = self._delivered - self._unhandled + 1
        if (self._state != _OPEN or self._client or not self._unhandled
                or ack <= self._ack_sent or channel is None or channel.binding is not None
                or not 0 < request_id <= self._max_rid_seen
                or (self._buffered and self._buffered + size > self.max_send_buffer)):
            return None
        self._unhandled -= 1
        seq = self._next_seq
        self._next_seq = seq + 1
        self._sent_upto = seq
        self._unacked.append((seq, _new_message(Message, (data, False, 0, request_id)), size))
        self._buffered += size
        self._ack_sent = ack
        self._ack_bytes = 0
        self.ack_deadline = None
        record = bytearray(REPLY_ACK_BYTE)
        put_varint(record, ack)
        put_varint(record, request_id)
        record += data
        return encode_frame(record, FLAG_SESSION)

    def _deliver(self, message: Message, now: float) -> list[Event]:
        if self._state == _CLOSING:
            return []   # past our final ack: the peer gets it back
        self._count_delivery(len(message.data), now)
        return [message]

    def _count_delivery(self, size: int, now: float) -> None:
        self._delivered += 1
        if self.ack_when_handled:
            self._unhandled += 1
        self._ack_bytes += size
        if (self._delivered - self._unhandled - self._ack_sent >= ACK_EVERY
                or self._ack_bytes >= self._peer_window // 4):
            self._send_control(ACK)
        elif self.ack_deadline is None:
            self.ack_deadline = now + self.ack_delay

    def _on_ack(self, ack: int) -> None:
        if not self._acked <= ack <= self._sent_upto:
            raise malformed(f"acknowledgement {ack} outside {self._acked}.."
                             f"{self._sent_upto}")
        unacked = self._unacked
        while unacked and unacked[0][0] <= ack:
            _, message, size = unacked.popleft()
            self._buffered -= size
        self._acked = ack

    def _on_going_away(self) -> list[Event]:
        if self._state == _OPEN:
            self._send_control(GOING_AWAY)
        return [self._end("the peer ended the session (going away)", graceful=True)]

    # -- hello ---------------------------------------------------------------------------
    def _on_welcome(self, record: bytes, now: float) -> list[Event]:
        channel = self._channel
        assert channel is not None
        window, resume_ms, resumed, sid, delivered, pos = parse_welcome(record)
        binding = channel.binding
        asked = self.session_id
        if resumed and (asked is None or sid != asked):
            raise malformed("WELCOME resumes a session that was not asked for")
        secret = welcome_secret(record, pos, sid, bool(resumed), binding, self._secret)
        events: list[Event] = []
        if resumed:
            if not self._acked <= delivered <= self._next_seq - 1:
                raise malformed(f"resume point {delivered} outside {self._acked}.."
                                 f"{self._next_seq - 1}")
            self._sent_upto = self._next_seq - 1   # the ack check's upper bound
            self._on_ack(delivered)
        else:
            if delivered:
                raise malformed("a new session that already delivered messages")
            if asked is not None:
                events.append(self.lose("the server does not know the session (its "
                                         "resume window passed or it restarted)"))
            # what was queued before the first session stays queued for this one
            self.session_id = bytes(sid)
            self._secret = secret
            self._bound = binding is not None
        self._peer_window = max(1, window)
        self._resume_window = resume_ms / 1000
        self._open(self._acked, now)
        events.append(SessionStarted(bytes(sid), bool(resumed)))
        return events

    def _take_resume_point(self) -> int:
        """The resume point to tell the peer: the messages handled (acknowledgeable).
        Those delivered after it whose handlers still run come again: the first
        ``_skip`` messages received are dropped."""
        point = self._delivered - self._unhandled
        if point < self._ack_sent:
            point = self._ack_sent
        self._skip = self._delivered - point
        self._resume_sent = point
        return point

    def _open(self, resume_from: int, now: float) -> None:
        """Open on the current channel; resend every message after *resume_from*."""
        self._state = _OPEN
        self._detached_at = None
        # the hello exchange told the peer our resume point: an ack
        self._ack_sent = self._resume_sent
        self._ack_bytes = 0
        self.ack_deadline = None
        for seq, message, _ in self._unacked:
            if seq > resume_from:
                self._transmit(seq, message, now)
        self._sent_upto = self._next_seq - 1

    # -- the end -----------------------------------------------------------------------
    def _end(self, reason: str, graceful: bool) -> SessionEnded:
        sid = self.session_id
        assert sid is not None
        lost = tuple(message for _, message, _ in self._unacked)
        lost_ids = {m.request_id for m in lost}
        unanswered = tuple(sorted(r for r in self._pending if r not in lost_ids))
        self._pending.clear()
        self._reset(None, None, False)
        # a client's Session carries the next session: it queues for it meanwhile
        self._state = _DETACHED if self._client else _ENDED
        self._detached_at = None
        return SessionEnded(sid, lost, unanswered, graceful, reason)

    def end_unstarted(self, reason: str) -> SessionEnded:
        """Client, no session yet: hand back what was queued for one (never sent)."""
        lost = tuple(message for _, message, _ in self._unacked)
        self._pending.clear()
        self._reset(None, None, False)
        return SessionEnded(b"", lost, (), True, reason)

    def lose(self, reason: str) -> SessionEnded:
        """End the session now, not gracefully (SESSION_LOST: it cannot resume, its
        window passed, the shell ends it); hand back what was not acknowledged. The
        caller (the client's calls above, SessionTable, the shell under its lock)
        handles the returned end."""
        return self._end(reason, graceful=False)
