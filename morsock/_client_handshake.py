"""The client's side of the AUTHENTICATED handshake on one Connection.

A :class:`HandshakeGate` sends the hello and sees the connection's decoded frames first
(``Connection.frame_hook``) until the server's answer -- its first flag-2 frame -- arrives.
Plaintext frames before the answer are what the server's application sent before our hello
reached it (a welcome from its ``on_connect``, a broadcast): held, then passed on right
after the answer, as if they came after the handshake. Any other frame before it, or more
than :data:`EARLY_FRAMES_MAX` of them, fails the handshake.

Reactor thread only (the frame hook runs there).
"""

from __future__ import annotations

from typing import Callable

from ._component import CryptoContext
from .connection import Connection
from .crypto import ClientHandshake
from .enums import ErrorCode
from .errors import CryptoError, MorsockError
from .protocol import FLAG_AUTHENTICATED, FLAG_PLAIN, HEADER_SIZE, Frame

__all__ = ["HandshakeGate", "EARLY_FRAMES_MAX", "unanswered_hello"]

#: Plaintext frames a server may send before its AUTHENTICATED handshake answer that the
#: client holds for after the handshake; one more fails the handshake.
EARLY_FRAMES_MAX = 64


def unanswered_hello(host: str, port: int, timeout: float, plaintext_frames: int) -> str:
    """The message of a connect whose TCP connection was made but whose AUTHENTICATED
    handshake got no answer."""
    got = (f"; it sent {plaintext_frames} plaintext frame(s) instead" if plaintext_frames
           else "")
    return (f"connected to {host}:{port}, but the server did not answer the AUTHENTICATED "
            f"handshake within {timeout:g} s{got}. It is probably not a morsock server with "
            f"an encryption_key: a Delphi mORMot server has no AUTHENTICATED profile (use "
            f"encryption_profile='MORMOT' with the same key, mode and key size), and a "
            f"server without a key treats the handshake as data")


class HandshakeGate:
    """The handshake of *conn* with the keys of *ctx*, with the server at *where*
    (``host:port``, for messages): :meth:`start` it once the connection is registered. On
    the answer, ``conn.session`` is set and *on_done* runs (before the held frames are
    handled). On a failure the connection is closed and *on_failed* gets the reason (for
    its ``ConnectionClosed``)."""

    def __init__(self, conn: Connection, ctx: CryptoContext, where: str,
                 on_done: Callable[[], None],
                 on_failed: Callable[[BaseException], None]) -> None:
        self._conn = conn
        self._handshake = ClientHandshake(ctx.key, ctx.mode, ctx.key_size)
        self._where = where
        self._on_done = on_done
        self._on_failed = on_failed
        self._early: list[Frame] = []
        #: True until the answer came (or the handshake failed).
        self.pending = True

    @property
    def early_frames(self) -> int:
        """Plaintext frames held so far (sent by the server before any answer)."""
        return len(self._early)

    def start(self) -> None:
        """Hook the connection's frames and send the hello."""
        self._conn.frame_hook = self._frames
        try:
            self._conn.send_frame(self._handshake.hello_frame)
        except MorsockError:
            pass  # the close that follows reports the failure

    def _frames(self, frames: list[Frame]) -> list[Frame]:
        """The frame hook: the frames to handle now (none until the answer came)."""
        conn = self._conn
        answer = next((i for i, f in enumerate(frames) if f.flag == FLAG_AUTHENTICATED),
                      len(frames))
        before = frames[:answer]
        try:
            self._check_early(before)
            self._early += before
            if answer == len(frames):
                return []  # still waiting for the answer
            conn.frame_hook = None
            conn.session = self._handshake.finish(frames[answer].payload)
        except CryptoError as exc:
            conn.frame_hook = None
            self.pending = False
            self._on_failed(exc)
            conn.close()
            return []
        early, self._early = self._early, []
        self.pending = False
        self._on_done()
        return early + frames[answer + 1:]

    def _check_early(self, before: list[Frame]) -> None:
        """Raise CryptoError(AUTHENTICATION_FAILED) if the frames that came before the
        answer show that the server does not speak the AUTHENTICATED profile."""
        where = self._where
        hello_head = self._handshake.hello_frame[HEADER_SIZE:HEADER_SIZE + 6]
        if any(f.flag == FLAG_PLAIN and hello_head in f.payload for f in before):
            # our hello came back inside a plaintext frame: the server took it for data
            raise CryptoError(
                f"{where} answered the AUTHENTICATED handshake with plaintext data that "
                f"contains it: the server does not know the AUTHENTICATED profile (a Delphi "
                f"mORMot server has none): use encryption_profile='MORMOT' with the same "
                f"key, mode and key size", ErrorCode.AUTHENTICATION_FAILED)
        sealed = any(f.flag != FLAG_PLAIN for f in before)
        if sealed or len(self._early) + len(before) > EARLY_FRAMES_MAX:
            sent = "MORMOT-profile frames" if sealed else "plaintext frames"
            raise CryptoError(
                f"{where} did not answer the AUTHENTICATED handshake (it sent {sent} "
                f"instead): it is not a morsock server in the AUTHENTICATED profile; a "
                f"Delphi mORMot server needs encryption_profile='MORMOT'",
                ErrorCode.AUTHENTICATION_FAILED)
