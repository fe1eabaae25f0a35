"""The frame codec: pure, no sockets (docs/guide/encryption.rst).

A frame is a 9-byte header followed by ``size`` payload bytes::

    magic  uint32 LE  0xCAFEBABE   (on the wire: BE BA FE CA)
    size   uint32 LE  number of payload bytes that follow
    flag   uint8      FLAG_PLAIN (0), FLAG_MORMOT (1) or FLAG_AUTHENTICATED (2);
                      FLAG_SESSION (3) only between morsock peers that agreed on a
                      session (:mod:`morsock._session`)

:func:`encode_frame` builds one frame; :class:`FrameDecoder` turns a byte stream, split
anywhere, into :class:`Frame` objects in time linear in the bytes fed. Neither keeps any
state beyond the decoder's partial-frame buffer, and neither knows about encryption: the
payload of an encrypted frame is opaque here (see :mod:`morsock.crypto`).
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple, Union

from .enums import ErrorCode
from .errors import ProtocolError

__all__ = [
    "MAGIC", "HEADER", "HEADER_SIZE", "MAX_FRAME_SIZE", "FLAG_PLAIN", "FLAG_MORMOT",
    "FLAG_AUTHENTICATED", "FLAG_SESSION", "VALID_FLAGS", "SESSION_FLAGS", "Frame",
    "encode_frame", "encode_header", "FrameDecoder", "ProtocolError", "DEFAULT_MAX_MESSAGE_SIZE",
]

MAGIC = 0xCAFEBABE  #: First header field of every frame (on the wire: BE BA FE CA).
HEADER = struct.Struct("<IIB")  #: The header: magic, payload size, flag (little-endian).
HEADER_SIZE = HEADER.size  #: 9 bytes.
MAX_FRAME_SIZE = 0xFFFFFFFF  #: Largest payload a header can announce.
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024  #: Default ``max_message_size`` (16 MiB).

FLAG_PLAIN = 0  #: Flag of a plaintext frame.
FLAG_MORMOT = 1  #: Flag of a MORMOT-profile frame.
FLAG_AUTHENTICATED = 2  #: Flag of an AUTHENTICATED-profile frame.
FLAG_SESSION = 3  #: Flag of a session frame (morsock peers with a session only).
VALID_FLAGS = frozenset((FLAG_PLAIN, FLAG_MORMOT, FLAG_AUTHENTICATED))  #: Flags a decoder takes.
#: The flags of a decoder made with ``session_frames=True``.
SESSION_FLAGS = VALID_FLAGS | {FLAG_SESSION}

_MAGIC_BYTES = struct.pack("<I", MAGIC)
_pack = HEADER.pack
_unpack_from = HEADER.unpack_from
#: _parse copies a chunk up to this size into one ``bytes`` first: each payload is then a
#: plain slice of it, not a memoryview slice copied by ``bytes()`` -- a third less work
#: per small frame, for one ``memcpy`` of the chunk.
_COPY_MAX = 16 * 1024

Buffer = Union[bytes, bytearray, memoryview]


class Frame(NamedTuple):
    """One decoded frame: its payload (still encrypted if ``flag`` != 0) and its flag."""

    payload: bytes
    flag: int = FLAG_PLAIN


def encode_header(size: int, flag: int = FLAG_PLAIN) -> bytes:
    """Return the 9 header bytes of a frame carrying *size* payload bytes."""
    if not 0 <= size <= MAX_FRAME_SIZE:
        raise ValueError(f"payload of {size} bytes does not fit a frame")
    if not 0 <= flag <= 255:
        raise ValueError(f"flag {flag} is not a byte")
    return _pack(MAGIC, size, flag)


def encode_frame(payload: Buffer, flag: int = FLAG_PLAIN) -> bytes:
    """Return one complete frame (header + *payload*) as a single bytes object.

    Raises ValueError if the payload is too large for a frame or *flag* is not a byte.
    """
    return encode_header(len(payload), flag) + payload


#: ``Frame(payload, flag)`` without the Python-level ``__new__`` of a NamedTuple.
_new_frame = tuple.__new__


class FrameDecoder:
    """Incremental frame parser.

    ``feed(data)`` returns every frame completed by *data* (possibly none). The caller may
    split the stream anywhere; bytes of an incomplete frame are kept, never re-scanned.

    A stream error raises :class:`ProtocolError` with ``.code``:

    * ``INVALID_PROTOCOL`` -- bad magic (detected from the first wrong byte) or a flag
      not in :data:`VALID_FLAGS`;
    * ``MESSAGE_TOO_LARGE`` -- a size over ``max_message_size``, detected from the
      header before anything is buffered for that payload.

    After an error the decoder is *broken*: every later ``feed`` raises the same error.
    Frames completed before the bad bytes in the same chunk are not lost: they are in
    the exception's ``frames`` attribute, in order.

    With *plain_as_bytes*, a plaintext frame comes out as its payload alone (``bytes``),
    saving an object per frame; other frames are still :class:`Frame`. With
    *session_frames*, flag :data:`FLAG_SESSION` is valid too (:data:`SESSION_FLAGS`):
    only on a connection whose component has sessions on.
    """

    __slots__ = ("max_message_size", "_buf", "_need", "_error", "_wrap_plain", "_flags",
                 "_max_flag")

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE, *,
                 plain_as_bytes: bool = False, session_frames: bool = False) -> None:
        if max_message_size < 0:
            raise ValueError("max_message_size must be >= 0")
        self.max_message_size = max_message_size
        self._flags = SESSION_FLAGS if session_frames else VALID_FLAGS
        self._max_flag = max(self._flags)  # the valid flags are 0.._max_flag
        self._wrap_plain = not plain_as_bytes
        self._buf = bytearray()
        self._need = HEADER_SIZE   # bytes _buf must hold before the next parse can progress
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held by the decoder (0 between frames)."""
        return len(self._buf)

    @property
    def broken(self) -> bool:
        """True once a stream error was raised."""
        return self._error is not None

    def feed(self, data: Buffer) -> list[Any]:
        """Consume *data*; return the frames it completes, in stream order."""
        if self._error is not None:
            raise self._error
        buf = self._buf
        if not buf:
            view = data if data.__class__ is memoryview else memoryview(data)
            if view.itemsize != 1:
                view = view.cast("B")  # count bytes, not items
            return self.feed_buffer(view, len(view))
        frames: list[Any] = []
        buf += data
        size = len(buf)
        if size < self._need:
            if size < HEADER_SIZE:
                self._check_partial_header(buf, frames)
            return frames
        with memoryview(buf) as view:  # released before buf is resized
            pos = self._parse(view, size, frames)
        del buf[:pos]
        if len(buf) < HEADER_SIZE and buf:
            self._check_partial_header(buf, frames)
        return frames

    def feed_buffer(self, buffer: memoryview, n: int) -> list[Any]:
        """``feed(buffer[:n])`` for a byte view the caller reuses (the reactor's scratch
        buffer), without slicing it first. Every payload returned is a copy."""
        if self._buf or self._error is not None:
            return self.feed(buffer[:n])
        if n >= HEADER_SIZE:
            # One whole frame, the commonest chunk: _parse's work, inline.
            magic, length, flag = _unpack_from(buffer, 0)
            if (n == HEADER_SIZE + length and magic == MAGIC and flag <= self._max_flag
                    and length <= self.max_message_size):
                if flag or self._wrap_plain:
                    return [_new_frame(Frame, (buffer[HEADER_SIZE:n].tobytes(), flag))]
                return [buffer[HEADER_SIZE:n].tobytes()]
        frames: list[Any] = []
        pos = self._parse(buffer, n, frames)
        if pos < n:
            buf = self._buf
            buf += buffer[pos:n]
            if len(buf) < HEADER_SIZE:
                self._check_partial_header(buf, frames)
        return frames

    def _parse(self, view: memoryview, n: int, frames: list[Any]) -> int:
        """Append the complete frames of view[:n] to *frames*; return bytes consumed."""
        limit = self.max_message_size
        append = frames.append
        copied = n <= _COPY_MAX
        src: Any = view[:n].tobytes() if copied else view
        plain_bytes = copied and not self._wrap_plain  # plaintext payloads: a slice of src each
        start = HEADER_SIZE  # where the payload of the frame at start - HEADER_SIZE begins
        while start <= n:
            magic, size, flag = _unpack_from(src, start - HEADER_SIZE)
            end = start + size
            if plain_bytes and magic == MAGIC and not flag and end <= n and size <= limit:
                append(src[start:end])  # the commonest frame, checked in one go
            elif not self._take_frame(src, start, end, n, (magic, size, flag), frames):
                return start - HEADER_SIZE  # the frame at start is incomplete
            start = end + HEADER_SIZE
        self._need = HEADER_SIZE
        return start - HEADER_SIZE

    def _take_frame(self, src: Any, start: int, end: int, n: int,
                    header: tuple[int, int, int], frames: list[Any]) -> bool:
        """:meth:`_parse`'s general case: check *header* (raise on a bad one), append
        the frame whose payload is ``src[start:end]``; False when it is incomplete
        (*n* bytes in all)."""
        magic, size, flag = header
        if magic != MAGIC or flag > self._max_flag or size > self.max_message_size:
            self._check_header(magic, size, flag, frames)
        if end > n:
            self._need = end - start + HEADER_SIZE
            return False
        payload = src[start:end] if src.__class__ is bytes else src[start:end].tobytes()
        if flag or self._wrap_plain:
            frames.append(_new_frame(Frame, (payload, flag)))
        else:
            frames.append(payload)
        return True

    def _check_header(self, magic: int, size: int, flag: int, frames: list[Any]) -> None:
        """Raise the ProtocolError a bad header deserves (see the class docstring)."""
        if magic != MAGIC:
            self._fail(ErrorCode.INVALID_PROTOCOL,
                       f"bad frame magic 0x{magic:08X} (expected 0x{MAGIC:08X})", frames)
        if flag not in self._flags:
            self._fail(ErrorCode.INVALID_PROTOCOL, f"unknown frame flag {flag}", frames)
        if size > self.max_message_size:
            self._fail(ErrorCode.MESSAGE_TOO_LARGE,
                       f"frame of {size} bytes exceeds max_message_size={self.max_message_size}",
                       frames)

    def _check_partial_header(self, buf: bytearray, frames: list[Any]) -> None:
        """Reject a bad magic as soon as its first wrong byte arrives."""
        k = min(len(buf), 4)
        if buf[:k] != _MAGIC_BYTES[:k]:
            self._fail(ErrorCode.INVALID_PROTOCOL,
                       f"bad frame magic (stream starts {bytes(buf[:k]).hex()})", frames)

    def _fail(self, code: ErrorCode, message: str, frames: list[Any]) -> None:
        error = ProtocolError(message, code, frames)
        self._buf = bytearray()
        self._error = error
        raise error
