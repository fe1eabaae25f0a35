"""Acceptance tests of morsock.Server over real sockets on 127.0.0.1 (API.md §3, §5, §6)."""

from __future__ import annotations

import datetime
import logging
import os
import socket
import struct
import threading
from typing import Dict, List, Optional

import pytest

from morsock import (AESMode, Client, ClientState, CryptoError, EncryptionProfile, ErrorCode,
                     KeySize, MorsockError, NotConnectedError, Server, ServerClient, ServerState)
from morsock.crypto import MormotCipher
from morsock.protocol import encode_frame
from morsock.testing import RawPeer, echo_handler, running_server

from helpers import (TIMEOUT, VECTOR_KEY, VECTOR_MODES, VECTORS, Recorder, frame_size,
                     free_port, log_lines, scaled, vector_cases, vector_decrypt,
                     vector_edge, wait_until)

LOCAL = "127.0.0.1"
S = ServerState


def _fds() -> set:
    return set(os.listdir("/proc/self/fd"))


# ------------------------------------------------------------------------ life cycle

def test_echo_on_port_zero_and_every_state_transition() -> None:
    rec = Recorder()
    server = Server(port=0, host=LOCAL, on_handle_command=echo_handler,
                    on_state_change=rec.handler("state"))
    assert server.state is S.DISCONNECTED and not server.active
    server.start()
    try:
        assert server.port != 0
        assert server.state is S.LISTENING and server.active
        with RawPeer(LOCAL, server.port) as peer:
            assert peer.request(b"hello morsock") == b"hello morsock"
            assert peer.request(bytes(range(256)) * 40) == bytes(range(256)) * 40
    finally:
        server.stop()
    assert server.state is S.DISCONNECTED and not server.active
    assert [e[1:] for e in rec.named("state")] == [
        (S.DISCONNECTED, S.STARTING), (S.STARTING, S.LISTENING),
        (S.LISTENING, S.STOPPING), (S.STOPPING, S.DISCONNECTED)]
    server.stop()  # stopping a stopped server is a no-op
    assert len(rec.named("state")) == 4


def test_active_property_and_with_block() -> None:
    rec = Recorder()
    server = Server(port=0, host=LOCAL, on_handle_command=echo_handler,
                    on_state_change=rec.handler("state"))
    server.active = True
    try:
        assert server.active and server.state is S.LISTENING
        with RawPeer(LOCAL, server.port) as peer:
            assert peer.request(b"via active") == b"via active"
    finally:
        server.active = False
    assert not server.active and server.state is S.DISCONNECTED
    assert rec.named("state")[-1] == ("state", S.STOPPING, S.DISCONNECTED)

    with Server(0, LOCAL, on_handle_command=lambda s, c, d: d.upper()) as srv:
        assert srv.active and srv.port != 0
        with RawPeer(LOCAL, srv.port) as peer:
            assert peer.request(b"with block") == b"WITH BLOCK"
    assert srv.state is S.DISCONNECTED and not srv.active


def test_settings_locked_while_listening_and_settable_while_stopped() -> None:
    server = Server(port=0, host=LOCAL, on_handle_command=echo_handler)
    assert server.port == 0 and server.thread_pool_size == 4 and server.max_connections == 1000
    server.encryption_mode = "amGCM"
    assert server.encryption_mode is AESMode.GCM
    server.encryption_mode = "cbc"
    with server:
        for name, value in [("port", 1234), ("host", "127.0.0.2"), ("thread_pool_size", 2),
                            ("encryption_key", "k"), ("encryption_mode", AESMode.CTR),
                            ("encryption_profile", EncryptionProfile.MORMOT),
                            ("max_message_size", 10), ("events_use_main_thread", True)]:
            before = getattr(server, name)
            with pytest.raises(MorsockError):
                setattr(server, name, value)
            assert getattr(server, name) == before, name
        server.max_connections = 50  # a live setting: allowed while listening
        assert server.max_connections == 50
    # stopped: every setting may change, and a restart uses it
    port = free_port()
    server.port = port
    server.thread_pool_size = 2
    server.host = LOCAL
    with server:
        assert server.port == port
        with RawPeer(LOCAL, port) as peer:
            assert peer.request(b"moved") == b"moved"


def test_busy_port_raises_and_reports_bind_failed() -> None:
    rec = Recorder()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind((LOCAL, 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        server = Server(port=port, host=LOCAL, on_error=rec.handler("error"),
                        on_state_change=rec.handler("state"))
        with pytest.raises(MorsockError) as info:
            server.start()
        assert info.value.code == ErrorCode.BIND_FAILED
        assert server.state is S.DISCONNECTED and not server.active
        errors = rec.named("error")
        assert len(errors) == 1
        _, client, message, code = errors[0]
        assert client is None and code == ErrorCode.BIND_FAILED and str(port) in message
        assert [e[1:] for e in rec.named("state")] == [(S.DISCONNECTED, S.STARTING),
                                                       (S.STARTING, S.DISCONNECTED)]
    # the blocker is gone: the same server object starts on that port now
    with server:
        assert server.port == port


def test_restart_on_the_same_port_right_after_stop() -> None:
    server = Server(port=0, host=LOCAL, on_handle_command=echo_handler)
    with server:
        port = server.port
        peer = RawPeer(LOCAL, port)
        assert peer.request(b"first life") == b"first life"
    try:
        peer.expect_close()  # the server closed first: its side sits in TIME_WAIT
    finally:
        peer.close()
    with server:  # SO_REUSEADDR: rebinding works at once
        assert server.port == port
        with RawPeer(LOCAL, port) as peer2:
            assert peer2.request(b"second life") == b"second life"


# ------------------------------------------------------------------------ statistics

def _handler_quiet_or_echo(server: Server, client: ServerClient, data: bytes) -> Optional[bytes]:
    if data.startswith(b"quiet"):
        return None
    if data.startswith(b"double"):
        return data * 2
    return data


def test_statistics_are_exact_on_both_sides() -> None:
    rec = Recorder()
    # every frame each side sent, per connection name: wire sizes are 9 + payload
    to_server: Dict[str, List[bytes]] = {"A": [], "B": [], "C": []}
    to_peer: Dict[str, List[bytes]] = {"A": [], "B": [], "C": []}

    def expect(who: str, request: bytes) -> Optional[bytes]:
        to_server[who].append(request)
        reply = _handler_quiet_or_echo(None, None, request)  # type: ignore[arg-type]
        if reply:
            to_peer[who].append(reply)
        return reply

    with running_server(_handler_quiet_or_echo, on_connect=rec.handler("connect"),
                        on_disconnect=rec.handler("disconnect")) as server:
        assert server.total_connections == 0 and server.client_count == 0
        assert server.up_time >= 0
        client_rec = Recorder()
        peer_a = RawPeer(LOCAL, server.port)
        peer_b = RawPeer(LOCAL, server.port)
        client = Client(LOCAL, server.port, on_handle_command=client_rec.handler("pushed"))
        try:
            client.connect()
            rec.wait_count("connect", 3)
            assert server.total_connections == 3
            assert server.client_count == 3 == server.total_active_connections
            by_port = {sc.peer_port: sc for sc in server.clients.values()}
            sc_a = by_port.pop(peer_a.sock.getsockname()[1])
            sc_b = by_port.pop(peer_b.sock.getsockname()[1])
            (sc_c,) = by_port.values()
            conns = {"A": sc_a, "B": sc_b, "C": sc_c}

            for payload in (b"hello", b"quiet-1", b"x" * 1000):
                reply = expect("A", payload)
                peer_a.send_frame(payload)
                if reply:
                    assert peer_a.recv_frame().payload == reply
            for payload in (b"double-abc", b"\x00" * 70000, b"quiet-2"):
                reply = expect("B", payload)
                peer_b.send_frame(payload)
                if reply:
                    assert peer_b.recv_frame().payload == reply
            assert client.request(b"from the client") == expect("C", b"from the client")
            client.send_data(b"quiet-3")
            expect("C", b"quiet-3")
            n_in = sum(len(v) for v in to_server.values())
            wait_until(lambda: server.total_messages_received == n_in, what="all messages in")

            sc_a.send_data(b"push to A")
            to_peer["A"].append(b"push to A")
            assert server.broadcast_data("all \u00e9") == 3  # str is sent as UTF-8
            for who in "ABC":
                to_peer[who].append("all \u00e9".encode())
            assert peer_a.recv_frame().payload == b"push to A"
            assert peer_a.recv_frame().payload == "all \u00e9".encode()
            assert peer_b.recv_frame().payload == "all \u00e9".encode()
            client_rec.wait_count("pushed", 1)
            assert client_rec.named("pushed") == [("pushed", "all \u00e9".encode())]

            def wire(frames: List[bytes]) -> int:
                return sum(frame_size(len(f)) for f in frames)

            for who, sc in conns.items():
                # bytes and messages sent are two counters, updated one after the other
                wait_until(lambda: (sc.bytes_sent, sc.messages_sent)
                           == (wire(to_peer[who]), len(to_peer[who])), what=f"{who} sent")
                assert sc.bytes_received == wire(to_server[who]), who
                assert sc.messages_received == len(to_server[who]), who
                assert sc.messages_sent == len(to_peer[who]), who
            total_in = sum(wire(v) for v in to_server.values())
            total_out = sum(wire(v) for v in to_peer.values())
            assert server.total_bytes_received == total_in
            assert server.total_bytes_sent == total_out
            assert server.total_messages_received == sum(len(v) for v in to_server.values())
            assert server.total_messages_sent == sum(len(v) for v in to_peer.values())
            # the morsock client counts the same wire bytes from its side
            wait_until(lambda: client.total_bytes_received == wire(to_peer["C"]))
            assert client.total_bytes_sent == wire(to_server["C"])
            assert client.messages_sent == len(to_server["C"])
            assert client.messages_received == len(to_peer["C"])

            info = server.get_server_info()
            assert "LISTENING" in info and str(server.port) in info and "DISABLED" in info
            assert str(total_in) in info and str(total_out) in info

            # clear_statistics: totals restart at zero, clients and their counters stay
            server.clear_statistics()
            assert (server.total_bytes_received, server.total_bytes_sent,
                    server.total_messages_received, server.total_messages_sent,
                    server.total_connections) == (0, 0, 0, 0, 0)
            assert server.client_count == 3 == server.total_active_connections
            assert sc_a.messages_received == 3
            assert peer_a.request(b"after clear") == b"after clear"
            wait_until(lambda: server.total_bytes_sent == frame_size(11))
            assert server.total_bytes_received == frame_size(11)
            assert server.total_messages_received == 1 == server.total_messages_sent

            client.clear_statistics()
            assert (client.total_bytes_sent, client.total_bytes_received,
                    client.messages_sent, client.messages_received) == (0, 0, 0, 0)
            assert client.request(b"12345") == b"12345"
            assert (client.total_bytes_sent, client.messages_sent) == (14, 1)
            assert (client.total_bytes_received, client.messages_received) == (14, 1)

            # connection counts follow connects and disconnects
            peer_a.close()
            rec.wait_count("disconnect", 1)
            assert server.client_count == 2 == server.total_active_connections
            with RawPeer(LOCAL, server.port) as peer_d:
                assert peer_d.request(b"d") == b"d"
                assert server.total_connections == 1  # counted since clear_statistics
                assert server.client_count == 3
            rec.wait_count("disconnect", 2)
            assert server.client_count == 2

            # up_time: whole seconds while listening (polled: no event marks a second)
            wait_until(lambda: server.up_time >= 1, scaled(5.0), "up_time reaching 1 s")
            assert isinstance(server.up_time, int)
        finally:
            client.disconnect()
            peer_a.close()
            peer_b.close()
    assert server.up_time == 0


def test_encryption_info() -> None:
    assert Server().encryption_info == "DISABLED"
    assert Client().encryption_info == "DISABLED"
    assert Server(encryption_key="secret").encryption_info == "AES-256-CBC"
    assert Client(encryption_key="secret").encryption_info == "AES-256-CBC"
    assert Server(encryption_key="k", encryption_mode="gcm",
                  encryption_key_size=KeySize.AES128).encryption_info == "AES-128-GCM"
    assert Client(encryption_key="k", encryption_mode=AESMode.CTR,
                  encryption_key_size=192).encryption_info == "AES-192-CTR"
    mormot = Server(encryption_key="k", encryption_profile="mormot").encryption_info
    assert mormot.startswith("AES-256-CBC")
    server = Server(port=0, host=LOCAL, encryption_key="secret", encryption_mode="amOFB")
    with server:
        assert server.encryption_info == "AES-256-OFB"
        assert "AES-256-OFB" in server.get_server_info()


# ------------------------------------------------------------------------ concurrency

def test_connect_and_disconnect_exactly_once_per_client_under_concurrency() -> None:
    log: Dict[int, List[str]] = {}
    lock = threading.Lock()
    all_gone = threading.Event()
    disconnects = [0]

    def note(client: ServerClient, what: str) -> None:
        with lock:
            log.setdefault(client.handle, []).append(what)

    def on_connect(server: Server, client: ServerClient) -> None:
        note(client, "connect-begin")
        client.custom_data = threading.get_ident()
        note(client, "connect-end")

    def on_disconnect(server: Server, client: ServerClient) -> None:
        note(client, "disconnect")
        with lock:
            disconnects[0] += 1
            if disconnects[0] == 100:
                all_gone.set()

    def handler(server: Server, client: ServerClient, data: bytes) -> bytes:
        note(client, "command")
        return data

    errors: List[BaseException] = []

    def worker(t: int) -> None:
        try:
            peers = []
            for i in range(10):
                peer = RawPeer(LOCAL, port)
                peers.append(peer)
                kind = (t + i) % 4
                if kind == 0:
                    peer.close()                          # connect and leave at once
                elif kind == 1:
                    assert peer.request(b"%d-%d" % (t, i)) == b"%d-%d" % (t, i)
                    peer.close()
                elif kind == 2:
                    peer.send_frame(b"%d-%d" % (t, i))    # leave with a reply in flight
                    peer.close()
                # kind 3: kept open until the end of the burst
            for peer in peers:
                peer.close()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with running_server(handler, on_connect=on_connect, on_disconnect=on_disconnect,
                        thread_pool_size=4) as server:
        port = server.port
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(scaled(60))
        assert not errors, errors
        assert all_gone.wait(TIMEOUT), f"{disconnects[0]} of 100 disconnects"
        assert server.total_connections == 100
        assert server.client_count == 0
    assert sorted(log) == list(range(1, 101))
    requested = 0
    for handle, events in log.items():
        assert events[:2] == ["connect-begin", "connect-end"], (handle, events)
        assert events[-1] == "disconnect", (handle, events)
        assert events.count("connect-begin") == 1 and events.count("disconnect") == 1
        assert set(events[2:-1]) <= {"command"}, (handle, events)
        requested += len(events) - 3
    assert requested >= 25  # every kind-1 peer was answered (kind 2 may be cut short)


def test_per_connection_order_with_pipelined_frames() -> None:
    n_conns, n_frames = 8, 2000
    lock = threading.Lock()
    running: Dict[int, int] = {}
    overlap: List[int] = []
    seen: Dict[int, List[int]] = {}

    def handler(server: Server, client: ServerClient, data: bytes) -> bytes:
        with lock:
            running[client.handle] = running.get(client.handle, 0) + 1
            if running[client.handle] > 1:
                overlap.append(client.handle)
        conn_id, seq = struct.unpack("<II", data)
        seen.setdefault(client.handle, []).append(seq)
        with lock:
            running[client.handle] -= 1
        return struct.pack("<III", conn_id, seq, seq * 7)

    with running_server(handler, thread_pool_size=4) as server:
        peers = [RawPeer(LOCAL, server.port, timeout=scaled(30)) for _ in range(n_conns)]
        try:
            for i, peer in enumerate(peers):
                peer.send_raw(b"".join(encode_frame(struct.pack("<II", i, seq))
                                       for seq in range(n_frames)))
            for i, peer in enumerate(peers):
                replies = [struct.unpack("<III", f.payload) for f in peer.frames(n_frames, 30)]
                assert replies == [(i, seq, seq * 7) for seq in range(n_frames)]
        finally:
            for peer in peers:
                peer.close()
        assert server.total_messages_received == n_conns * n_frames
    assert not overlap, "two frames of one connection were handled at the same time"
    assert len(seen) == n_conns
    assert all(v == list(range(n_frames)) for v in seen.values())


def test_different_connections_run_in_parallel() -> None:
    barrier = threading.Barrier(2)

    def handler(server: Server, client: ServerClient, data: bytes) -> bytes:
        barrier.wait(TIMEOUT)  # only passes if the other connection's handler runs too
        return b"passed " + data

    with running_server(handler, thread_pool_size=4) as server:
        with RawPeer(LOCAL, server.port) as one, RawPeer(LOCAL, server.port) as two:
            one.send_frame(b"one")
            two.send_frame(b"two")
            assert one.recv_frame().payload == b"passed one"
            assert two.recv_frame().payload == b"passed two"


def test_handler_exception_is_reported_and_connection_kept() -> None:
    rec = Recorder()

    def handler(server: Server, client: ServerClient, data: bytes) -> bytes:
        if data == b"boom":
            raise ValueError("handler blew up")
        return data

    with running_server(handler, on_error=rec.handler("error"),
                        on_disconnect=rec.handler("disconnect")) as server:
        with RawPeer(LOCAL, server.port) as peer:
            peer.send_frame(b"boom")
            (_, client, message, code), = rec.wait_count("error", 1)
            assert code == ErrorCode.HANDLER_EXCEPTION
            assert isinstance(client, ServerClient) and client.connected
            assert "blew up" in message
            assert peer.request(b"still there") == b"still there"  # no reply for the boom
            assert server.client_count == 1
        rec.wait_count("disconnect", 1)
    assert rec.count("error") == 1


@pytest.mark.parametrize("name", ["morsock.test.debug", "elsewhere.app"])
@pytest.mark.parametrize("level", [logging.DEBUG, logging.INFO])
def test_per_message_debug_follows_the_logger_passed(name: str, level: int) -> None:
    """API §5: per-message detail at DEBUG, on the logger passed as ``logger=``: that
    logger's level decides, whatever the level of the "morsock" logger."""
    base = logging.getLogger("morsock")
    base_level = base.level
    base.setLevel(logging.WARNING if level == logging.DEBUG else logging.DEBUG)
    try:
        with log_lines(name, level) as lines:
            with running_server(echo_handler, logger=logging.getLogger(name)) as server:
                with RawPeer(LOCAL, server.port) as peer:
                    assert peer.request(b"hello") == b"hello"
                    assert peer.request(b"again!") == b"again!"
    finally:
        base.setLevel(base_level)
    per_message = [line for line in lines if "-byte message" in line]
    if level == logging.DEBUG:
        assert per_message == ["client #1: 5-byte message (flag 0)",
                               "client #1: 6-byte message (flag 0)"]
    else:
        assert per_message == []
    assert any(line.startswith("server listening") for line in lines), lines


def test_per_message_debug_follows_a_level_changed_while_running() -> None:
    """A level set while the server runs -- on the logger's parent, here -- decides from
    the next message on: the server reads the logging module's own cached answer, which
    every setLevel clears, never a copy of its own."""
    parent = logging.getLogger("morsock.test.live")
    parent_level = parent.level
    parent.setLevel(logging.INFO)
    try:
        with log_lines("morsock.test.live.child", logging.NOTSET) as lines:
            logger = logging.getLogger("morsock.test.live.child")
            with running_server(echo_handler, logger=logger) as server:
                with RawPeer(LOCAL, server.port) as peer:
                    assert peer.request(b"one") == b"one"
                    parent.setLevel(logging.DEBUG)
                    assert peer.request(b"two!") == b"two!"
                    parent.setLevel(logging.INFO)
                    assert peer.request(b"three") == b"three"
    finally:
        parent.setLevel(parent_level)
    assert [line for line in lines if "-byte message" in line] == [
        "client #1: 4-byte message (flag 0)"]


@pytest.mark.parametrize("with_events", [False, True])
def test_a_closed_client_is_freed_without_the_garbage_collector(with_events: bool) -> None:
    """Once a connection is over, nothing the server keeps refers to its ServerClient in
    a cycle: it is freed by reference counting (a server under connection churn does
    not feed the cyclic collector a connection at a time)."""
    import gc
    import weakref
    clients: List["weakref.ref[ServerClient]"] = []
    events = {}
    if with_events:  # the last item through the strand is then on_disconnect
        events = {"on_connect": lambda sender, client: clients.append(weakref.ref(client)),
                  "on_disconnect": lambda sender, client: None}
    enabled = gc.isenabled()
    gc.disable()
    try:
        with running_server(echo_handler, **events) as server:
            for _ in range(5):
                with RawPeer(LOCAL, server.port) as peer:
                    assert peer.request(b"ping") == b"ping"
                    if not with_events:
                        clients.append(weakref.ref(next(iter(server.clients.values()))))
            wait_until(lambda: all(ref() is None for ref in clients),
                       what="closed clients freed without gc")
            assert len(clients) == 5
    finally:
        if enabled:
            gc.enable()


def test_a_client_that_closes_while_its_handler_runs_is_freed_without_the_collector() -> None:
    """The peer's close arrives while the strand is busy: the EOF goes through the strand,
    the close completes with items still running, and the strand is retired after them
    all the same (no on_disconnect is set, so nothing else would pass through it)."""
    import gc
    import weakref
    release = threading.Event()
    clients: List["weakref.ref[ServerClient]"] = []

    def handler(sender: Server, client: ServerClient, data: bytes) -> None:
        clients.append(weakref.ref(client))
        assert release.wait(TIMEOUT)

    enabled = gc.isenabled()
    gc.disable()
    try:
        with running_server(handler) as server:
            for _ in range(3):
                release.clear()
                with RawPeer(LOCAL, server.port) as peer:
                    peer.send_raw(encode_frame(b"hold on"))
                    wait_until(lambda: len(clients) == 1, what="the handler runs")
                # the peer is gone; the strand is still busy with its frame
                wait_until(lambda: not clients[0]()._conn._reading,  # type: ignore[union-attr]
                           what="the server read the EOF")
                release.set()
                wait_until(lambda: clients[0]() is None, what="the closed client freed")
                clients.clear()
    finally:
        release.set()
        if enabled:
            gc.enable()


# ------------------------------------------------------------------------ client management

def test_client_management_and_server_client_fields() -> None:
    rec = Recorder()

    def on_connect(server: Server, client: ServerClient) -> None:
        client.custom_data = {"greeted": client.handle}
        rec.add("connect", client)

    def handler(server: Server, client: ServerClient, data: bytes) -> bytes:
        return b"%d:%s" % (client.handle, repr(client.custom_data).encode())

    with running_server(handler, on_connect=on_connect,
                        on_disconnect=rec.handler("disconnect")) as server:
        peers: Dict[int, RawPeer] = {}
        try:
            for handle in (1, 2, 3, 4):
                before = datetime.datetime.now()
                peer = RawPeer(LOCAL, server.port)
                rec.wait_count("connect", handle)
                after = datetime.datetime.now()
                client = rec.named("connect")[-1][1]
                assert client.handle == handle  # handles count from 1, in accept order
                peers[handle] = peer
                assert server.find_client(handle) is client
                assert client.peer_ip == LOCAL
                assert client.peer_port == peer.sock.getsockname()[1] != server.port
                assert before - datetime.timedelta(seconds=1) <= client.connected_at <= after
                assert client.connected and client.connected_time >= 0
                assert client.custom_data == {"greeted": handle}
                assert peer.request(b"?") == b"%d:{'greeted': %d}" % (handle, handle)
                assert client.last_activity_time >= client.connected_at
            snapshot = server.clients
            assert sorted(snapshot) == [1, 2, 3, 4]
            snapshot.clear()  # a snapshot: the server's set is untouched
            assert server.client_count == 4
            with server.property_lock:
                assert sorted(server.clients) == [1, 2, 3, 4]
            assert server.find_client(99) is None
            assert server.find_client_by_ip(LOCAL) is server.find_client(1)
            assert server.find_client_by_ip("10.1.2.3") is None

            assert server.broadcast_data(b"news") == 4
            for peer in peers.values():
                frame = peer.recv_frame()
                assert (frame.payload, frame.flag) == (b"news", 0)
            server.find_client(2).send_data(b"only for two")
            assert peers[2].recv_frame().payload == b"only for two"
            for handle in (1, 3, 4):  # nobody else got it: their next frame is their reply
                assert peers[handle].request(b"?").startswith(b"%d:" % handle)

            two = server.find_client(2)
            assert server.disconnect_client(1) is True
            assert server.disconnect_client(1) is False
            assert server.disconnect_client(two) is True
            assert server.disconnect_client(two) is False
            assert not two.connected
            for handle in (1, 2):
                gone = peers.pop(handle)
                try:
                    gone.expect_close()
                finally:
                    gone.close()
            rec.wait_count("disconnect", 2)
            assert {e[1].handle for e in rec.named("disconnect")} == {1, 2}
            assert server.find_client(1) is None and server.client_count == 2
            with pytest.raises(NotConnectedError):
                two.send_data(b"too late")

            peers[5] = RawPeer(LOCAL, server.port)
            rec.wait_count("connect", 5)
            assert rec.named("connect")[-1][1].handle == 5  # never reused
            assert server.find_client_by_ip(LOCAL).handle == 3

            assert server.disconnect_all_clients() == 3
            for peer in peers.values():
                peer.expect_close()
            rec.wait_count("disconnect", 5)
            assert server.client_count == 0 and server.disconnect_all_clients() == 0
            assert server.broadcast_data(b"nobody") == 0
            assert server.total_connections == 5
        finally:
            for peer in peers.values():
                peer.close()


def test_encrypted_send_without_key_raises_crypto_error() -> None:
    rec = Recorder()
    with running_server(on_connect=rec.handler("connect")) as server:
        with RawPeer(LOCAL, server.port) as peer:
            (_, client), = rec.wait_count("connect", 1)
            with pytest.raises(CryptoError) as info:
                client.send_data(b"secret", encrypted=True)
            assert info.value.code == ErrorCode.ENCRYPTION_REQUIRED
            with pytest.raises(CryptoError):
                server.broadcast_data(b"secret", encrypted=True)
            # nothing was sent: the next frame is the echo
            assert peer.request(b"plain") == b"plain"
            wait_until(lambda: client.messages_sent >= 1)
            assert client.messages_sent == 1 and client.bytes_sent == frame_size(5)


# ------------------------------------------------------------------------ stop and leaks

def test_stop_with_many_clients_attached_leaks_nothing() -> None:
    threads_before = set(threading.enumerate())
    fds_before = _fds()
    rec = Recorder()
    client_recs = [Recorder() for _ in range(3)]
    server = Server(port=0, host=LOCAL, on_handle_command=echo_handler,
                    on_connect=rec.handler("connect"), on_disconnect=rec.handler("disconnect"))
    peers: List[RawPeer] = []
    clients: List[Client] = []
    server.start()
    try:
        for i in range(30):
            peers.append(RawPeer(LOCAL, server.port))
        for r in client_recs:
            clients.append(Client(LOCAL, server.port, on_disconnect=r.handler("disconnect"),
                                  on_state_change=r.handler("state")))
            clients[-1].connect()
        rec.wait_count("connect", 33)
        for i, peer in enumerate(peers[::5]):
            assert peer.request(b"p%d" % i) == b"p%d" % i
        for i, client in enumerate(clients):
            assert client.request(b"c%d" % i) == b"c%d" % i
        assert server.client_count == 33
        server.stop()
        # stop() returns after every client got its on_disconnect
        assert rec.count("disconnect") == 33
        assert {e[1].handle for e in rec.named("disconnect")} == set(range(1, 34))
        assert server.client_count == 0
        for peer in peers:
            peer.expect_close()
        for client, r in zip(clients, client_recs):
            r.wait_count("disconnect", 1)
            r.wait_for(lambda ev: ("state", ClientState.CONNECTED, ClientState.DISCONNECTED) in ev)
            assert client.state is ClientState.DISCONNECTED and not client.connected
    finally:
        server.stop()
        for peer in peers:
            peer.close()
        for client in clients:
            client.disconnect()
    assert set(threading.enumerate()) == threads_before
    wait_until(lambda: _fds() <= fds_before, 2.0, "fds released")
    assert _fds() == fds_before


def test_stop_while_an_on_error_handler_is_running() -> None:
    """A close asked for by a worker (here: plaintext under require_encryption, whose
    on_error handler is still running) while stop() closes everything: that client still
    gets its on_disconnect and its socket is released."""
    rec = Recorder()
    in_error = threading.Event()
    release = threading.Event()

    def on_error(server: Server, client: Optional[ServerClient], message: str,
                 code: int) -> None:
        rec.add("error", code)
        in_error.set()
        assert release.wait(TIMEOUT)

    server = Server(0, LOCAL, on_handle_command=echo_handler, require_encryption=True,
                    encryption_key="k", encryption_profile="MORMOT", on_error=on_error,
                    on_connect=rec.handler("connect"), on_disconnect=rec.handler("disconnect"))
    server.start()
    stopper = threading.Thread(target=server.stop)
    try:
        with RawPeer(LOCAL, server.port) as offender, RawPeer(LOCAL, server.port) as bystander:
            rec.wait_count("connect", 2)
            offender.send_frame(b"plaintext")  # closed with ENCRYPTION_REQUIRED
            assert in_error.wait(TIMEOUT)
            stopper.start()
            bystander.expect_close()  # stop() has closed everything it could
            release.set()
            offender.expect_close()
            stopper.join(TIMEOUT * 3)
            assert not stopper.is_alive()
    finally:
        release.set()
        server.stop()
    assert rec.named("error") == [("error", ErrorCode.ENCRYPTION_REQUIRED)]
    assert rec.count("disconnect") == 2


# ------------------------------------------------------------------------ MORMOT interop



@pytest.mark.parametrize("mode", VECTOR_MODES)
def test_mormot_profile_server_decodes_delphi_frames(mode: str) -> None:
    rec = Recorder()
    received: List[bytes] = []

    def handler(server: Server, client: ServerClient, data: bytes) -> bytes:
        received.append(data)
        return b"re:" + data

    cipher = MormotCipher(VECTOR_KEY, mode, 256)
    cases = vector_cases(mode)
    assert len(cases) == 5
    with running_server(handler, encryption_profile=EncryptionProfile.MORMOT,
                        encryption_key=VECTOR_KEY, encryption_mode=mode,
                        encryption_key_size=256, on_error=rec.handler("error")) as server:
        with RawPeer(LOCAL, server.port) as peer:
            for case in cases:
                plaintext = bytes.fromhex(case["plaintext_hex"])
                peer.send_raw(bytes.fromhex(case["frame_hex"]))
                frame = peer.recv_frame()
                assert frame.flag == 1, case["id"]
                expected = b"re:" + plaintext
                assert len(frame.payload) == 16 + 16 * (len(expected) // 16 + 1)
                assert vector_decrypt(mode, frame.payload) == expected, case["id"]
                assert cipher.decrypt(frame.payload) == expected
            for case in VECTORS["unencrypted_cases"]:
                plaintext = bytes.fromhex(case["plaintext_hex"])
                peer.send_raw(bytes.fromhex(case["frame_hex"]))
                frame = peer.recv_frame()
                assert (frame.flag, frame.payload) == (0, b"re:" + plaintext)
            # a Delphi frame with broken padding: refused, never handed to the handler
            edge = vector_edge("bad_padding_last_byte_xor01", mode)
            assert edge is not None
            peer.send_raw(bytes.fromhex(edge["frame_hex"]))
            peer.expect_close()
        (_, client, _, code), = rec.wait_count("error", 1)
        assert code == ErrorCode.DECRYPT_FAILED and isinstance(client, ServerClient)
    plaintexts = [bytes.fromhex(c["plaintext_hex"]) for c in cases]
    plaintexts += [bytes.fromhex(c["plaintext_hex"]) for c in VECTORS["unencrypted_cases"]]
    assert received == plaintexts


def test_server_client_send_encrypted_in_mormot_profile() -> None:
    rec = Recorder()
    with running_server(encryption_profile="MORMOT", encryption_key=VECTOR_KEY,
                        encryption_mode="CTR", on_connect=rec.handler("connect")) as server:
        with RawPeer(LOCAL, server.port) as peer:
            (_, client), = rec.wait_count("connect", 1)
            client.send_data(b"to the delphi peer", encrypted=True)
            assert server.broadcast_data(b"to everyone", encrypted=True) == 1
            for expected in (b"to the delphi peer", b"to everyone"):
                frame = peer.recv_frame()
                assert frame.flag == 1
                assert vector_decrypt("CTR", frame.payload) == expected


def test_disconnect_delivers_what_was_queued_before_it():
    """A graceful disconnect lets the send queue drain first (nothing accepted is lost)."""
    big = bytes(range(256)) * (4 * 4096)  # 4 MiB: far more than the kernel buffers hold
    with running_server(None, max_send_buffer=64 << 20) as server:
        with RawPeer.to(server, timeout=scaled(20)) as peer:
            wait_until(lambda: server.client_count == 1, what="the peer to connect")
            client = next(iter(server.clients.values()))
            for _ in range(4):
                client.send_data(big)
            assert client.send_queue_size > 0  # the kernel did not take it all at once
            assert client.disconnect()
            frames = peer.frames(4, timeout=scaled(20))
            assert [f.payload for f in frames] == [big] * 4
            assert peer.expect_close(scaled(10)) == b""
        wait_until(lambda: server.client_count == 0, what="the close to finish")
        assert server.total_messages_sent == 4
