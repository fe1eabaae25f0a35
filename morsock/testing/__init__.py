"""Test kit for applications that need a real morsock peer in their own tests.

* :func:`running_server` -- a started :class:`~morsock.Server` on 127.0.0.1 and a free port,
  stopped (with every thread joined) when the ``with`` block ends.
* :class:`RawPeer` -- a blocking socket that speaks the frame format byte by byte:
  ``send_frame``, ``send_raw``, ``recv_frame``, ``frames``, ``request`` and
  ``expect_close``; ``RawPeer.to(server)`` connects to a running server.
* A pytest plugin (entry point ``morsock``) exposes them as the fixtures
  ``morsock_server_factory`` and ``raw_peer_factory`` (which takes a server or a port).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any, Callable

from ..protocol import FLAG_PLAIN, HEADER, HEADER_SIZE, MAGIC, Frame, encode_frame
from ..server import Server

__all__ = ["running_server", "RawPeer", "echo_handler"]


def echo_handler(server: Server, client: Any, data: bytes) -> bytes:
    """A handler that answers every message with the same bytes."""
    return data


@contextlib.contextmanager
def running_server(handler: Callable[..., Any] | None = echo_handler,
                   **settings: Any) -> Iterator[Server]:
    """Start a server on ``127.0.0.1``, port 0 (both overridable), yield it, stop it.

    *handler* becomes ``on_handle_command`` (default: echo); *settings* are any
    :class:`~morsock.Server` arguments and events.
    """
    settings.setdefault("host", "127.0.0.1")
    settings.setdefault("port", 0)
    server = Server(on_handle_command=handler, **settings)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class RawPeer:
    """A plain blocking TCP peer for protocol-level tests (not thread-safe).

    Every read is bounded by *timeout* seconds: a test fails fast instead of hanging.
    Attributes: ``sock`` (the connected socket, for anything not covered here) and
    ``timeout``.
    """

    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()

    @classmethod
    def to(cls, server: Server, timeout: float = 5.0) -> RawPeer:
        """Connect to a running server (127.0.0.1 if it listens on every address)."""
        host = server.host if server.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        return cls(host, server.port, timeout)

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket (idempotent)."""
        self.sock.close()

    def reset(self) -> None:
        """Close with RST instead of FIN (SO_LINGER 0)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        """Send bytes exactly as given."""
        self.sock.sendall(data)

    def send_frame(self, payload: bytes, flag: int = FLAG_PLAIN) -> None:
        """Send one frame."""
        self.sock.sendall(encode_frame(payload, flag))

    def _fill(self, n: int, deadline: float) -> bool:
        while len(self._buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"expected {n} bytes, got {len(self._buf)}")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return False
            self._buf += chunk
        return True

    def recv_frame(self, timeout: float | None = None) -> Frame:
        """Read one frame; raises TimeoutError, or ConnectionError if the peer closed."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        if not self._fill(HEADER_SIZE, deadline):
            raise ConnectionError("connection closed before a frame header")
        magic, size, flag = HEADER.unpack_from(self._buf)
        if magic != MAGIC:
            raise ValueError(f"bad magic 0x{magic:08X}")
        if not self._fill(HEADER_SIZE + size, deadline):
            raise ConnectionError("connection closed inside a frame")
        payload = bytes(self._buf[HEADER_SIZE:HEADER_SIZE + size])
        del self._buf[:HEADER_SIZE + size]
        return Frame(payload, flag)

    def request(self, payload: bytes, flag: int = FLAG_PLAIN) -> bytes:
        """Send a frame and return the payload of the next frame received."""
        self.send_frame(payload, flag)
        return self.recv_frame().payload

    def expect_close(self, timeout: float | None = None) -> bytes:
        """Wait until the peer closes; return whatever bytes came before the close.

        Raises TimeoutError if the connection is still open after *timeout*.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the peer did not close the connection")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            except socket.timeout:
                continue
            if not chunk:
                data = bytes(self._buf)
                self._buf.clear()
                return data
            self._buf += chunk

    def frames(self, count: int, timeout: float | None = None) -> list[Frame]:
        """Read exactly *count* frames."""
        return [self.recv_frame(timeout) for _ in range(count)]
