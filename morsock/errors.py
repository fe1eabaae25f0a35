"""The exception tree.

::

    MorsockError                 base of everything morsock raises on purpose
     ├── ProtocolError           the peer sent bytes that are not a valid frame (.code)
     ├── CryptoError             encryption misuse (no key) or a frame that fails to
     │                           decrypt / authenticate (.code: DECRYPT_FAILED or
     │                           AUTHENTICATION_FAILED)
     ├── ConnectError            Client.connect() could not connect (cause chained)
     ├── NotConnectedError       sending or requesting without a connection
     ├── RequestTimeout          Client.request() got no reply in time
     └── SendBufferFullError     the connection's send queue is at max_send_buffer

Every exception has ``.code``, the :class:`~morsock.ErrorCode` that ``on_error`` would
report for the same condition (``None`` where there is none).
"""

from __future__ import annotations

from typing import Any

from .enums import ErrorCode


class MorsockError(Exception):
    """Base class of every exception morsock raises on purpose."""

    default_code: ErrorCode | None = None

    def __init__(self, message: str = "", code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.code: ErrorCode | None = code if code is not None else self.default_code


class ProtocolError(MorsockError):
    """The peer sent something that is not a valid frame (bad magic, flag or size)."""

    default_code = ErrorCode.INVALID_PROTOCOL

    def __init__(self, message: str = "", code: ErrorCode | None = None,
                 frames: list[Any] | None = None) -> None:
        super().__init__(message, code)
        #: Frames that were complete before the bad bytes (FrameDecoder.feed).
        self.frames: list[Any] = list(frames or ())


class CryptoError(MorsockError):
    """Encryption asked for without a key, or a frame that fails to decrypt/authenticate."""

    default_code = ErrorCode.DECRYPT_FAILED


class ConnectError(MorsockError):
    """A client could not connect (refused, unreachable, timed out, TLS failure)."""

    default_code = ErrorCode.CONNECTION_FAILED


class NotConnectedError(MorsockError):
    """Sending or requesting on a connection that is not (or no longer) established."""

    default_code = ErrorCode.CONNECTION_LOST


class RequestTimeout(MorsockError):
    """``Client.request()`` got no reply within its timeout."""

    default_code = ErrorCode.TIMEOUT


class SendBufferFullError(MorsockError):
    """The frame would take the connection's queued bytes past ``max_send_buffer``."""

    default_code = ErrorCode.SEND_BUFFER_FULL
