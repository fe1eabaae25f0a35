"""Cluster backplane (docs/guide/cluster.rst): several servers act as one through Redis.

A node is one :class:`~morsock.Server` given a :class:`RedisBackplane`. Its clients are
named cluster-wide by ``ServerClient.client_id`` (``"<node_id>:<handle>"``);
``broadcast_data`` reaches every node's clients, ``send_to`` / ``disconnect_client``
reach a client on any node, ``cluster_client_count`` / ``cluster_nodes`` cover the
cluster. docs/guide/cluster.rst is the user's guide; this docstring is the wire spec.

Redis layout (every key starts with the backplane's *channel*, written ``C``):

* ``C:nodes`` -- SET of the node ids that announced themselves.
* ``C:node:<id>`` -- a node's heartbeat: a STRING (JSON: ``pid``, ``host``, ``run``,
  ``seq``: the last sequence number of that run Redis confirmed, per stream) set with a
  TTL of ``node_ttl`` and refreshed every ``heartbeat_interval``. A node whose heartbeat
  expired is dead.
* ``C:presence:<id>`` -- HASH ``handle -> "ip:port"`` of the node's clients, with the
  same TTL (refreshed with the heartbeat), rebuilt whole after every reconnect.
* ``C:epoch`` -- a random token set once; a node that finds it changed or missing
  after a reconnect knows Redis lost its data and reads the streams from their start.
* ``C:all`` -- STREAM of cluster-wide messages, trimmed to about ``stream_length``.
* ``C:inbox:<id>`` -- STREAM of the messages for one node, expiring with its owner.

Stream entry fields: ``k`` kind (``b`` broadcast, ``j`` join, ``l`` leave on ``C:all``;
``s`` send_to, ``d`` disconnect, ``n`` a send_to its node could not deliver, ``x`` wake
up on an inbox), ``o`` origin node id, ``q`` the origin's sequence number in that stream
(1, 2, ... per origin and stream; not on ``j``/``l``/``x``), ``h`` client handle, ``e``
``1`` if the payload is to be sent encrypted, ``p`` payload, ``i`` the origin's run (a
random token per start: a restarted node numbers from 1 again), ``c`` client id and
``r`` reason (``n`` only).

Delivery rule: messages go out in order through one connection per node and are read
by each node from the last entry id it saw, so a Redis reconnect resumes where it
stopped. A receiver drops a sequence number it already had (a publish retried after a
reconnect) and reports a gap (messages lost in Redis: a restart without persistence,
trimming) as ``CLUSTER_UNDELIVERED``; it also compares the sequence numbers that
heartbeats announce with what it read, so losing the last messages of a stream is
reported too. What a node cannot hand to Redis within ``pending_timeout`` is reported
by that node. Nothing is dropped without a report.

Code: this module holds the public names, the settings, the writer thread and the
reports; its private parts are ``_cluster_wire`` (this format), ``_cluster_seq``
(duplicates and gaps), ``_cluster_reader`` (the reader thread) and
``_cluster_membership`` (heartbeat, presence, the view of the cluster).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from . import _cluster_wire as wire
from ._cluster_membership import Membership
from ._cluster_reader import StreamReader
from ._cluster_seq import SeqLedger
from ._cluster_wire import Outgoing
from .enums import ErrorCode, ReconnectStrategy
from .errors import MorsockError
from .reconnect import ReconnectPolicy

if TYPE_CHECKING:
    from .server import Server

__all__ = ["Backplane", "RedisBackplane", "Undelivered", "split_client_id"]


def split_client_id(client_id: str) -> tuple[str, int]:
    """``("<node_id>", handle)`` of a ``ServerClient.client_id``; ValueError (TypeError
    for a non-str) naming the expected form otherwise."""
    if not isinstance(client_id, str):
        raise TypeError(f"client_id must be a str, not {type(client_id).__name__}")
    node, sep, handle = client_id.rpartition(":")
    if not sep or not node or not handle.isdigit():
        raise ValueError(f"{client_id!r} is not a client id: expected '<node_id>:<handle>' "
                         f"(ServerClient.client_id)")
    return node, int(handle)


class Undelivered(NamedTuple):
    """Cluster messages that did not arrive, as ``on_undelivered`` receives them.

    ``direction``: ``"outgoing"`` -- this node could not hand the message to Redis in
    time, or the node holding its client could not deliver it (``payload`` is the
    message) --, or ``"incoming"`` -- messages from ``node`` were lost in Redis (a gap in
    its sequence numbers; ``payload`` is None, ``messages`` says how many).
    ``kind``: ``"broadcast"``, ``"send_to"``, ``"disconnect"``, or ``"message"`` for an
    incoming gap. ``node``: the other node (None for an outgoing broadcast). ``target``:
    the client id of a ``send_to`` / ``disconnect`` (else None).
    """

    direction: str
    kind: str
    node: str | None
    target: str | None
    messages: int
    payload: bytes | None
    reason: str


class Backplane:
    """What a :class:`~morsock.Server` needs from a cluster backplane.

    The server calls :meth:`attach` from ``start()`` once listening and :meth:`detach`
    from ``stop()`` once its clients are closed; :meth:`client_joined` and
    :meth:`client_left` on its reactor thread; the rest from any thread.
    """

    node_id: str

    def attach(self, server: Server) -> None:
        """Start serving *server* (MorsockError if already serving a running one)."""
        raise NotImplementedError

    def detach(self, server: Server) -> None:
        """Stop serving *server* (no effect if it serves another or none): leave the
        cluster, report what could not be sent, join every thread."""
        raise NotImplementedError

    def client_joined(self, handle: int, address: str) -> None:
        """A client of this node connected (reactor thread: must not block)."""
        raise NotImplementedError

    def client_left(self, handle: int) -> None:
        """A client of this node disconnected (reactor thread: must not block)."""
        raise NotImplementedError

    def publish_broadcast(self, payload: bytes, encrypted: bool) -> None:
        """Hand a broadcast to the other nodes (this node's clients already have it)."""
        raise NotImplementedError

    def route_send(self, node: str, handle: int, payload: bytes, encrypted: bool) -> bool:
        """Route a ``send_to`` to another node; False if that node is not live."""
        raise NotImplementedError

    def route_disconnect(self, node: str, handle: int) -> bool:
        """Route a ``disconnect_client`` to another node; False if it is not live."""
        raise NotImplementedError

    def cluster_client_count(self, local: int) -> int:
        """Clients of the whole cluster, given this node's exact *local* count."""
        raise NotImplementedError

    def cluster_nodes(self) -> list[str]:
        """Ids of the live nodes, this one included, sorted."""
        raise NotImplementedError


def _positive(name: str, value: Any) -> float:
    seconds = float(value)
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError(f"RedisBackplane.{name} must be a finite number > 0, not {value!r}")
    return seconds


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"RedisBackplane.{name} must be an int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"RedisBackplane.{name} must be >= 1, not {value}")
    return value


def _name(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"RedisBackplane.{name} must be a str, not {type(value).__name__}")
    if not value or any(ch.isspace() for ch in value):
        raise ValueError(f"RedisBackplane.{name} must be a non-empty str without spaces, "
                         f"not {value!r}")
    return value


class RedisBackplane(Backplane):
    """A cluster backplane on Redis (redis-py; extra ``morsock[redis]``).

    ``RedisBackplane(url="redis://127.0.0.1:6379/0", channel="morsock", node_id=None)``,
    passed as ``Server(..., backplane=...)``; one backplane serves one server at a time.
    Servers sharing a Redis database and *channel* form one cluster. *node_id* (default:
    ``"<host>-<pid>-<random>"``) must be unique in the cluster while its node lives.

    Settings (keywords): ``heartbeat_interval`` (1.0 s) and ``node_ttl`` (3.0 s, at least
    twice the interval): a node silent for ``node_ttl`` is dead and leaves the counts;
    ``stream_length`` (100000): entries ``C:all`` keeps (a node that falls further
    behind loses messages, reported); ``max_pending`` (10000 messages) and
    ``pending_timeout`` (10.0 s): while Redis is unreachable, outgoing cluster messages
    wait, at most that many and that long, then are reported undelivered;
    ``reconnect_strategy`` / ``reconnect_interval`` (ms, 100) /
    ``reconnect_max_interval`` (ms, 5000) / ``reconnect_max_attempts`` (0: forever):
    retrying a lost connection, as :class:`~morsock.reconnect.ReconnectPolicy` computes;
    ``socket_timeout`` (5.0 s) bounds one Redis command.

    Reports go to the server's ``on_error(server, None, message, code)``:
    ``CLUSTER_UNAVAILABLE`` once when Redis is lost (and when retrying gives up),
    ``CLUSTER_UNDELIVERED`` for messages that did not arrive; and, per report, to
    ``on_undelivered(backplane, report: Undelivered)`` when set (any library thread).

    Read-only: ``node_id``, ``url``, ``channel``, ``connected`` (both threads reach Redis
    and this node has announced itself); :meth:`wait_joined` blocks until it has.

    Threads: a writer (publishes, presence, heartbeat, cluster view) and a reader (the
    streams), both started by the server's ``start()`` and joined by its ``stop()``.
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", channel: str = "morsock",
                 node_id: str | None = None, *, heartbeat_interval: float = 1.0,
                 node_ttl: float = 3.0, stream_length: int = 100_000,
                 max_pending: int = 10_000, pending_timeout: float = 10.0,
                 reconnect_strategy: ReconnectStrategy | str = ReconnectStrategy.BACKOFF,
                 reconnect_interval: int = 100, reconnect_max_interval: int = 5000,
                 reconnect_max_attempts: int = 0, socket_timeout: float = 5.0,
                 on_undelivered: Callable[[RedisBackplane, Undelivered], Any] | None = None,
                 logger: logging.Logger | None = None) -> None:
        try:
            import redis
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("morsock.cluster.RedisBackplane needs redis-py: "
                              "pip install 'morsock[redis]'") from exc
        if not isinstance(url, str):
            raise TypeError(f"RedisBackplane.url must be a str, not {type(url).__name__}")
        self.url = url
        self.channel = _name("channel", channel)
        if node_id is None:
            node_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.node_id = _name("node_id", node_id)
        self.heartbeat_interval = _positive("heartbeat_interval", heartbeat_interval)
        self.node_ttl = _positive("node_ttl", node_ttl)
        if self.node_ttl < 2 * self.heartbeat_interval:
            raise ValueError(f"RedisBackplane.node_ttl ({node_ttl!r}) must be at least twice "
                             f"heartbeat_interval ({heartbeat_interval!r})")
        self.stream_length = _count("stream_length", stream_length)
        self.max_pending = _count("max_pending", max_pending)
        self.pending_timeout = _positive("pending_timeout", pending_timeout)
        self.socket_timeout = _positive("socket_timeout", socket_timeout)
        self._policy_args = (ReconnectStrategy.parse(reconnect_strategy), reconnect_interval,
                             reconnect_max_attempts, reconnect_max_interval)
        ReconnectPolicy(*self._policy_args)  # checks them now
        self.on_undelivered = on_undelivered
        self._log = logger or logging.getLogger("morsock")
        self._redis = redis
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._connect_kwargs = self._client_kwargs(url)  # ValueError for a bad URL
        self._keys = wire.Keys(self.channel)
        self._all = self._keys.all
        self._inbox = self._keys.inbox(self.node_id)
        self._server: Server | None = None
        self._cond = threading.Condition()
        self._reset()

    # -- configuration -------------------------------------------------------------------
    def _client_kwargs(self, url: str) -> dict[str, Any]:
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        self._redis.Redis.from_url(url).close()  # parses only: ValueError for a bad URL
        return {"socket_connect_timeout": self.socket_timeout,
                "retry": Retry(NoBackoff(), 0),  # the reconnect policy retries, not redis-py
                "health_check_interval": 0}

    def _reset(self) -> None:
        """The run state (attach() starts from it)."""
        self._outbox: deque[Outgoing] = deque()
        self._presence_ops: list[tuple[int, str | None]] = []
        self._stopping = False
        self._stop_event = threading.Event()
        self._setup_done = threading.Event()
        self._joined = threading.Event()
        self._refresh_wanted = False
        self._gave_up = False
        self._down: set[str] = set()
        self._members = Membership(self)
        self._seq: dict[bytes, int] = {}  # last sequence number given, per stream
        self._written: dict[bytes, int] = {}  # last one Redis confirmed, per stream
        self._ledger = SeqLedger()  # duplicates and gaps of what the reader handles
        self._run = uuid.uuid4().hex[:8]  # this attach: a restarted node numbers from 1
        self._reader = StreamReader(self)
        self._threads: list[threading.Thread] = []
        self._writer_client: Any = None
        self._reader_client: Any = None

    def _policy(self) -> ReconnectPolicy:
        return ReconnectPolicy(*self._policy_args)

    def __repr__(self) -> str:
        return (f"<RedisBackplane node {self.node_id!r} channel {self.channel!r} at "
                f"{self._redacted_url()}>")

    def _redacted_url(self) -> str:
        scheme, sep, rest = self.url.partition("://")
        if sep and "@" in rest:
            rest = "***@" + rest.rpartition("@")[2]
        return f"{scheme}{sep}{rest}"

    # -- state read by the server --------------------------------------------------------
    @property
    def connected(self) -> bool:
        """True while both threads reach Redis and this node has joined the cluster."""
        return self._joined.is_set() and not self._down and self._server is not None

    def wait_joined(self, timeout: float | None = None) -> bool:
        """Block until this node has announced itself in Redis (True) or *timeout*."""
        return self._joined.wait(timeout)

    def cluster_client_count(self, local: int) -> int:
        view = self._members.live_view()
        return local + sum(count for node, count in view.items() if node != self.node_id)

    def cluster_nodes(self) -> list[str]:
        return sorted(set(self._members.live_view()) | {self.node_id})

    # -- life cycle ----------------------------------------------------------------------
    def attach(self, server: Server) -> None:
        with self._cond:
            if self._server is not None:
                raise MorsockError(f"{self!r} already serves a running server")
            self._reset()
            self._server = server
        redis = self._redis
        self._writer_client = redis.Redis.from_url(
            self.url, socket_timeout=self.socket_timeout, **self._connect_kwargs)
        self._reader_client = redis.Redis.from_url(
            self.url, socket_timeout=self.socket_timeout + self.heartbeat_interval,
            **self._connect_kwargs)
        for target, role in ((self._write_loop, "writer"), (self._reader.run, "reader")):
            thread = threading.Thread(target=target, daemon=True,
                                      name=f"morsock-cluster-{role}-{self.node_id}")
            self._threads.append(thread)
        for thread in self._threads:
            thread.start()

    def detach(self, server: Server) -> None:
        if threading.current_thread() in self._threads:
            # stop() from a handler of one of our reports: that thread cannot join itself
            threading.Thread(target=self.detach, args=(server,), daemon=True,
                             name=f"morsock-cluster-detach-{self.node_id}").start()
            return
        with self._cond:
            if self._server is not server:
                return
            self._stopping = True
            self._cond.notify_all()
        self._stop_event.set()
        self._setup_done.set()  # a reader still waiting for the first setup
        writer, reader = self._threads
        writer.join(self.socket_timeout * 3)
        reader.join(0.5)
        if reader.is_alive():  # blocked in XREAD: cut its connection
            self._reader_client.connection_pool.disconnect()
            reader.join(self.socket_timeout * 3)
        for client in (self._writer_client, self._reader_client):
            client.connection_pool.disconnect()
            client.close()
        for thread in self._threads:
            if thread.is_alive():  # pragma: no cover - Redis hung past every timeout
                self._log.error("cluster: %s did not stop", thread.name)
        with self._cond:
            self._server = None

    # -- hooks (server threads) ----------------------------------------------------------
    def client_joined(self, handle: int, address: str) -> None:
        with self._cond:
            self._presence_ops.append((handle, address))
            self._cond.notify()

    def client_left(self, handle: int) -> None:
        with self._cond:
            self._presence_ops.append((handle, None))
            self._cond.notify()

    def publish_broadcast(self, payload: bytes, encrypted: bool) -> None:
        self._enqueue(Outgoing(self._all, wire.broadcast_fields(payload, encrypted),
                               "broadcast", None, None, payload))

    def route_send(self, node: str, handle: int, payload: bytes, encrypted: bool) -> bool:
        if node not in self._members.live_view():
            return False
        return self._enqueue(Outgoing(self._keys.inbox(node),
                                      wire.send_fields(handle, payload, encrypted),
                                      "send_to", node, f"{node}:{handle}", payload))

    def route_disconnect(self, node: str, handle: int) -> bool:
        if node not in self._members.live_view():
            return False
        return self._enqueue(Outgoing(self._keys.inbox(node), wire.disconnect_fields(handle),
                                      "disconnect", node, f"{node}:{handle}", None))

    def _enqueue(self, item: Outgoing) -> bool:
        wire.stamp(item.fields, self.node_id, self._run)
        with self._cond:
            if self._server is None or self._stopping:
                reason = "the server is not running"
            elif self._gave_up:
                reason = "the cluster backplane gave up reconnecting to Redis"
            elif len(self._outbox) >= self.max_pending:
                reason = (f"{len(self._outbox)} cluster messages already wait for Redis "
                          f"(max_pending={self.max_pending})")
            else:
                self._outbox.append(item)
                self._cond.notify()
                return True
        self._report_lost([item], reason)
        return False

    # -- reports -------------------------------------------------------------------------
    def _report(self, message: str, code: ErrorCode) -> None:
        server = self._server
        if server is not None:
            server._report(None, message, code)
        else:  # pragma: no cover - a report after detach
            self._log.error("%s (code %d)", message, code)

    def _notify(self, reports: list[Undelivered]) -> None:
        handler = self.on_undelivered
        if handler is None:
            return
        for report in reports:
            try:
                handler(self, report)
            except Exception:
                self._log.exception("cluster: on_undelivered handler raised")

    def _report_lost(self, items: list[Outgoing], reason: str) -> None:
        """Outgoing messages that will not be sent: one on_error, one report each."""
        if not items:
            return
        kinds: dict[str, int] = {}
        for item in items:
            kinds[item.kind] = kinds.get(item.kind, 0) + 1
        what = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
        self._report(f"cluster: {len(items)} message(s) not delivered to other nodes "
                     f"({what}): {reason}", ErrorCode.CLUSTER_UNDELIVERED)
        self._notify([Undelivered("outgoing", item.kind, item.node, item.target, 1,
                                  item.payload, reason) for item in items])

    def _report_gap(self, origin: str, stream: bytes, first: int, last: int,
                    why: str) -> None:
        count = last - first + 1
        reason = (f"{count} message(s) from node {origin} (sequence {first}..{last} of "
                  f"{stream.decode(errors='replace')}) were lost in Redis ({why})")
        self._report_incoming("message", origin, count, None, reason)

    def _report_incoming(self, kind: str, origin: str, count: int, payload: bytes | None,
                         reason: str) -> None:
        """Messages from *origin* that did not reach this node's clients: one on_error,
        one report."""
        self._report(f"cluster: {reason}", ErrorCode.CLUSTER_UNDELIVERED)
        self._notify([Undelivered("incoming", kind, origin, None, count, payload, reason)])

    def _request_refresh(self) -> None:
        """Ask the writer for a heartbeat and a new view now (any thread)."""
        with self._cond:
            self._refresh_wanted = True
            self._cond.notify()

    def _mark_down(self, role: str, exc: BaseException) -> None:
        with self._cond:
            first = not self._down
            self._down.add(role)
        if first:
            self._report(f"cluster: lost the connection to Redis at {self._redacted_url()} "
                         f"({type(exc).__name__}: {exc}); retrying",
                         ErrorCode.CLUSTER_UNAVAILABLE)

    def _mark_up(self, role: str) -> None:
        with self._cond:
            was = bool(self._down)
            self._down.discard(role)
            back = was and not self._down
        if back:
            self._log.warning("cluster: connection to Redis at %s restored",
                              self._redacted_url())

    def _retry_wait(self, policy: ReconnectPolicy, role: str, exc: BaseException) -> bool:
        """After a failure: wait the policy's delay; False to give up (or on stop)."""
        self._mark_down(role, exc)
        attempt = policy.record_failure()
        delay = policy.next_delay()
        if delay is None:
            with self._cond:
                gave_up, self._gave_up = self._gave_up, True
            if not gave_up:
                self._report(f"cluster: gave up reconnecting to Redis at "
                             f"{self._redacted_url()} after {attempt} attempt(s); this node "
                             f"now serves only its own clients", ErrorCode.CLUSTER_UNAVAILABLE)
            return False
        self._log.warning("cluster %s: Redis attempt %d failed (%s); next in %.2f s", role,
                          attempt, exc, delay)
        return not self._stop_event.wait(delay)

    # -- writer thread -------------------------------------------------------------------
    def _write_loop(self) -> None:
        policy = self._policy()
        up = False
        next_beat = 0.0
        while True:
            if not up:
                if self._stopping:
                    break
                connected = self._connect_writer(policy)
                if connected is None:
                    break
                if not connected:
                    continue
                up = True
                next_beat = time.monotonic() + self.heartbeat_interval
                self._expire_pending()
            batch, ops, stopping = self._take_work(next_beat)
            try:
                next_beat = self._write(batch, ops, next_beat)
            except self._errors as exc:
                with self._cond:
                    self._outbox.extendleft(reversed(batch))  # resent, same sequence numbers
                up = False
                if not self._retry_wait(policy, "writer", exc):
                    break
                continue
            if stopping and not self._outbox:
                self._members.leave(self._writer_client)
                return
        with self._cond:
            left = list(self._outbox)
            self._outbox.clear()
        self._report_lost(left, "Redis was unreachable when the server stopped"
                          if self._stopping else "Redis is unreachable")

    def _connect_writer(self, policy: ReconnectPolicy) -> bool | None:
        """(Re)join through the writer's connection (writer thread): True once joined;
        False after a failure and the policy's wait; None to give up (or on stop)."""
        try:
            if not self._setup_done.is_set():
                self._first_setup()
            self._resync()
        except self._errors as exc:
            if not self._retry_wait(policy, "writer", exc):
                return None
            self._expire_pending()
            return False
        policy.reset()
        self._mark_up("writer")
        self._joined.set()
        return True

    def _write(self, batch: list[Outgoing], ops: list[tuple[int, str | None]],
               next_beat: float) -> float:
        """Write *batch* and *ops*, then the heartbeat if due or a refresh is wanted
        (writer thread). Returns when the next heartbeat is due; raises the Redis
        errors (the caller queues *batch* again)."""
        if batch or ops:
            self._push(batch, ops)
        if time.monotonic() >= next_beat or self._refresh_wanted:
            self._refresh_wanted = False
            self._beat()
            return time.monotonic() + self.heartbeat_interval
        return next_beat

    def _take_work(self, next_beat: float) -> tuple[list[Outgoing], list[tuple[int, str | None]],
                                                    bool]:
        with self._cond:
            while not (self._outbox or self._presence_ops or self._stopping
                       or self._refresh_wanted):
                left = next_beat - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = [self._outbox.popleft() for _ in range(min(wire.BATCH, len(self._outbox)))]
            ops, self._presence_ops = self._presence_ops, []
            return batch, ops, self._stopping

    def _expire_pending(self) -> None:
        """Report (and drop) the waiting messages older than pending_timeout."""
        limit = time.monotonic() - self.pending_timeout
        expired = []
        with self._cond:
            while self._outbox and self._outbox[0].since < limit:
                expired.append(self._outbox.popleft())
        self._report_lost(expired, f"Redis was unreachable for more than "
                                   f"pending_timeout={self.pending_timeout:g} s")

    def _first_setup(self) -> None:
        """The reader's starting point, taken before this node announces itself."""
        self._reader.start_from(self._writer_client)
        self._setup_done.set()

    def _heartbeat_value(self) -> str:
        return wire.heartbeat_value(self._run, self._written)

    def _resync(self) -> None:
        """(Re)announce this node with the whole presence hash (writer thread)."""
        with self._cond:
            self._presence_ops.clear()  # the snapshot below covers them
        server = self._server
        assert server is not None
        presence = {str(c.handle): f"{c.peer_ip}:{c.peer_port}"
                    for c in server.clients.values() if c.connected}
        self._members.announce(self._writer_client, self._heartbeat_value(), presence)

    def _push(self, batch: list[Outgoing], ops: list[tuple[int, str | None]]) -> None:
        pipe = self._writer_client.pipeline(transaction=False)
        key = self._keys.presence(self.node_id)
        for handle, address in ops:
            if address is None:
                pipe.hdel(key, str(handle))
            else:
                pipe.hset(key, str(handle), address)
        if ops:
            pipe.pexpire(key, int(self.node_ttl * 1000))
        inbox_ttl = int(max(60.0, 10 * self.node_ttl) * 1000)
        for item in batch:
            if not item.seq:
                item.seq = self._seq.get(item.stream, 0) + 1
                self._seq[item.stream] = item.seq
                wire.number(item.fields, item.seq)
            pipe.xadd(item.stream, item.fields, maxlen=self.stream_length, approximate=True)
            if item.stream != self._all:
                pipe.pexpire(item.stream, inbox_ttl)
        pipe.execute()
        written = self._written
        for item in batch:  # in order: the last of each stream is the highest
            written[item.stream] = item.seq

    def _beat(self) -> None:
        """Heartbeat and view (writer thread); announce again if the heartbeat expired."""
        if not self._members.beat(self._writer_client, self._heartbeat_value()):
            self._log.warning("cluster: node %s's heartbeat had expired; announcing it again",
                              self.node_id)
            self._resync()
