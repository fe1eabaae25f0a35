"""This node's membership of the cluster: its announcement in Redis, its view of the others.

One :class:`Membership` per attach of a RedisBackplane. Its commands run on the writer
thread, through the writer's Redis client, and raise the Redis errors (:meth:`leave`
excepted: it logs them). :attr:`Membership.view` is replaced whole, never changed in
place, so any thread may read it. Keys and values as morsock.cluster's spec says: a
node is live while its heartbeat key exists; a dead node's keys are removed by whichever
node sees it dead first.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from . import _cluster_wire as wire

if TYPE_CHECKING:
    from .cluster import RedisBackplane


class Membership:
    """The announcement and view of *backplane*'s node."""

    def __init__(self, backplane: RedisBackplane) -> None:
        self._bp = backplane
        #: Live node -> its client count, as last read (this node included).
        self.view: dict[str, int] = {}
        self.view_mono = 0.0  # when it was read

    def live_view(self) -> dict[str, int]:
        """:attr:`view`, or {} when it has not been read for too long (any thread)."""
        if time.monotonic() - self.view_mono > 2 * self._bp.node_ttl:
            return {}  # not refreshed for long: nothing known about the others
        return self.view

    def announce(self, r: Any, heartbeat: str, presence: dict[str, str]) -> None:
        """(Re)announce this node: heartbeat, node set, the whole *presence* hash, join;
        then read the view."""
        bp, node = self._bp, self._bp.node_id
        ttl = int(bp.node_ttl * 1000)
        key = bp._keys.presence(node)
        pipe = r.pipeline(transaction=True)
        pipe.set(bp._keys.heartbeat(node), heartbeat, px=ttl)
        pipe.sadd(bp._keys.nodes, node)
        pipe.delete(key)
        if presence:
            pipe.hset(key, mapping=presence)
            pipe.pexpire(key, ttl)
        pipe.xadd(bp._all, wire.control_fields(wire.JOIN, node),
                  maxlen=bp.stream_length, approximate=True)
        pipe.execute()
        self.refresh(r)

    def beat(self, r: Any, heartbeat: str) -> bool:
        """Refresh this node's keys, then the view. False (view not read) if the heartbeat
        had expired (a stall, or Redis lost its data): the caller announces again."""
        bp, node = self._bp, self._bp.node_id
        ttl = int(bp.node_ttl * 1000)
        pipe = r.pipeline(transaction=False)
        pipe.set(bp._keys.heartbeat(node), heartbeat, px=ttl, get=True)
        pipe.sadd(bp._keys.nodes, node)
        pipe.pexpire(bp._keys.presence(node), ttl)
        pipe.pexpire(bp._inbox, int(max(60.0, 10 * bp.node_ttl) * 1000))
        if pipe.execute()[0] is None:
            return False
        self.refresh(r)
        return True

    def refresh(self, r: Any) -> None:
        """Read the view: the live nodes' client counts and the sequence numbers their
        heartbeats announce; remove the dead nodes' keys; report what the reader lost."""
        bp = self._bp
        members = sorted(m.decode() for m in r.smembers(bp._keys.nodes))
        pipe = r.pipeline(transaction=False)
        for node in members:
            pipe.get(bp._keys.heartbeat(node))
            pipe.hlen(bp._keys.presence(node))
        replies = pipe.execute()
        view: dict[str, int] = {}
        dead = []
        now = time.monotonic()
        for index, node in enumerate(members):
            beat, count = replies[2 * index], replies[2 * index + 1]
            if beat is None:
                dead.append(node)
                continue
            view[node] = int(count)
            if node != bp.node_id:
                self._note_announced(now, node, beat)
        if dead:
            self._forget(r, dead)
        self._replace(view, now)
        bp._ledger.trim(set(view))
        for node, stream, first, last in bp._ledger.overdue(4 * max(1, len(view))):
            bp._report_gap(node, stream, first, last, "the last messages of a stream")

    def _note_announced(self, now: float, node: str, beat: bytes) -> None:
        parsed = wire.parse_heartbeat(beat)
        if parsed is None:
            return
        run, seqs = parsed
        for stream in (self._bp._all, self._bp._inbox):
            seq = seqs.get(stream.decode())
            if isinstance(seq, int):
                self._bp._ledger.announce(now, node, run, stream, seq)

    def _forget(self, r: Any, dead: list[str]) -> None:
        """Remove the *dead* nodes from the node set, with their presence hashes."""
        keys = self._bp._keys
        pipe = r.pipeline(transaction=False)
        for node in dead:
            pipe.srem(keys.nodes, node)
            pipe.delete(keys.presence(node))
        pipe.execute()

    def _replace(self, view: dict[str, int], now: float) -> None:
        """Make *view* (read at *now*) the current one; log who joined and who left."""
        log = self._bp._log
        old = set(self.view)
        self.view, self.view_mono = view, now
        for node in sorted(set(view) - old - {self._bp.node_id}):
            log.info("cluster: node %s joined", node)
        for node in sorted(old - set(view)):
            log.info("cluster: node %s left (heartbeat expired or it stopped)", node)

    def leave(self, r: Any) -> None:
        """Clean stop: tell the others, remove this node's keys, wake the reader. A Redis
        error is logged, not raised."""
        bp, node = self._bp, self._bp.node_id
        pipe = r.pipeline(transaction=False)
        pipe.srem(bp._keys.nodes, node)
        pipe.delete(bp._keys.heartbeat(node), bp._keys.presence(node))
        # the leave goes after the removals: a refresh it causes sees this node gone
        pipe.xadd(bp._all, wire.control_fields(wire.LEAVE, node),
                  maxlen=bp.stream_length, approximate=True)
        pipe.xadd(bp._inbox, wire.control_fields(wire.WAKE, node))
        pipe.pexpire(bp._inbox, 5000)
        try:
            pipe.execute()
        except bp._errors as exc:
            bp._log.warning("cluster: could not leave the cluster cleanly: %s", exc)
