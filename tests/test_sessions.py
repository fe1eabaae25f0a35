"""Sessions wired into the components (API.md §10): Client(resumable=True) with
Server(resume_window > 0), through a proxy that cuts the connections on demand."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

from morsock import Client, ConnectError, ErrorCode, SendBufferFullError, Server
from morsock.protocol import encode_frame
from morsock.testing import RawPeer, running_server

from helpers import TIMEOUT, Recorder, scaled, wait_until
from session_proxy import CutProxy

LOCAL = "127.0.0.1"
KEY = "session tests"
PROFILES = ["plain", "authenticated", "mormot", "tls"]


def profile_settings(profile: str, pki: Path | None = None) -> Tuple[Dict[str, Any],
                                                                     Dict[str, Any]]:
    """(server settings, client settings) of *profile*."""
    if profile == "plain":
        return {}, {}
    if profile == "authenticated":
        return {"encryption_key": KEY}, {"encryption_key": KEY}
    if profile == "mormot":
        both = {"encryption_key": KEY, "encryption_profile": "MORMOT",
                "encryption_mode": "CTR"}
        return dict(both), dict(both)
    from test_tls import client_ctx, server_ctx
    assert pki is not None
    return {"ssl_context": server_ctx(pki)}, {"ssl_context": client_ctx(pki)}


@pytest.fixture(params=PROFILES)
def profile(request: pytest.FixtureRequest) -> Tuple[str, Dict[str, Any], Dict[str, Any]]:
    pki = request.getfixturevalue("pki") if request.param == "tls" else None
    server_kw, client_kw = profile_settings(request.param, pki)
    return request.param, server_kw, client_kw


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_tls import _make_ca, _make_leaf
    d = tmp_path_factory.mktemp("pki-sessions")
    _make_ca(d, "ca", "morsock test CA")
    _make_leaf(d, "server", "ca", "localhost", "DNS:localhost,IP:127.0.0.1", "serverAuth")
    return d


class Stream:
    """Messages one side received, in order, with a condition to wait on."""

    def __init__(self) -> None:
        self.items: List[bytes] = []
        self.cond = threading.Condition()

    def add(self, data: bytes) -> None:
        with self.cond:
            self.items.append(data)
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = TIMEOUT) -> List[bytes]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.items) >= n, timeout), (
                f"{len(self.items)} of {n} messages came")
            return list(self.items)


def tagged(prefix: bytes, n: int, size: int = 0) -> List[bytes]:
    return [prefix + b"%06d" % i + b"x" * size for i in range(n)]


# ------------------------------------------------------------------ hello and profiles

def test_session_in_every_profile(profile: Any) -> None:
    """A session opens with no encryption, both profiles and TLS: both sides know its id,
    messages flow both ways (encrypted ones too), request() is answered."""
    name, server_kw, client_kw = profile
    at_server, at_client = Stream(), Stream()
    srec = Recorder()

    flags: List[bool] = []

    def handle(server: Server, client: Any, data: bytes) -> bytes | None:
        at_server.add(data)
        flags.append(client.message_encrypted)
        if data.startswith(b"req"):
            return b"re:" + data
        client.send_data(b"push:" + data, encrypted=name in ("authenticated", "mormot"))
        return None

    with running_server(handle, resume_window=5, on_connect=srec.handler("on_connect"),
                        **server_kw) as server:
        client = Client(LOCAL, server.port, resumable=True, **client_kw,
                        on_handle_command=lambda c, d: at_client.add(d))
        with client:
            assert client.session_id is not None and len(client.session_id) == 16
            (_, sclient), = srec.wait_count("on_connect", 1)
            assert sclient.session_id == client.session_id
            encrypted = name in ("authenticated", "mormot")
            for i, data in enumerate(tagged(b"m", 20)):
                client.send_data(data, encrypted=encrypted and i % 2 == 0)
            assert client.request(b"req-1", TIMEOUT, encrypted=encrypted) == b"re:req-1"
            assert at_server.wait(21) == tagged(b"m", 20) + [b"req-1"]
            assert at_client.wait(20) == [b"push:" + d for d in tagged(b"m", 20)]
            # ServerClient.message_encrypted tells the handler how each message came
            assert flags == [encrypted and i % 2 == 0 for i in range(20)] + [encrypted]


def test_resumable_client_fails_connect_on_a_server_without_sessions() -> None:
    """A resumable client whose server does not answer the hello: ConnectError."""
    with running_server() as server:
        client = Client(LOCAL, server.port, resumable=True, connection_timeout=3)
        try:
            with pytest.raises(ConnectError):
                client.connect()
        finally:
            client.disconnect()


def test_session_less_peers_see_no_new_byte() -> None:
    """On a server with resume_window > 0, a raw peer and a non-resumable morsock client
    get exactly the bytes a server without sessions sends them."""
    def handle(server: Server, client: Any, data: bytes) -> bytes:
        return b"echo:" + data

    def exchange(server: Server) -> bytes:
        peer = RawPeer(LOCAL, server.port)
        try:
            peer.sock.sendall(encode_frame(b"hello") + encode_frame(b"x" * 1000))
            got = b""
            want = len(encode_frame(b"echo:hello")) + len(encode_frame(b"echo:" + b"x" * 1000))
            peer.sock.settimeout(TIMEOUT)
            while len(got) < want:
                chunk = peer.sock.recv(65536)
                assert chunk, "closed"
                got += chunk
            return got
        finally:
            peer.sock.close()

    with running_server(handle) as plain_server:
        reference = exchange(plain_server)
    with running_server(handle, resume_window=5) as server:
        assert exchange(server) == reference
        with Client(LOCAL, server.port) as client:
            assert client.request(b"hi", TIMEOUT) == b"echo:hi"
            assert client.session_id is None
        assert len(server._sessions) == 0  # type: ignore[arg-type]


def test_silent_session_less_peer_gets_on_connect() -> None:
    """A peer that sends nothing is still announced (on_connect), and its greeting from
    on_connect reaches it as a plain frame."""
    srec = Recorder()

    def greet(server: Server, client: Any) -> None:
        srec.add("on_connect", client)
        client.send_data(b"welcome")

    with running_server(resume_window=5, on_connect=greet) as server:
        peer = RawPeer(LOCAL, server.port)
        try:
            peer.sock.settimeout(TIMEOUT)
            want = encode_frame(b"welcome")
            got = b""
            while len(got) < len(want):
                chunk = peer.sock.recv(100)
                assert chunk
                got += chunk
            assert got == want
        finally:
            peer.sock.close()


# ------------------------------------------------------------------------ the resume

@pytest.mark.parametrize("mode", ["reset", "close", "orphan"])
def test_resume_delivers_everything_once_in_order(mode: str) -> None:
    """Cut the connection while both sides stream: after the resume each side has every
    message exactly once, in order; same ServerClient (handle, custom_data);
    on_connect/on_disconnect once per session on both sides."""
    at_server, at_client = Stream(), Stream()
    srec, crec = Recorder(), Recorder()
    faces: List[Any] = []

    def handle(server: Server, client: Any, data: bytes) -> None:
        faces.append(client)
        at_server.add(data)

    def on_connect(server: Server, client: Any) -> None:
        client.custom_data = "mine"
        srec.add("on_connect", client)

    with running_server(handle, resume_window=10, on_connect=on_connect,
                        on_disconnect=srec.handler("on_disconnect")) as server:
        with CutProxy(server.port) as proxy:
            client = Client(LOCAL, proxy.port, resumable=True, auto_reconnect=True,
                            reconnect_strategy="IMMEDIATE", reconnect_max_attempts=0,
                            on_handle_command=lambda c, d: at_client.add(d),
                            on_connect=crec.handler("on_connect"),
                            on_disconnect=crec.handler("on_disconnect"),
                            on_error=crec.handler("on_error"))
            with client:
                (_, face), = srec.wait_count("on_connect", 1)
                handle_no = face.handle
                up, down = tagged(b"u", 300, 50), tagged(b"d", 300, 50)
                for i in range(300):
                    client.send_data(up[i])
                    face.send_data(down[i])
                    if i in (100, 200):
                        proxy.cut(mode)
                        assert proxy.wait_accepted(2 if i == 100 else 3, TIMEOUT)
                assert at_server.wait(300) == up
                assert at_client.wait(300) == down
                assert proxy.accepted >= 3
                assert all(f is face for f in faces)
                assert face.handle == handle_no and face.custom_data == "mine"
                assert server.find_client(handle_no) is face
                assert srec.count("on_connect") == 1 and srec.count("on_disconnect") == 0
                assert crec.count("on_connect") == 1 and crec.count("on_disconnect") == 0
                assert not [e for e in crec.named("on_error")
                            if e[2] == ErrorCode.SESSION_LOST]
            srec.wait_count("on_disconnect", 1)
            assert crec.count("on_disconnect") == 1
            assert client.take_unacknowledged() == []


def test_send_data_while_disconnected_is_queued_and_bounded() -> None:
    """While the client has no connection its send_data queues (then delivered after
    the resume); past max_send_buffer it raises SendBufferFullError."""
    at_server = Stream()
    with running_server(lambda s, c, d: at_server.add(d), resume_window=10) as server:
        with CutProxy(server.port) as proxy:
            client = Client(LOCAL, proxy.port, resumable=True, auto_reconnect=True,
                            reconnect_strategy="FIXED_INTERVAL", reconnect_interval=100,
                            reconnect_max_attempts=0,
                            max_send_buffer=10_000)
            with client:
                client.send_data(b"first")
                at_server.wait(1)
                proxy.refusing = True
                proxy.cut("reset")
                wait_until(lambda: not client.connected, what="the drop seen")
                queued = tagged(b"q", 9, 1000)
                for data in queued:
                    client.send_data(data)
                with pytest.raises(SendBufferFullError):
                    client.send_data(b"y" * 2000)
                proxy.refusing = False
                assert at_server.wait(10) == [b"first"] + queued


def test_session_id_alone_cannot_take_a_session_over() -> None:
    """AUTHENTICATED: a client that knows a session's id (not the key-bound secret)
    cannot resume it; the real owner still can."""
    at_server = Stream()
    srec = Recorder()
    with running_server(lambda s, c, d: at_server.add(d), resume_window=10,
                        encryption_key=KEY, on_error=srec.handler("on_error")) as server:
        with CutProxy(server.port) as proxy:
            owner = Client(LOCAL, proxy.port, resumable=True, encryption_key=KEY,
                           auto_reconnect=True, reconnect_strategy="IMMEDIATE",
                           reconnect_max_attempts=0)
            with owner:
                owner.send_data(b"one")
                at_server.wait(1)
                sid = owner.session_id
                assert sid is not None
                thief = Client(LOCAL, server.port, resumable=True, encryption_key=KEY,
                               connection_timeout=3)
                link = thief._link()
                assert link is not None
                session = link.session
                session.session_id = sid          # it saw the id on the wire
                session._secret = b"\0" * 32      # but not the secret
                session._bound = True
                try:
                    with pytest.raises(ConnectError):
                        thief.connect()
                finally:
                    thief.disconnect()
                srec.wait_for(lambda ev: any(e[3] == ErrorCode.AUTHENTICATION_FAILED
                                             for e in ev if e[0] == "on_error"))
                proxy.cut("reset")
                owner.send_data(b"two")
                assert at_server.wait(2) == [b"one", b"two"]
                assert owner.session_id == sid


# --------------------------------------------------------------------- request ids

def test_requests_are_matched_by_id_and_pushes_never_taken_for_replies() -> None:
    """Concurrent requests each get their own reply while the server pushes between
    them; pushes reach on_handle_command; a reply that comes after its request timed
    out is not taken by the next request."""
    pushes = Stream()
    release = threading.Event()

    def handle(server: Server, client: Any, data: bytes) -> bytes:
        client.send_data(b"push-for-" + data)
        if data == b"slow":
            release.wait(TIMEOUT)
        return b"reply-to-" + data

    with running_server(handle, resume_window=5, thread_pool_size=4) as server:
        with Client(LOCAL, server.port, resumable=True,
                    on_handle_command=lambda c, d: pushes.add(d)) as client:
            from morsock import RequestTimeout
            with pytest.raises(RequestTimeout):
                client.request(b"slow", 0.3)
            release.set()
            results: Dict[int, bytes] = {}

            def ask(i: int) -> None:
                results[i] = client.request(b"r%d" % i, TIMEOUT)

            threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(TIMEOUT)
            assert results == {i: b"reply-to-r%d" % i for i in range(8)}
            got = pushes.wait(9)
            assert sorted(got) == sorted([b"push-for-slow"] +
                                         [b"push-for-r%d" % i for i in range(8)])
            assert not any(g.startswith(b"reply-to") for g in got)


# ---------------------------------------------------------------- sessions that end

def test_session_lost_when_the_window_passed_hands_messages_back() -> None:
    """The client stays away longer than resume_window: on_error(SESSION_LOST) with the
    count, and every unacknowledged message comes back from take_unacknowledged()."""
    at_server = Stream()
    crec = Recorder()
    with running_server(lambda s, c, d: at_server.add(d), resume_window=0.3) as server:
        with CutProxy(server.port) as proxy:
            client = Client(LOCAL, proxy.port, resumable=True, auto_reconnect=True,
                            reconnect_strategy="FIXED_INTERVAL", reconnect_interval=100,
                            reconnect_max_attempts=0,
                            on_error=crec.handler("on_error"),
                            on_connect=crec.handler("on_connect"),
                            on_disconnect=crec.handler("on_disconnect"))
            with client:
                client.send_data(b"delivered")
                at_server.wait(1)
                proxy.refusing = True
                proxy.cut("reset")
                wait_until(lambda: not client.connected, what="the drop seen")
                queued = tagged(b"lost", 5)
                for data in queued:
                    client.send_data(data)
                lost = crec.wait_for(lambda ev: any(e[0] == "on_error"
                                                    and e[2] == ErrorCode.SESSION_LOST
                                                    for e in ev))
                message = [e for e in lost if e[0] == "on_error"
                           and e[2] == ErrorCode.SESSION_LOST][0][1]
                back = client.take_unacknowledged()
                # "delivered" comes back too if its acknowledgement was still on the way
                assert [m.data for m in back][-5:] == queued and len(back) in (5, 6)
                assert f"{len(back)} message(s)" in message
                assert client.take_unacknowledged() == []
                crec.wait_count("on_disconnect", 1)
                proxy.refusing = False
                crec.wait_count("on_connect", 2)   # a new session
                client.send_data(b"after")
                assert at_server.wait(2) == [b"delivered", b"after"]


def test_server_stop_sends_going_away() -> None:
    """Server.stop() ends each session with GOING_AWAY: the client's session ends
    (on_disconnect once), and nothing it had acknowledged is reported lost."""
    crec = Recorder()
    at_server = Stream()
    server = Server(0, LOCAL, resume_window=10, on_handle_command=lambda s, c, d:
                    at_server.add(d))
    server.start()
    client = Client(LOCAL, server.port, resumable=True,
                    on_error=crec.handler("on_error"),
                    on_disconnect=crec.handler("on_disconnect"))
    try:
        client.connect()
        for data in tagged(b"s", 10):
            client.send_data(data)
        at_server.wait(10)
        server.stop()
        crec.wait_count("on_disconnect", 1)
        assert client.session_id is None
        assert client.take_unacknowledged() == []
        assert not [e for e in crec.named("on_error") if e[2] == ErrorCode.SESSION_LOST]
    finally:
        client.disconnect()
        server.stop()


def test_server_client_disconnect_ends_the_session() -> None:
    """ServerClient.disconnect() on a session: the client does not resume it."""
    srec, crec = Recorder(), Recorder()
    with running_server(resume_window=10, on_connect=srec.handler("on_connect"),
                        on_disconnect=srec.handler("on_disconnect")) as server:
        client = Client(LOCAL, server.port, resumable=True,
                        on_disconnect=crec.handler("on_disconnect"))
        with client:
            (_, face), = srec.wait_count("on_connect", 1)
            face.disconnect()
            srec.wait_count("on_disconnect", 1)
            crec.wait_count("on_disconnect", 1)
            assert len(server._sessions) == 0  # type: ignore[arg-type]


def test_plain_peer_may_not_start_a_session_later() -> None:
    """A connection that began session-less and then sends a session frame is refused."""
    srec = Recorder()
    with running_server(resume_window=5, on_error=srec.handler("on_error")) as server:
        peer = RawPeer(LOCAL, server.port)
        try:
            peer.sock.sendall(encode_frame(b"plain first"))
            peer.sock.settimeout(TIMEOUT)
            assert peer.sock.recv(100)
            peer.sock.sendall(encode_frame(b"\x08x", 3))
            srec.wait_for(lambda ev: any(e[3] == ErrorCode.INVALID_PROTOCOL
                                         for e in ev if e[0] == "on_error"))
        finally:
            peer.sock.close()


# ------------------------------------------------------------------- a Delphi peer

DELPHI_BIN = Path(os.environ.get("MORSOCK_DELPHI_PEER", Path(__file__).resolve().parents[2]
                                  / "shared" / "delphi_peer")) / "bin"


@pytest.fixture(scope="module")
def delphi_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Delphi peer's programs, copied out of ../shared (they write beside themselves)."""
    import shutil
    d = tmp_path_factory.mktemp("delphi")
    for name in ("mm_client", "mm_echo_server"):
        shutil.copy2(DELPHI_BIN / name, d / name)
    return d


@pytest.mark.parametrize("encrypted", [False, True])
def test_delphi_client_on_a_session_server(delphi_bin: Path, encrypted: bool) -> None:
    """The original TmMClient on a server with resume_window > 0: its on_connect greeting
    and the echo reach it byte for byte, as from a server without sessions."""
    import subprocess

    def handle(server: Server, client: Any, data: bytes) -> bytes:
        return b"Echo: " + data

    def greet(server: Server, client: Any) -> None:
        client.send_data(b"welcome", encrypted=encrypted)

    key = {"encryption_key": KEY, "encryption_profile": "MORMOT",
           "encryption_mode": "CBC"} if encrypted else {}
    args = ["--keyhex", KEY.encode().hex(), "--mode", "CBC", "--bits", "256"] if encrypted else []
    with running_server(handle, resume_window=5, on_connect=greet, **key) as server:
        proc = subprocess.run(
            [str(delphi_bin / "mm_client"), "--host", LOCAL, "--port", str(server.port), *args],
            input=f"connect 5000\nsend {int(encrypted)} {b'hello'.hex()}\nwait 2 8000\n"
                  "disconnect\nquit\n", capture_output=True, text=True, timeout=scaled(60))
        got = [line.split("hex=")[1] for line in proc.stdout.splitlines()
               if line.startswith("RECV")]
        assert sorted(got) == sorted([b"welcome".hex(), b"Echo: hello".hex()]), proc.stdout
        assert len(server._sessions) == 0  # type: ignore[arg-type]


def test_resumable_client_refused_by_a_delphi_server(delphi_bin: Path) -> None:
    """The original TmMServer does not answer the session hello: connect() fails."""
    import subprocess
    port_sock = socket.create_server((LOCAL, 0))
    port = port_sock.getsockname()[1]
    port_sock.close()
    proc = subprocess.Popen([str(delphi_bin / "mm_echo_server"), "--port", str(port)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=delphi_bin)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("READY"):
                break
        client = Client(LOCAL, port, resumable=True, connection_timeout=3)
        try:
            with pytest.raises(ConnectError):
                client.connect()
        finally:
            client.disconnect()
    finally:
        assert proc.stdin is not None
        proc.stdin.write("quit\n")
        proc.stdin.close()
        proc.wait(scaled(20))
        proc.stdout.close()  # type: ignore[union-attr]


# ---------------------------------------------------------- the server process dies

_SERVER_CHILD = r"""
import sys, threading
from morsock import Server
lock = threading.Lock()
def handle(server, client, data):
    with lock:
        sys.stdout.write(data.decode() + "\n")
        sys.stdout.flush()
server = Server(int(sys.argv[1]), "127.0.0.1", resume_window=30, on_handle_command=handle)
server.start()
sys.stdout.write("PORT %d\n" % server.port)
sys.stdout.flush()
sys.stdin.read()
server.stop()
"""


def test_killed_server_every_unacknowledged_message_reported() -> None:
    """SIGKILL the server mid-stream, start another on the same port: the client's
    session is lost; every message it sent either reached the dead server or comes
    back through take_unacknowledged() (counted in on_error(SESSION_LOST)); none is
    silently gone."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))

    def spawn(port: int) -> Tuple[subprocess.Popen, List[str], threading.Event, int,
                                  threading.Thread]:
        proc = subprocess.Popen([sys.executable, "-c", _SERVER_CHILD, str(port)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env=env)
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("PORT "), first
        lines: List[str] = []
        enough = threading.Event()

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line.strip())
                if len(lines) >= 200:
                    enough.set()
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        return proc, lines, enough, int(first.split()[1]), reader

    crec = Recorder()
    proc, received, enough, port, reader = spawn(0)
    client = Client(LOCAL, port, resumable=True, auto_reconnect=True,
                    reconnect_strategy="FIXED_INTERVAL", reconnect_interval=100,
                    reconnect_max_attempts=0, on_error=crec.handler("on_error"))
    second = None
    try:
        client.connect()
        sent = [f"k{i:05d}" for i in range(400)]
        for i, data in enumerate(sent):
            client.send_data(data.encode())
            if i == 300:
                assert enough.wait(TIMEOUT)
                proc.kill()
                proc.wait(TIMEOUT)
                reader.join(TIMEOUT)   # everything the dead server wrote is read
        second = spawn(port)
        crec.wait_for(lambda ev: any(e[0] == "on_error" and e[2] == ErrorCode.SESSION_LOST
                                     for e in ev), 2 * TIMEOUT)
        message = [e[1] for e in crec.named("on_error") if e[2] == ErrorCode.SESSION_LOST][0]
        back = [m.data.decode() for m in client.take_unacknowledged()]
        assert f"{len(back)} message(s)" in message
        assert back == sorted(back) and len(set(back)) == len(back)
        assert set(received) | set(back) == set(sent), "a message was silently lost"
        assert set(sent) - set(received) <= set(back)
        assert len(received) < len(sent)  # the kill did lose some
    finally:
        client.disconnect()
        for p in ([proc] + ([second[0]] if second else [])):
            if p.poll() is None:
                assert p.stdin is not None
                p.stdin.close()
                p.wait(TIMEOUT)
            for stream in (p.stdin, p.stdout):
                if stream is not None:
                    stream.close()


def test_resume_in_every_profile(profile: Any) -> None:
    """A resume after a reset works with no encryption, both profiles and TLS (encrypted
    messages resealed on the new connection), both directions."""
    name, server_kw, client_kw = profile
    encrypted = name in ("authenticated", "mormot")
    at_server, at_client = Stream(), Stream()
    srec = Recorder()
    with running_server(lambda s, c, d: at_server.add(d), resume_window=10,
                        on_connect=srec.handler("on_connect"), **server_kw) as server:
        with CutProxy(server.port) as proxy:
            client = Client(LOCAL, proxy.port, resumable=True, auto_reconnect=True,
                            reconnect_strategy="IMMEDIATE", reconnect_max_attempts=0,
                            **client_kw,
                            on_handle_command=lambda c, d: at_client.add(d))
            with client:
                (_, face), = srec.wait_count("on_connect", 1)
                up, down = tagged(b"u", 60, 100), tagged(b"d", 60, 100)
                for i in range(60):
                    client.send_data(up[i], encrypted=encrypted and i % 2 == 1)
                    face.send_data(down[i], encrypted=encrypted and i % 3 == 1)
                    if i == 30:
                        proxy.cut("reset")
                assert at_server.wait(60) == up
                assert at_client.wait(60) == down
                assert proxy.wait_accepted(2, TIMEOUT)
                assert srec.count("on_connect") == 1


def test_server_reports_messages_of_a_session_that_expired() -> None:
    """Server side: the client never comes back; after resume_window the session ends,
    on_error(client, SESSION_LOST) counts what it did not acknowledge, then
    on_disconnect fires once."""
    srec = Recorder()
    with running_server(resume_window=0.3, on_connect=srec.handler("on_connect"),
                        on_disconnect=srec.handler("on_disconnect"),
                        on_error=srec.handler("on_error")) as server:
        with CutProxy(server.port) as proxy:
            client = Client(LOCAL, proxy.port, resumable=True)
            with client:
                (_, face), = srec.wait_count("on_connect", 1)
                proxy.refusing = True
                proxy.cut("reset")
                wait_until(lambda: not face.connected, what="the server saw the drop")
                for data in tagged(b"late", 4):
                    face.send_data(data)
                srec.wait_count("on_disconnect", 1)
                lost = [e for e in srec.named("on_error") if e[3] == ErrorCode.SESSION_LOST]
                assert len(lost) == 1 and lost[0][1] is face and "4 message(s)" in lost[0][2]
                assert srec.count("on_disconnect") == 1


def test_server_stop_fires_on_disconnect_of_a_waiting_session() -> None:
    """A session whose client is away when the server stops: its on_disconnect fires
    (once) before stop() returns."""
    srec = Recorder()
    server = Server(0, LOCAL, resume_window=30, on_connect=srec.handler("on_connect"),
                    on_disconnect=srec.handler("on_disconnect"))
    server.start()
    try:
        with CutProxy(server.port) as proxy:
            client = Client(LOCAL, proxy.port, resumable=True)
            with client:
                (_, face), = srec.wait_count("on_connect", 1)
                proxy.refusing = True
                proxy.cut("reset")
                wait_until(lambda: not face.connected, what="the server saw the drop")
                assert srec.count("on_disconnect") == 0
                server.stop()
                assert srec.count("on_disconnect") == 1
    finally:
        server.stop()


def test_messages_queued_for_a_session_that_never_started_are_handed_back() -> None:
    """A resumable client that never reached its server: disconnect() hands back what
    send_data queued (it was never sent), with on_error(SESSION_LOST)."""
    crec = Recorder()
    with running_server() as server:   # speaks no sessions: connect() fails
        client = Client(LOCAL, server.port, resumable=True, connection_timeout=3,
                        on_error=crec.handler("on_error"))
        client.send_data(b"one")
        client.send_data(b"two", encrypted=False)
        with pytest.raises(ConnectError):
            client.connect()
        client.disconnect()
        assert [m.data for m in client.take_unacknowledged()] == [b"one", b"two"]
        assert any(e[2] == ErrorCode.SESSION_LOST and "2 message(s)" in e[1]
                   for e in crec.named("on_error"))
        never = Client(LOCAL, server.port, resumable=True)
        never.send_data(b"three")
        never.disconnect()   # no thread ever ran
        assert [m.data for m in never.take_unacknowledged()] == [b"three"]


def test_session_handlers_are_timed_once_for_the_metrics() -> None:
    """With metrics on, every message of a session is one handler duration sample."""
    from prometheus_client import CollectorRegistry

    from morsock.metrics import register
    registry = CollectorRegistry()
    with running_server(resume_window=5) as server:
        reg = register(server, registry)
        try:
            with Client(LOCAL, server.port, resumable=True) as client:
                for i in range(20):
                    assert client.request(b"%d" % i, TIMEOUT) == b"%d" % i
            count = registry.get_sample_value("morsock_handler_duration_seconds_count",
                                              {"name": "server"})
        finally:
            reg.unregister()
    assert count == 20


def test_acknowledgements_empty_the_resend_buffers_when_idle() -> None:
    """Nothing flows back: the receiver's timed acknowledgement still frees the sender's
    resend buffer (both directions)."""
    at_server, at_client = Stream(), Stream()
    srec = Recorder()
    with running_server(lambda s, c, d: at_server.add(d), resume_window=5,
                        on_connect=srec.handler("on_connect")) as server:
        with Client(LOCAL, server.port, resumable=True,
                    on_handle_command=lambda c, d: at_client.add(d)) as client:
            (_, face), = srec.wait_count("on_connect", 1)
            for data in tagged(b"x", 3):
                client.send_data(data)
                face.send_data(data)
            at_server.wait(3)
            at_client.wait(3)
            link = client._session_link
            entry = server._sessions.entries[face._conn]  # type: ignore[union-attr]
            assert link is not None
            wait_until(lambda: link.session.unacknowledged == 0, what="client acked")
            wait_until(lambda: entry.session.unacknowledged == 0, what="server acked")
            assert link.session.buffered_bytes == 0 and entry.session.buffered_bytes == 0


def test_a_message_is_acknowledged_only_once_its_handler_returned() -> None:
    """While the server's handler still runs, the client keeps the message (a server that
    died now would hand it back); once it returned, the acknowledgement frees it."""
    entered, release = threading.Event(), threading.Event()

    def slow(server: Server, client: Any, data: bytes) -> None:
        entered.set()
        release.wait(TIMEOUT)

    with running_server(slow, resume_window=5) as server:
        with Client(LOCAL, server.port, resumable=True) as client:
            link = client._session_link
            assert link is not None
            client.send_data(b"slow work")
            assert entered.wait(TIMEOUT)
            client.send_data(b"probe")   # any frame back would carry an ack by now
            assert not release.wait(0.3)  # several ack delays pass, the handler runs on
            assert link.session.unacknowledged == 2
            release.set()
            wait_until(lambda: link.session.unacknowledged == 0, what="acknowledged")
