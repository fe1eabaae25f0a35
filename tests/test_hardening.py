"""Hardening (issue 5): limits, timeouts, backpressure and hostile peers, over real sockets
on 127.0.0.1 (API.md §3, §6, §7).

Every hostile peer here is a plain socket (:class:`morsock.testing.RawPeer` or a bare
``socket``); the invariant throughout is the one of API.md §6: bad input closes that one
connection with an ``on_error`` naming the code, no handler ever sees garbage, and the
server keeps serving everyone else.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest

from morsock import (Client, ErrorCode, MorsockError, NotConnectedError, ReconnectStrategy,
                     SendBufferFullError, Server, ServerClient)
from morsock.protocol import FrameDecoder, HEADER, MAGIC, encode_frame
from morsock.testing import RawPeer, echo_handler, running_server

from helpers import TIMEOUT, Recorder, vector_edge, wait_until

LOCAL = "127.0.0.1"
MiB = 1024 * 1024


def _rss() -> int:
    """Resident set size of this process in bytes (Linux)."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")  # pragma: no cover


def _errors(rec: Recorder, code: ErrorCode) -> List[Tuple[Any, ...]]:
    """Server ``on_error`` events ``("on_error", client, message, code)`` with *code*."""
    return [e for e in rec.named("on_error") if e[3] == code]


def _server_events(rec: Recorder) -> Dict[str, Any]:
    return dict(on_connect=rec.handler("on_connect"), on_disconnect=rec.handler("on_disconnect"),
                on_error=rec.handler("on_error"))


def _only_client(server: Server) -> ServerClient:
    wait_until(lambda: server.client_count == 1, what="one connected client")
    return next(iter(server.clients.values()))


def _wait_closed_with(rec: Recorder, code: ErrorCode, n: int = 1) -> List[Tuple[Any, ...]]:
    """Wait for *n* ``on_error(code)`` and as many ``on_disconnect``; return the errors."""
    rec.wait_for(lambda ev: sum(1 for e in ev if e[0] == "on_error" and e[3] == code) >= n,
                 what=f"{n} x on_error({code.name})")
    rec.wait_count("on_disconnect", n)
    return _errors(rec, code)


def _recording_and_setting(rec: Recorder, event: threading.Event) -> Any:
    """An ``on_disconnect`` handler that records the event and sets *event*."""
    def on_disconnect(sender: Server, client: ServerClient) -> None:
        rec.add("on_disconnect", client)
        event.set()
    return on_disconnect


# ------------------------------------------------------------------------ keep-alive

def _sockopt(sock: socket.socket, level: int, name: str) -> Optional[int]:
    if not hasattr(socket, name):
        return None
    return sock.getsockopt(level, getattr(socket, name))


def test_keepalive_settings_are_applied_to_both_ends() -> None:
    assert (Server.keepalive_idle.default, Server.keepalive_interval.default,
            Server.keepalive_count.default) == (10, 5, 3)
    server = Server(port=0, host=LOCAL, keepalive_idle=7, keepalive_interval=3,
                    keepalive_count=4, on_handle_command=echo_handler)
    assert (server.keepalive_idle, server.keepalive_interval, server.keepalive_count) == (7, 3, 4)
    with server:
        with pytest.raises(MorsockError):
            server.keepalive_idle = 1
        with Client(LOCAL, server.port, keepalive_idle=2, keepalive_interval=1,
                    keepalive_count=5) as client:
            assert client.request(b"ka") == b"ka"
            sc = _only_client(server)
            for sock, (idle, intvl, cnt) in ((sc._conn._sock, (7, 3, 4)),
                                             (client._conn._sock, (2, 1, 5))):  # type: ignore[union-attr]
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
                assert _sockopt(sock, socket.IPPROTO_TCP, "TCP_KEEPIDLE") in (idle, None)
                assert _sockopt(sock, socket.IPPROTO_TCP, "TCP_KEEPINTVL") in (intvl, None)
                assert _sockopt(sock, socket.IPPROTO_TCP, "TCP_KEEPCNT") in (cnt, None)
                if hasattr(socket, "TCP_USER_TIMEOUT"):
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == \
                        (idle + intvl * cnt) * 1000
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    with pytest.raises(ValueError):
        Client(LOCAL, 1, keepalive_count=0)


def test_keep_alive_and_no_delay_off_are_applied() -> None:
    with running_server(keep_alive=False, no_delay=False) as server:
        with RawPeer.to(server) as peer:
            assert peer.request(b"x") == b"x"
            sock = _only_client(server)._conn._sock  # the accepted socket, server side
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
            sock = _only_client(server)._conn._sock
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
            if hasattr(socket, "TCP_USER_TIMEOUT"):
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0


# ------------------------------------------------------------------------ message size

def test_max_message_size_on_the_server() -> None:
    rec = Recorder()
    seen: List[int] = []
    with running_server(lambda s, c, d: seen.append(len(d)) or d, max_message_size=1000,
                        **_server_events(rec)) as server:
        with RawPeer.to(server) as peer:
            assert peer.request(b"a" * 1000) == b"a" * 1000
            peer.send_frame(b"b" * 1001)
            peer.expect_close()
        (err,) = _wait_closed_with(rec, ErrorCode.MESSAGE_TOO_LARGE)
        assert "1001" in err[2]
        with RawPeer.to(server) as peer:
            assert peer.request(b"still serving") == b"still serving"
    assert seen == [1000, len(b"still serving")]


def test_size_claim_of_4_gib_is_closed_at_once() -> None:
    rec = Recorder()
    seen: List[bytes] = []
    # connection_timeout is long: the close must come from the header, not from a timer
    with running_server(lambda s, c, d: seen.append(d), connection_timeout=60,
                        **_server_events(rec)) as server:
        with RawPeer.to(server) as healthy, RawPeer.to(server) as peer:
            rss = _rss()
            peer.send_raw(HEADER.pack(MAGIC, 0xFFFFFFFF, 0) + b"x" * 1000)
            t0 = time.monotonic()
            assert peer.expect_close(timeout=TIMEOUT) == b""
            assert time.monotonic() - t0 < 5.0
            (err,) = _wait_closed_with(rec, ErrorCode.MESSAGE_TOO_LARGE)
            assert err[1] is not None
            assert _rss() - rss < 64 * MiB  # nothing was allocated for the claimed payload
            healthy.send_frame(b"ok")
            wait_until(lambda: seen == [b"ok"], what="healthy frame handled")


def test_client_refuses_a_reply_over_its_max_message_size() -> None:
    rec = Recorder()
    with running_server(lambda s, c, d: b"r" * 5000) as server:
        with Client(LOCAL, server.port, max_message_size=4096,
                    on_error=rec.handler("on_error"),
                    on_disconnect=rec.handler("on_disconnect")) as client:
            with pytest.raises(NotConnectedError):
                client.request(b"give me too much", timeout=TIMEOUT)
            rec.wait_count("on_disconnect", 1)
            assert [e[2] for e in rec.named("on_error")] == [ErrorCode.MESSAGE_TOO_LARGE]
            assert not client.connected


# ------------------------------------------------------------------------ bad input

def test_http_request_closes_that_connection_while_another_keeps_working() -> None:
    rec = Recorder()
    handled: List[bytes] = []
    with running_server(lambda s, c, d: handled.append(d) or d, **_server_events(rec)) as server:
        with Client(LOCAL, server.port) as client:
            assert client.request(b"before") == b"before"
            with RawPeer.to(server) as peer:
                peer.send_raw(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n")
                assert peer.expect_close() == b""
            (err,) = _wait_closed_with(rec, ErrorCode.INVALID_PROTOCOL)
            assert "magic" in err[2]
            for i in range(20):
                assert client.request(b"after %d" % i) == b"after %d" % i
            assert server.client_count == 1
    assert handled == [b"before"] + [b"after %d" % i for i in range(20)]


@pytest.mark.parametrize("flag", [3, 7, 255])
def test_unknown_flag_is_invalid_protocol(flag: int) -> None:
    rec = Recorder()
    handled: List[bytes] = []
    with running_server(lambda s, c, d: handled.append(d) or d, **_server_events(rec)) as server:
        with RawPeer.to(server) as peer:
            assert peer.request(b"valid first") == b"valid first"
            peer.send_raw(HEADER.pack(MAGIC, 5, flag) + b"hello")
            peer.expect_close()
        (err,) = _wait_closed_with(rec, ErrorCode.INVALID_PROTOCOL)
        assert f"flag {flag}" in err[2]
    assert handled == [b"valid first"]


@pytest.mark.parametrize("garbage, code", [
    (b"GET / HTTP/1.1\r\n\r\n", ErrorCode.INVALID_PROTOCOL),          # bad magic
    (b"\x00", ErrorCode.INVALID_PROTOCOL),                          # its first wrong byte
    (HEADER.pack(MAGIC, 5, 9) + b"hello", ErrorCode.INVALID_PROTOCOL),  # unknown flag
    (HEADER.pack(MAGIC, 0xFFFFFFFF, 0), ErrorCode.MESSAGE_TOO_LARGE),
], ids=["bad-magic", "one-bad-byte", "bad-flag", "too-large"])
def test_frames_before_bad_bytes_in_the_same_write_are_handled_then_it_closes(
        garbage: bytes, code: ErrorCode) -> None:
    # Whole frames that come before bad bytes are handled (and answered) whether or not the
    # bad bytes share their read: the outcome must not depend on how TCP splits the stream.
    rec = Recorder()

    def handler(sender: Server, client: ServerClient, data: bytes) -> bytes:
        rec.add("handled", data)
        return b"re:" + data

    with running_server(handler, **_server_events(rec)) as server:
        with RawPeer.to(server) as peer:
            peer.send_raw(encode_frame(b"one") + encode_frame(b"two") + garbage)
            replies = [peer.recv_frame().payload, peer.recv_frame().payload]
            assert peer.expect_close() == b""
        (err,) = _wait_closed_with(rec, code)
        assert replies == [b"re:one", b"re:two"]
        assert server.total_messages_received == 2 and server.total_messages_sent == 2
        assert server.total_bytes_received == 2 * HEADER.size + 6 + len(garbage)
    order = [e[0] for e in rec.snapshot() if e[0] != "on_connect"]
    assert order == ["handled", "handled", "on_error", "on_disconnect"]
    assert [e[1] for e in rec.named("handled")] == [b"one", b"two"]


def test_delphi_frame_with_trailing_bytes_is_handled_then_the_bytes_refused() -> None:
    # The interop vector "trailing_bytes": a Delphi frame followed by 5 bytes that cannot
    # start a frame. The Pascal reader delivered the frame; so does morsock, then it closes
    # that connection for the bad bytes (API.md §6).
    edge = vector_edge("trailing_bytes", "CBC")
    if edge is None:
        pytest.fail("the interop vectors lack the trailing_bytes edge case")
    rec = Recorder()
    with running_server(lambda s, c, d: rec.add("handled", d) or b"ok",
                        encryption_profile="MORMOT", encryption_key=edge["decoder_key"],
                        encryption_mode=edge["mode"], encryption_key_size=edge["key_size"],
                        **_server_events(rec)) as server:
        with RawPeer.to(server) as peer:
            peer.send_raw(bytes.fromhex(edge["frame_hex"]))
            assert peer.recv_frame().flag == 1  # the reply, encrypted as the request was
            peer.expect_close()
        _wait_closed_with(rec, ErrorCode.INVALID_PROTOCOL)
    assert [e[1] for e in rec.named("handled")] == [bytes.fromhex(edge["pascal_data_hex"])]


def test_header_cut_at_every_offset_across_two_writes() -> None:
    rec = Recorder()
    with running_server(**_server_events(rec)) as server:
        with RawPeer.to(server) as peer:
            assert peer.request(b"warm-up") == b"warm-up"
            sc = _only_client(server)
            payload = bytes(range(40))
            frame = encode_frame(payload)
            for cut in range(1, len(frame)):  # every header offset and a few in the payload
                before = sc.bytes_received
                peer.send_raw(frame[:cut])
                # the first part has really arrived (and been decoded) before the second
                wait_until(lambda: sc.bytes_received == before + cut, what=f"cut {cut}")
                peer.send_raw(frame[cut:])
                assert peer.recv_frame().payload == payload, cut
            assert sc.connected
    assert rec.named("on_error") == []


def test_a_stream_that_always_ends_mid_frame_is_not_a_timeout() -> None:
    """connection_timeout bounds each frame, not a stream of frames that keep completing:
    every write here completes one frame and starts the next, for 4 x connection_timeout."""
    rec = Recorder()
    timeout = 0.4
    with running_server(connection_timeout=timeout, **_server_events(rec)) as server:
        with RawPeer.to(server) as peer:
            frames = [encode_frame(b"%06d" % i + b"." * 300) for i in range(100000)]
            peer.send_raw(frames[0][:100])
            t0 = time.monotonic()
            i = 0
            while time.monotonic() - t0 < 4 * timeout:
                peer.send_raw(frames[i][100:] + frames[i + 1][:100])
                assert peer.recv_frame().payload.startswith(b"%06d" % i)
                i += 1
            peer.send_raw(frames[i][100:])
            assert peer.recv_frame().payload.startswith(b"%06d" % i)
            assert _only_client(server).connected
    assert rec.named("on_error") == []


def test_rst_in_the_middle_of_a_frame() -> None:
    rec = Recorder()
    handled: List[bytes] = []
    with running_server(lambda s, c, d: handled.append(d) or d, **_server_events(rec)) as server:
        with RawPeer.to(server) as peer:
            assert peer.request(b"whole") == b"whole"
            peer.send_raw(encode_frame(b"x" * 10000)[:5000])
            sc = _only_client(server)
            wait_until(lambda: sc.bytes_received >= 5000 + 14, what="half frame arrived")
            peer.reset()
        rec.wait_count("on_disconnect", 1)
        assert server.client_count == 0
        with RawPeer.to(server) as other:
            assert other.request(b"next") == b"next"
    assert handled == [b"whole", b"next"]
    assert [e[3] for e in rec.named("on_error")] == []  # a reset is not the peer's garbage


# ------------------------------------------------------------------------ max_connections

def test_max_connections_closes_extra_connections_at_once() -> None:
    rec = Recorder()
    with running_server(max_connections=2, **_server_events(rec)) as server:
        with RawPeer.to(server) as a, RawPeer.to(server) as b:
            assert a.request(b"a") == b"a" and b.request(b"b") == b"b"
            with RawPeer.to(server) as c:
                assert c.expect_close() == b""
            errs = rec.wait_for(lambda ev: any(e[0] == "on_error" for e in ev))
            full = [e for e in errs if e[0] == "on_error"]
            assert len(full) == 1 and full[0][1] is None and full[0][3] == ErrorCode.SERVER_FULL
            assert server.total_rejected_connections == 1
            assert server.total_connections == 2 and server.client_count == 2
            server.max_connections = 3  # live setting
            with RawPeer.to(server) as d:
                assert d.request(b"d") == b"d"
                assert server.client_count == 3
            assert a.request(b"a2") == b"a2"
        rec.wait_count("on_disconnect", 3)
        assert rec.count("on_connect") == 3  # the refused one never reached on_connect
        assert server.total_rejected_connections == 1 and server.total_connections == 3


def test_max_connections_raised_during_an_accept_loop_applies_to_the_next_connection() -> None:
    """The limit is read for every connection the reactor accepts, not once per wake-up.
    The on_error of a refusal runs on the reactor thread, inside the accept loop: when it
    raises max_connections and a connection is already waiting in the backlog (it connects
    one there itself), that connection is admitted in the same loop."""
    waiting: List[RawPeer] = []

    def on_error(sender: Server, client: Any, message: str, code: int) -> None:
        if code == ErrorCode.SERVER_FULL and not waiting:
            sender.max_connections = 2
            waiting.append(RawPeer.to(sender))  # the kernel completes it; not accepted yet

    with running_server(max_connections=1, on_error=on_error) as server:
        with RawPeer.to(server) as a:
            assert a.request(b"a") == b"a"
            with RawPeer.to(server) as refused:
                assert refused.expect_close() == b""
            wait_until(lambda: waiting, what="the on_error handler's connection")
            with waiting[0] as late:
                assert late.request(b"late") == b"late"
                assert server.client_count == 2
        assert server.total_rejected_connections == 1 and server.total_connections == 2


# ------------------------------------------------------------------------ garbage flood

def _garbage(rnd: random.Random) -> Tuple[bytes, ErrorCode]:
    """Random bytes that are invalid from their first frame on, and the code they earn."""
    kind = rnd.randrange(4)
    if kind == 0:  # random bytes, first one already wrong
        data = bytes([rnd.choice([b for b in range(256) if b != 0xBE])])
        return data + rnd.randbytes(rnd.randrange(0, 3000)), ErrorCode.INVALID_PROTOCOL
    if kind == 1:  # magic right, flag wrong
        return (HEADER.pack(MAGIC, rnd.randrange(0, 100), rnd.randrange(3, 256))
                + rnd.randbytes(rnd.randrange(0, 200))), ErrorCode.INVALID_PROTOCOL
    if kind == 2:  # magic right, size far too large
        return (HEADER.pack(MAGIC, rnd.randrange(17 * MiB, 2 ** 32), rnd.randrange(3))
                + rnd.randbytes(rnd.randrange(0, 200))), ErrorCode.MESSAGE_TOO_LARGE
    magic = bytearray(struct.pack("<I", MAGIC))  # magic wrong from a later byte on
    pos = rnd.randrange(1, 4)
    magic[pos] ^= rnd.randrange(1, 256)
    return bytes(magic) + rnd.randbytes(rnd.randrange(5, 100)), ErrorCode.INVALID_PROTOCOL


def test_garbage_from_6_threads_on_180_connections_while_a_client_is_served() -> None:
    rec = Recorder()
    handled_by: List[int] = []
    lock = threading.Lock()

    def handler(server: Server, client: ServerClient, data: bytes) -> bytes:
        with lock:
            handled_by.append(client.handle)
        return data

    expected: List[ErrorCode] = []
    failures: List[BaseException] = []
    with running_server(handler, max_connections=500, thread_pool_size=4,
                        **_server_events(rec)) as server:
        with Client(LOCAL, server.port) as client:
            assert client.request(b"hello") == b"hello"
            healthy = _only_client(server).handle

            def attack(seed: int) -> None:
                rnd = random.Random(seed)
                peers: List[RawPeer] = []
                try:
                    for _ in range(30):
                        peers.append(RawPeer.to(server, timeout=TIMEOUT))
                    for peer in peers:
                        data, code = _garbage(rnd)
                        with lock:
                            expected.append(code)
                        cut = rnd.randrange(1, len(data) + 1)
                        try:
                            peer.send_raw(data[:cut])
                            peer.send_raw(data[cut:])
                        except (BrokenPipeError, ConnectionResetError):
                            pass  # closed by the server while we were still sending
                    for peer in peers:
                        peer.expect_close()
                except BaseException as exc:  # reported by the main thread
                    failures.append(exc)
                finally:
                    for peer in peers:
                        peer.close()

            threads = [threading.Thread(target=attack, args=(seed,), name=f"attacker-{seed}")
                       for seed in range(6)]
            for t in threads:
                t.start()
            answered = 0
            try:
                while any(t.is_alive() for t in threads) or answered < 50:
                    payload = b"healthy %d" % answered
                    assert client.request(payload, timeout=TIMEOUT) == payload
                    answered += 1
            finally:
                for t in threads:
                    t.join(TIMEOUT * 3)
            assert not failures, failures
            assert not any(t.is_alive() for t in threads)
            rec.wait_count("on_disconnect", 180)
            wait_until(lambda: server.client_count == 1, what="only the healthy client left")
            assert client.request(b"still here") == b"still here"
            assert server.total_connections == 181 and server.total_rejected_connections == 0
    errors = sorted(e[3] for e in rec.named("on_error")[:180])
    assert errors == sorted(expected)
    assert len(rec.named("on_error")) == 180
    assert set(handled_by) == {healthy}  # no garbage connection ever reached the handler
    assert len(handled_by) == answered + 2


# ------------------------------------------------------------------------ backpressure

def test_peer_that_never_reads_replies_is_disconnected_and_memory_stays_bounded() -> None:
    rec = Recorder()
    limit = 1 * MiB
    reply = b"R" * (256 * 1024)
    queue_sizes: List[int] = []
    rss_peak = [0]

    def handler(server: Server, client: ServerClient, data: bytes) -> bytes:
        queue_sizes.append(client.send_queue_size)
        rss_peak[0] = max(rss_peak[0], _rss())
        return reply

    rss_before = _rss()
    with running_server(handler, max_send_buffer=limit, **_server_events(rec)) as server:
        with RawPeer.to(server) as peer:
            peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            gone = threading.Event()
            server.on_disconnect = _recording_and_setting(rec, gone)
            sent = 0
            request = encode_frame(b"more")
            try:  # 4000 requests would queue 1 GiB of replies if nothing bounded it
                while sent < 4000 and not gone.is_set():
                    peer.send_raw(request)
                    sent += 1
            except (BrokenPipeError, ConnectionResetError):
                pass
            assert gone.wait(TIMEOUT), "the non-reading peer was not disconnected"
        errs = rec.wait_for(lambda ev: any(e[0] == "on_error" for e in ev))
        codes = [e[3] for e in errs if e[0] == "on_error"]
        assert codes == [ErrorCode.SEND_BUFFER_FULL]
        with RawPeer.to(server) as other:
            assert other.request(b"x") == reply
    assert queue_sizes and max(queue_sizes) <= limit
    assert len(queue_sizes) < 1000  # frames queued behind the close were never handled
    assert rss_peak[0] - rss_before < 128 * MiB


@pytest.mark.parametrize("reply_size", [16 * 1024, 64 * 1024])
def test_requests_one_at_a_time_from_a_peer_that_never_reads_replies(reply_size: int) -> None:
    """Each request arrives alone (the peer waits for the handler before sending the
    next), so each reply leaves from a one-frame batch -- small ones at once, large ones
    with sendmsg. Once its replies fill half the send queue the server reads no more of
    its requests: TCP slows the peer down, it is not disconnected, and its queue stays
    within max_send_buffer; other clients are served meanwhile. (Replies that no longer
    fit at all -- larger than the room left -- still disconnect it: see above.)"""
    rec = Recorder()
    limit = 256 * 1024
    reply = b"R" * reply_size
    state = threading.Condition()
    calls = [0]
    queue_sizes: List[int] = []

    def handler(server: Server, client: ServerClient, data: bytes) -> bytes:
        queue_sizes.append(client.send_queue_size)
        with state:
            calls[0] += 1
            state.notify_all()
        return reply

    with running_server(handler, max_send_buffer=limit, **_server_events(rec)) as server:
        with RawPeer.to(server) as peer:
            peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            request = encode_frame(b"more")
            sent = 0
            stopped = False
            while sent < 4000 and not stopped:  # 4000 replies would queue up to 1 GiB
                peer.send_raw(request)
                sent += 1
                with state:  # the handler runs for it, or the server stopped reading
                    stopped = not state.wait_for(lambda: calls[0] == sent, 1.0)
            assert stopped, "the server kept reading a peer that never reads its replies"
            assert server.client_count == 1
            with RawPeer.to(server) as other:
                assert other.request(b"x") == reply
                assert server.client_count == 2
        rec.wait_count("on_disconnect", 2)
    assert not rec.named("on_error")
    assert queue_sizes and max(queue_sizes) <= limit
    assert 0 < calls[0] < 4000


def test_server_send_data_past_the_buffer_raises_then_disconnects_a_stalled_peer() -> None:
    rec = Recorder()
    limit = 256 * 1024
    with running_server(max_send_buffer=limit, connection_timeout=1.0,
                        **_server_events(rec)) as server:
        with RawPeer.to(server) as peer:
            peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            assert peer.request(b"hi") == b"hi"
            sc = _only_client(server)
            chunk = b"s" * (64 * 1024)
            refused_at: Optional[float] = None
            refusals = 0
            gone = threading.Event()
            server.on_disconnect = _recording_and_setting(rec, gone)
            deadline = time.monotonic() + TIMEOUT
            while not gone.is_set() and time.monotonic() < deadline:
                before = sc.send_queue_size
                try:
                    sc.send_data(chunk)
                except SendBufferFullError:
                    refusals += 1
                    refused_at = refused_at or time.monotonic()
                    assert sc.send_queue_size <= before  # nothing of the frame was queued
                    gone.wait(0.02)  # a sender backing off, as an application would
                except NotConnectedError:
                    break
                assert sc.send_queue_size <= limit
            assert gone.wait(TIMEOUT)
            assert refused_at is not None and refusals > 1
            elapsed = time.monotonic() - refused_at
            assert 0.9 <= elapsed <= 1.0 + 4.0  # connection_timeout, with a wide margin
        (err,) = _wait_closed_with(rec, ErrorCode.SEND_BUFFER_FULL)
        assert err[1] is sc and "does not read" in err[2]


def test_server_send_data_past_the_buffer_queues_nothing_of_the_refused_frame() -> None:
    """Frames accepted before a refusal arrive whole and in order once the peer reads."""
    with running_server(max_send_buffer=200 * 1024, connection_timeout=60) as server:
        with RawPeer.to(server) as peer:
            assert peer.request(b"hi") == b"hi"
            sc = _only_client(server)
            accepted = 0
            refused = 0
            while refused < 5:
                try:
                    sc.send_data(b"%08d" % accepted + b"p" * 30000)
                    accepted += 1
                except SendBufferFullError:
                    refused += 1
            frames = peer.frames(accepted, timeout=TIMEOUT)
            assert [f.payload[:8] for f in frames] == [b"%08d" % i for i in range(accepted)]
            assert all(len(f.payload) == 30008 for f in frames)
            assert peer.request(b"after") == b"after"  # nothing else was queued


def test_broadcast_skips_a_full_client_then_it_is_disconnected() -> None:
    rec = Recorder()
    limit = 128 * 1024
    with running_server(max_send_buffer=limit, connection_timeout=1.0,
                        **_server_events(rec)) as server:
        with RawPeer.to(server) as reader, RawPeer.to(server) as sleeper:
            sleeper.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            assert reader.request(b"r") == b"r" and sleeper.request(b"s") == b"s"
            wait_until(lambda: server.client_count == 2)
            received: List[bytes] = []
            stop = threading.Event()

            def read_all() -> None:
                while not stop.is_set():
                    try:
                        received.append(reader.recv_frame(timeout=0.2).payload)
                    except (TimeoutError, socket.timeout):
                        continue

            t = threading.Thread(target=read_all, name="broadcast-reader")
            t.start()
            counts: List[int] = []
            try:
                gone = threading.Event()
                server.on_disconnect = _recording_and_setting(rec, gone)
                i = 0
                while not gone.is_set():
                    counts.append(server.broadcast_data(b"%06d" % i + b"b" * 16000))
                    i += 1
                    gone.wait(0.005)
                    assert i < 20000, "the sleeper was never disconnected"
                expected = [b"%06d" % j for j in range(i)]
                wait_until(lambda: len(received) >= i, what="reader got every broadcast")
            finally:
                stop.set()
                t.join(TIMEOUT)
        assert [p[:6] for p in received] == expected  # the reader never missed one
        assert 2 in counts and 1 in counts  # both, then only the reader
        skipped = _errors(rec, ErrorCode.SEND_BUFFER_FULL)
        assert len(skipped) >= 2 and all(e[1] is not None for e in skipped)
        assert any("skipped" in e[2] for e in skipped) and any("does not read" in e[2]
                                                                for e in skipped)


def test_client_send_data_past_the_buffer_raises_with_nothing_half_queued() -> None:
    listener = socket.create_server((LOCAL, 0))
    try:
        with Client(LOCAL, listener.getsockname()[1], max_send_buffer=300 * 1024) as client:
            listener.settimeout(TIMEOUT)
            conn, _ = listener.accept()
            with conn:
                accepted = refused = 0
                while refused < 5:
                    before = client._conn.send_queue_size  # type: ignore[union-attr]
                    try:
                        client.send_data(b"%08d" % accepted + b"c" * 50000)
                        accepted += 1
                    except SendBufferFullError as exc:
                        assert exc.code == ErrorCode.SEND_BUFFER_FULL
                        assert client._conn.send_queue_size <= before  # type: ignore[union-attr]
                        refused += 1
                assert client.connected  # a client is never disconnected for this
                conn.settimeout(TIMEOUT)
                decoder = FrameDecoder()
                frames: List[Any] = []
                while len(frames) < accepted:
                    data = conn.recv(1 << 20)
                    assert data, "closed early"
                    frames += decoder.feed(data)
                assert [f.payload[:8] for f in frames] == [b"%08d" % i for i in range(accepted)]
                assert decoder.buffered == 0 and all(len(f.payload) == 50008 for f in frames)
                client.send_data(b"after")  # the queue drained: accepted again
                while not frames[-1].payload == b"after":
                    frames += decoder.feed(conn.recv(1 << 20))
    finally:
        listener.close()


# ------------------------------------------------------------------------ timeouts

def test_slow_loris_first_byte_then_nothing_times_out() -> None:
    rec = Recorder()
    timeout = 0.5
    with running_server(connection_timeout=timeout, **_server_events(rec)) as server:
        with Client(LOCAL, server.port) as client, RawPeer.to(server) as loris, \
                RawPeer.to(server) as loris2, RawPeer.to(server) as quiet:
            loris.send_raw(b"\xBE")
            t0 = time.monotonic()
            loris2.send_raw(encode_frame(b"z" * 100)[:50])  # header + part of the payload
            assert loris.expect_close(timeout=TIMEOUT) == b""
            elapsed = time.monotonic() - t0
            assert timeout * 0.8 <= elapsed <= timeout + 3.0
            loris2.expect_close(timeout=TIMEOUT)
            errs = _wait_closed_with(rec, ErrorCode.TIMEOUT, 2)
            assert all("connection_timeout" in e[2] for e in errs)
            assert client.request(b"fine") == b"fine"  # healthy traffic is not a partial frame
            # a connection that sends nothing is not mid-frame: idle_timeout is off
            assert quiet.request(b"q") == b"q"
            assert server.client_count == 2


def test_idle_timeout_closes_silent_connections_only() -> None:
    rec = Recorder()
    idle = 0.5
    with running_server(idle_timeout=idle, **_server_events(rec)) as server:
        assert server.idle_timeout == idle
        with RawPeer.to(server) as silent, RawPeer.to(server) as chatty:
            t0 = time.monotonic()
            stop = threading.Event()
            while not stop.wait(idle / 5):  # talk five times per idle period
                assert chatty.request(b"tick") == b"tick"
                if time.monotonic() - t0 > 3 * idle:
                    break
            silent.expect_close(timeout=TIMEOUT)
            assert time.monotonic() - t0 >= idle * 0.8
            (err,) = _wait_closed_with(rec, ErrorCode.TIMEOUT)
            assert "idle_timeout" in err[2]
            assert chatty.request(b"alive") == b"alive"
        server.idle_timeout = None  # live setting
        assert server.idle_timeout is None


# ------------------------------------------------------------------------ encryption

def test_require_encryption_refuses_plaintext_and_serves_encrypted_clients() -> None:
    rec = Recorder()
    handled: List[bytes] = []
    with running_server(lambda s, c, d: handled.append(d) or d, require_encryption=True,
                        encryption_key="hardening key", **_server_events(rec)) as server:
        with RawPeer.to(server) as peer:
            peer.send_frame(b"plain text")
            peer.expect_close()
        (err,) = _wait_closed_with(rec, ErrorCode.ENCRYPTION_REQUIRED)
        with Client(LOCAL, server.port, encryption_key="hardening key") as client:
            assert client.request(b"secret", encrypted=True) == b"secret"
            with pytest.raises((NotConnectedError, MorsockError)):
                client.request(b"oops, plaintext", timeout=TIMEOUT)
        _wait_closed_with(rec, ErrorCode.ENCRYPTION_REQUIRED, 2)
    assert handled == [b"secret"]


# ------------------------------------------------------------------------ client side

class _RawServer:
    """A listening socket on 127.0.0.1 whose connections a test scripts by hand."""

    def __init__(self) -> None:
        self.listener = socket.create_server((LOCAL, 0))
        self.listener.settimeout(TIMEOUT)
        self.port = self.listener.getsockname()[1]

    def accept(self) -> socket.socket:
        conn, _ = self.listener.accept()
        conn.settimeout(TIMEOUT)
        return conn

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("garbage, code", [
    (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", ErrorCode.INVALID_PROTOCOL),
    (HEADER.pack(MAGIC, 3, 9) + b"abc", ErrorCode.INVALID_PROTOCOL),
    (HEADER.pack(MAGIC, 0xFFFFFFFF, 0), ErrorCode.MESSAGE_TOO_LARGE),
])
def test_client_survives_a_server_that_sends_garbage(garbage: bytes, code: ErrorCode) -> None:
    rec = Recorder()
    raw = _RawServer()
    try:
        client = Client(LOCAL, raw.port, auto_reconnect=True,
                        reconnect_strategy=ReconnectStrategy.IMMEDIATE,
                        on_error=rec.handler("on_error"), on_connect=rec.handler("on_connect"),
                        on_disconnect=rec.handler("on_disconnect"),
                        on_handle_command=rec.handler("on_handle_command"))
        with client:
            first = raw.accept()
            with first:
                first.sendall(encode_frame(b"valid before") + garbage)
                rec.wait_count("on_disconnect", 1)
                assert first.recv(100) == b""  # the client closed its side
            errors = [e for e in rec.named("on_error")]
            assert [e[2] for e in errors] == [code]
            second = raw.accept()  # the automatic reconnection
            with second:
                rec.wait_count("on_connect", 2)
                second.sendall(encode_frame(b"valid after"))
                rec.wait_for(lambda ev: ("on_handle_command", b"valid after") in ev,
                             what="the frame sent on the new connection")
                assert client.connected
        # the frame before the garbage is handled, whether or not it shared a read with it
        assert [e[1] for e in rec.named("on_handle_command")] == [b"valid before",
                                                                   b"valid after"]
        assert rec.count("on_disconnect") == 2
    finally:
        raw.close()
