"""The server's send path: replies held per strand batch, one ``sendmsg`` for large ones,
partial sends, and exact counting of the frames that left."""

from __future__ import annotations

import random
import socket
import threading
from typing import Any, List

import pytest

from morsock import Client, ErrorCode

from morsock._send_queue import HEADER_CACHE_MAX, HOLD_MAX, PLAIN_HEADERS
from morsock._connection_send import DIRECT_SEND_MIN, plain_frame
from morsock.protocol import HEADER_SIZE, FrameDecoder, encode_frame
from morsock.testing import RawPeer, echo_handler, running_server

from helpers import Recorder, frame_size, scaled, wait_until


def test_pipelined_mixed_sizes_arrive_whole_in_order_and_are_counted_exactly() -> None:
    rng = random.Random(6)
    sizes = [rng.choice((1, 9, 100, 4000, 40000, 70000, 150000)) for _ in range(120)]
    payloads = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
    wire = sum(frame_size(size) for size in sizes)
    with running_server(echo_handler) as server:
        sock = socket.socket()
        # a small receive window: the server's sends stop short, replies queue up
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(scaled(30))
        try:
            sock.connect(("127.0.0.1", server.port))
            wait_until(lambda: server.client_count == 1, what="the peer to connect")
            client = next(iter(server.clients.values()))
            # and a small send buffer on the server's side (white box: its socket)
            client._conn._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
            sock.sendall(b"".join(encode_frame(p) for p in payloads))
            decoder = FrameDecoder(1 << 20)
            got: List[bytes] = []
            while len(got) < len(payloads):
                chunk = sock.recv(65536)
                assert chunk, "the server closed the connection"
                got += [frame.payload for frame in decoder.feed(chunk)]
            assert got == payloads
            wait_until(lambda: client.messages_sent == len(payloads), what="all counted")
            assert client.bytes_sent == wire == client.bytes_received
            assert server.total_messages_sent == len(payloads) == server.total_messages_received
            assert server.total_bytes_sent == wire
        finally:
            sock.close()


def test_framing_matches_encode_frame_on_both_sides_of_the_prebuilt_headers() -> None:
    lengths = list(range(0, 40)) + list(range(HEADER_CACHE_MAX - 3, HEADER_CACHE_MAX + 4))
    payloads = [bytes([n % 251]) * n for n in lengths]
    assert [plain_frame(p) for p in payloads] == [encode_frame(p) for p in payloads]
    assert all(PLAIN_HEADERS[n] == encode_frame(bytes(n))[:9] for n in range(HEADER_CACHE_MAX))


def test_single_replies_on_both_sides_of_the_prebuilt_headers_arrive_exactly() -> None:
    sizes = [1, HEADER_CACHE_MAX - 1, HEADER_CACHE_MAX, HEADER_CACHE_MAX + 1, 4000,
             DIRECT_SEND_MIN - 1, DIRECT_SEND_MIN, DIRECT_SEND_MIN + 1]
    with running_server(echo_handler) as server:
        with RawPeer.to(server) as peer:
            for size in sizes:  # one at a time: each reply leaves on its own (an empty
                # reply is none at all, so 0 is checked by the plain_frame test above)
                payload = bytes([size % 251]) * size
                peer.send_raw(encode_frame(payload))
                frame = peer.recv_frame(timeout=scaled(10))
                assert (frame.payload, frame.flag) == (payload, 0)


def test_an_empty_reply_sends_nothing_alone_or_in_a_batch() -> None:
    first_handled = threading.Event()

    def handler(sender: Any, client: Any, data: bytes) -> bytes:
        if data == b"quiet-1":
            first_handled.set()
        return b"" if data.startswith(b"quiet") else b"r-" + data

    with running_server(handler) as server:
        with RawPeer.to(server) as peer:
            peer.send_raw(encode_frame(b"quiet-1"))  # alone: the one-frame batch
            assert first_handled.wait(scaled(10)), "quiet-1 not handled"
            peer.send_raw(encode_frame(b"a"))
            assert peer.recv_frame(timeout=scaled(10)).payload == b"r-a"
            peer.send_raw(encode_frame(b"quiet-2") + encode_frame(b"b") + encode_frame(b"quiet-3")
                          + encode_frame(b"c"))  # one read, most likely: a batch
            assert ([peer.recv_frame(timeout=scaled(10)).payload for _ in range(2)]
                    == [b"r-b", b"r-c"])
            # a reply is counted once send() returns, which may be after the peer has it
            wait_until(lambda: server.total_messages_sent == 3, what="the replies counted")
            assert server.total_messages_received == 6
            assert server.total_messages_sent == 3


def test_a_send_from_the_handler_keeps_its_place_among_held_replies() -> None:
    def handler(sender: Any, client: Any, data: bytes) -> bytes:
        client.send_data(b"push-" + data)
        return b"reply-" + data

    with running_server(handler) as server:
        with RawPeer.to(server) as peer:
            names = [str(i).encode() for i in range(40)]
            peer.send_raw(b"".join(encode_frame(n) for n in names))  # one batch, most likely
            got = [f.payload for f in peer.frames(2 * len(names), timeout=scaled(10))]
            assert got == [x for n in names for x in (b"push-" + n, b"reply-" + n)]


def test_replies_held_before_a_disconnect_from_the_handler_still_leave() -> None:
    def handler(sender: Any, client: Any, data: bytes) -> bytes:
        if data == b"quit":
            client.disconnect()
            return b"never sent"
        return b"re:" + data

    with running_server(handler) as server:
        with RawPeer.to(server) as peer:
            peer.send_raw(b"".join(encode_frame(p) for p in (b"a", b"b", b"quit", b"c")))
            assert [f.payload for f in peer.frames(2, timeout=scaled(10))] == [b"re:a", b"re:b"]
            assert peer.expect_close(scaled(10)) == b""


def test_replies_past_hold_max_go_out_before_the_batch_ends() -> None:
    size = HOLD_MAX // 4
    payloads = [bytes([i]) * size for i in range(10)]  # 2.5 x HOLD_MAX in one batch
    with running_server(echo_handler) as server:
        with RawPeer.to(server, timeout=scaled(20)) as peer:
            peer.send_raw(b"".join(encode_frame(p) for p in payloads))
            assert [f.payload for f in peer.frames(len(payloads), timeout=scaled(20))] == payloads
            client = next(iter(server.clients.values()))
            wait_until(lambda: client.messages_sent == len(payloads), what="all counted")
            assert client.bytes_sent == len(payloads) * (size + HEADER_SIZE)


@pytest.mark.parametrize("profile", ["MORMOT", "AUTHENTICATED"])
def test_encrypted_requests_get_every_kind_of_handler_outcome(profile: str) -> None:
    """The server's lean path for encrypted frames: a bytes reply, a str reply, no reply,
    a handler that raises (reported; the connection stays)."""
    def handler(sender: Any, client: Any, data: bytes) -> Any:
        if data == b"str":
            return "é text"
        if data == b"none":
            return None
        if data == b"raise":
            raise RuntimeError("boom")
        return b"re:" + data

    rec = Recorder()
    key = "send path key"
    with running_server(handler, encryption_key=key, encryption_profile=profile,
                        on_error=rec.handler("error")) as server, \
            Client("127.0.0.1", server.port, encryption_key=key,
                   encryption_profile=profile) as client:
        assert client.request(b"x", encrypted=True) == b"re:x"
        assert client.request(b"str", encrypted=True) == "é text".encode("utf-8")
        client.send_data(b"none", encrypted=True)
        client.send_data(b"raise", encrypted=True)
        (_, sc, message, code), = rec.wait_count("error", 1)
        assert code == ErrorCode.HANDLER_EXCEPTION and "boom" in message
        assert client.request(b"after", encrypted=True) == b"re:after"  # nothing else came
        # "none" and "raise" got no reply (AUTHENTICATED: the hello and its answer even out).
        # Every request is counted by now; a reply is counted once send() returns, which
        # may be after the client has it: wait for the last one (an extra reply would
        # take the difference below 2 for good).
        wait_until(lambda: server.total_messages_received - server.total_messages_sent == 2,
                   what="the last reply counted")
