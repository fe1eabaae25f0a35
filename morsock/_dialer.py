"""Opening the socket of a client's connection attempt: name lookup, TCP connect, TLS.

:class:`Dialer` carries out the ``Resolve``, ``OpenSocket``, ``StartTls`` and
``CloseSocket`` actions of :mod:`morsock._client_state` and reports every outcome as one of
that machine's events through *report*, always on the reactor thread. It holds at most one
socket, the one of the step in progress, until :meth:`Dialer.take` hands it over.

Threads: every method runs on the reactor thread, except :meth:`Dialer.join` (the thread
that stopped the reactor). A name lookup can block for seconds, so it runs on a
short-lived resolver thread of its own; an IP literal is answered at once.
"""

from __future__ import annotations

import errno
import socket
import threading
from typing import Any, Callable

from ._client_state import (
    Event,
    Resolved,
    ResolveFailed,
    SocketConnected,
    SocketFailed,
    TlsDone,
    TlsFailed,
)
from .enums import ErrorCode
from .reactor import EVENT_WRITE, Reactor
from .tls import TLSHandshake

__all__ = ["Dialer"]

_CONNECT_IN_PROGRESS = {0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN, 10035}


def _os_error(err: int) -> OSError:
    return OSError(err, errno.errorcode.get(err, str(err)))


class Dialer:
    """The sockets of one client run (see the module docstring).

    *report* takes the machine's events; *configure* applies the socket options to a
    connected socket (raises OSError when it cannot).
    """

    def __init__(self, reactor: Reactor, report: Callable[[Event], None],
                 configure: Callable[[socket.socket], None], name: str) -> None:
        self._reactor = reactor
        self._report = report
        self._configure = configure
        self._name = name
        self._connecting: socket.socket | None = None   # TCP connect in progress
        self._tls: TLSHandshake | None = None           # TLS handshake in progress
        self._ready: socket.socket | None = None        # connected, not yet taken
        self._address: Any = None   # where the socket in progress connects (its peer)
        self._resolvers: set[threading.Thread] = set()
        self._resolvers_lock = threading.Lock()

    def resolve(self, attempt: int, host: str, port: int) -> None:
        """Look up *host*:*port*; report ``Resolved`` or ``ResolveFailed``."""
        try:   # an IP literal needs no lookup
            numeric = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                         flags=socket.AI_NUMERICHOST)
        except (OSError, UnicodeError):
            pass
        else:
            self._report(Resolved(attempt, tuple(numeric)))
            return
        resolver = threading.Thread(target=self._lookup, args=(attempt, host, port),
                                    name=f"{self._name}-resolver", daemon=True)
        with self._resolvers_lock:
            self._resolvers.add(resolver)
        resolver.start()

    def _lookup(self, attempt: int, host: str, port: int) -> None:
        """Resolver thread: getaddrinfo; the outcome goes to the reactor thread."""
        try:
            event: Event
            try:
                event = Resolved(attempt, tuple(socket.getaddrinfo(
                    host, port, type=socket.SOCK_STREAM)))
            except (OSError, UnicodeError) as exc:
                event = ResolveFailed(attempt, exc)
            self._reactor.call_soon(self._report, event)
        finally:
            with self._resolvers_lock:
                self._resolvers.discard(threading.current_thread())

    def open(self, attempt: int, address: tuple[Any, ...]) -> None:
        """Start a non-blocking connect to *address* (a ``getaddrinfo`` tuple); report
        ``SocketConnected`` or ``SocketFailed``."""
        family, socktype, proto, _, sockaddr = address
        try:
            sock = socket.socket(family, socktype, proto)
        except OSError as exc:
            self._report(SocketFailed(attempt, exc))
            return
        sock.setblocking(False)
        err = sock.connect_ex(sockaddr)
        if err not in _CONNECT_IN_PROGRESS:
            sock.close()
            self._report(SocketFailed(attempt, _os_error(err)))
            return
        self._connecting, self._address = sock, sockaddr
        self._reactor.register(sock, EVENT_WRITE, lambda mask: self._writable(attempt, sock))

    def _writable(self, attempt: int, sock: socket.socket) -> None:
        if sock is not self._connecting:
            return
        self._reactor.unregister(sock)
        self._connecting = None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        try:
            if err:
                raise _os_error(err)
            self._configure(sock)
        except OSError as exc:
            sock.close()
            self._report(SocketFailed(attempt, exc))
            return
        self._ready = sock
        self._report(SocketConnected(attempt))

    def start_tls(self, attempt: int, context: Any, server_hostname: str,
                  description: str) -> None:
        """The TLS handshake on the connected socket (bounded by the attempt's own
        timer); report ``TlsDone`` or ``TlsFailed``."""
        sock, self._ready = self._ready, None
        assert sock is not None, "StartTls without a connected socket"

        def succeeded(tls_sock: socket.socket) -> None:
            self._tls = None
            self._ready = tls_sock
            self._report(TlsDone(attempt))

        def failed(message: str, code: ErrorCode) -> None:
            self._tls = None
            self._report(TlsFailed(attempt, message))

        self._tls = TLSHandshake(self._reactor, context, sock, server_side=False,
                                 server_hostname=server_hostname, on_success=succeeded,
                                 on_failure=failed, description=description)
        self._tls.start()

    def take(self) -> tuple[socket.socket, Any]:
        """Hand over the connected (TLS) socket and its peer's address (a reset socket
        has no ``getpeername()``): the caller owns the socket from now on."""
        sock, self._ready = self._ready, None
        assert sock is not None, "OpenConnection without a connected socket"
        return sock, self._address

    def close(self) -> None:
        """Close the socket of the step in progress, if any; nothing is reported."""
        sock, self._connecting = self._connecting, None
        if sock is not None:
            self._reactor.unregister(sock)
            sock.close()
        tls, self._tls = self._tls, None
        if tls is not None:
            tls.abort()
        ready, self._ready = self._ready, None
        if ready is not None:
            ready.close()

    def join(self, timeout: float) -> None:
        """Wait for the lookups still running (at most *timeout* seconds each); called
        once the reactor stopped, whose answers they would have been."""
        with self._resolvers_lock:
            resolvers = list(self._resolvers)
        for resolver in resolvers:
            resolver.join(timeout)
