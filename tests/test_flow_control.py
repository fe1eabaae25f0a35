"""Flow control and closing (read back-pressure, draining disconnect, refused sends that
change nothing, on_error in the client's order, idle components that sleep)."""

from __future__ import annotations

import select
import socket
import threading

import pytest

import morsock
from morsock.protocol import HEADER_SIZE, encode_frame

from helpers import TIMEOUT, Recorder, wait_until

FRAME = 64 * 1024
#: One read of the reactor takes at most this many bytes (its scratch buffer).
READ_MAX = 256 * 1024


def _push_until_blocked(sock: socket.socket, frame: bytes, limit_bytes: int,
                        stall: float = 1.0) -> int:
    """Send *frame* over and over until the socket has not been writable for *stall*
    seconds (the peer stopped reading) or *limit_bytes* went out; return the bytes sent."""
    sock.setblocking(False)
    view = memoryview(frame * 4)
    sent = 0
    while sent < limit_bytes:
        _, writable, _ = select.select([], [sock], [], stall)
        if not writable:
            break
        try:
            sent += sock.send(view[sent % len(frame):])
        except BlockingIOError:
            continue
    return sent


@pytest.mark.parametrize("pool", [1, 4])
def test_a_slow_handler_stops_the_reading_of_its_connection(pool: int) -> None:
    """With the handler stuck, what the server reads from that peer stays within
    max_receive_backlog (plus one read); TCP pushes back on the sender; once the handler
    goes on, every frame is handled and the connection is read again."""
    gate = threading.Event()
    handled = Recorder()
    backlog_limit = 256 * 1024

    def handle(server, client, data):
        gate.wait(TIMEOUT)
        handled.add("frame", len(data))

    with morsock.Server(port=0, host="127.0.0.1", thread_pool_size=pool,
                        max_receive_backlog=backlog_limit,
                        on_handle_command=handle) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
            frame = encode_frame(b"x" * (FRAME - HEADER_SIZE))
            sent = _push_until_blocked(sock, frame, 64 * 1024 * 1024)
            assert sent < 64 * 1024 * 1024, "the server kept reading: no back-pressure"
            [client] = server.clients.values()
            assert client.receive_backlog <= backlog_limit + READ_MAX
            gate.set()
            total = sent // FRAME
            # the rest of a frame cut by the stall, then a marker frame to count on
            sock.setblocking(True)
            sock.sendall(frame[sent % FRAME:] if sent % FRAME else b"")
            total += 1 if sent % FRAME else 0
            handled.wait_count("frame", total, timeout=TIMEOUT)
            wait_until(lambda: client.receive_backlog == 0, what="backlog drained")
            # reading resumed: a further frame is handled too
            sock.sendall(frame)
            handled.wait_count("frame", total + 1, timeout=TIMEOUT)


def test_a_frame_larger_than_the_backlog_is_still_accepted() -> None:
    """One frame is always accepted when nothing is pending, however large."""
    rec = Recorder()
    with morsock.Server(port=0, host="127.0.0.1", max_receive_backlog=1024,
                        on_handle_command=lambda s, c, d: d[:4]) as server:
        with morsock.Client("127.0.0.1", server.port, max_receive_backlog=1024,
                            on_handle_command=rec.handler("push")) as client:
            for _ in range(3):
                assert client.request(b"y" * 300_000) == b"yyyy"
            with server.property_lock:
                [sc] = server.clients.values()
            big = b"z" * 200_000
            for _ in range(20):
                sc.send_data(big)
            rec.wait_count("push", 20)


def test_the_backlog_bookkeeping_stays_small_while_handlers_keep_up() -> None:
    """What the reactor notes per read is forgotten once its frames are handled, whether or
    not the backlog ever came near its limit (a long-lived connection must not grow)."""
    with morsock.Server(port=0, host="127.0.0.1",
                        on_handle_command=lambda s, c, d: d) as server:
        with morsock.Client("127.0.0.1", server.port) as client:
            for i in range(2000):
                assert client.request(b"%d" % i) == b"%d" % i
            with server.property_lock:
                [sc] = server.clients.values()
            assert sc._conn._backlog.entries() <= 2, "one entry per read was kept"
            assert client._conn._backlog.entries() <= 2


def test_a_pipelining_client_is_slowed_down_not_dropped() -> None:
    """A client that sends requests faster than it reads the replies is slowed down by
    TCP (the server stops reading it while its replies wait), never disconnected with
    SEND_BUFFER_FULL."""
    errors = Recorder()
    payload = b"p" * 32 * 1024
    with morsock.Server(port=0, host="127.0.0.1", max_send_buffer=1024 * 1024,
                        max_receive_backlog=256 * 1024,
                        on_error=errors.handler("error"),
                        on_handle_command=lambda s, c, d: d) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            frame = encode_frame(payload)
            sent = _push_until_blocked(sock, frame, 256 * 1024 * 1024)
            assert sent < 256 * 1024 * 1024, "the server kept reading: no back-pressure"
            assert server.client_count == 1, errors.snapshot()
            # read everything back: every request is answered
            sock.setblocking(True)
            rest = sent % len(frame)
            if rest:
                sock.sendall(frame[rest:])
            expected = (sent + (len(frame) - rest if rest else 0)) // len(frame) * len(frame)
            got = 0
            sock.settimeout(TIMEOUT)
            while got < expected:
                chunk = sock.recv(1 << 20)
                assert chunk, "the server closed the connection"
                got += len(chunk)
            assert got == expected
        assert not [e for e in errors.snapshot()
                    if e[-1] == morsock.ErrorCode.SEND_BUFFER_FULL]


class _PausableRelay:
    """Forwards one connection 127.0.0.1 -> *target*; while :attr:`hold` is set it
    stops reading from the target, so the target's sends pile up (a peer that does not
    read). Stopped by :meth:`close` (joins its thread)."""

    def __init__(self, target: int) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._target = target
        self.hold = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relay")
        self._thread.start()

    def _run(self) -> None:
        self._listener.settimeout(TIMEOUT)
        down, _ = self._listener.accept()
        up = socket.create_connection(("127.0.0.1", self._target), timeout=TIMEOUT)
        with down, up:
            down.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
            up.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
            while not self._stop.is_set():
                watch = [down] if self.hold.is_set() else [down, up]
                readable, _, _ = select.select(watch, [], [], 0.02)
                for src in readable:
                    data = src.recv(65536)
                    if not data:
                        return
                    (up if src is down else down).sendall(data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        self._listener.close()


@pytest.mark.parametrize("profile", ["AUTHENTICATED", "MORMOT"])
def test_a_refused_send_leaves_an_encrypted_connection_as_it_was(profile: str) -> None:
    """send_data refused with SendBufferFullError, and broadcast_data skipping a full
    client, change nothing: in the AUTHENTICATED profile no sequence number is used up,
    so the next frame is accepted by the peer."""
    key = "flow-control-key"
    got = Recorder()
    errors = Recorder()
    with morsock.Server(port=0, host="127.0.0.1", encryption_key=key,
                        encryption_profile=profile, max_send_buffer=128 * 1024,
                        on_error=errors.handler("server_error"),
                        on_handle_command=lambda s, c, d: b"ok") as server:
        relay = _PausableRelay(server.port)
        try:
            with morsock.Client("127.0.0.1", relay.port, encryption_key=key,
                                encryption_profile=profile,
                                on_error=errors.handler("client_error"),
                                on_handle_command=lambda c, d: got.add(
                                    "got", d if len(d) < 16 else len(d))) as client:
                assert client.request(b"hi", encrypted=True) == b"ok"
                [sc] = server.clients.values()
                relay.hold.set()
                chunk = b"c" * 32 * 1024
                sent = refused = skipped = 0
                for _ in range(4000):
                    try:
                        sc.send_data(chunk, encrypted=True)
                        sent += 1
                    except morsock.SendBufferFullError:
                        refused += 1
                        if server.broadcast_data(chunk, encrypted=True) == 0:
                            skipped += 1
                        if refused >= 3:
                            break
                assert refused >= 3 and skipped >= 1
                relay.hold.clear()
                got.wait_count("got", sent)
                sc.send_data(b"after", encrypted=True)
                got.wait_for(lambda ev: ("got", b"after") in ev, what="the frame after")
                assert client.request(b"again", encrypted=True) == b"ok"
                assert not errors.named("client_error"), errors.snapshot()
        finally:
            relay.close()


@pytest.mark.parametrize("pool", [2, 4])
def test_on_error_waits_for_on_connect(pool: int) -> None:
    """A peer that sends garbage at once while its on_connect still runs gets its
    on_error after on_connect returned, then on_disconnect: one order per client."""
    gate = threading.Event()
    rec = Recorder()

    def on_connect(server, client):
        rec.add("connect-start", client.handle)
        gate.wait(TIMEOUT)
        rec.add("connect-end", client.handle)

    with morsock.Server(port=0, host="127.0.0.1", thread_pool_size=pool,
                        on_connect=on_connect,
                        on_error=lambda s, c, m, code: rec.add("error", c and c.handle, code),
                        on_disconnect=lambda s, c: rec.add("disconnect", c.handle)) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
            rec.wait_count("connect-start", 1)
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            # the garbage was read and refused (the server closes its side) ...
            sock.settimeout(TIMEOUT)
            assert sock.recv(16) == b""
            assert server.total_bytes_received > 0
            gate.set()
            rec.wait_count("disconnect", 1)
    order = [e[0] for e in rec.snapshot()]
    assert order == ["connect-start", "connect-end", "error", "disconnect"], rec.snapshot()
    assert rec.named("error")[0][2] == morsock.ErrorCode.INVALID_PROTOCOL


def test_disconnect_lets_the_queue_drain_and_closes_the_socket() -> None:
    """200 x 32 KiB accepted by send_data, then disconnect(): every frame reaches the
    server, which then sees the close; nothing stays open."""
    gate = threading.Event()
    rec = Recorder()

    def handle(server, client, data):
        gate.wait(TIMEOUT)
        rec.add("frame", len(data))

    with morsock.Server(port=0, host="127.0.0.1", on_handle_command=handle,
                        on_disconnect=rec.handler("disconnect")) as server:
        client = morsock.Client(
            "127.0.0.1", server.port, on_error=rec.handler("client_error"),
            # the server's handler waits until the disconnect has begun, so the queue is
            # still full then
            on_state_change=lambda c, old, new: new is morsock.ClientState.DISCONNECTING
            and gate.set())
        client.connect()
        chunk = b"d" * 32 * 1024
        for _ in range(200):
            client.send_data(chunk)
        client.disconnect()
        assert gate.is_set()
        rec.wait_count("frame", 200)
        rec.wait_count("disconnect", 1)
        assert server.client_count == 0
    assert not rec.named("client_error")


def test_disconnect_reports_what_the_peer_did_not_take() -> None:
    """A peer that does not read within connection_timeout: disconnect() returns after
    it, reports the dropped frames and bytes (on_error TIMEOUT) and closes the socket
    (the no_leaks fixture checks that no fd or thread is left)."""
    rec = Recorder()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        port = listener.getsockname()[1]
        client = morsock.Client("127.0.0.1", port, connection_timeout=0.5,
                                encryption_key="", on_error=rec.handler("error"))
        client.connect()
        peer, _ = listener.accept()
        with peer:
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            chunk = b"e" * 64 * 1024
            sent = 0
            try:
                while sent < 120:  # 7.5 MiB: within max_send_buffer
                    client.send_data(chunk)
                    sent += 1
            except morsock.SendBufferFullError:
                pass
            client.disconnect()
            [(_, message, code)] = rec.named("error")
            assert code == morsock.ErrorCode.TIMEOUT
            assert "frame(s)" in message and "bytes queued" in message
            frames = int(message.split(" frame(s)")[0].rsplit(" ", 1)[-1])
            assert 0 < frames <= sent
            assert client.state is morsock.ClientState.DISCONNECTED


def _switches(threads: list) -> int:
    """Context switches of *threads* so far (Linux /proc), each wake-up counts one."""
    total = 0
    for t in threads:
        with open(f"/proc/self/task/{t.native_id}/status") as fh:
            for line in fh:
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
    return total


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/task"),
                    reason="counts wake-ups through Linux /proc")
def test_an_idle_component_sleeps() -> None:
    """With no traffic and no timer asked for, the server's and the client's threads make
    no periodic wake-ups (also after traffic, and with a client connected). The quiet
    window is an observation over wall time, not a synchronisation."""
    before = set(threading.enumerate())
    with morsock.Server(port=0, host="127.0.0.1", thread_pool_size=4,
                        on_handle_command=lambda s, c, d: d) as server:
        with morsock.Client("127.0.0.1", server.port) as client:
            for _ in range(50):
                assert client.request(b"ping") == b"ping"
            threads = [t for t in threading.enumerate() if t not in before]
            assert len(threads) >= 6  # server: 4 workers; client: reactor and worker
            quiet = threading.Event()
            quiet.wait(0.3)  # let the last batch settle and the watch notice the quiet
            start = _switches(threads)
            quiet.wait(1.0)
            woke = _switches(threads) - start
            assert woke <= 2, f"{woke} wake-ups in an idle second"
            assert client.request(b"after") == b"after"  # and it wakes for traffic
