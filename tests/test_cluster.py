"""The Redis cluster backplane (API.md §11) against a real redis-server: broadcasts,
send_to, disconnect_client and counts across nodes; a node killed with SIGKILL; Redis
restarted mid-stream; ``python -m morsock server --processes N --redis URL``."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

import morsock
from morsock import ErrorCode

from helpers import TIMEOUT, Recorder, scaled, wait_until
from redis_server import REDIS_SERVER, RedisServer

redis = pytest.importorskip("redis", reason="redis-py is not installed (pip install "
                                            "'morsock[redis]')")
from morsock.cluster import RedisBackplane, Undelivered, split_client_id  # noqa: E402

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed "
                                "(apt-get install redis-server; .ci/run installs it)")

#: Short timings for in-process nodes, so convergence takes a fraction of a second.
FAST = {"heartbeat_interval": 0.2, "node_ttl": 1.0, "reconnect_interval": 50,
        "reconnect_max_interval": 300}


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """One redis-server for the module's tests (each test uses a channel of its own)."""
    server = RedisServer()
    server.start()
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture
def channel() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


class Node:
    """One in-process cluster node: a server with a backplane, and what it reported."""

    def __init__(self, url: str, channel: str, name: str, key: str = "",
                 **settings: Any) -> None:
        self.errors = Recorder()
        self.lost: List[Undelivered] = []
        self.lost_lock = threading.Lock()
        options = dict(FAST)
        options.update(settings)
        self.backplane = RedisBackplane(url, channel=channel, node_id=name,
                                        on_undelivered=self._on_undelivered, **options)
        self.server = morsock.Server(0, "127.0.0.1", backplane=self.backplane,
                                     encryption_key=key,
                                     on_error=self.errors.handler("on_error"))

    def _on_undelivered(self, backplane: RedisBackplane, report: Undelivered) -> None:
        with self.lost_lock:
            self.lost.append(report)

    def reports(self) -> List[Undelivered]:
        with self.lost_lock:
            return list(self.lost)

    def codes(self) -> List[int]:
        return [event[3] for event in self.errors.named("on_error")]


class Receiver:
    """A client that records every frame the server pushes to it."""

    def __init__(self, port: int, key: str = "") -> None:
        self.got = Recorder()
        self.client = morsock.Client("127.0.0.1", port, encryption_key=key,
                                     on_handle_command=self.got.handler("data"))
        self.client.connect()

    def payloads(self) -> List[bytes]:
        return [event[1] for event in self.got.named("data")]


@contextlib.contextmanager
def cluster(url: str, channel: str, n: int, **settings: Any) -> Iterator[List[Node]]:
    nodes = [Node(url, channel, f"node{i}", **settings) for i in range(n)]
    with contextlib.ExitStack() as stack:
        for node in nodes:
            node.server.start()
            stack.callback(node.server.stop)
        for node in nodes:
            assert node.backplane.wait_joined(TIMEOUT)
        names = sorted(node.backplane.node_id for node in nodes)
        for node in nodes:
            wait_until(lambda node=node: set(names) <= set(node.server.cluster_nodes),
                       what="every node sees every node")
        yield nodes


@contextlib.contextmanager
def receivers(nodes: List[Node], per_node: int) -> Iterator[Dict[str, List[Receiver]]]:
    with contextlib.ExitStack() as stack:
        out: Dict[str, List[Receiver]] = {}
        for node in nodes:
            out[node.backplane.node_id] = []
            for _ in range(per_node):
                receiver = Receiver(node.server.port)
                stack.callback(receiver.client.disconnect)
                out[node.backplane.node_id].append(receiver)
        total = per_node * len(nodes)
        for node in nodes:
            wait_until(lambda node=node: node.server.cluster_client_count == total,
                       what=f"cluster_client_count == {total}")
        yield out


def test_broadcast_reaches_every_client_of_every_node(redis_url: str, channel: str) -> None:
    with cluster(redis_url, channel, 3) as nodes, receivers(nodes, 3) as by_node:
        assert nodes[0].server.broadcast_data(b"to everyone") == 3  # its own clients
        every = [r for group in by_node.values() for r in group]
        assert len(every) == 9
        for receiver in every:
            receiver.got.wait_count("data", 1)
        nodes[2].server.broadcast_data("second")
        for receiver in every:
            receiver.got.wait_count("data", 2)
        assert nodes[1].server.broadcast_data(b"third", encrypted=False) == 3
        for receiver in every:
            receiver.got.wait_count("data", 3)
            assert receiver.payloads() == [b"to everyone", b"second", b"third"]
        for node in nodes:
            assert node.codes() == [] and node.reports() == []


def test_encrypted_broadcast_is_sealed_by_each_node_for_its_clients(redis_url: str,
                                                                   channel: str) -> None:
    key = "cluster secret"
    a = Node(redis_url, channel, "sealed0", key=key)
    b = Node(redis_url, channel, "sealed1", key=key)
    plain = Node(redis_url, channel, "plain")
    with a.server, b.server, plain.server:
        for node in (a, b, plain):
            assert node.backplane.wait_joined(TIMEOUT)
        wait_until(lambda: len(a.server.cluster_nodes) == 3)
        remote = Receiver(b.server.port, key=key)
        bystander = Receiver(plain.server.port)
        try:
            wait_until(lambda: a.server.cluster_client_count == 2)
            wait_until(lambda: all(c._conn.session is not None for c in b.server.clients.values()),
                       what="the AUTHENTICATED handshake")
            a.server.broadcast_data(b"secret news", encrypted=True)
            remote.got.wait_count("data", 1)
            assert remote.payloads() == [b"secret news"]
            # a node without a key cannot seal it for its clients: it says so
            plain.errors.wait_for(lambda ev: any(e[3] == ErrorCode.CLUSTER_UNDELIVERED
                                                 for e in ev), what="keyless node report")
            (report,) = plain.reports()
            assert (report.direction, report.kind, report.node) == (
                "incoming", "broadcast", "sealed0")
            assert bystander.payloads() == []
        finally:
            remote.client.disconnect()
            bystander.client.disconnect()


def test_send_to_a_client_of_another_node(redis_url: str, channel: str) -> None:
    with cluster(redis_url, channel, 2) as (a, b), receivers([a, b], 1) as by_node:
        target = b.server.clients
        (client,) = target.values()
        assert client.client_id == f"node1:{client.handle}"
        assert split_client_id(client.client_id) == ("node1", client.handle)
        assert a.server.send_to(client.client_id, b"just you") is True
        (receiver,) = by_node["node1"]
        receiver.got.wait_count("data", 1)
        assert receiver.payloads() == [b"just you"]
        assert by_node["node0"][0].payloads() == []
        # a client of this very node, by client id
        (own,) = a.server.clients.values()
        assert a.server.send_to(own.client_id, b"local") is True
        by_node["node0"][0].got.wait_count("data", 1)
        # unknown node: False at once; malformed: a clear error
        assert a.server.send_to("nosuchnode:1", b"x") is False
        with pytest.raises(ValueError, match="client id"):
            a.server.send_to("node1", b"x")
        # a live node without that client: routed, then reported back to the sender
        assert a.server.send_to("node1:999", b"lost") is True
        a.errors.wait_for(lambda ev: any(e[3] == ErrorCode.CLUSTER_UNDELIVERED for e in ev),
                          what="CLUSTER_UNDELIVERED for node1:999")
        wait_until(lambda: len(a.reports()) == 1)
        (report,) = a.reports()
        assert (report.direction, report.kind, report.target, report.payload) == (
            "outgoing", "send_to", "node1:999", b"lost")
        assert receiver.payloads() == [b"just you"]


def test_disconnect_client_of_another_node(redis_url: str, channel: str) -> None:
    with cluster(redis_url, channel, 2) as (a, b), receivers([a, b], 2):
        victim, keeper = sorted(b.server.clients.values(), key=lambda c: c.handle)
        assert a.server.disconnect_client(victim.client_id) is True
        wait_until(lambda: not victim.connected, what="the remote client closed")
        assert keeper.connected
        wait_until(lambda: a.server.cluster_client_count == 3)
        assert a.server.disconnect_client("nosuchnode:1") is False


def test_counts_converge_after_join_and_clean_stop(redis_url: str, channel: str) -> None:
    with cluster(redis_url, channel, 2) as (a, b), receivers([a, b], 2):
        assert a.server.cluster_client_count == b.server.cluster_client_count == 4
        late = Node(redis_url, channel, "node-late", **{})
        late.server.start()
        try:
            extra = Receiver(late.server.port)
            try:
                wait_until(lambda: a.server.cluster_client_count == 5, what="join counted")
                assert a.server.cluster_nodes == ["node-late", "node0", "node1"]
            finally:
                extra.client.disconnect()
            wait_until(lambda: b.server.cluster_client_count == 4, what="leave counted")
        finally:
            late.server.stop()
        wait_until(lambda: a.server.cluster_nodes == ["node0", "node1"], what="node left")
        assert a.server.cluster_client_count == 4


def test_a_restarted_node_with_the_same_id_is_heard_again(redis_url: str,
                                                         channel: str) -> None:
    """Its sequence numbers start again at 1: the others must not take its new messages
    for duplicates of the old ones."""
    with cluster(redis_url, channel, 2) as (a, b), receivers([b], 1) as by_node:
        (receiver,) = by_node["node1"]
        for i in range(3):
            a.server.broadcast_data(b"first run %d" % i)
        receiver.got.wait_count("data", 3)
        a.server.stop()  # a clean stop: the others forget its numbers
        a.server.start()
        assert a.backplane.wait_joined(TIMEOUT)
        a.server.broadcast_data(b"second run")
        receiver.got.wait_count("data", 4)
        assert receiver.payloads()[-1] == b"second run"
        # a node that crashed and came back under its id before the others noticed: its
        # entries (written here with redis-py) carry a new run, numbered from 1 again
        with contextlib.closing(redis.Redis.from_url(redis_url)) as r:
            stream = f"{channel}:all"
            for run, seq in (("run1", 1), ("run1", 2), ("run2", 1)):
                r.xadd(stream, {"k": "b", "o": "phoenix", "i": run, "q": str(seq),
                                "e": "0", "p": f"{run}/{seq}"})
            receiver.got.wait_count("data", 7)
        assert receiver.payloads()[-3:] == [b"run1/1", b"run1/2", b"run2/1"]
        assert b.reports() == []


def _spawn_node(url: str, channel: str, port_file: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "morsock", "server", "--host", "127.0.0.1", "--port", "0",
         "--redis", url, "--redis-channel", channel, "--port-file", str(port_file),
         "--status", "off", *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _read_port(proc: subprocess.Popen, port_file: Path) -> int:
    wait_until(lambda: port_file.exists() or proc.poll() is not None, 30,
               what="the server process to listen")
    if proc.poll() is not None:
        raise AssertionError(f"server process exited: {proc.stderr.read().decode()}")
    return int(port_file.read_text())


def test_a_node_killed_with_sigkill_leaves_the_counts(redis_url: str, channel: str,
                                                      tmp_path: Path) -> None:
    proc = _spawn_node(redis_url, channel, tmp_path / "port")
    try:
        port = _read_port(proc, tmp_path / "port")
        with cluster(redis_url, channel, 1) as (a,), receivers([a], 2):
            remote = [Receiver(port) for _ in range(3)]
            try:
                wait_until(lambda: a.server.cluster_client_count == 5, what="5 clients")
                assert len(a.server.cluster_nodes) == 2
                a.server.broadcast_data(b"before")
                for receiver in remote:
                    receiver.got.wait_count("data", 1)
                proc.send_signal(signal.SIGKILL)
                proc.wait(TIMEOUT)
                killed = time.monotonic()
                wait_until(lambda: a.server.cluster_client_count == 2, 10.0,
                           what="the dead node's clients leave the count within 10 s")
                assert time.monotonic() - killed < 10.0
                assert a.server.cluster_nodes == ["node0"]
            finally:
                for receiver in remote:
                    receiver.client.disconnect()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(TIMEOUT)
        proc.stderr.close()


def test_redis_restart_mid_stream_every_broadcast_delivered_or_reported() -> None:
    channel = "restart"
    redis_server = RedisServer()
    redis_server.start()
    try:
        with cluster(redis_server.url, channel, 2, pending_timeout=1.0) as (a, b), \
                receivers([b], 2) as by_node:
            sent: List[int] = []
            stop = threading.Event()

            def broadcaster() -> None:
                i = 0
                while not stop.is_set():
                    a.server.broadcast_data(b"%d" % i)
                    sent.append(i)
                    i += 1
                    stop.wait(0.002)  # a steady stream, not a synchronisation

            thread = threading.Thread(target=broadcaster)
            thread.start()
            try:
                wait_until(lambda: len(by_node["node1"][0].payloads()) >= 50)
                redis_server.restart()
                a.errors.wait_for(lambda ev: any(e[3] == ErrorCode.CLUSTER_UNAVAILABLE
                                                 for e in ev), what="Redis loss reported")
                wait_until(lambda: a.backplane.connected and b.backplane.connected, scaled(20),
                           what="both nodes reconnected")
                mark = len(sent)
                wait_until(lambda: any(int(p) > mark for p in by_node["node1"][0].payloads()),
                           20, what="broadcasts flow again after the restart")
            finally:
                stop.set()
                thread.join()
            total = len(sent)
            wait_until(lambda: all(total - 1 in {int(p) for p in r.payloads()}
                                   for r in by_node["node1"]), what="the last broadcast")
            # undelivered-and-unreported would show here: the heartbeat check and the
            # gap check have had a few intervals to report
            for receiver in by_node["node1"]:
                got = [int(p) for p in receiver.payloads()]
                assert got == sorted(set(got)), "duplicates or reordering"
                outgoing = {int(r.payload) for r in a.reports()
                            if r.direction == "outgoing" and r.kind == "broadcast"}
                incoming = sum(r.messages for r in b.reports() if r.direction == "incoming")
                missing = set(range(total)) - set(got) - outgoing
                assert len(missing) <= incoming, (
                    f"{len(missing)} broadcasts neither delivered nor reported "
                    f"(reported lost on arrival: {incoming})")
            wait_until(lambda: a.server.cluster_nodes == b.server.cluster_nodes
                       == ["node0", "node1"], what="both nodes see both after the restart")
            wait_until(lambda: a.server.cluster_client_count == 2,
                       what="presence announced again after the restart")
    finally:
        redis_server.close()


def test_messages_lost_in_redis_are_reported_by_the_receiver(redis_url: str,
                                                             channel: str) -> None:
    """A node's messages that never reach another node (here: a node "ghost" whose
    entries 2..4 are missing from the stream, and whose heartbeat announces 8 when the
    stream ends at 5) are reported by the receiver: on a gap, and from the heartbeat."""
    import json
    with cluster(redis_url, channel, 1) as (b,), receivers([b], 1) as by_node, \
            contextlib.closing(redis.Redis.from_url(redis_url)) as r:
        (receiver,) = by_node["node0"]
        stream = f"{channel}:all"
        r.xadd(stream, {"k": "b", "o": "ghost", "q": "1", "e": "0", "p": "one"})
        receiver.got.wait_count("data", 1)
        r.xadd(stream, {"k": "b", "o": "ghost", "q": "1", "e": "0", "p": "one again"})
        r.xadd(stream, {"k": "b", "o": "ghost", "q": "5", "e": "0", "p": "five"})
        receiver.got.wait_count("data", 2)
        assert receiver.payloads() == [b"one", b"five"]  # the duplicate is dropped
        wait_until(lambda: len(b.reports()) == 1, what="the gap reported")
        (gap,) = b.reports()
        assert (gap.direction, gap.node, gap.messages) == ("incoming", "ghost", 3)
        assert "2..4" in gap.reason
        r.set(f"{channel}:node:ghost", json.dumps({"seq": {stream: 8}}), px=5000)
        r.sadd(f"{channel}:nodes", "ghost")
        wait_until(lambda: len(b.reports()) == 2, what="the unseen tail reported")
        tail = b.reports()[1]
        assert (tail.direction, tail.node, tail.messages) == ("incoming", "ghost", 3)
        assert "6..8" in tail.reason
        assert b.codes().count(ErrorCode.CLUSTER_UNDELIVERED) == 2
        r.delete(f"{channel}:node:ghost")


def test_what_cannot_reach_redis_is_reported(channel: str) -> None:
    from redis_server import free_port
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    node = Node(dead, channel, "lonely", pending_timeout=0.3, max_pending=3)
    with node.server:
        node.errors.wait_for(lambda ev: any(e[3] == ErrorCode.CLUSTER_UNAVAILABLE
                                            for e in ev), what="unreachable Redis reported")
        assert not node.backplane.connected
        assert node.server.cluster_nodes == ["lonely"]
        for i in range(5):
            assert node.server.broadcast_data(b"m%d" % i) == 0
        # two refused at once (max_pending=3), three after pending_timeout
        wait_until(lambda: len(node.reports()) == 5, what="every broadcast reported")
    payloads = sorted(r.payload for r in node.reports())
    assert payloads == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    assert {r.direction for r in node.reports()} == {"outgoing"}


def test_pending_messages_are_reported_when_the_server_stops(channel: str) -> None:
    from redis_server import free_port
    node = Node(f"redis://127.0.0.1:{free_port()}/0", channel, "stopping",
                pending_timeout=60.0)
    node.server.start()
    node.server.broadcast_data(b"never sent")
    node.server.stop()
    assert [r.payload for r in node.reports()] == [b"never sent"]
    assert ErrorCode.CLUSTER_UNDELIVERED in node.codes()


def test_stop_from_an_on_error_of_the_backplane(channel: str) -> None:
    """on_error runs on a backplane thread here: stopping the server from it works."""
    from redis_server import free_port
    stopped = threading.Event()
    node = Node(f"redis://127.0.0.1:{free_port()}/0", channel, "selfstop")

    def on_error(server: Any, client: Any, message: str, code: int) -> None:
        if code == ErrorCode.CLUSTER_UNAVAILABLE:
            server.stop()
            stopped.set()

    node.server.on_error = on_error
    node.server.start()
    assert stopped.wait(TIMEOUT)
    wait_until(lambda: node.server.state is morsock.ServerState.DISCONNECTED)
    wait_until(lambda: not node.backplane.connected and node.backplane._server is None,
               what="the backplane detached")


def test_settings_are_checked(redis_url: str) -> None:
    with pytest.raises(ValueError, match="node_ttl"):
        RedisBackplane(redis_url, heartbeat_interval=2.0, node_ttl=3.0)
    with pytest.raises(ValueError, match="node_id"):
        RedisBackplane(redis_url, node_id="has space")
    with pytest.raises(TypeError, match="channel"):
        RedisBackplane(redis_url, channel=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RedisBackplane("http://127.0.0.1:1/0")
    with pytest.raises(TypeError, match="backplane"):
        morsock.Server(0, backplane="redis://127.0.0.1")
    backplane = RedisBackplane(redis_url)
    with morsock.Server(0, "127.0.0.1", backplane=backplane):
        with pytest.raises(morsock.MorsockError, match="already serves"):
            morsock.Server(0, "127.0.0.1", backplane=backplane).start()


def test_without_a_backplane_client_ids_name_local_clients(morsock_server_factory) -> None:
    server = morsock_server_factory()
    receiver = Receiver(server.port)
    try:
        wait_until(lambda: server.client_count == 1)
        (client,) = server.clients.values()
        assert client.client_id == f"{server.node_id}:{client.handle}"
        assert server.send_to(client.client_id, b"hi") is True
        receiver.got.wait_count("data", 1)
        assert server.send_to("elsewhere:1", b"hi") is False
        assert server.cluster_client_count == 1
        assert server.cluster_nodes == [server.node_id]
        assert server.disconnect_client(client.client_id) is True
    finally:
        receiver.client.disconnect()


def _children(pid: int) -> List[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT and /proc")
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_processes_share_a_port_and_stop_together(redis_url: str, channel: str,
                                                  tmp_path: Path, how: str) -> None:
    proc = _spawn_node(redis_url, channel, tmp_path / "port", "--processes", "2")
    try:
        port = _read_port(proc, tmp_path / "port")
        workers = _children(proc.pid)
        assert len(workers) == 2
        with contextlib.closing(redis.Redis.from_url(redis_url)) as r:
            wait_until(lambda: r.scard(f"{channel}:nodes") == 2, what="both workers joined")
            clients = [morsock.Client("127.0.0.1", port) for _ in range(8)]
            try:
                for i, client in enumerate(clients):
                    client.connect()
                    assert client.request(b"echo %d" % i) == b"echo %d" % i
                nodes = [m.decode() for m in r.smembers(f"{channel}:nodes")]
                wait_until(lambda: sum(r.hlen(f"{channel}:presence:{n}") for n in nodes) == 8,
                           what="8 clients in the cluster's presence")
                assert sum(1 for n in nodes if r.hlen(f"{channel}:presence:{n}")) >= 1
            finally:
                for client in clients:
                    client.disconnect()
            proc.send_signal(getattr(signal, how))
            proc.wait(scaled(30))
            wait_until(lambda: not any(_alive(pid) for pid in workers), scaled(30),
                       what="no worker outlives its parent")
            if how != "SIGKILL":
                assert proc.returncode == 0
                wait_until(lambda: r.scard(f"{channel}:nodes") == 0,
                           what="the workers left the cluster")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
        proc.stderr.close()


def test_cli_refuses_a_bad_redis_url() -> None:
    done = subprocess.run([sys.executable, "-m", "morsock", "server", "--host", "127.0.0.1",
                           "--port", "0", "--redis", "http://127.0.0.1:1/0"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=scaled(60))
    assert done.returncode == 2
    assert "redis" in done.stderr.lower()


def test_a_message_resent_by_a_node_that_looked_gone_is_not_delivered_twice(
        redis_url: str, channel: str) -> None:
    """A publish retried after a Redis reconnect may come again after the other nodes
    saw its node leave their view (Redis lost its data and the heartbeats with it): the
    duplicate check must still drop it."""
    with cluster(redis_url, channel, 2) as nodes, receivers(nodes[1:], 1) as by_node:
        sender, other = nodes
        [receiver] = by_node[other.backplane.node_id]
        sender.server.broadcast_data(b"one")
        receiver.got.wait_count("data", 1)
        r = redis.Redis.from_url(redis_url)
        try:
            [(_, fields)] = [(i, f) for i, f in r.xrange(other.backplane._all)
                             if f.get(b"k") == b"b" and f.get(b"p") == b"one"]
        finally:
            r.close()
        sender.server.stop()  # it leaves the others' view
        wait_until(lambda: other.server.cluster_nodes == [other.backplane.node_id],
                   what="the sender gone from the view")
        other.backplane._reader.dispatch(other.backplane._all, fields)  # its retried copy
        other.server.broadcast_data(b"marker")
        receiver.got.wait_count("data", 2)
        assert receiver.payloads() == [b"one", b"marker"]
