"""The application's view of one accepted connection: :class:`ServerClient`, a facade
over the library's :class:`~morsock.connection.Connection` (re-exported as
``morsock.server.ServerClient`` and ``morsock.ServerClient``).

Made by the server's reactor thread when it admits a socket, one per connection, and kept
by the server's client table until the connection has closed. Its properties read the
connection's counters and may be read from any thread; :meth:`ServerClient.send_data` and
:meth:`ServerClient.disconnect` go through the server (any thread); ``message_encrypted``
is written by the strand thread that runs the handler.
"""

from __future__ import annotations

import datetime
import socket
import time
from typing import TYPE_CHECKING, Any

from ._component import Data
from .connection import Connection

if TYPE_CHECKING:
    from .server import Server

__all__ = ["ServerClient"]


class ServerClient:
    """One accepted connection, as the server sees it (Delphi ``TmMServerClient``): a
    facade over the library's :class:`~morsock.connection.Connection`.

    Read-only: ``handle`` (int from 1, never reused by one server), ``peer_ip``,
    ``peer_port`` (the peer's own port), ``connected_at`` (datetime),
    ``last_activity_time`` (datetime), ``bytes_received``, ``bytes_sent``,
    ``messages_received``, ``messages_sent``, ``connected_time`` (seconds),
    ``connected``, ``send_queue_size`` (bytes accepted but not yet taken by the kernel),
    ``receive_backlog`` (bytes of frames read from the peer and not yet handled),
    ``peer_certificate`` (over TLS, the peer's verified certificate as
    ``ssl.SSLSocket.getpeercert()`` gives it -- e.g. to authorise by ``subject`` --;
    None without TLS or when the peer sent none), ``session_id``
    (docs/guide/sessions.rst). Free for the
    application: ``custom_data``. ``message_encrypted``: while ``on_handle_command`` runs
    for this client, True when the message it was given arrived encrypted (False
    otherwise). Methods (any thread): :meth:`send_data`, :meth:`disconnect`.
    """

    #: While ``on_handle_command`` runs for this client: True when the message being
    #: handled arrived encrypted. Written by the handler's own thread around the call.
    message_encrypted: bool = False

    def __init__(self, server: Server, sock: socket.socket, handle: int,
                 peer: Any = None) -> None:
        """Made by the server's reactor thread for an accepted socket."""
        conn = Connection(server._conn_owner, sock, max_message_size=server.max_message_size,
                          max_send_buffer=server.max_send_buffer, peer=peer)
        conn.facade = self
        self._conn = conn
        self._server = server
        self.handle = handle
        self._connected_wall = time.time()
        self._connected_mono = conn.last_activity  # time.monotonic(), as Connection took it
        self._closed_mono = 0.0  # set once its socket is closed
        #: Free slot for the application (Delphi ``CustomData``).
        self.custom_data: Any = None

    @property
    def peer_ip(self) -> str:
        """The peer's IP address."""
        return self._conn.peer_ip

    @property
    def peer_port(self) -> int:
        """The peer's own port."""
        return self._conn.peer_port

    @property
    def peer_certificate(self) -> dict[str, Any] | None:
        """Over TLS, the peer's verified certificate (``getpeercert()``), else None."""
        return self._conn.peer_certificate

    @property
    def connected_at(self) -> datetime.datetime:
        """When the connection was accepted (local time)."""
        return datetime.datetime.fromtimestamp(self._connected_wall)

    @property
    def connected(self) -> bool:
        """True until the connection starts closing."""
        return not self._conn.closing

    @property
    def connected_time(self) -> float:
        """Seconds since the connection was accepted (frozen once it is closed)."""
        closed = self._conn.closed and self._closed_mono  # set just after the close
        end = self._closed_mono if closed else time.monotonic()
        return end - self._connected_mono

    @property
    def last_activity_time(self) -> datetime.datetime:
        """When bytes last arrived from this peer (``connected_at`` if none yet)."""
        return self.connected_at + datetime.timedelta(
            seconds=max(0.0, self._conn.last_activity - self._connected_mono))

    @property
    def bytes_received(self) -> int:
        """Wire bytes received from this peer (headers included)."""
        return self._conn.bytes_received

    @property
    def bytes_sent(self) -> int:
        """Wire bytes sent to this peer (headers included)."""
        return self._conn.bytes_sent

    @property
    def messages_received(self) -> int:
        """Frames received from this peer."""
        return self._conn.messages_received

    @property
    def messages_sent(self) -> int:
        """Frames sent to this peer (counted once their last byte left)."""
        return self._conn.messages_sent

    @property
    def send_queue_size(self) -> int:
        """Bytes accepted for this peer but not yet taken by the kernel."""
        return self._conn.send_queue_size

    @property
    def receive_backlog(self) -> int:
        """Wire bytes of the frames read from this peer and not yet handled (see
        ``max_receive_backlog``)."""
        return self._conn.receive_backlog

    def send_data(self, data: Data, encrypted: bool = False) -> None:
        """Send one message to this client. Thread-safe; never blocks on the peer.

        Raises NotConnectedError once it is disconnected, SendBufferFullError past
        ``max_send_buffer``, CryptoError if ``encrypted`` without a usable key.
        """
        self._server._send_on(self._conn, data, encrypted)

    def disconnect(self) -> bool:
        """Close this connection (``on_disconnect`` follows). False if already closing.
        A session's client is told the session is over (it does not resume)."""
        sessions = self._server._sessions
        if sessions is not None and sessions.close_session(self._conn):
            return True
        return self._conn.close()

    @property
    def client_id(self) -> str:
        """``"<node_id>:<handle>"``: names this client across a cluster (docs/guide/cluster.rst)."""
        return f"{self._server.node_id}:{self.handle}"

    @property
    def session_id(self) -> bytes | None:
        """The id of this client's session (docs/guide/sessions.rst), None without one."""
        sessions = self._server._sessions
        return sessions.session_id(self._conn) if sessions is not None else None

    def __repr__(self) -> str:
        closed = " closed" if self._conn.closing else ""
        return f"<ServerClient #{self.handle} {self._conn.describe()}{closed}>"
