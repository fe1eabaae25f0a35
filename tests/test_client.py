"""Acceptance tests of morsock.Client over real sockets on 127.0.0.1 (API.md §4), and of
both encryption profiles end to end."""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple, Union

import pytest

import morsock
from morsock import (AESMode, Client, ClientState, ConnectError, CryptoError, ErrorCode,
                     MorsockError, NotConnectedError, ReconnectStrategy, RequestTimeout, Server,
                     ServerClient)
from morsock.crypto import authenticated_payload_size, server_handshake
from morsock.protocol import encode_frame
from morsock.testing import RawPeer, running_server

from helpers import (TIMEOUT, VECTOR_KEY, VECTOR_MODES, Recorder, frame_size,
                     free_port, log_lines, read_frame, scaled, vector_cases,
                     vector_decrypt, wait_until)

LOCAL = "127.0.0.1"
C = ClientState
AUTH_KEY = "correct horse battery staple"


# ------------------------------------------------------------------------ life cycle

def test_disconnecting_lasts_until_the_drained_socket_is_closed() -> None:
    """disconnect() with frames a peer does not take: DISCONNECTING while they drain,
    then on_error(TIMEOUT) for what was dropped, and only once the socket is closed
    DISCONNECTED and on_disconnect."""
    rec = Recorder()
    with socket.create_server((LOCAL, 0)) as listener:
        listener.settimeout(TIMEOUT)
        client = Client(LOCAL, listener.getsockname()[1], connection_timeout=0.5,
                        on_state_change=rec.handler("state"), on_error=rec.handler("error"),
                        on_disconnect=rec.handler("disconnect"))
        client.connect()
        peer, _ = listener.accept()
        with peer:
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            try:
                for _ in range(120):
                    client.send_data(b"q" * 64 * 1024)
            except morsock.SendBufferFullError:
                pass
            client.disconnect()
    rec.wait_count("disconnect", 1)
    trace = [(e[0], *e[1:]) if e[0] == "state" else (e[0], e[-1] if e[0] == "error" else None)
             for e in rec.snapshot()]
    assert trace[2:] == [("state", C.CONNECTED, C.DISCONNECTING), ("error", ErrorCode.TIMEOUT),
                         ("state", C.DISCONNECTING, C.DISCONNECTED), ("disconnect", None)]
    assert client.state is C.DISCONNECTED


def test_state_transitions_active_and_with_block() -> None:
    rec = Recorder()
    with running_server() as server:
        client = Client(LOCAL, server.port, on_state_change=rec.handler("state"),
                        on_connect=rec.handler("connect"),
                        on_disconnect=rec.handler("disconnect"))
        assert client.state is C.DISCONNECTED and not client.connected and not client.active
        client.connect()
        try:
            assert client.state is C.CONNECTED and client.connected and client.active
            assert client.remote_ip == LOCAL
            assert client.request(b"ping") == b"ping"
            client.connect()  # already connected: no effect
        finally:
            client.disconnect()
        assert client.state is C.DISCONNECTED and not client.connected
        rec.wait_count("disconnect", 1)
        states = [e[1:] for e in rec.named("state")]
        assert states == [(C.DISCONNECTED, C.CONNECTING), (C.CONNECTING, C.CONNECTED),
                          (C.CONNECTED, C.DISCONNECTING), (C.DISCONNECTING, C.DISCONNECTED)]
        kinds = [e[0] for e in rec.snapshot()]
        assert kinds.index("connect") > kinds.index("state")  # CONNECTED announced first
        assert kinds.count("connect") == 1 and kinds.count("disconnect") == 1
        client.disconnect()  # already disconnected: no effect

        client.active = True
        try:
            assert client.active and client.request(b"again") == b"again"
        finally:
            client.active = False
        assert not client.active and client.state is C.DISCONNECTED

        with Client(LOCAL, server.port) as other:
            assert other.connected and other.request(b"with") == b"with"
        assert other.state is C.DISCONNECTED


def test_settings_locked_while_connected_and_settable_after() -> None:
    with running_server(lambda s, c, d: b"one:" + d) as one, \
            running_server(lambda s, c, d: b"two:" + d) as two:
        client = Client(LOCAL, one.port)
        with client:
            assert client.request(b"x") == b"one:x"
            for name, value in [("port", two.port), ("host", "localhost"),
                                ("encryption_key", "k"), ("max_message_size", 100),
                                ("encryption_profile", "MORMOT")]:
                before = getattr(client, name)
                with pytest.raises(MorsockError):
                    setattr(client, name, value)
                assert getattr(client, name) == before
            client.auto_reconnect = False  # live settings may change while connected
            client.reconnect_interval = 250
            assert client.reconnect_interval == 250
        client.port = two.port
        client.encryption_mode = "amCTR"
        assert client.encryption_mode is AESMode.CTR
        with client:
            assert client.request(b"x") == b"two:x"


def _client_threads() -> List[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("morsock-client")]


def test_settings_settable_after_a_failed_connect_and_after_a_drop() -> None:
    # "Settable while disconnected" holds in the DISCONNECTED state, not only once
    # disconnect() released the threads: fix the port after a failed connect(), go on.
    with running_server(lambda s, c, d: b"one:" + d, encryption_key=AUTH_KEY) as one, \
            running_server(lambda s, c, d: b"two:" + d) as two:
        client = Client(LOCAL, free_port())
        try:
            with pytest.raises(ConnectError):
                client.connect()
            assert client.state is C.DISCONNECTED and _client_threads()
            client.port = one.port       # read by the next attempt: the threads stay
            assert _client_threads()
            client.encryption_key = AUTH_KEY  # built into them: they are released first
            assert client.encryption_key == AUTH_KEY and not _client_threads()
            client.connect()
            assert client.request(b"x", encrypted=True) == b"one:x"
            one.disconnect_all_clients()  # a drop, no auto_reconnect
            wait_until(lambda: client.state is C.DISCONNECTED, what="the drop")
            client.port = two.port
            client.encryption_key = ""
            client.connect()
            assert client.request(b"y") == b"two:y"
        finally:
            client.disconnect()


def test_a_retry_uses_a_port_changed_while_retries_are_scheduled() -> None:
    # Fail over: the address may change between retries; settings built into the threads
    # may not (the retries would stop).
    rec = Recorder()
    with running_server(lambda s, c, d: b"ok:" + d) as server:
        client = Client(LOCAL, free_port(), auto_reconnect=True,
                        reconnect_strategy=ReconnectStrategy.FIXED_INTERVAL,
                        reconnect_interval=50, reconnect_max_attempts=0,
                        on_error=rec.handler("error"), on_connect=rec.handler("connect"))
        try:
            with pytest.raises(ConnectError):
                client.connect()
            rec.wait_count("error", 2)  # CONNECTION_FAILED, then at least one retry failed
            with pytest.raises(MorsockError, match="retries are scheduled"):
                client.encryption_key = AUTH_KEY
            assert client.encryption_key == ""
            client.port = server.port
            rec.wait_count("connect", 1)
            assert client.request(b"z") == b"ok:z"
            with pytest.raises(MorsockError, match="connected"):
                client.port = free_port()
        finally:
            client.disconnect()


def test_settings_refused_from_a_handler_while_the_threads_run() -> None:
    outcome: List[BaseException] = []
    done = threading.Event()

    def on_disconnect(sender: Client) -> None:
        try:
            sender.encryption_key = AUTH_KEY  # would have to join the thread it runs on
        except MorsockError as exc:
            outcome.append(exc)
        done.set()

    with running_server() as server:
        client = Client(LOCAL, server.port, on_disconnect=on_disconnect)
        try:
            client.connect()
            wait_until(lambda: server.client_count == 1, what="the server's side")
            server.disconnect_all_clients()
            assert done.wait(TIMEOUT)
            assert len(outcome) == 1 and client.encryption_key == ""
        finally:
            client.disconnect()


def test_bad_setting_values_name_the_setting() -> None:
    for make in (lambda: Server(port=70000), lambda: Client(LOCAL, -1)):
        with pytest.raises(ValueError, match=r"\.port: a TCP port is 0-65535"):
            make()
    with pytest.raises(ValueError, match=r"Server\.thread_pool_size: must be >= 1"):
        Server(0, thread_pool_size=0)
    client = Client(LOCAL, 1)
    with pytest.raises(ValueError, match=r"Client\.encryption_mode"):
        client.encryption_mode = "no such mode"
    with pytest.raises(ValueError, match=r"Client\.reconnect_interval"):
        client.reconnect_interval = -5
    assert client.reconnect_interval == 5000 and client.port == 1


def test_connect_refused_raises_and_reports_connection_failed() -> None:
    rec = Recorder()
    port = free_port()
    client = Client(LOCAL, port, on_error=rec.handler("error"),
                    on_state_change=rec.handler("state"))
    try:
        with pytest.raises(ConnectError):
            client.connect()
        assert client.state is C.DISCONNECTED and not client.connected
        (_, message, code), = rec.wait_count("error", 1)
        assert code == ErrorCode.CONNECTION_FAILED == -1
        assert str(port) in message
        rec.wait_count("state", 2)
        assert [e[1:] for e in rec.named("state")] == [(C.DISCONNECTED, C.CONNECTING),
                                                       (C.CONNECTING, C.DISCONNECTED)]
        with pytest.raises(NotConnectedError):
            client.send_data(b"nobody listens")
    finally:
        client.disconnect()


def test_not_connected_error() -> None:
    client = Client(LOCAL, free_port())
    with pytest.raises(NotConnectedError):
        client.send_data(b"never connected")
    with pytest.raises(NotConnectedError):
        client.request(b"never connected", timeout=1)
    with running_server() as server:
        client.port = server.port
        with client:
            assert client.request(b"now") == b"now"
    with pytest.raises(NotConnectedError):
        client.send_data(b"after disconnect")
    with pytest.raises(NotConnectedError):
        client.request(b"after disconnect", timeout=1)


def test_encrypted_send_without_key_raises_crypto_error() -> None:
    with running_server() as server, Client(LOCAL, server.port) as client:
        with pytest.raises(CryptoError) as info:
            client.send_data(b"secret", encrypted=True)
        assert info.value.code == ErrorCode.ENCRYPTION_REQUIRED
        with pytest.raises(CryptoError):
            client.request(b"secret", timeout=1, encrypted=True)
        assert client.request(b"plain") == b"plain"  # nothing else went out
        assert client.messages_sent == 1
        assert server.total_messages_received == 1


def test_disconnect_while_a_close_from_the_worker_is_under_way() -> None:
    """disconnect() while the client's worker is closing the connection itself (here:
    blocked logging the ENCRYPTION_REQUIRED error): on_disconnect still fires, once."""
    rec = Recorder()
    in_log = threading.Event()
    release = threading.Event()

    class BlockingHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "encryption is required" in record.getMessage():
                in_log.set()
                release.wait(TIMEOUT)

    logger = logging.getLogger("morsock.test.blocking")
    logger.propagate = False
    handler = BlockingHandler()
    logger.addHandler(handler)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
            listener.bind((LOCAL, 0))
            listener.listen(1)
            client = Client(LOCAL, listener.getsockname()[1], encryption_key="k",
                            encryption_profile="MORMOT", require_encryption=True,
                            logger=logger, on_connect=rec.handler("connect"),
                            on_disconnect=rec.handler("disconnect"),
                            on_error=rec.handler("error"))
            stopper = threading.Thread(target=client.disconnect)
            try:
                client.connect()
                raw, _ = listener.accept()
                with raw:
                    rec.wait_count("connect", 1)
                    raw.sendall(encode_frame(b"plaintext"))  # refused: closes from the worker
                    assert in_log.wait(TIMEOUT)
                    stopper.start()
                    # disconnect() is under way; the socket closes once the worker is free
                    wait_until(lambda: client.state is C.DISCONNECTING)
                    assert stopper.is_alive()
                    release.set()
                    stopper.join(TIMEOUT * 2)
                    assert not stopper.is_alive()
            finally:
                release.set()
                client.disconnect()
    finally:
        logger.removeHandler(handler)
    assert [e[0] for e in rec.snapshot()] == ["connect", "error", "disconnect"]
    assert rec.named("error")[0][2] == ErrorCode.ENCRYPTION_REQUIRED


def test_per_message_debug_on_the_logger_passed() -> None:
    """API §5: the client logs each message it receives at DEBUG, on its own logger (its
    level decides, not the "morsock" logger's)."""
    with log_lines("elsewhere.client", logging.DEBUG) as lines:
        logger = logging.getLogger("elsewhere.client")
        with running_server() as server, Client(LOCAL, server.port, logger=logger) as client:
            assert client.request(b"hello") == b"hello"
            assert client.request(b"second") == b"second"
    assert [line for line in lines if "-byte message" in line] == [
        f"5-byte message from {LOCAL}:{server.port} (flag 0)",
        f"6-byte message from {LOCAL}:{server.port} (flag 0)"]


# ------------------------------------------------------------------------ requests

def test_request_timeout_gives_up_its_place() -> None:
    release = threading.Event()
    rec = Recorder()

    def handler(server: Server, client: ServerClient, data: bytes) -> Optional[bytes]:
        if data == b"silent":
            return None              # no reply at all
        if data == b"slow":
            assert release.wait(TIMEOUT)
            return b"late reply"
        return b"re:" + data

    with running_server(handler) as server, \
            Client(LOCAL, server.port, on_handle_command=rec.handler("unsolicited")) as client:
        # (a reply the server skips, b"silent": tests/test_requests.py)
        started = time.monotonic()
        with pytest.raises(RequestTimeout):
            client.request(b"slow", timeout=0.2)
        assert 0.15 <= time.monotonic() - started < TIMEOUT  # sanity bound only
        release.set()
        # the late reply finds no waiting request: it goes to on_handle_command
        rec.wait_count("unsolicited", 1)
        assert rec.named("unsolicited") == [("unsolicited", b"late reply")]
        assert client.request(b"after") == b"re:after"
        assert client.connected


def test_concurrent_requests_each_get_their_own_reply() -> None:
    def handler(server: Server, client: ServerClient, data: bytes) -> bytes:
        return b"reply-to-" + data

    results: Dict[int, List[Tuple[bytes, bytes]]] = {}
    errors: List[BaseException] = []
    with running_server(handler) as server, Client(LOCAL, server.port) as client:
        def worker(t: int) -> None:
            try:
                got = []
                for i in range(50):
                    payload = b"t%d-r%d" % (t, i)
                    got.append((payload, client.request(payload, timeout=TIMEOUT)))
                results[t] = got
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(scaled(60))
    assert not errors, errors
    assert len(results) == 8
    for got in results.values():
        assert len(got) == 50
        assert all(reply == b"reply-to-" + payload for payload, reply in got)


def test_send_data_from_eight_threads_at_once() -> None:
    lock = threading.Lock()
    seen: Dict[int, List[int]] = {}
    all_in = threading.Event()
    n_threads, per_thread = 8, 250

    def handler(server: Server, client: ServerClient, data: bytes) -> None:
        t, i = struct.unpack("<HI", data[:6])
        with lock:
            seen.setdefault(t, []).append(i)
            if sum(map(len, seen.values())) == n_threads * per_thread:
                all_in.set()
        return None

    with running_server(handler) as server, Client(LOCAL, server.port) as client:
        start = threading.Barrier(n_threads)

        def worker(t: int) -> None:
            start.wait(TIMEOUT)
            for i in range(per_thread):
                client.send_data(struct.pack("<HI", t, i) + b"." * (i % 50))

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(scaled(60))
        assert all_in.wait(TIMEOUT), f"{sum(map(len, seen.values()))} messages handled"
        total = n_threads * per_thread
        wire = n_threads * sum(frame_size(6 + i % 50) for i in range(per_thread))
        assert server.total_messages_received == total
        assert server.total_bytes_received == wire
        assert client.messages_sent == total and client.total_bytes_sent == wire
    # each thread's messages arrived in the order that thread sent them
    assert sorted(seen) == list(range(n_threads))
    assert all(v == list(range(per_thread)) for v in seen.values())


def test_waiting_requests_fail_at_once_when_the_server_drops() -> None:
    release = threading.Event()

    def handler(server: Server, client: ServerClient, data: bytes) -> bytes:
        release.wait(TIMEOUT)
        return data

    outcomes: List[BaseException] = []
    rec = Recorder()
    with running_server(handler) as server, \
            Client(LOCAL, server.port, on_disconnect=rec.handler("disconnect")) as client:
        def worker(i: int) -> None:
            try:
                client.request(b"hold %d" % i, timeout=30)
            except BaseException as exc:
                outcomes.append(exc)
                rec.add("failed", type(exc), time.monotonic())

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
        try:
            for t in threads:
                t.start()
            wait_until(lambda: server.total_messages_received == 3, what="3 requests in")
            dropped = time.monotonic()
            assert server.disconnect_all_clients() == 1
            failures = rec.wait_count("failed", 3)
            assert all(kind is NotConnectedError for _, kind, _ in failures)
            assert max(at for _, _, at in failures) - dropped < TIMEOUT  # not the 30 s
            rec.wait_count("disconnect", 1)
            assert client.state is C.DISCONNECTED
        finally:
            release.set()
            for t in threads:
                t.join(TIMEOUT)
    assert len(outcomes) == 3


# ------------------------------------------------------------------------ MORMOT profile



@pytest.mark.parametrize("mode", VECTOR_MODES)
def test_mormot_client_frames_decode_with_the_vector_rules(mode: str) -> None:
    rec = Recorder()
    cases = vector_cases(mode)

    def handler(sender: Client, data: bytes) -> bytes:
        rec.add("got", data)
        return b"ack:" + data

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind((LOCAL, 0))
        listener.listen(1)
        client = Client(LOCAL, listener.getsockname()[1], encryption_profile="MORMOT",
                        encryption_key=VECTOR_KEY, encryption_mode=mode,
                        encryption_key_size=256,
                        on_handle_command=handler)
        with client:
            assert client.encryption_info.startswith(f"AES-256-{mode}")
            raw, _ = listener.accept()
            with raw:
                # morsock -> Delphi: every frame decodes with the published rules
                ivs = set()
                for case in cases:
                    plaintext = bytes.fromhex(case["plaintext_hex"])
                    client.send_data(plaintext, encrypted=True)
                    flag, payload = read_frame(raw)
                    assert flag == 1
                    assert len(payload) == case["data_size"] == 16 + 16 * (len(plaintext) // 16 + 1)
                    assert vector_decrypt(mode, payload) == plaintext, case["id"]
                    ivs.add(payload[:16])
                assert len(ivs) == len(cases)  # a fresh random IV per message
                client.send_data(b"plain", encrypted=False)
                assert read_frame(raw) == (0, b"plain")
                # Delphi -> morsock: the handler gets the plaintext, its reply is encrypted
                for case in cases:
                    raw.sendall(bytes.fromhex(case["frame_hex"]))
                    flag, payload = read_frame(raw)
                    plaintext = bytes.fromhex(case["plaintext_hex"])
                    assert flag == 1
                    assert vector_decrypt(mode, payload) == b"ack:" + plaintext
                assert [e[1] for e in rec.named("got")] == \
                    [bytes.fromhex(c["plaintext_hex"]) for c in cases]
                # and a request answered by a Delphi frame
                answer = threading.Thread(target=lambda: (read_frame(raw), raw.sendall(
                    bytes.fromhex(cases[-1]["frame_hex"]))))
                answer.start()
                try:
                    assert client.request(b"question", TIMEOUT, encrypted=True) == \
                        bytes.fromhex(cases[-1]["plaintext_hex"])
                finally:
                    answer.join(TIMEOUT)


def test_mormot_client_and_server_talk_to_each_other() -> None:
    with running_server(lambda s, c, d: d[::-1], encryption_profile="MORMOT",
                        encryption_key=VECTOR_KEY, encryption_mode="GCM") as server, \
            Client(LOCAL, server.port, encryption_profile="MORMOT", encryption_key=VECTOR_KEY,
                   encryption_mode="GCM") as client:
        assert client.request(b"abcdef", encrypted=True) == b"fedcba"
        client.clear_statistics()
        assert client.request(b"x" * 40, encrypted=True) == b"x" * 40
        wait_until(lambda: client.total_bytes_received == 9 + 16 + 48)
        assert client.total_bytes_sent == 9 + 16 + 48  # IV + 40 bytes padded to 48


# ------------------------------------------------------------------------ AUTHENTICATED profile

@pytest.mark.parametrize("mode", list(AESMode))
def test_authenticated_profile_end_to_end(mode: AESMode) -> None:
    rec = Recorder()
    server_rec = Recorder()
    with running_server(lambda s, c, d: b"re:" + d, encryption_key=AUTH_KEY,
                        encryption_mode=mode, on_connect=server_rec.handler("connect")) as server, \
            Client(LOCAL, server.port, encryption_key=AUTH_KEY, encryption_mode=mode,
                   on_handle_command=rec.handler("pushed")) as client:
        assert client.encryption_info == f"AES-256-{mode.value}" == server.encryption_info
        (_, sc), = server_rec.wait_count("connect", 1)
        client.clear_statistics()
        question = b"secret question"
        assert client.request(question, encrypted=True) == b"re:" + question
        # both directions were encrypted: exact wire sizes of the authenticated frames
        sent = 9 + authenticated_payload_size(mode, len(question))
        received = 9 + authenticated_payload_size(mode, len(question) + 3)
        wait_until(lambda: client.total_bytes_received == received)
        assert client.total_bytes_sent == sent
        assert client.request(b"plain question") == b"re:plain question"
        wait_until(lambda: client.total_bytes_received == received + frame_size(17))
        assert client.total_bytes_sent == sent + frame_size(14)
        # server-initiated encrypted messages
        sc.send_data(b"push", encrypted=True)
        assert server.broadcast_data(b"to all", encrypted=True) == 1
        rec.wait_count("pushed", 2)
        assert [e[1] for e in rec.named("pushed")] == [b"push", b"to all"]
        for _ in range(3):  # sequence numbers keep advancing in both directions
            assert client.request(b"again", encrypted=True) == b"re:again"


def test_authenticated_wrong_key_refused_at_connect() -> None:
    with running_server(encryption_key=AUTH_KEY, encryption_mode="GCM") as server:
        bad = Client(LOCAL, server.port, encryption_key=AUTH_KEY + "!", encryption_mode="GCM")
        try:
            with pytest.raises(ConnectError):
                bad.connect()
            assert bad.state is C.DISCONNECTED
        finally:
            bad.disconnect()
        # a mode mismatch is refused too
        other_mode = Client(LOCAL, server.port, encryption_key=AUTH_KEY, encryption_mode="CBC")
        try:
            with pytest.raises(ConnectError):
                other_mode.connect()
        finally:
            other_mode.disconnect()
        wait_until(lambda: server.client_count == 0)
        with Client(LOCAL, server.port, encryption_key=AUTH_KEY, encryption_mode="GCM") as good:
            assert good.request(b"ok", encrypted=True) == b"ok"


def test_greetings_from_on_connect_reach_an_authenticated_client() -> None:
    # The server's on_connect runs before the client's hello is handled, so its sends go out
    # ahead of the handshake answer: the client holds them and handles them after on_connect.
    rec = Recorder()

    def greet(server: Server, client: ServerClient) -> None:
        client.send_data(b"welcome")
        server.broadcast_data(b"someone joined")

    with running_server(lambda s, c, d: b"re:" + d, encryption_key=AUTH_KEY,
                        on_connect=greet) as server, \
            Client(LOCAL, server.port, encryption_key=AUTH_KEY,
                   on_connect=rec.handler("connect"),
                   on_handle_command=rec.handler("pushed")) as client:
        rec.wait_count("pushed", 2)
        assert rec.snapshot() == [("connect",), ("pushed", b"welcome"),
                                  ("pushed", b"someone joined")]
        assert client.request(b"q", encrypted=True) == b"re:q"


def _answer_hello_with(frames: Union[bytes, Callable[[bytes], bytes]]
                       ) -> Tuple[threading.Thread, int, List[bytes]]:
    """A one-connection raw server that reads the client's hello, then sends *frames*
    (or what *frames* returns for the hello's bytes) and keeps the connection open until
    the client closes it."""
    listener = socket.create_server((LOCAL, 0))
    port = listener.getsockname()[1]
    got: List[bytes] = []

    def serve() -> None:
        with listener:
            listener.settimeout(TIMEOUT)
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                got.append(conn.recv(4096))
                conn.sendall(frames(got[0]) if callable(frames) else frames)
                while conn.recv(4096):
                    pass

    thread = threading.Thread(target=serve)
    thread.start()
    return thread, port, got


@pytest.mark.parametrize("before", [
    encode_frame(b"mormot?", 1),                              # an encrypted frame
    b"".join(encode_frame(b"%d" % i) for i in range(65)),     # more plaintext than it holds
], ids=["mormot-frame", "65-plaintext-frames"])
def test_what_is_not_a_greeting_before_the_handshake_answer_fails_the_connect(
        before: bytes) -> None:
    thread, port, got = _answer_hello_with(before)
    client = Client(LOCAL, port, encryption_key=AUTH_KEY, connection_timeout=3 * TIMEOUT)
    try:
        started = time.monotonic()
        with pytest.raises(ConnectError) as info:
            client.connect()
        assert info.value.code == ErrorCode.AUTHENTICATION_FAILED
        assert "did not answer the AUTHENTICATED handshake" in str(info.value)
        assert time.monotonic() - started < TIMEOUT  # at once, not at connection_timeout
    finally:
        client.disconnect()
        thread.join(TIMEOUT)
    assert got and got[0][8] == 2  # it was the client's hello


def test_bad_bytes_behind_the_handshake_answer_close_the_new_connection() -> None:
    # The answer and a greeting are handled (connect() succeeds, on_connect, the greeting),
    # then the bytes that follow them in the same read close the connection.
    def answer(hello: bytes) -> bytes:
        reply, _ = server_handshake(AUTH_KEY, AESMode.CBC, 256, hello[9:])
        return encode_frame(b"hi") + reply + b"GET / HTTP/1.0\r\n\r\n"

    rec = Recorder()
    thread, port, _ = _answer_hello_with(answer)
    client = Client(LOCAL, port, encryption_key=AUTH_KEY, on_connect=rec.handler("connect"),
                    on_handle_command=rec.handler("data"), on_error=rec.handler("error"),
                    on_disconnect=rec.handler("disconnect"))
    try:
        client.connect()
        rec.wait_count("disconnect", 1)
        assert [e[0] for e in rec.snapshot()] == ["connect", "data", "error", "disconnect"]
        assert rec.named("data") == [("data", b"hi")]
        assert rec.named("error")[0][2] == ErrorCode.INVALID_PROTOCOL
    finally:
        client.disconnect()
        thread.join(TIMEOUT)


def test_mormot_client_against_authenticated_server_is_refused() -> None:
    server_rec = Recorder()
    client_rec = Recorder()
    handled: List[bytes] = []

    def handler(server: Server, client: ServerClient, data: bytes) -> bytes:
        handled.append(data)
        return data

    with running_server(handler, encryption_key=AUTH_KEY,
                        on_error=server_rec.handler("error")) as server, \
            Client(LOCAL, server.port, encryption_key=AUTH_KEY, encryption_profile="MORMOT",
                   on_disconnect=client_rec.handler("disconnect")) as client:
        assert client.request(b"plain is fine") == b"plain is fine"
        client.send_data(b"mormot frame", encrypted=True)
        (_, sc, _, code), = server_rec.wait_count("error", 1)
        assert code == ErrorCode.DECRYPT_FAILED and isinstance(sc, ServerClient)
        client_rec.wait_count("disconnect", 1)
        assert not client.connected
    assert handled == [b"plain is fine"]


def test_raw_flag_2_frame_to_authenticated_server_is_closed() -> None:
    rec = Recorder()
    with running_server(encryption_key=AUTH_KEY, on_error=rec.handler("error")) as server:
        with RawPeer(LOCAL, server.port) as peer:
            assert peer.request(b"plain works") == b"plain works"  # no key, no handshake
        with RawPeer(LOCAL, server.port) as peer:
            peer.send_frame(b"\x00" * 48, flag=2)
            assert peer.expect_close() == b""
        (_, sc, _, code), = rec.wait_count("error", 1)
        assert code == ErrorCode.AUTHENTICATION_FAILED
        wait_until(lambda: server.client_count == 0)
