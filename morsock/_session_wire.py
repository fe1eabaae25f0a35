"""The bytes of a session (the layer of :mod:`morsock._session`): its records, the
HELLO and WELCOME, the proofs that protect a resume, and :class:`Channel`, one TCP
connection as the session sees it. Pure functions; ProtocolError for bytes that
break the rules.

Frames (the 9-byte frame header is unchanged)
    Inside a session every frame of the connection is one of:

    * flag 0, raw payload: one application message, exactly as today (no request id, no
      acknowledgement). Its bytes are those of a connection without sessions.
    * flag 3 (``FLAG_SESSION``), payload = one *record* in plaintext.
    * flag 1 or 2 (the connection's encryption profile): the plaintext sealed in the
      frame is one *record* (the record's bytes are what gets encrypted).

    ::

        record  = type (1) || [ack (varint) if type & 0x80] || fields || body
        type    = kind | 0x80 when an ack follows; bits 0x70 are zero
        varint  = unsigned LEB128, at most 10 bytes (values < 2**64)

        kind  name        fields                 body          counts as a message
        1     HELLO       see below (flag 3 only, the client's first frame)
        2     WELCOME     see below (flag 3 only, the server's answer)
        3     ACK         (the ack is always present: type 0x83)            no
        4     GOING_AWAY  (ack always present: type 0x84)                   no
        8     DATA        --                     the message   yes
        9     REQUEST     request id (varint)    the message   yes (client -> server)
        10    REPLY       request id (varint)    the message   yes (server -> client)

Hello and resume
    ::

        HELLO   = 01 || version (1) = 01 || caps (varint) || window (varint)
                  || sid_len (1: 0 = new session, 16 = resume) || session id (sid_len)
                  || delivered (varint) || proof (0 or 32)
        WELCOME = 02 || version (1) = 01 || caps (varint) || window (varint)
                  || resume_window_ms (varint) || status (1: 0 = new, 1 = resumed)
                  || session id (16) || delivered (varint) || proof (0 or 32)

    ``caps``: bit 0 request ids, bit 1 GOING_AWAY (version 1 peers set both; unknown bits
    are ignored). ``window``: the sender's ``max_send_buffer``. ``delivered``: the count of
    the peer's messages this side delivered (the resume point; 0 for a new session).

    On resume each side drops from its resend buffer what the other says it delivered and
    sends the rest, in order, first on the new connection: the server right after its
    WELCOME, the client once it has the WELCOME (it sends nothing else before it). Each
    side resends from exactly the peer's resume point, so no message arrives twice; a
    resume point outside [acknowledged, sent] is a protocol error. An unknown or expired
    session id gets a WELCOME of a *new* session: the client then reports the old one lost
    (SESSION_LOST) and hands back every message it had not seen acknowledged.

What protects resumption (``binding``: a 32-byte secret both ends of one TCP connection
share and nobody else knows)
    AUTHENTICATED profile: ``binding`` = ``AuthSession.binding`` (k_export of that
    connection's handshake, see :mod:`morsock.crypto`). The session secret is never sent::

        secret = HMAC-SHA256(binding of the connection that created it,
                             b"morsock session v1 secret" || session id)
        HELLO proof   = HMAC-SHA256(K, b"morsock session v1 hello" || binding || HELLO
                        before the proof), K = binding (new) or secret (resume)
        WELCOME proof = HMAC-SHA256(secret, b"morsock session v1 welcome" || binding ||
                        WELCOME before the proof)

    So a resume needs the secret, which needs the key and the creating connection's
    handshake: someone who saw the session id (or even the whole first connection without
    the key) cannot take the session over, and a recorded HELLO fails on any other
    connection (another binding). A wrong proof closes that connection with
    AUTHENTICATION_FAILED and leaves the session as it was. On such a connection ACK,
    GOING_AWAY and piggybacked acks are accepted only inside flag-2 frames (a flag-3 frame
    carrying one is AUTHENTICATION_FAILED), so acknowledgements cannot be forged;
    plaintext messages stay as unauthenticated as plaintext is without sessions. A
    session created on an AUTHENTICATED connection resumes only on one.

    Plain, MORMOT and TLS connections have no binding: the WELCOME of a new session
    carries a random 32-byte secret as its proof and a resume HELLO presents it (compared
    in constant time); WELCOME of a resume and HELLO of a new session have no proof. Over
    TLS the secret is as confidential as everything else in the TLS channel; in plaintext
    and MORMOT (whose frames are unauthenticated and replayable) it only stops an off-path
    guess of 128 + 256 random bits: whoever can read the stream can resume the session,
    as they can already read and inject its messages.

"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Callable

from .enums import ErrorCode
from .errors import CryptoError, ProtocolError
from .protocol import FLAG_PLAIN, FLAG_SESSION, Frame, encode_frame

if TYPE_CHECKING:
    from .crypto import AuthSession, MormotCipher


VERSION = 1
CAP_REQUEST_IDS = 1
CAP_GOING_AWAY = 2
CAPS = CAP_REQUEST_IDS | CAP_GOING_AWAY
SESSION_ID_SIZE = 16
PROOF_SIZE = 32
#: An ack goes out at once when this many delivered messages are unacknowledged.
ACK_EVERY = 64

HELLO, WELCOME, ACK, GOING_AWAY = 1, 2, 3, 4
DATA, REQUEST, REPLY = 8, 9, 10
WITH_ACK = 0x80
REQUEST_ACK = REQUEST | WITH_ACK
REQUEST_ACK_BYTE = bytes((REQUEST_ACK,))
REPLY_ACK_BYTE = bytes((REPLY | WITH_ACK,))
KINDS = frozenset((HELLO, WELCOME, ACK, GOING_AWAY, DATA, REQUEST, REPLY))
CONTROL = frozenset((ACK, GOING_AWAY))
LABEL_SECRET = b"morsock session v1 secret"
LABEL_HELLO = b"morsock session v1 hello"
LABEL_WELCOME = b"morsock session v1 welcome"
VARINT_MAX = (1 << 64) - 1


def put_varint(out: bytearray, value: int) -> None:
    """Append *value* (0 <= value < 2**64) to *out* as an unsigned LEB128 varint."""
    if value < 0x80:   # the common cases: one byte, two bytes
        out.append(value)
        return
    if value < 0x4000:
        out += bytes(((value & 0x7F) | 0x80, value >> 7))
        return
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def malformed(what: str) -> ProtocolError:
    """The ProtocolError (INVALID_PROTOCOL) of a record that breaks the rules: *what*."""
    return ProtocolError(f"malformed session record: {what}", ErrorCode.INVALID_PROTOCOL)


def get_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Return (value, position after it); ProtocolError if truncated or over 64 bits."""
    if pos + 1 < len(buf):   # the common cases: one byte, two bytes
        first = buf[pos]
        if first < 0x80:
            return first, pos + 1
        second = buf[pos + 1]
        if second < 0x80:
            return (first & 0x7F) | (second << 7), pos + 2
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise malformed("truncated number")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            if result > VARINT_MAX:
                raise malformed("number over 64 bits")
            return result, pos
        shift += 7
        if shift > 63:
            raise malformed("number over 64 bits")


def make_proof(key: bytes, label: bytes, binding: bytes, record: bytes | bytearray) -> bytes:
    """HMAC-SHA256 under *key* of *label* || *binding* || *record* (HELLO, WELCOME)."""
    return hmac.digest(key, label + binding + bytes(record), "sha256")


def bound_secret(binding: bytes, session_id: bytes) -> bytes:
    """The secret of a session created on a connection of *binding* (never sent)."""
    return hmac.digest(binding, LABEL_SECRET + session_id, "sha256")


class Channel:
    """One TCP connection as the session layer sees it: how it seals and opens encrypted
    records, and its binding (API of the module docstring). Made by the shell for each
    connection and never reused (AUTHENTICATED keys are per connection). Not
    thread-safe: used under the session's lock."""

    __slots__ = ("flag", "binding", "_seal", "_open")

    def __init__(self, flag: int = FLAG_PLAIN, seal: Callable[[bytes], bytes] | None = None,
                 open_: Callable[[bytes], bytes] | None = None,
                 binding: bytes | None = None) -> None:
        """*seal*: plaintext -> complete frame; *open_*: payload -> plaintext, for frames of
        *flag*; *binding*: see the module docstring. Prefer the class methods."""
        self.flag = flag
        self.binding = binding
        self._seal = seal
        self._open = open_

    @classmethod
    def plain(cls) -> Channel:
        """A connection without per-message encryption (plaintext or TLS)."""
        return cls()

    @classmethod
    def authenticated(cls, auth: AuthSession) -> Channel:
        """A connection after its AUTHENTICATED handshake (flag 2, bound to it)."""
        return cls(2, auth.seal, auth.open, auth.binding)

    @classmethod
    def mormot(cls, cipher: MormotCipher) -> Channel:
        """A connection with a MORMOT-profile key (flag 1, no binding)."""
        def seal(plaintext: bytes) -> bytes:
            return encode_frame(cipher.encrypt(plaintext), 1)

        def open_(payload: bytes) -> bytes:
            return bytes(cipher.decrypt(payload))
        return cls(1, seal, open_)

    def seal(self, record: bytes) -> bytes:
        """The complete encrypted frame of *record*; CryptoError without a key."""
        if self._seal is None:
            raise CryptoError("encrypted=True but this connection has no encryption key",
                              ErrorCode.ENCRYPTION_REQUIRED)
        return self._seal(record)

    def open(self, frame: Frame) -> bytes:
        """The record sealed in *frame*; CryptoError if it is not this channel's profile
        or fails to decrypt/authenticate."""
        if self._open is None or frame.flag != self.flag:
            code = (ErrorCode.AUTHENTICATION_FAILED if frame.flag == 2
                    else ErrorCode.DECRYPT_FAILED)
            raise CryptoError(f"encrypted frame (flag {frame.flag}) that this connection "
                              "has no key for", code)
        return self._open(frame.payload)


def parse_welcome(record: bytes) -> tuple[int, int, int, bytes, int, int]:
    """The fields of a WELCOME record: ``(window, resume window in ms, resumed (0 or
    1), session id, resume point, where the proof starts)``; ProtocolError for a
    malformed one."""
    version = record[1] if len(record) > 1 else None
    if version != VERSION:
        raise malformed(f"WELCOME of version {version}")
    _caps, pos = get_varint(record, 2)
    window, pos = get_varint(record, pos)
    resume_ms, pos = get_varint(record, pos)
    if pos + 1 + SESSION_ID_SIZE > len(record):
        raise malformed("truncated WELCOME")
    resumed = record[pos]
    sid = record[pos + 1:pos + 1 + SESSION_ID_SIZE]
    delivered, pos = get_varint(record, pos + 1 + SESSION_ID_SIZE)
    if resumed > 1:
        raise malformed(f"WELCOME status {resumed}")
    return window, resume_ms, resumed, sid, delivered, pos


def parse_hello(record: bytes) -> tuple[int, bytes, int, int]:
    """The fields of a HELLO record: ``(window, session id or b"", resume point, where
    the proof starts)``; ProtocolError for a malformed one."""
    if record[1] != VERSION:
        raise malformed(f"HELLO of version {record[1]}")
    _caps, pos = get_varint(record, 2)
    window, pos = get_varint(record, pos)
    sid_len = record[pos] if pos < len(record) else -1
    if sid_len not in (0, SESSION_ID_SIZE):
        raise malformed(f"session id of {sid_len} bytes")
    sid = bytes(record[pos + 1:pos + 1 + sid_len])
    if len(sid) != sid_len:
        raise malformed("truncated HELLO")
    delivered, pos = get_varint(record, pos + 1 + sid_len)
    return window, sid, delivered, pos


def hello_frame(window: int, sid: bytes | None, delivered: int, binding: bytes | None,
                secret: bytes | None) -> bytes:
    """The frame of a HELLO: a new session (*sid* None) or the resume of *sid* from the
    resume point *delivered*, proven with its *secret* (on a connection of *binding*,
    if any)."""
    record = bytearray((HELLO, VERSION))
    put_varint(record, CAPS)
    put_varint(record, window)
    record.append(len(sid) if sid is not None else 0)
    if sid is not None:
        record += sid
    put_varint(record, delivered)
    if binding is not None:
        key = secret if sid is not None else binding
        assert key is not None
        record += make_proof(key, LABEL_HELLO, binding, record)
    elif sid is not None:
        assert secret is not None
        record += secret
    return encode_frame(record, FLAG_SESSION)


def welcome_frame(window: int, resume_ms: int, resumed: bool, sid: bytes, delivered: int,
                  binding: bytes | None, secret: bytes) -> bytes:
    """The frame of a WELCOME of the session *sid* (new or *resumed*), proven with its
    *secret* on a connection of *binding*, or carrying the secret (new, no binding)."""
    record = bytearray((WELCOME, VERSION))
    put_varint(record, CAPS)
    put_varint(record, window)
    put_varint(record, resume_ms)
    record.append(1 if resumed else 0)
    record += sid
    put_varint(record, delivered)
    if binding is not None:
        record += make_proof(secret, LABEL_WELCOME, binding, record)
    elif not resumed:
        record += secret
    return encode_frame(record, FLAG_SESSION)


def welcome_secret(record: bytes, signed: int, sid: bytes, resumed: bool,
                   binding: bytes | None, known: bytes | None) -> bytes:
    """The session's secret after the WELCOME *record* (its proof starts at *signed*;
    *known*: the secret of the session asked for): checked against the channel's
    *binding* when bound (CryptoError, AUTHENTICATION_FAILED, if wrong), else the proof
    itself for a new session."""
    proof = record[signed:]
    if binding is not None:
        secret = known if resumed else bound_secret(binding, sid)
        assert secret is not None
        expected = make_proof(secret, LABEL_WELCOME, binding, record[:signed])
        if len(proof) != PROOF_SIZE or not hmac.compare_digest(proof, expected):
            raise CryptoError("the server's session WELCOME failed its proof",
                              ErrorCode.AUTHENTICATION_FAILED)
        return secret
    if len(proof) != (0 if resumed else PROOF_SIZE):
        raise malformed("WELCOME proof of the wrong length")
    if resumed:
        assert known is not None
        return known
    return proof


def parse_record(record: bytes, unauthenticated: bool, client: bool
                 ) -> tuple[int, int | None, int, int]:
    """The header of a record after the handshake, received by the *client* or the
    server: ``(kind, ack or None, request id or 0, where the body starts)``;
    ProtocolError (CryptoError: an ack in a plaintext frame of a bound session,
    *unauthenticated*) for a record that breaks the rules."""
    kind_byte = record[0]
    kind = kind_byte & ~WITH_ACK
    if kind not in KINDS:
        raise malformed(f"unknown record type 0x{kind_byte:02X}")
    if kind in (HELLO, WELCOME):
        raise malformed("a second hello")
    pos = 1
    ack = None
    if kind_byte & WITH_ACK:
        ack, pos = get_varint(record, pos)
    elif kind in CONTROL:
        raise malformed("control record without its ack")
    if unauthenticated and (ack is not None or kind in CONTROL):
        raise CryptoError("an acknowledgement in a plaintext frame on an AUTHENTICATED "
                          "session (only sealed frames may carry one)",
                          ErrorCode.AUTHENTICATION_FAILED)
    rid = 0
    if kind in (REQUEST, REPLY):
        rid, pos = get_varint(record, pos)
        if rid == 0:
            raise malformed("request id 0")
        if (kind == REQUEST) == client:
            raise malformed("a request from the server or a reply from the client")
    elif kind != DATA and pos != len(record):
        raise malformed("bytes after a control record")
    return kind, ack, rid, pos
