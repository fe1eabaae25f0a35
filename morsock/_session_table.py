"""The server's sessions (the layer of :mod:`morsock._session`): :class:`SessionTable`
answers the HELLO of a new connection with a new or a resumed :class:`Session` and
expires those whose connection stayed away past ``resume_window``.

Sans-I/O like :mod:`morsock._session`: no sockets, no threads, no clock (``now``, in
seconds of one monotonic clock, is given).
"""

from __future__ import annotations

import hmac
import os

from ._session import Event, Session, SessionEnded
from ._session_wire import (
    HELLO,
    LABEL_HELLO,
    PROOF_SIZE,
    SESSION_ID_SIZE,
    Channel,
    bound_secret,
    make_proof,
    malformed,
    parse_hello,
)
from .enums import ErrorCode
from .errors import CryptoError
from .protocol import FLAG_SESSION, Frame

__all__ = ["SessionTable"]


def _check_hello_proof(session: Session | None, sid: bytes, binding: bytes | None,
                       signed: bytes, proof: bytes) -> None:
    """CryptoError (AUTHENTICATION_FAILED) unless *proof* is right for a HELLO whose
    bytes before it are *signed*: the resumed *session*'s secret (bound to the channel's
    *binding*, if any), or for a new session (no *sid*) the binding alone. An unknown
    *sid* (no *session*) has no secret left to check against."""
    if session is not None:
        secret = session.secret
        assert secret is not None
        expected = (make_proof(secret, LABEL_HELLO, binding, signed) if binding is not None
                    else secret)
        if session.bound != (binding is not None) or not hmac.compare_digest(
                proof, expected):
            raise CryptoError("session resume refused: its proof does not match "
                              "(not the session's owner)", ErrorCode.AUTHENTICATION_FAILED)
    elif not sid:
        expected = (make_proof(binding, LABEL_HELLO, binding, signed)
                    if binding is not None else b"")
        if not hmac.compare_digest(proof, expected):
            raise CryptoError("session HELLO failed its proof",
                              ErrorCode.AUTHENTICATION_FAILED)


class SessionTable:
    """The server's sessions, by id, with their expiry ``resume_window`` seconds after
    their connection dropped.

    Reactor-thread only (or under one lock). The shell routes the first frame of a new
    connection here when it has flag 3 (:meth:`accept`); a connection whose first frame
    has another flag is a session-less peer and never reaches this table.
    """

    __slots__ = ("resume_window", "max_send_buffer", "ack_delay", "ack_when_handled",
                 "_sessions", "_expiry")

    def __init__(self, resume_window: float, max_send_buffer: int, ack_delay: float = 0.1,
                 ack_when_handled: bool = False) -> None:
        if not resume_window > 0:
            raise ValueError(f"resume_window must be > 0, got {resume_window}")
        self.resume_window = resume_window
        self.max_send_buffer = max_send_buffer
        self.ack_delay = ack_delay
        self.ack_when_handled = ack_when_handled
        self._sessions: dict[bytes, Session] = {}
        self._expiry: dict[bytes, float] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def accept(self, frame: Frame, channel: Channel, now: float) -> tuple[Session, bool]:
        """Answer the HELLO *frame* of a new connection: return (session, resumed), its
        WELCOME (and resent messages) queued in the session's :meth:`Session.data_to_send`.

        A resumed session that was still on another connection moved to this one: close
        that connection (its ``connection_lost`` is then ignored). An unknown or expired
        id gets a new session. Raises ProtocolError for a malformed HELLO, CryptoError
        (AUTHENTICATION_FAILED) for a resume whose proof is wrong: close the connection;
        the session is left as it was.
        """
        record = frame.payload
        if frame.flag != FLAG_SESSION or len(record) < 2 or record[0] != HELLO:
            raise malformed("the first session frame is not a HELLO")
        window, sid, delivered, signed = parse_hello(record)
        proof = bytes(record[signed:])
        session = self._sessions.get(sid) if sid else None
        if session is not None and (session.ended or now >= self._expiry.get(sid, now + 1)):
            session = None   # expire() reports it
        _check_hello_proof(session, sid, channel.binding, record[:signed], proof)
        # an unknown id: its proof cannot be checked (the secret is gone); a new session
        if session is None:
            return self._new_session(channel, window, now), False
        session.resume_on(channel, window, delivered, self.resume_window, now)
        self._expiry.pop(sid, None)
        return session, True

    def _new_session(self, channel: Channel, window: int, now: float) -> Session:
        sid = os.urandom(SESSION_ID_SIZE)
        while sid in self._sessions:   # pragma: no cover - 2**-128
            sid = os.urandom(SESSION_ID_SIZE)
        binding = channel.binding
        secret = (bound_secret(binding, sid) if binding is not None
                  else os.urandom(PROOF_SIZE))
        session = Session(client=False, max_send_buffer=self.max_send_buffer,
                          ack_delay=self.ack_delay, ack_when_handled=self.ack_when_handled)
        session.start_new(sid, secret, channel, window, self.resume_window, now)
        self._sessions[sid] = session
        return session

    def connection_lost(self, session: Session, channel: Channel, now: float
                        ) -> list[Event]:
        """The connection of *channel* dropped: *session* waits ``resume_window``."""
        events = session.connection_lost(channel, now)
        sid = session.session_id
        if sid is not None and not session.ended and session.channel is None:
            self._expiry[sid] = now + self.resume_window
        return events

    def remove(self, session: Session) -> None:
        """Forget *session* (it ended: SessionEnded was handled)."""
        for sid, known in list(self._sessions.items()):
            if known is session:
                del self._sessions[sid]
                self._expiry.pop(sid, None)

    def next_expiry(self) -> float | None:
        """The earliest moment :meth:`expire` has work, if any."""
        return min(self._expiry.values(), default=None)

    def expire(self, now: float) -> list[tuple[Session, SessionEnded]]:
        """Remove every session whose window passed; return each with its end (its
        unacknowledged messages: the shell reports SESSION_LOST for them)."""
        ended = []
        for sid, deadline in list(self._expiry.items()):
            if now >= deadline:
                session = self._sessions.pop(sid)
                del self._expiry[sid]
                end = session.lose(f"no connection within resume_window "
                                   f"({self.resume_window:g} s)")
                ended.append((session, end))
        return ended
