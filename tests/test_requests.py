"""Client.request() never returns another request's reply (docs/guide/requests.rst):
late replies after a timeout, fire-and-forget sends in between, concurrent requests
behind one that timed out, a server that skips a reply, and the checks made before
anything is sent."""

from __future__ import annotations

import math
import threading
from typing import Any, List, Optional

import pytest

from morsock import (Client, ErrorCode, MorsockError, NotConnectedError, ProtocolError,
                     ReconnectStrategy, RequestTimeout, Server, ServerClient)
from morsock.testing import running_server

from helpers import TIMEOUT, Recorder, scaled, wait_until

LOCAL = "127.0.0.1"


def _held(client: Client) -> int:
    """Requests the client holds back right now (0 where it has no such rule)."""
    return int(getattr(getattr(client, "_replies", None), "held", 0))


class SlowServer:
    """A handler: ``slow`` waits for :attr:`release`; ``note`` gets no reply; ``silent``
    never gets one; everything else ``reply-to-<data>``."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def __call__(self, server: Server, client: ServerClient, data: bytes) -> Optional[bytes]:
        if data.startswith(b"slow"):
            assert self.release.wait(TIMEOUT)
        elif data in (b"note", b"silent"):
            return None
        return b"reply-to-" + data


def _request_in_thread(client: Client, data: bytes, results: List[Any],
                       timeout: float = TIMEOUT) -> threading.Thread:
    def run() -> None:
        try:
            results.append(client.request(data, timeout=timeout))
        except Exception as exc:  # the test looks at it
            results.append(exc)
    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize("note_between", [False, True])
def test_a_late_reply_never_goes_to_the_next_request(note_between: bool) -> None:
    """request(slow) times out; the next request (after a send_data() the server does not
    answer, or right away) gets its own reply, and the late one reaches
    on_handle_command."""
    handler = SlowServer()
    rec = Recorder()
    with running_server(handler) as server, \
            Client(LOCAL, server.port, on_handle_command=rec.handler("unsolicited")) as client:
        with pytest.raises(RequestTimeout):
            client.request(b"slow", timeout=0.3)
        sent = 1
        if note_between:
            client.send_data(b"note")
            sent += 1
        results: List[Any] = []
        thread = _request_in_thread(client, b"fast", results)
        # "fast" is either on the wire behind "slow" or held back by the client
        wait_until(lambda: server.total_messages_received > sent or _held(client) == 1,
                   what="the next request sent or held")
        handler.release.set()
        thread.join(TIMEOUT)
        assert results == [b"reply-to-fast"]
        rec.wait_count("unsolicited", 1)
        assert rec.named("unsolicited") == [("unsolicited", b"reply-to-slow")]
        assert client.request(b"after") == b"reply-to-after"
        assert client.connected


def test_requests_behind_a_timed_out_one_never_get_its_reply() -> None:
    """Three requests in flight; the first times out. The middle one gives up (had the
    server skipped the first reply, it would have been handed the third's), the newest
    gets its own reply, and nobody gets another's."""
    handler = SlowServer()
    rec = Recorder()
    with running_server(handler) as server, \
            Client(LOCAL, server.port, on_handle_command=rec.handler("unsolicited")) as client:
        first: List[Any] = []
        middle: List[Any] = []
        newest: List[Any] = []
        threads = [_request_in_thread(client, b"slow", first, timeout=0.5)]
        wait_until(lambda: server.total_messages_received == 1, what="slow in")
        threads.append(_request_in_thread(client, b"middle", middle))
        wait_until(lambda: server.total_messages_received == 2, what="middle in")
        threads.append(_request_in_thread(client, b"newest", newest))
        wait_until(lambda: server.total_messages_received == 3, what="newest in")
        threads[0].join(TIMEOUT)
        assert len(first) == 1 and isinstance(first[0], RequestTimeout)
        handler.release.set()
        for thread in threads:
            thread.join(TIMEOUT)
        assert newest == [b"reply-to-newest"]
        assert middle != [b"reply-to-slow"]
        assert len(middle) == 1 and isinstance(middle[0], RequestTimeout), middle
        assert "gave up" in str(middle[0])
        rec.wait_count("unsolicited", 2)
        assert [e[1] for e in rec.named("unsolicited")] == [b"reply-to-slow",
                                                            b"reply-to-middle"]
        assert client.request(b"after") == b"reply-to-after"


def test_a_skipped_reply_costs_one_timeout_and_the_connection_not_more() -> None:
    """The server never answers "silent": the next request is held, its timeout passes,
    the client closes the connection (its order is lost) and reconnects; from then on
    requests work again, and no request ever got a reply that was not its own."""
    handler = SlowServer()
    rec = Recorder()
    with running_server(handler) as server, \
            Client(LOCAL, server.port, auto_reconnect=True,
                   reconnect_strategy=ReconnectStrategy.IMMEDIATE,
                   on_error=rec.handler("error"), on_connect=rec.handler("connect"),
                   on_handle_command=rec.handler("unsolicited")) as client:
        rec.wait_count("connect", 1)
        with pytest.raises(RequestTimeout):
            client.request(b"silent", timeout=0.3)
        with pytest.raises(RequestTimeout, match="order of replies is lost"):
            client.request(b"next", timeout=0.3)
        (_, message, code), = rec.wait_count("error", 1)
        assert code == ErrorCode.TIMEOUT and "skip replies" in message
        rec.wait_count("connect", 2)
        wait_until(lambda: client.connected, what="reconnected")
        assert client.request(b"again") == b"reply-to-again"
        assert rec.named("unsolicited") == []
        assert server.total_messages_received >= 2  # "next" was never sent


def test_answers_to_send_data_never_go_to_a_request() -> None:
    """An echo server answers send_data() too: with send_data_replies those answers go to
    on_handle_command, and a request gets its own reply (without it, the next request
    would take the first answer)."""
    gate = threading.Event()

    def echo(server: Server, client: ServerClient, data: bytes) -> bytes:
        if data == b"x1":
            assert gate.wait(TIMEOUT)  # the request is made before x1's answer is out
        return b"echo-" + data

    rec = Recorder()
    with running_server(echo) as server, \
            Client(LOCAL, server.port, send_data_replies=True,
                   on_handle_command=rec.handler("unsolicited")) as client:
        client.send_data(b"x1")
        client.send_data(b"x2")
        results: List[Any] = []
        thread = _request_in_thread(client, b"y", results)
        wait_until(lambda: _held(client) == 1, what="the request held behind x1, x2")
        gate.set()
        thread.join(TIMEOUT)
        assert results == [b"echo-y"]
        rec.wait_count("unsolicited", 2)
        assert [e[1] for e in rec.named("unsolicited")] == [b"echo-x1", b"echo-x2"]
        assert client.request(b"z") == b"echo-z"


def test_send_data_replies_with_a_server_that_does_not_answer_never_gives_wrong_data() -> None:
    """The setting's premise broken (the server answers nothing to "note"): the request
    times out and the connection is renewed; no request gets another's reply."""
    handler = SlowServer()
    rec = Recorder()
    with running_server(handler) as server, \
            Client(LOCAL, server.port, send_data_replies=True, auto_reconnect=True,
                   reconnect_strategy=ReconnectStrategy.IMMEDIATE,
                   on_connect=rec.handler("connect"), on_error=rec.handler("error"),
                   on_handle_command=rec.handler("unsolicited")) as client:
        rec.wait_count("connect", 1)
        client.send_data(b"note")
        with pytest.raises(RequestTimeout, match="order of replies is lost"):
            client.request(b"y", timeout=0.3)
        rec.wait_count("connect", 2)
        wait_until(lambda: client.connected, what="reconnected")
        assert client.request(b"after") == b"reply-to-after"
        assert rec.named("unsolicited") == []


def test_a_held_request_fails_at_once_when_the_connection_drops() -> None:
    handler = SlowServer()
    with running_server(handler) as server, Client(LOCAL, server.port) as client:
        with pytest.raises(RequestTimeout):
            client.request(b"slow", timeout=0.3)
        results: List[Any] = []
        thread = _request_in_thread(client, b"held", results, timeout=30)
        wait_until(lambda: _held(client) == 1, what="request held")
        assert server.disconnect_all_clients() == 1
        thread.join(TIMEOUT)
        assert len(results) == 1 and isinstance(results[0], NotConnectedError)
        handler.release.set()


# ----------------------------------------------------------- checked before sending

@pytest.mark.parametrize("timeout, kind", [(-1, ValueError), (0, ValueError),
                                           (math.nan, ValueError), (math.inf, ValueError),
                                           ("5", TypeError), (True, TypeError),
                                           (None, TypeError)])
def test_request_timeout_nonsense_is_refused_before_sending(timeout: Any, kind: type) -> None:
    with running_server() as server, Client(LOCAL, server.port) as client:
        with pytest.raises(kind, match=r"request\(timeout=\.\.\.\)"):
            client.request(b"x", timeout=timeout)
        assert client.messages_sent == 0 and server.total_messages_received == 0
        assert client.request(b"ok", timeout=scaled(2.5)) == b"ok"


@pytest.mark.parametrize("profile", [None, "MORMOT", "AUTHENTICATED"])
def test_oversize_payload_is_refused_locally_on_both_sides(profile: Optional[str]) -> None:
    """Over max_message_size (counting what encryption adds): ProtocolError
    (MESSAGE_TOO_LARGE) from send_data, request and broadcast_data, nothing sent, and
    the connection goes on."""
    limit = 1000
    key = {"encryption_key": "k", "encryption_profile": profile} if profile else {}
    encrypted = profile is not None
    rec = Recorder()
    with running_server(max_message_size=limit, on_error=rec.handler("error"), **key) as server, \
            Client(LOCAL, server.port, max_message_size=limit,
                   on_error=rec.handler("error"), **key) as client:
        wait_until(lambda: server.client_count == 1, what="client in")
        (sc,) = server.clients.values()
        sent, received = client.messages_sent, server.total_messages_received
        big = b"x" * (limit + 1)
        just = b"x" * (limit - 10)  # fits in plaintext, not once encrypted
        for payload in ([big, just] if encrypted else [big]):
            for send in (lambda: client.send_data(payload, encrypted=encrypted),
                         lambda: client.request(payload, encrypted=encrypted),
                         lambda: sc.send_data(payload, encrypted=encrypted),
                         lambda: server.broadcast_data(payload, encrypted=encrypted)):
                with pytest.raises(ProtocolError, match="max_message_size") as info:
                    send()
                assert info.value.code == ErrorCode.MESSAGE_TOO_LARGE
        assert client.messages_sent == sent and server.total_messages_received == received
        assert client.request(b"y" * 100, encrypted=encrypted) == b"y" * 100
        assert client.connected and rec.named("error") == []


@pytest.mark.parametrize("batch", [1, 8])
def test_an_oversize_handler_reply_is_reported_not_sent(batch: int) -> None:
    """A handler's plaintext reply over max_message_size (alone, or in a batch of
    several) is refused at the server and reported there (MESSAGE_TOO_LARGE); the
    connection goes on and the replies that fit still come."""
    limit = 1000
    rec = Recorder()
    got = Recorder()

    def handle(server: Any, client: Any, data: bytes) -> bytes:
        return b"z" * (limit + 1) if data == b"big" else data

    with running_server(handle, max_message_size=limit,
                        on_error=rec.handler("error")) as server, \
            Client(LOCAL, server.port, on_handle_command=got.handler("reply")) as client:
        for i in range(batch - 1):
            client.send_data(b"%d" % i)
        client.send_data(b"big")
        client.send_data(b"last")
        replies = got.wait_count("reply", batch)
        assert [r[-1] for r in replies] == [b"%d" % i for i in range(batch - 1)] + [b"last"]
        (error,) = rec.wait_count("error", 1)
        assert error[-1] == ErrorCode.MESSAGE_TOO_LARGE and "max_message_size" in error[-2]
        assert client.connected


def test_request_from_a_client_handler_still_fails_at_once() -> None:
    """The order rules do not change the rule for a client's own threads."""
    rec = Recorder()

    def on_connect(client: Client) -> None:
        try:
            client.request(b"x", timeout=1)
        except MorsockError as exc:
            rec.add("refused", str(exc))

    with running_server() as server, Client(LOCAL, server.port, on_connect=on_connect):
        (_, message), = rec.wait_count("refused", 1)
        assert "own threads" in message
