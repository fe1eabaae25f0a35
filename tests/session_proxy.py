"""A TCP proxy on 127.0.0.1 whose connections a test cuts on demand (session tests).

``with CutProxy(target_port) as proxy:`` listens on ``proxy.port`` and forwards every
accepted connection to ``127.0.0.1:target_port`` on one thread (``selectors`` over every
socket and a wake-up pair). :meth:`CutProxy.cut` ends every live connection at once, in
one of three ways:

* ``"reset"`` -- both sockets closed with RST (SO_LINGER 0): bytes in flight are lost;
* ``"close"`` -- both closed with FIN after dropping what the proxy held: the peers see
  a clean end of stream, possibly inside a frame;
* ``"orphan"`` -- the client's side is reset, the server's side is left open and silent
  (nothing more forwarded, nothing closed until :meth:`stop`): a drop the server does not
  notice.

:attr:`CutProxy.refusing` makes new connections be reset at once (the server looks
unreachable). :meth:`wait_accepted` waits for the n-th connection.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
from typing import Any, Dict, List, Optional

__all__ = ["CutProxy"]

_LINGER_RST = struct.pack("ii", 1, 0)


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    except OSError:
        pass
    sock.close()


class CutProxy:
    """See the module docstring."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._lock = threading.Condition()
        self._peer: Dict[socket.socket, socket.socket] = {}
        self._orphans: List[socket.socket] = []
        self._cuts: List[str] = []
        self._stop = False
        self.refusing = False
        self.accepted = 0
        self.cut_count = 0
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "CutProxy":
        self._sel.register(self._listener, selectors.EVENT_READ, "accept")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name="cut-proxy", daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> "CutProxy":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
        self._wake()
        if self._thread is not None:
            self._thread.join(10)
        self._sel.close()
        for sock in list(self._peer) + self._orphans + [self._listener, self._wake_r,
                                                         self._wake_w]:
            sock.close()
        self._peer.clear()

    def cut(self, mode: str = "reset") -> None:
        """End every live connection (see the module docstring); returns at once."""
        assert mode in ("reset", "close", "orphan")
        with self._lock:
            self._cuts.append(mode)
        self._wake()

    def live(self) -> int:
        """Connection pairs being forwarded now."""
        with self._lock:
            return len(self._peer) // 2

    def wait_accepted(self, n: int, timeout: float) -> bool:
        """Wait until *n* connections were accepted (in all)."""
        with self._lock:
            return self._lock.wait_for(lambda: self.accepted >= n, timeout)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    # -- the proxy thread ----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stop:
                    return
                cuts, self._cuts = self._cuts, []
            for mode in cuts:
                self._cut_all(mode)
            for key, _ in self._sel.select(1.0):
                if key.data == "wake":
                    try:
                        self._wake_r.recv(4096)
                    except OSError:
                        pass
                elif key.data == "accept":
                    self._accept()
                else:
                    self._forward(key.fileobj)  # type: ignore[arg-type]

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:
            return
        if self.refusing:
            _reset(client)
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
        except OSError:
            _reset(client)
            return
        for sock in (client, upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._peer[client] = upstream
            self._peer[upstream] = client
            self.accepted += 1
            self._lock.notify_all()
        self._sel.register(client, selectors.EVENT_READ, "client")
        self._sel.register(upstream, selectors.EVENT_READ, "upstream")

    def _drop(self, sock: socket.socket, how: str) -> None:
        """Stop forwarding *sock* and close it (*how*: reset, close or keep)."""
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        with self._lock:
            self._peer.pop(sock, None)
        if how == "reset":
            _reset(sock)
        elif how == "close":
            sock.close()
        else:
            self._orphans.append(sock)

    def _cut_all(self, mode: str) -> None:
        with self._lock:
            pairs = [(c, u) for c, u in self._peer.items()
                     if self._sel.get_map() and self._is_client(c)]
            self.cut_count += 1
        for client, upstream in pairs:
            if mode == "reset":
                self._drop(client, "reset")
                self._drop(upstream, "reset")
            elif mode == "close":
                self._drop(client, "close")
                self._drop(upstream, "close")
            else:
                self._drop(client, "reset")
                self._drop(upstream, "keep")

    def _is_client(self, sock: socket.socket) -> bool:
        try:
            return self._sel.get_key(sock).data == "client"
        except (KeyError, ValueError):
            return False

    def _forward(self, src: socket.socket) -> None:
        dst = self._peer.get(src)
        if dst is None:
            return
        try:
            data = src.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(src, "reset")
            self._drop(dst, "close")
            return
        view = memoryview(data)
        while view:
            try:
                n = dst.send(view)
            except (BlockingIOError, InterruptedError):
                sel = selectors.DefaultSelector()  # the peer is slow: wait for it
                sel.register(dst, selectors.EVENT_WRITE)
                sel.select(1.0)
                sel.close()
                with self._lock:
                    if self._stop or dst not in self._peer or self._cuts:
                        return
                continue
            except OSError:
                self._drop(src, "reset")
                self._drop(dst, "reset")
                return
            view = view[n:]
