"""The sans-I/O session core (morsock/_session.py): pure, no sockets, virtual time.

Two endpoints are joined by in-memory byte streams that the tests deliver in chunks of any
size and cut anywhere (a dropped TCP connection: the bytes in flight are gone).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from morsock import ErrorCode
from morsock._session import (
    ACK_EVERY,
    Channel,
    LateReply,
    Message,
    Session,
    SessionEnded,
    SessionStarted,
)
from morsock._session_table import SessionTable
from morsock.crypto import ClientHandshake, MormotCipher, server_handshake
from morsock.errors import CryptoError, ProtocolError, SendBufferFullError
from morsock.protocol import FLAG_SESSION, Frame, FrameDecoder, encode_frame

KEY = "session test key"
WINDOW = 30.0


def channels(profile: str) -> tuple[Channel, Channel]:
    """(client channel, server channel) of one new connection in *profile*."""
    if profile == "plain":
        return Channel.plain(), Channel.plain()
    if profile == "mormot":
        return (Channel.mormot(MormotCipher(KEY, "CTR", 128)),
                Channel.mormot(MormotCipher(KEY, "CTR", 128)))
    hello = ClientHandshake(KEY, "GCM", 128)
    answer, server_auth = server_handshake(KEY, "GCM", 128, hello.hello_frame[9:])
    client_auth = hello.finish(answer[9:])
    return Channel.authenticated(client_auth), Channel.authenticated(server_auth)


@dataclass
class Link:
    """A client Session and a server SessionTable joined by two byte streams."""

    profile: str = "plain"
    max_send_buffer: int = 1 << 20
    now: float = 0.0
    client: Session = field(init=False)
    table: SessionTable = field(init=False)
    server: Session | None = None
    c_chan: Channel | None = None
    s_chan: Channel | None = None
    c2s: bytearray = field(default_factory=bytearray)
    s2c: bytearray = field(default_factory=bytearray)
    client_events: list = field(default_factory=list)
    server_events: list = field(default_factory=list)
    server_on_conn: bool = False   # the server saw this connection's HELLO

    def __post_init__(self) -> None:
        self.client = Session(client=True, max_send_buffer=self.max_send_buffer)
        self.table = SessionTable(WINDOW, self.max_send_buffer)

    def connect(self) -> None:
        self.c_chan, self.s_chan = channels(self.profile)
        self.c_dec = FrameDecoder(session_frames=True)
        self.s_dec = FrameDecoder(session_frames=True)
        self.server_on_conn = False
        self.client_events += self.client.connection_made(self.c_chan, self.now)
        self.pump_out()

    def cut(self) -> None:
        """The TCP connection drops: bytes in flight are lost on both sides."""
        self.c2s.clear()
        self.s2c.clear()
        assert self.c_chan is not None and self.s_chan is not None
        self.client_events += self.client.connection_lost(self.c_chan, self.now)
        if self.server is not None and self.server_on_conn:
            self.server_events += self.table.connection_lost(self.server, self.s_chan,
                                                             self.now)
        self.c_chan = self.s_chan = None

    def pump_out(self) -> None:
        self.c2s += self.client.data_to_send()
        if self.server is not None:
            out = self.server.data_to_send()
            if self.server_on_conn:
                self.s2c += out

    def deliver_c2s(self, n: int | None = None) -> None:
        self.pump_out()
        n = len(self.c2s) if n is None else n
        chunk, self.c2s[:] = bytes(self.c2s[:n]), self.c2s[n:]
        for frame in self.s_dec.feed(chunk):
            if not self.server_on_conn:
                self.server, _ = self.table.accept(frame, self.s_chan, self.now)
                self.server_on_conn = True
            else:
                assert self.server is not None
                self.server_events += self.server.receive(frame, self.now)
        self.pump_out()

    def deliver_s2c(self, n: int | None = None) -> None:
        self.pump_out()
        n = len(self.s2c) if n is None else n
        chunk, self.s2c[:] = bytes(self.s2c[:n]), self.s2c[n:]
        for frame in self.c_dec.feed(chunk):
            self.client_events += self.client.receive(frame, self.now)
        self.pump_out()

    def settle(self, rounds: int = 50) -> None:
        self.pump_out()
        for _ in range(rounds):
            if not self.c2s and not self.s2c:
                return
            self.deliver_c2s()
            self.deliver_s2c()

    def tick(self, dt: float) -> None:
        self.now += dt
        self.client_events += self.client.poll(self.now)
        if self.server is not None:
            self.server_events += self.server.poll(self.now)
        self.pump_out()


def messages(events: list) -> list[Message]:
    return [e for e in events if isinstance(e, Message)]


def opened(link: Link) -> Link:
    link.connect()
    link.settle()
    assert link.client.is_open and link.server is not None and link.server.is_open
    return link


# ------------------------------------------------------------------ the property test

@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.sampled_from(["plain", "authenticated", "mormot"]))
def test_exactly_once_in_order_across_random_cuts(data, profile):
    """Both sides stream mixed messages (sizes 0..3000, some encrypted, some requests);
    the byte streams are delivered in random chunks and cut at random points, the client
    reconnects and resumes: every message arrives exactly once, in order, and every
    request gets its own reply."""
    link = Link(profile, max_send_buffer=8000)
    link.connect()
    can_encrypt = profile != "plain"
    client_todo = [Message(b"c%d:" % i + os.urandom(data.draw(st.integers(0, 3000))),
                           can_encrypt and data.draw(st.booleans()),
                           int(data.draw(st.integers(0, 3)) == 0))
                   for i in range(data.draw(st.integers(1, 40)))]
    push_todo = [Message(b"p%d:" % i + bytes(data.draw(st.integers(0, 3000))),
                         can_encrypt and data.draw(st.booleans()))
                 for i in range(data.draw(st.integers(0, 30)))]
    client_sent: list[Message] = []
    server_sent: dict[int, list[Message]] = {}   # per server session
    server_todo: list[Message] = []   # replies and pushes, in the server's order
    handled = 0
    rids: dict[int, bytes] = {}

    def client_send() -> None:
        m = client_todo[0]
        try:
            if m.request_id:
                rid = link.client.request(m.data, m.encrypted, link.now)
                rids[rid] = m.data
                client_sent.append(Message(m.data, m.encrypted, request_id=rid))
            else:
                link.client.send(m.data, m.encrypted, link.now)
                client_sent.append(Message(m.data, m.encrypted))
        except SendBufferFullError:
            return
        client_todo.pop(0)
        link.pump_out()

    def server_work() -> None:
        nonlocal handled
        got = messages(link.server_events)
        for m in got[handled:]:
            if m.request_id:
                server_todo.append(Message(b"re:" + m.data[:20], m.encrypted,
                                           reply_to=m.request_id))
        handled = len(got)
        if push_todo and data.draw(st.booleans()):
            server_todo.append(push_todo.pop(0))
        while server_todo and link.server is not None:
            m = server_todo[0]
            try:
                if m.reply_to:
                    link.server.reply(m.reply_to, m.data, m.encrypted, link.now)
                else:
                    link.server.send(m.data, m.encrypted, link.now)
            except SendBufferFullError:
                break
            server_sent.setdefault(id(link.server), []).append(server_todo.pop(0))
        link.pump_out()

    for _ in range(data.draw(st.integers(10, 120))):
        action = data.draw(st.integers(0, 9))
        connected = link.c_chan is not None
        if action <= 1 and client_todo:
            client_send()
        elif action == 2:
            server_work()
        elif action in (3, 4) and connected:
            link.deliver_c2s(data.draw(st.integers(0, max(0, len(link.c2s)))))
        elif action in (5, 6) and connected:
            link.deliver_s2c(data.draw(st.integers(0, max(0, len(link.s2c)))))
        elif action == 7:
            link.tick(data.draw(st.sampled_from([0.0, 0.01, 0.05, 0.2])))
        elif action == 8 and connected:
            link.cut()
        elif not connected:
            link.connect()
    # the network heals: no more cuts until everything is through
    if link.c_chan is None:
        link.connect()
    for _ in range(400):
        if client_todo:
            client_send()
        server_work()
        link.settle()
        link.tick(0.2)
        link.settle()
        if (not client_todo and not server_todo and not push_todo
                and not link.client.unacknowledged and link.server is not None
                and not link.server.unacknowledged
                and len(messages(link.server_events)) == handled):
            break
    assert not any(isinstance(e, SessionEnded) for e in link.client_events)
    assert messages(link.server_events) == client_sent     # 0 lost, 0 duplicated, in order
    assert messages(link.client_events) == server_sent.pop(id(link.server), [])
    # a session whose WELCOME was cut off never reached the client: it expires and hands
    # back exactly what the server queued on it
    orphans = link.table.expire(link.now + 2 * WINDOW)
    assert {id(s): list(end.unacknowledged) for s, end in orphans if end.unacknowledged} \
        == {k: v for k, v in server_sent.items() if v}
    replies = [m for m in messages(link.client_events) if m.reply_to]
    assert sorted(m.reply_to for m in replies) == sorted(rids)
    assert all(m.data == b"re:" + rids[m.reply_to][:20] for m in replies)
    started = [e for e in link.client_events if isinstance(e, SessionStarted)]
    assert not started[0].resumed and all(e.resumed for e in started[1:])
    assert len({e.session_id for e in started}) == 1
    assert len(link.table) == 1 and link.table.next_expiry() is None


@pytest.mark.parametrize("profile", ["plain", "authenticated", "mormot"])
def test_resume_resends_exactly_from_the_peers_resume_point(profile):
    """Delivered but unacknowledged messages, in both directions, are not resent; those
    cut off in flight (whole or in part) are, once, in order; encrypted ones re-sealed
    under the new connection's keys."""
    link = opened(Link(profile))
    enc = profile != "plain"
    for i in range(3):
        link.client.send(b"c%d" % i, enc and i == 1, link.now)
        link.server.send(b"s%d" % i, enc and i == 2, link.now)
    link.pump_out()
    first = link.c2s.index(b"c1") + 1 if not enc else 0
    link.deliver_c2s(first or len(encode_frame(b"c0")))  # c0 whole, c1 not
    link.deliver_s2c(len(encode_frame(b"s0")) + len(encode_frame(b"s1")) + 3)
    assert [m.data for m in messages(link.server_events)] == [b"c0"]
    assert [m.data for m in messages(link.client_events)] == [b"s0", b"s1"]
    assert link.client.unacknowledged == 3 and link.server.unacknowledged == 3
    link.cut()
    link.connect()
    link.settle()
    assert messages(link.server_events) == [Message(b"c0"), Message(b"c1", enc),
                                            Message(b"c2")]
    assert messages(link.client_events) == [Message(b"s0"), Message(b"s1"),
                                            Message(b"s2", enc)]
    link.tick(1.0)
    link.settle()
    assert link.client.unacknowledged == 0 and link.server.unacknowledged == 0


# ---------------------------------------------------------------------------- wire

def test_plain_messages_are_todays_frames():
    """A session-less peer's bytes are today's codec: the default decoder still refuses
    flag 3, and inside a session a plain message with no ack due is the same frame."""
    with pytest.raises(ProtocolError) as info:
        FrameDecoder().feed(encode_frame(b"x", FLAG_SESSION))
    assert info.value.code == ErrorCode.INVALID_PROTOCOL
    link = opened(Link())
    for payload in (b"", b"hello", bytes(70000)):
        link.client.send(payload, False, link.now)
        assert link.client.data_to_send() == encode_frame(payload)


def test_server_without_sessions_answer_fails_the_hello():
    """Anything but a WELCOME as the first answer (an echo of the hello by a Delphi
    server, a plaintext frame) fails the resumable client's connect."""
    client = Session(client=True, max_send_buffer=1000)
    client.connection_made(Channel.plain(), 0.0)
    hello = client.data_to_send()
    with pytest.raises(ProtocolError, match="did not answer the session hello"):
        client.receive(Frame(hello[9:], FLAG_SESSION), 0.0)   # the hello echoed back
    client2 = Session(client=True, max_send_buffer=1000)
    client2.connection_made(Channel.plain(), 0.0)
    with pytest.raises(ProtocolError):
        client2.receive(Frame(b"welcome!", 0), 0.0)


# ------------------------------------------------------------ buffers, acks, expiry

def test_resend_buffer_bounded_in_bytes_back_pressure_not_loss():
    link = opened(Link(max_send_buffer=100))
    link.client.send(bytes(60), False, link.now)
    with pytest.raises(SendBufferFullError):
        link.client.send(bytes(50), False, link.now)
    assert link.client.buffered_bytes == 60 and link.client.unacknowledged == 1
    link.settle()
    link.tick(1.0)          # the server's delayed ack
    link.settle()
    assert link.client.buffered_bytes == 0
    link.client.send(bytes(1000), False, link.now)   # an empty buffer takes any message
    assert link.client.buffered_bytes == 1000
    assert [len(m.data) for m in messages(link.server_events)] == [60]


def test_sends_queue_while_disconnected_then_flow_on_resume():
    link = opened(Link(max_send_buffer=100))
    link.cut()
    link.client.send(b"a" * 40, False, link.now)
    link.client.send(b"b" * 40, True if link.profile != "plain" else False, link.now)
    with pytest.raises(SendBufferFullError):
        link.client.send(b"c" * 40, False, link.now)
    assert link.client.data_to_send() == b""
    link.connect()
    link.settle()
    assert [m.data[:1] for m in messages(link.server_events)] == [b"a", b"b"]


def test_acks_every_n_messages_and_on_idle():
    link = opened(Link())
    for i in range(ACK_EVERY):
        link.client.send(b"%d" % i, False, link.now)
    link.deliver_c2s()
    assert link.s2c, "an ack after ACK_EVERY messages"
    link.deliver_s2c()
    assert link.client.unacknowledged == 0
    link.client.send(b"one more", False, link.now)
    link.deliver_c2s()
    assert not link.s2c
    assert link.server.next_deadline() == pytest.approx(link.now + 0.1)
    link.tick(0.1)
    link.deliver_s2c()
    assert link.client.unacknowledged == 0


def test_server_session_expires_after_resume_window():
    link = opened(Link())
    link.server.send(b"push", False, link.now)
    link.pump_out()
    link.cut()
    assert link.table.next_expiry() == pytest.approx(WINDOW)
    assert link.table.expire(WINDOW - 0.01) == []
    [(session, end)] = link.table.expire(WINDOW)
    assert session is link.server and len(link.table) == 0
    assert end.unacknowledged == (Message(b"push"),) and not end.graceful
    assert link.table.next_expiry() is None


def test_session_lost_hands_back_exactly_the_unacknowledged():
    """Window passed: the resuming client gets a new session and SESSION_LOST hands back
    every message the server had not acknowledged, in order; answered requests are not
    among them, requests acknowledged but unanswered are named."""
    link = opened(Link())
    rid1 = link.client.request(b"r1", False, link.now)
    link.client.send(b"m1", False, link.now)
    link.settle()
    link.tick(1.0)
    link.settle()            # r1, m1 acknowledged (r1 never answered)
    link.client.send(b"m2", False, link.now)
    rid2 = link.client.request(b"r2", False, link.now)
    link.pump_out()
    link.deliver_c2s(5)      # a part of m2's frame: nothing delivered
    link.cut()
    link.client.send(b"m3", False, link.now)
    link.now += WINDOW + 1
    assert link.table.expire(link.now)
    link.connect()
    link.settle()
    [end] = [e for e in link.client_events if isinstance(e, SessionEnded)]
    assert end.unacknowledged == (Message(b"m2"), Message(b"r2", request_id=rid2),
                                  Message(b"m3"))
    assert end.unanswered == (rid1,) and not end.graceful
    started = [e for e in link.client_events if isinstance(e, SessionStarted)]
    assert [s.resumed for s in started] == [False, False]
    assert started[0].session_id != started[1].session_id
    assert link.client.unacknowledged == 0 and link.client.is_open


def test_client_gives_up_after_the_servers_window():
    link = opened(Link())
    link.client.send(b"x", False, link.now)
    link.pump_out()
    link.cut()
    assert link.client.next_deadline() == pytest.approx(link.now + WINDOW)
    link.tick(WINDOW - 1)
    assert not any(isinstance(e, SessionEnded) for e in link.client_events)
    link.tick(1)
    [end] = [e for e in link.client_events if isinstance(e, SessionEnded)]
    assert end.unacknowledged == (Message(b"x"),)
    assert link.client.session_id is None


# ---------------------------------------------------------------------- takeover

@pytest.mark.parametrize("profile", ["plain", "authenticated"])
def test_resume_without_the_secret_is_refused(profile):
    """A HELLO naming the victim's session id without its secret (or a recorded HELLO
    replayed on another connection) is refused; the victim still resumes."""
    link = opened(Link(profile))
    link.server.send(b"for the victim", False, link.now)
    link.pump_out()
    sid = link.client.session_id
    link.cut()
    # the victim's real resume HELLO, recorded
    link.connect()
    recorded = bytes(link.c2s)
    link.cut()
    attacker = Session(client=True, max_send_buffer=1000)
    attacker.session_id = sid          # saw the id, not the secret
    attacker._secret = os.urandom(32)
    attacker._bound = profile == "authenticated"
    _, s_chan = channels(profile)
    c_chan, _ = channels(profile)
    attacker.connection_made(c_chan, link.now)
    forged = attacker.data_to_send()
    with pytest.raises(CryptoError) as info:
        link.table.accept(Frame(forged[9:], FLAG_SESSION), s_chan, link.now)
    assert info.value.code == ErrorCode.AUTHENTICATION_FAILED
    if profile == "authenticated":
        _, other = channels(profile)
        with pytest.raises(CryptoError):
            link.table.accept(Frame(recorded[9:], FLAG_SESSION), other, link.now)
    link.connect()
    link.settle()
    assert messages(link.client_events) == [Message(b"for the victim")]
    assert [e.resumed for e in link.client_events if isinstance(e, SessionStarted)] == \
        [False, True]


def test_forged_plaintext_ack_refused_on_authenticated_session():
    link = opened(Link("authenticated"))
    link.client.send(b"x", True, link.now)
    link.pump_out()
    with pytest.raises(CryptoError) as info:
        link.client.receive(Frame(b"\x83\x01", FLAG_SESSION), link.now)
    assert info.value.code == ErrorCode.AUTHENTICATION_FAILED
    assert link.client.unacknowledged == 1


# ------------------------------------------------------------------- request ids

def test_requests_matched_by_id_in_any_order_pushes_never_replies():
    link = opened(Link("authenticated"))
    rids = [link.client.request(b"q%d" % i, i % 2 == 0, link.now) for i in range(4)]
    link.settle()
    requests = messages(link.server_events)
    assert [m.request_id for m in requests] == rids
    link.server.send(b"a push", False, link.now)
    for m in reversed(requests):
        link.server.reply(m.request_id, b"answer " + m.data, m.encrypted, link.now)
    link.settle()
    got = messages(link.client_events)
    assert got[0] == Message(b"a push")
    assert [(m.reply_to, m.data) for m in got[1:]] == \
        [(r, b"answer q%d" % i) for i, r in reversed(list(enumerate(rids)))]
    with pytest.raises(ValueError):
        link.server.reply(99, b"never asked", False, link.now)


def test_late_reply_to_an_abandoned_request():
    link = opened(Link())
    rid = link.client.request(b"slow", False, link.now)
    rid2 = link.client.request(b"fast", False, link.now)
    link.settle()
    link.client.abandon(rid)           # it timed out
    link.server.reply(rid, b"too late", False, link.now)
    link.server.reply(rid2, b"in time", False, link.now)
    link.settle()
    assert link.client_events[-2:] == [LateReply(rid, b"too late", False),
                                       Message(b"in time", reply_to=rid2)]
    with pytest.raises(ProtocolError):  # an id never issued
        link.client.receive(Frame(b"\x0a\x63x", FLAG_SESSION), link.now)


# -------------------------------------------------------------------- going away

def test_going_away_ends_both_sides_and_returns_the_undelivered():
    link = opened(Link())
    link.client.send(b"delivered", False, link.now)
    link.settle()
    link.server_events += link.server.going_away(link.now)
    link.pump_out()
    link.client.send(b"after the server left", False, link.now)
    link.pump_out()
    link.settle()
    [s_end] = [e for e in link.server_events if isinstance(e, SessionEnded)]
    [c_end] = [e for e in link.client_events if isinstance(e, SessionEnded)]
    assert c_end.graceful and s_end.graceful
    assert c_end.unacknowledged == (Message(b"after the server left"),)
    assert s_end.unacknowledged == ()
    assert messages(link.server_events) == [Message(b"delivered")]
    assert link.server.ended and link.client.session_id is None
    link.table.remove(link.server)
    assert len(link.table) == 0
    with pytest.raises(ValueError):
        link.server.send(b"no more", False, link.now)


# ------------------------------------------------------------------ bad peer input

@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40), st.sampled_from([0, 2, FLAG_SESSION]),
       st.sampled_from(["plain", "authenticated"]))
def test_garbage_from_the_peer_is_a_clear_error_never_a_crash(payload, flag, profile):
    link = opened(Link(profile))
    link.client.send(b"pending", False, link.now)
    link.pump_out()
    for session, frame in ((link.client, Frame(payload, flag)),
                           (link.server, Frame(payload, flag))):
        try:
            events = session.receive(frame, link.now)
        except (ProtocolError, CryptoError) as exc:
            assert exc.code in (ErrorCode.INVALID_PROTOCOL, ErrorCode.AUTHENTICATION_FAILED)
        else:
            assert all(isinstance(e, (Message, LateReply, SessionEnded)) for e in events)
    try:
        link.table.accept(Frame(payload, flag), channels(profile)[1], link.now)
    except (ProtocolError, CryptoError) as exc:
        assert exc.code in (ErrorCode.INVALID_PROTOCOL, ErrorCode.AUTHENTICATION_FAILED)


def test_session_lost_is_a_new_negative_code():
    codes = [c.value for c in ErrorCode]
    assert ErrorCode.SESSION_LOST < 0 and codes.count(ErrorCode.SESSION_LOST) == 1


def test_ack_when_handled_waits_for_the_handler() -> None:
    """With ack_when_handled, a delivered message is acknowledged only after handled():
    a process that dies while its handler runs gets it back from the peer."""
    client = Session(client=True, max_send_buffer=1 << 20, ack_when_handled=True)
    table = SessionTable(WINDOW, 1 << 20, ack_delay=0.1, ack_when_handled=True)
    c_chan, s_chan = channels("plain")
    c_dec, s_dec = FrameDecoder(session_frames=True), FrameDecoder(session_frames=True)
    client.connection_made(c_chan, 0.0)
    server, _ = table.accept(s_dec.feed(client.data_to_send())[0], s_chan, 0.0)
    for frame in c_dec.feed(server.data_to_send()):
        client.receive(frame, 0.0)
    client.send(b"work", False, 0.0)
    events = [e for f in s_dec.feed(client.data_to_send()) for e in server.receive(f, 0.0)]
    assert [e.data for e in events] == [b"work"]
    server.poll(1.0)                       # the ack is due, but the handler still runs
    for frame in c_dec.feed(server.data_to_send()):
        client.receive(frame, 1.0)
    assert client.unacknowledged == 1
    server.handled(1.0)
    deadline = server.next_deadline()
    assert deadline is not None
    server.poll(deadline)
    for frame in c_dec.feed(server.data_to_send()):
        client.receive(frame, deadline)
    assert client.unacknowledged == 0


def test_resume_while_a_handler_runs_delivers_it_once() -> None:
    """ack_when_handled: a message delivered but still in its handler when the connection
    drops is not counted in the resume point, so the peer keeps (and resends) it; the
    resent copy is dropped, not delivered twice."""
    client = Session(client=True, max_send_buffer=1 << 20, ack_when_handled=True)
    table = SessionTable(WINDOW, 1 << 20, ack_delay=0.1, ack_when_handled=True)

    def connect() -> tuple:
        c_chan, s_chan = channels("plain")
        c_dec, s_dec = FrameDecoder(session_frames=True), FrameDecoder(session_frames=True)
        client.connection_made(c_chan, 0.0)
        server, _ = table.accept(s_dec.feed(client.data_to_send())[0], s_chan, 0.0)
        for frame in c_dec.feed(server.data_to_send()):
            client.receive(frame, 0.0)
        return server, c_chan, s_chan, c_dec, s_dec

    server, c_chan, s_chan, c_dec, s_dec = connect()
    client.send(b"slow", False, 0.0)
    client.send(b"next", False, 0.0)
    wire = client.data_to_send()
    delivered = [e for f in s_dec.feed(wire) for e in server.receive(f, 0.0)]
    assert [e.data for e in delivered] == [b"slow", b"next"]
    server.handled(0.0)                      # "slow" returned; "next" still runs
    table.connection_lost(server, s_chan, 0.0)
    client.connection_lost(c_chan, 0.0)
    again, c_chan, s_chan, c_dec, s_dec = connect()   # resumes: the point is 1
    assert again is server
    assert client.unacknowledged == 1       # "next" is kept: its handler did not return
    resent = [e for f in s_dec.feed(client.data_to_send()) for e in server.receive(f, 0.0)]
    assert resent == []                      # the copy is dropped: delivered once
    server.handled(0.0)
    deadline = server.next_deadline()
    assert deadline is not None
    server.poll(deadline)
    for frame in c_dec.feed(server.data_to_send()):
        client.receive(frame, deadline)
    assert client.unacknowledged == 0
