"""TLS transport: the non-blocking handshake, driven by a component's reactor.

A :class:`TLSHandshake` takes a connected, non-blocking TCP socket, wraps it with the
component's ``ssl.SSLContext`` (``do_handshake_on_connect=False``) and steps
``do_handshake()`` each time the selector reports the socket ready for what OpenSSL
asked for (``SSLWantReadError`` -> readable, ``SSLWantWriteError`` -> writable). On
success it unregisters the socket and hands the ``ssl.SSLSocket`` to ``on_success``
(which then builds the :class:`~morsock.connection.Connection`); on failure -- a TLS
error, a connection error, or no completion within *timeout* seconds -- it closes the
socket and calls ``on_failure(message, code)`` with ``ErrorCode.TLS_FAILED`` or
``ErrorCode.TIMEOUT``. Exactly one of the two callbacks runs, once, unless
:meth:`TLSHandshake.abort` is called first (then neither runs).

Threads: everything here runs on the reactor thread.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any, Callable

from .enums import ErrorCode
from .reactor import EVENT_READ, EVENT_WRITE, Reactor, Timer

__all__ = ["TLSHandshake", "check_ssl_context"]


def check_ssl_context(value: Any) -> Any:
    """Setting converter: None or an ``ssl.SSLContext`` (else TypeError)."""
    if value is not None and not isinstance(value, ssl.SSLContext):
        raise TypeError(f"ssl_context must be an ssl.SSLContext or None, "
                        f"not {type(value).__name__}")
    return value


class TLSHandshake:
    """One TLS handshake in progress (reactor thread only; see the module docstring).

    *sock* must be connected, non-blocking and already configured; from :meth:`start`
    on, this object owns it (and the ``SSLSocket`` that replaces it) until it passes the
    ``SSLSocket`` to *on_success*. *description* (``ip:port``) is used in messages.
    """

    def __init__(self, reactor: Reactor, context: ssl.SSLContext, sock: socket.socket, *,
                 server_side: bool, server_hostname: str | None = None,
                 timeout: float | None = None,
                 on_success: Callable[[ssl.SSLSocket], None],
                 on_failure: Callable[[str, ErrorCode], None],
                 description: str = "") -> None:
        self._reactor = reactor
        self._context = context
        self._raw: socket.socket | None = sock
        self._sock: ssl.SSLSocket | None = None
        self._server_side = server_side
        self._server_hostname = server_hostname
        self._timeout = timeout
        self._on_success = on_success
        self._on_failure = on_failure
        self._timer: Timer | None = None
        self._events = 0
        self.description = description
        self.done = False

    def start(self) -> None:
        """Wrap the socket and take the first handshake step (callbacks may run at once)."""
        raw, self._raw = self._raw, None
        assert raw is not None
        try:
            self._sock = self._context.wrap_socket(
                raw, server_side=self._server_side, do_handshake_on_connect=False,
                server_hostname=None if self._server_side else self._server_hostname)
        except (OSError, ValueError) as exc:
            raw.close()
            self._finish_failed(f"TLS setup failed: {exc}", ErrorCode.TLS_FAILED)
            return
        if self._timeout is not None:
            self._timer = self._reactor.call_later(self._timeout, self._timed_out)
        self._step(0)

    def abort(self) -> None:
        """Stop the handshake and close its socket; neither callback runs."""
        if self.done:
            return
        self.done = True
        self._release()

    # -- internals -------------------------------------------------------------------
    def _step(self, mask: int) -> None:
        if self.done:
            return
        sock = self._sock
        assert sock is not None
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch(EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._watch(EVENT_WRITE)
            return
        except (OSError, ValueError) as exc:
            self._fail(f"TLS handshake with {self.description} failed: {_reason(exc)}",
                       ErrorCode.TLS_FAILED)
            return
        self.done = True
        self._cancel_timer()
        if self._events:
            self._reactor.unregister(sock)
        self._sock = None
        self._on_success(sock)

    def _watch(self, events: int) -> None:
        sock = self._sock
        assert sock is not None
        if self._events == events:
            return
        if self._events:
            self._reactor.modify(sock, events, self._step)
        else:
            self._reactor.register(sock, events, self._step)
        self._events = events

    def _timed_out(self) -> None:
        if not self.done:
            self._fail(f"TLS handshake with {self.description} not completed within "
                       f"connection_timeout={self._timeout:g} s", ErrorCode.TIMEOUT)

    def _fail(self, message: str, code: ErrorCode) -> None:
        self.done = True
        self._release()
        self._on_failure(message, code)

    def _finish_failed(self, message: str, code: ErrorCode) -> None:
        self.done = True
        self._on_failure(message, code)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _release(self) -> None:
        self._cancel_timer()
        sock, self._sock = self._sock, None
        raw, self._raw = self._raw, None
        if sock is not None:
            if self._events:
                self._reactor.unregister(sock)
            sock.close()
        if raw is not None:
            raw.close()


def _reason(exc: BaseException) -> str:
    """A readable reason for a handshake error (the verification message if any)."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        reason = str(exc.reason).lower().replace("_", " ")
        if reason in ("wrong version number", "http request", "unknown protocol"):
            reason += " (the peer does not speak TLS?)"
        return reason
    return str(exc) or type(exc).__name__
