"""Starting and stopping asked for from the components' own threads (handlers) while the
application stops, restarts or connects from its own (API.md §3, §4): nothing waits on a
thread that is being joined, a stop asked for by a handler ends the run it was asked
from, and concurrent connect() calls share one attempt. Real sockets on 127.0.0.1."""

from __future__ import annotations

import logging
import socket
import sys
import threading
from typing import Any, List, Optional

import pytest

from morsock import (Client, ClientState, ConnectError, EncryptionProfile, MorsockError,
                     Server, ServerClient, ServerState)
from morsock.testing import RawPeer, echo_handler, running_server

from helpers import TIMEOUT, Recorder, log_lines, wait_until

LOCAL = "127.0.0.1"


def _problems(lines: List[str]) -> List[str]:
    return [line for line in lines if "did not stop" in line or "not closed" in line]


def test_server_stop_from_on_disconnect_while_the_application_stops() -> None:
    """"Stop once the last client has gone", asked in on_disconnect while stop() (e.g. the
    end of a ``with`` block) is closing that client: the handler's stop() must not wait
    for the stop that is joining its thread (it used to, until the join gave up)."""
    calls: List[str] = []

    def on_disconnect(server: Server, client: ServerClient) -> None:
        server.stop()  # returns at once: a stop is under way
        calls.append("stopped")

    with log_lines("morsock", logging.WARNING) as lines:
        server = Server(0, LOCAL, on_handle_command=echo_handler, on_disconnect=on_disconnect)
        server.start()
        try:
            with RawPeer(LOCAL, server.port) as peer:
                assert peer.request(b"hi") == b"hi"
                server.stop()
                peer.expect_close()
        finally:
            server.stop()
        assert calls == ["stopped"]
        assert server.state is ServerState.DISCONNECTED
        assert _problems(lines) == []


def test_a_stop_asked_by_a_handler_leaves_a_restarted_server_alone() -> None:
    """A handler's stop() completes on a helper thread. If the application stops and starts
    the server again before that helper gets going, the new run keeps listening."""
    asked = threading.Event()

    def on_handle_command(server: Server, client: ServerClient, data: bytes) -> bytes:
        server.stop()  # hands the stop to a helper thread
        asked.set()
        return data

    server = Server(0, LOCAL, on_handle_command=on_handle_command)
    server.start()
    try:
        # Holding the life lock keeps the helper waiting until the restart is done (the
        # race this test makes certain: the helper is a thread like any other).
        with server._life_lock:
            with RawPeer(LOCAL, server.port) as peer:
                peer.send_frame(b"stop please")
                assert asked.wait(TIMEOUT)
            server.stop()
            server.start()
        helpers = [t for t in threading.enumerate() if t.name == "morsock-server-stop"]
        for helper in helpers:
            helper.join(TIMEOUT)
            assert not helper.is_alive()
        assert server.state is ServerState.LISTENING
        with RawPeer(LOCAL, server.port) as peer:
            assert peer.request(b"still here") == b"still here"
    finally:
        server.stop()


def test_client_disconnect_from_on_disconnect_while_the_application_disconnects() -> None:
    calls: List[str] = []

    def on_disconnect(client: Client) -> None:
        client.disconnect()  # returns at once: a disconnect is under way
        calls.append("disconnected")

    with log_lines("morsock", logging.WARNING) as lines:
        with running_server(echo_handler) as server:
            client = Client(LOCAL, server.port, on_disconnect=on_disconnect)
            client.connect()
            assert client.request(b"hi", timeout=TIMEOUT) == b"hi"
            client.disconnect()
        assert calls == ["disconnected"]
        assert client.state is ClientState.DISCONNECTED
        assert _problems(lines) == []


def test_reconnect_from_on_disconnect_gives_way_to_the_application_disconnect() -> None:
    """disconnect() "stops retrying at once": a reconnect() asked in on_disconnect while
    the application disconnects raises ConnectError instead of connecting again (it used
    to wait for the join to give up, then connect a fresh run nobody would stop)."""
    outcomes: List[BaseException] = []

    def on_disconnect(client: Client) -> None:
        try:
            client.reconnect()
        except ConnectError as exc:
            outcomes.append(exc)

    with log_lines("morsock", logging.WARNING) as lines:
        with running_server(echo_handler) as server:
            client = Client(LOCAL, server.port, on_disconnect=on_disconnect)
            client.connect()
            wait_until(lambda: server.client_count == 1)
            client.disconnect()
            assert client.state is ClientState.DISCONNECTED and not client.active
            wait_until(lambda: server.client_count == 0)
        assert [str(exc) for exc in outcomes] == ["disconnect() was called"]
        assert _problems(lines) == []


def _waiting_in_connect(thread: threading.Thread) -> bool:
    """*thread* is blocked in an Event.wait() called by Client.connect()."""
    frame: Any = sys._current_frames().get(thread.ident)  # type: ignore[arg-type]
    names = []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    return bool(names) and names[0] == "wait" and "connect" in names


def test_concurrent_connects_wait_for_one_attempt() -> None:
    """Two threads call connect() while an attempt is in progress: the second waits for
    that attempt's outcome instead of cancelling it (the first used to raise 'superseded
    by connect()'). Here the attempt hangs in the AUTHENTICATED handshake (the listener
    never accepts), and a disconnect() ends it: both calls see the same outcome."""
    listener = socket.socket()
    listener.bind((LOCAL, 0))
    listener.listen(4)
    client = Client(LOCAL, listener.getsockname()[1], encryption_key="k",
                    encryption_profile=EncryptionProfile.AUTHENTICATED, connection_timeout=60)
    outcomes: List[Optional[BaseException]] = [None, None]

    def connect(i: int) -> None:
        try:
            client.connect()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcomes[i] = exc

    first = threading.Thread(target=connect, args=(0,))
    second = threading.Thread(target=connect, args=(1,))
    try:
        first.start()
        wait_until(lambda: client.state is ClientState.CONNECTING and _waiting_in_connect(first))
        second.start()
        wait_until(lambda: _waiting_in_connect(second))
        # Let the reactor run what the second connect() queued before disconnect() sets
        # its flag (the old code superseded the first attempt there).
        drained = threading.Event()
        client._reactor.call_soon(drained.set)
        assert drained.wait(TIMEOUT)
        client.disconnect()
        for thread in (first, second):
            thread.join(TIMEOUT)
            assert not thread.is_alive()
    finally:
        client.disconnect()
        listener.close()
    assert [type(exc) for exc in outcomes] == [ConnectError, ConnectError]
    assert [str(exc) for exc in outcomes] == ["disconnect() was called"] * 2


def test_concurrent_connects_both_return_connected() -> None:
    with running_server(echo_handler) as server:
        client = Client(LOCAL, server.port)
        barrier = threading.Barrier(2)
        errors: List[BaseException] = []

        def connect() -> None:
            barrier.wait(TIMEOUT)
            try:
                client.connect()
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                errors.append(exc)

        threads = [threading.Thread(target=connect) for _ in range(2)]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(TIMEOUT)
                assert not thread.is_alive()
            assert errors == []
            assert client.state is ClientState.CONNECTED
            assert client.request(b"one", timeout=TIMEOUT) == b"one"
            wait_until(lambda: server.client_count == 1)
        finally:
            client.disconnect()


def test_a_failed_with_statement_leaves_no_retries_behind() -> None:
    """``with Client(..., auto_reconnect=True) as client:`` against a server that is down:
    the ConnectError leaves the block before ``client`` is bound, so nothing could stop
    the retries; __enter__ stops them itself."""
    port_holder = socket.socket()
    port_holder.bind((LOCAL, 0))  # bound, not listening: connections are refused
    rec = Recorder()
    client = Client(LOCAL, port_holder.getsockname()[1], auto_reconnect=True,
                    reconnect_strategy="IMMEDIATE", on_error=rec.handler("error"))
    try:
        with pytest.raises(ConnectError):
            with client:
                pytest.fail("the with block ran without a connection")
        assert client.state is ClientState.DISCONNECTED and not client.active
    finally:
        port_holder.close()


def test_request_from_a_client_handler_fails_at_once() -> None:
    """request() waits for a reply that is handled on the client's own thread: from a
    handler it could only time out. It raises MorsockError at once, saying why."""
    outcome: List[BaseException] = []
    got: List[bytes] = []

    def on_connect(client: Client) -> None:
        try:
            client.request(b"login", timeout=TIMEOUT)
        except MorsockError as exc:
            outcome.append(exc)
        client.send_data(b"login")

    with running_server(echo_handler) as server:
        with Client(LOCAL, server.port, on_connect=on_connect,
                    on_handle_command=lambda c, data: got.append(data)) as client:
            wait_until(lambda: got == [b"login"])
            assert client.request(b"from outside", timeout=TIMEOUT) == b"from outside"
    assert len(outcome) == 1 and "own threads" in str(outcome[0])
