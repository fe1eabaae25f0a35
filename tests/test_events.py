"""Event delivery (API.md §5): direct calls on library threads, or an EventQueue pumped by
the application's own thread (``events_use_main_thread=True``)."""

from __future__ import annotations

import socket
import threading
from typing import List, Optional

import pytest

from morsock import (Client, ClientState, ErrorCode, EventQueue, Server, ServerClient,
                     ServerState)
from morsock.testing import RawPeer, running_server

from helpers import TIMEOUT, Recorder, frame_size, read_frame, wait_until

LOCAL = "127.0.0.1"
S = ServerState
C = ClientState


def _queued(queue: EventQueue, n: int) -> None:
    wait_until(lambda: len(queue) >= n, what=f"{n} queued events (have {len(queue)})")


# ------------------------------------------------------------------------ EventQueue itself

def test_event_queue_runs_callbacks_in_order_on_the_pumping_thread() -> None:
    queue = EventQueue()
    ran: List[tuple] = []
    assert queue.pump() == 0 and len(queue) == 0
    posters = [threading.Thread(target=queue.post, args=(ran.append, ("t", i)))
               for i in range(5)]
    for t in posters:
        t.start()
    for t in posters:
        t.join(TIMEOUT)
    assert len(queue) == 5 and ran == []
    assert queue.pump() == 5
    assert sorted(ran) == [("t", i) for i in range(5)]

    ran.clear()
    for i in range(5):
        queue.post(lambda i=i: ran.append((i, threading.get_ident())))
    assert queue.pump(max_events=2) == 2
    assert [i for i, _ in ran] == [0, 1]
    assert queue.pump() == 3
    assert [i for i, _ in ran] == [0, 1, 2, 3, 4]
    assert {ident for _, ident in ran} == {threading.get_ident()}

    # a callback that posts more does not keep one pump() going forever
    def again() -> None:
        ran.append("again")
        queue.post(again)
    queue.post(again)
    assert queue.pump() == 1 and len(queue) == 1
    assert queue.clear() == 1 and len(queue) == 0

    # an exception propagates, after its callback was removed
    def boom() -> None:
        raise RuntimeError("boom")
    queue.post(boom)
    queue.post(ran.append, "after boom")
    with pytest.raises(RuntimeError):
        queue.pump()
    assert queue.pump() == 1 and ran[-1] == "after boom"


def test_event_queue_pump_waits_for_a_first_callback() -> None:
    queue = EventQueue()
    ran = threading.Event()
    poster = threading.Thread(target=queue.post, args=(ran.set,))
    poster.start()
    try:
        assert queue.pump(timeout=TIMEOUT) == 1
        assert ran.is_set()
    finally:
        poster.join(TIMEOUT)
    assert queue.pump(timeout=0.01) == 0  # empty: gives up after the timeout


def test_default_event_queue_is_a_singleton_and_used_without_event_queue() -> None:
    default = EventQueue.default()
    assert EventQueue.default() is default and isinstance(default, EventQueue)
    seen: List[EventQueue] = []
    threads = [threading.Thread(target=lambda: seen.append(EventQueue.default()))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert all(q is default for q in seen)

    default.clear()
    rec = Recorder()
    server = Server(0, LOCAL, events_use_main_thread=True,
                    on_state_change=rec.handler("state"))
    try:
        server.start()
        assert rec.count("state") == 0 and len(default) == 2
        assert default.pump() == 2
        assert [e[1:] for e in rec.named("state")] == [(S.DISCONNECTED, S.STARTING),
                                                       (S.STARTING, S.LISTENING)]
    finally:
        server.stop()
        default.pump()
    assert rec.named("state")[-1] == ("state", S.STOPPING, S.DISCONNECTED)


# ------------------------------------------------------------------------ queued mode

def test_server_events_wait_for_the_pump_and_run_on_the_pumping_thread() -> None:
    queue = EventQueue()
    main = threading.get_ident()
    rec = Recorder()
    handler_threads: List[int] = []

    def handler(server: Server, client: ServerClient, data: bytes) -> bytes:
        handler_threads.append(threading.get_ident())
        return data

    server = Server(0, LOCAL, events_use_main_thread=True, event_queue=queue,
                    on_handle_command=handler,
                    on_connect=rec.handler("connect", thread=True),
                    on_disconnect=rec.handler("disconnect", thread=True),
                    on_error=rec.handler("error", thread=True),
                    on_state_change=rec.handler("state", thread=True))
    server.start()
    try:
        assert rec.snapshot() == [] and len(queue) == 2
        assert queue.pump() == 2
        assert [e[1:3] for e in rec.named("state")] == [(S.DISCONNECTED, S.STARTING),
                                                        (S.STARTING, S.LISTENING)]
        with RawPeer(LOCAL, server.port) as peer:
            # on_handle_command runs on a worker at once, without waiting for the pump
            assert peer.request(b"hello") == b"hello"
            assert handler_threads and main not in handler_threads
            _queued(queue, 1)
            assert rec.count("connect") == 0
            assert queue.pump() == 1
            assert rec.count("connect") == 1

            with RawPeer(LOCAL, server.port) as bad:
                bad.send_raw(b"GET / HTTP/1.1\r\n\r\n")  # not a frame: closed
                bad.expect_close()
            _queued(queue, 3)  # its on_connect, on_error, on_disconnect
            assert rec.count("error") == 0 and rec.count("disconnect") == 0
            assert queue.pump() == 3
            (_, client, _, code, _), = rec.named("error")
            assert code == ErrorCode.INVALID_PROTOCOL and isinstance(client, ServerClient)
            assert rec.count("disconnect") == 1
        server.stop()
        # LISTENING->STOPPING, the peer's on_disconnect, STOPPING->DISCONNECTED
        assert rec.count("disconnect") == 1 and len(queue) == 3
        assert queue.pump() == 3
    finally:
        server.stop()
        queue.pump()
    assert rec.count("disconnect") == 2
    assert [e[1:3] for e in rec.named("state")][-2:] == [(S.LISTENING, S.STOPPING),
                                                         (S.STOPPING, S.DISCONNECTED)]
    assert {e[-1] for e in rec.snapshot()} == {main}  # every event ran on this thread


def test_client_events_wait_for_the_pump_and_run_on_the_pumping_thread() -> None:
    queue = EventQueue()
    main = threading.get_ident()
    rec = Recorder()
    handler_threads: List[int] = []

    def handler(sender: Client, data: bytes) -> bytes:
        handler_threads.append(threading.get_ident())
        return b"ack:" + data

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind((LOCAL, 0))
        listener.listen(1)
        client = Client(LOCAL, listener.getsockname()[1], events_use_main_thread=True,
                        event_queue=queue, on_handle_command=handler,
                        on_connect=rec.handler("connect", thread=True),
                        on_disconnect=rec.handler("disconnect", thread=True),
                        on_error=rec.handler("error", thread=True),
                        on_state_change=rec.handler("state", thread=True))
        try:
            client.connect()
            raw, _ = listener.accept()
            with raw:
                _queued(queue, 3)  # two state changes, then on_connect
                assert rec.snapshot() == []
                assert queue.pump() == 3
                assert [e[0] for e in rec.snapshot()] == ["state", "state", "connect"]
                # the handler answers at once on the client's worker
                raw.sendall(b"\xbe\xba\xfe\xca\x02\x00\x00\x00\x00hi")
                assert read_frame(raw) == (0, b"ack:hi")
                assert handler_threads and main not in handler_threads
                raw.sendall(b"garbage!!" * 3)  # a bad magic: the client closes
                raw.settimeout(TIMEOUT)
                assert raw.recv(100) == b""
            _queued(queue, 3)  # on_error, CONNECTED->DISCONNECTED, on_disconnect
            assert rec.count("error") == 0 and rec.count("disconnect") == 0
            assert queue.pump() == 3
            (_, _, code, _), = rec.named("error")
            assert code == ErrorCode.INVALID_PROTOCOL
            assert rec.count("disconnect") == 1
            assert rec.named("state")[-1][1:3] == (C.CONNECTED, C.DISCONNECTED)
        finally:
            client.disconnect()
            queue.pump()
    assert {e[-1] for e in rec.snapshot()} == {main}


# ------------------------------------------------------------------------ direct mode

def test_direct_events_run_on_library_threads_and_in_order() -> None:
    main = threading.get_ident()
    release = threading.Event()
    rec = Recorder()

    def on_connect(server: Server, client: ServerClient) -> None:
        rec.add("connect-begin", threading.get_ident())
        assert release.wait(TIMEOUT)
        rec.add("connect-end", threading.get_ident())

    def handler(server: Server, client: ServerClient, data: bytes) -> bytes:
        rec.add("command", threading.get_ident())
        return data

    with running_server(handler, on_connect=on_connect) as server:
        with RawPeer(LOCAL, server.port) as peer:
            peer.send_frame(b"early")  # arrives while on_connect is still running
            rec.wait_count("connect-begin", 1)
            wait_until(lambda: server.total_messages_received == 1)
            assert rec.count("command") == 0  # not before on_connect returned
            release.set()
            assert peer.recv_frame().payload == b"early"
    names = [e[0] for e in rec.snapshot()]
    assert names == ["connect-begin", "connect-end", "command"]
    assert main not in {e[1] for e in rec.snapshot()}


def test_event_handler_exception_is_reported_and_harmless() -> None:
    rec = Recorder()

    def on_connect(server: Server, client: ServerClient) -> None:
        raise KeyError("on_connect broke")

    def on_error(server: Server, client: Optional[ServerClient], message: str,
                 code: int) -> None:
        rec.add("error", client, message, code)
        raise RuntimeError("on_error broke as well")  # logged, never loops or kills

    with running_server(on_connect=on_connect, on_error=on_error) as server:
        with RawPeer(LOCAL, server.port) as peer:
            assert peer.request(b"still served") == b"still served"
            (_, client, message, code), = rec.wait_count("error", 1)
            assert code == ErrorCode.HANDLER_EXCEPTION and "on_connect" in message
            assert isinstance(client, ServerClient) and client.connected
        with RawPeer(LOCAL, server.port) as peer:
            assert peer.request(b"next one") == b"next one"
        rec.wait_count("error", 2)


def test_data_events_count_the_wire_bytes() -> None:
    rec = Recorder()
    client_rec = Recorder()
    with running_server(on_data_received=rec.handler("in"), on_data_sent=rec.handler("out"),
                        on_connect=rec.handler("connect")) as server, \
            Client(LOCAL, server.port, on_data_received=client_rec.handler("in"),
                   on_data_sent=client_rec.handler("out")) as client:
        payloads = [b"a", b"bb" * 100, b"", b"ccc" * 5000]
        for p in payloads[:2] + payloads[3:]:
            assert client.request(p) == p
        client.send_data(b"")
        wire = sum(frame_size(len(p)) for p in payloads)
        echoed = wire - frame_size(0)
        wait_until(lambda: sum(e[2] for e in rec.named("out")) == echoed)
        wait_until(lambda: sum(e[2] for e in rec.named("in")) == wire)
        wait_until(lambda: sum(e[1] for e in client_rec.named("in")) == echoed)
        wait_until(lambda: sum(e[1] for e in client_rec.named("out")) == wire)
        (_, sc), = rec.named("connect")
        assert {e[1] for e in rec.named("in") + rec.named("out")} == {sc}
        assert server.total_bytes_received == wire and client.total_bytes_sent == wire
