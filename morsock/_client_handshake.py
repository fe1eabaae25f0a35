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
from .protocol import FLAG_AUTHENTICATED, FLAG_PLAIN, Frame

__all__ = ["HandshakeGate", "EARLY_FRAMES_MAX"]

#: Plaintext frames a server may send before its AUTHENTICATED handshake answer that the
#: client holds for after the handshake; one more fails the handshake.
EARLY_FRAMES_MAX = 64


class HandshakeGate:
    """The handshake of *conn* with the keys of *ctx*: :meth:`start` it once the
    connection is registered. On the answer, ``conn.session`` is set and *on_done* runs
    (before the held frames are handled). On a failure the connection is closed and
    :attr:`error` says why (for its ``ConnectionClosed``)."""

    def __init__(self, conn: Connection, ctx: CryptoContext,
                 on_done: Callable[[], None]) -> None:
        self._conn = conn
        self._handshake = ClientHandshake(ctx.key, ctx.mode, ctx.key_size)
        self._on_done = on_done
        self._early: list[Frame] = []
        #: Why the handshake failed (None: it did not, or not yet).
        self.error: BaseException | None = None

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
            if (any(f.flag != FLAG_PLAIN for f in before)
                    or len(self._early) + len(before) > EARLY_FRAMES_MAX):
                raise CryptoError("the server did not answer the AUTHENTICATED handshake "
                                  "(is it a morsock server with the same key and profile?)",
                                  ErrorCode.AUTHENTICATION_FAILED)
            self._early += before
            if answer == len(frames):
                return []  # still waiting for the answer
            conn.frame_hook = None
            conn.session = self._handshake.finish(frames[answer].payload)
        except CryptoError as exc:
            conn.frame_hook = None
            self.error = exc
            conn.close()
            return []
        early, self._early = self._early, []
        self._on_done()
        return early + frames[answer + 1:]
