"""``ServerClient``'s public namespace is exactly what the documentation lists (API §3
and §10, docs/guide/components.rst, docs/guide/flow_control.rst, the docstring of
``message_encrypted``): the connection machinery behind it (cork, send_frame, the
strand ...) is not part of it."""

from __future__ import annotations

from morsock import Client, ServerClient
from morsock.testing import echo_handler, running_server

from helpers import wait_until

#: The documented names: API §3 (and README's TmMServerClient paragraph),
#: docs/guide/components.rst (``send_queue_size``, ``receive_backlog``,
#: ``peer_certificate``), API §10 (``session_id``), API §11 and docs/guide/cluster.rst
#: (``client_id``), ``message_encrypted`` (its docstring).
DOCUMENTED = {
    "handle", "peer_ip", "peer_port", "connected_at", "last_activity_time",
    "bytes_received", "bytes_sent", "messages_received", "messages_sent",
    "connected_time", "connected", "custom_data", "send_data", "disconnect",
    "send_queue_size", "peer_certificate", "receive_backlog", "session_id",
    "message_encrypted", "client_id",
}


def _public(obj: object) -> set:
    return {name for name in dir(obj) if not name.startswith("_")}


def test_a_server_client_shows_exactly_the_documented_names() -> None:
    with running_server(echo_handler) as server, \
            Client("127.0.0.1", server.port) as client:
        assert client.request(b"hi") == b"hi"
        wait_until(lambda: server.client_count == 1, what="the client to be listed")
        [sc] = server.clients.values()
        assert isinstance(sc, ServerClient)
        assert _public(sc) == DOCUMENTED
        assert _public(ServerClient) == DOCUMENTED - {"handle", "custom_data"}
        # and every documented name works on a live client
        assert sc.connected and sc.handle == 1 and sc.peer_ip == "127.0.0.1"
        assert sc.messages_received == 1 and sc.bytes_received > 0
        assert sc.send_queue_size == 0 and sc.receive_backlog >= 0
        assert sc.peer_certificate is None and sc.custom_data is None
        assert sc.session_id is None and sc.message_encrypted is False
        assert sc.connected_time >= 0 and sc.connected_at <= sc.last_activity_time
        wait_until(lambda: sc.messages_sent == 1, what="the reply counted")
        sc.send_data(b"push")
        assert sc.disconnect() and not sc.connected
