"""The cluster's reader: ``C:all`` and this node's inbox, read in order, handed to the server.

One :class:`StreamReader` per attach of a RedisBackplane. :meth:`StreamReader.start_from`
runs on the writer thread before the node announces itself; :meth:`StreamReader.run` is
the reader thread, ended by the backplane's stop or when its retry policy gives up. Each
stream is read from the last entry id seen (from its start once Redis lost its data), so
a reconnect resumes where it stopped. Duplicates are dropped and gaps reported through
the backplane's SeqLedger; an entry that fails is logged and skipped, never retried.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

from . import _cluster_wire as wire
from ._cluster_wire import Entry, Outgoing
from .errors import CryptoError, MorsockError, NotConnectedError, SendBufferFullError

if TYPE_CHECKING:
    from .cluster import RedisBackplane
    from .server import Server

def current_epoch(r: Any, key: str) -> bytes:
    """The epoch token at *key*, set first if missing (raises the Redis errors)."""
    r.set(key, uuid.uuid4().hex, nx=True)
    token = r.get(key)
    return bytes(token or b"")


class StreamReader:
    """Reads the cluster streams for *backplane* and acts on what they carry."""

    def __init__(self, backplane: RedisBackplane) -> None:
        self._bp = backplane
        self._read_from: dict[bytes, bytes] = {}  # stream -> last entry id seen
        self._epoch: bytes | None = None

    def start_from(self, r: Any) -> None:
        """Take the epoch and the streams' current ends through *r* (writer thread, before
        the node announces itself, so the reader misses nothing sent to it after)."""
        bp = self._bp
        self._epoch = current_epoch(r, bp._keys.epoch)
        for stream in (bp._all, bp._inbox):
            last = r.xrevrange(stream, count=1)
            self._read_from[stream] = last[0][0] if last else b"0-0"

    def run(self) -> None:
        """The reader thread's loop (returns on stop or when retrying gives up)."""
        bp = self._bp
        policy = bp._policy()
        bp._setup_done.wait()
        ready = True
        r = bp._reader_client
        # One XREAD waits at most a heartbeat (a stop wakes it at once): the heartbeat
        # check (SeqLedger.overdue) needs a read that started after a heartbeat arrived.
        block_ms = max(1, int(bp.heartbeat_interval * 1000))
        while not bp._stopping:
            try:
                if not ready:
                    self._after_reconnect(r)
                    ready = True
                    policy.reset()
                    bp._mark_up("reader")
                started = time.monotonic()
                reply = r.xread(dict(self._read_from), count=wire.BATCH, block=block_ms)
            except bp._errors as exc:
                ready = False
                if bp._stopping or not bp._retry_wait(policy, "reader", exc):
                    break
                continue
            if self._handle_reply(reply) < wire.BATCH:
                bp._ledger.drained_mono = started

    def _handle_reply(self, reply: Any) -> int:
        """Dispatch the entries of one XREAD reply in order; returns the most entries
        one stream gave (BATCH: there may be more to read)."""
        got = 0
        for stream, entries in reply or ():
            got = max(got, len(entries))
            for entry_id, fields in entries:
                self._read_from[bytes(stream)] = entry_id
                try:
                    self.dispatch(bytes(stream), fields)
                except Exception:
                    self._bp._log.exception("cluster: error handling a message from Redis")
        return got

    def _after_reconnect(self, r: Any) -> None:
        epoch = current_epoch(r, self._bp._keys.epoch)
        if epoch != self._epoch:
            self._bp._log.warning("cluster: Redis lost its data (a restart without "
                                  "persistence?): reading its streams from their start")
            for stream in self._read_from:
                self._read_from[stream] = b"0-0"
            self._epoch = epoch
            self._bp._request_refresh()

    def dispatch(self, stream: bytes, fields: dict[bytes, bytes]) -> None:
        """Handle one entry read from *stream* (reader thread; raises what a malformed
        entry or the server raises, and the reader logs it)."""
        bp = self._bp
        entry = Entry(fields)
        kind, origin = entry.kind, entry.origin
        if kind in wire.CONTROL:
            if kind != wire.WAKE and origin != bp.node_id:
                bp._request_refresh()
            return
        if origin == bp.node_id and stream == bp._all:
            return  # our own broadcast: our clients had it already
        seq = entry.seq
        missing = bp._ledger.accept((stream, origin, entry.run), seq)
        if missing is None:
            return  # a publish retried after a reconnect: already handled
        if missing:
            bp._report_gap(origin, stream, missing.start, seq - 1, "a gap in the stream")
        server = bp._server
        if server is not None:
            self._handle(server, stream, entry)

    def _handle(self, server: Server, stream: bytes, entry: Entry) -> None:
        """A new message of *entry*'s kind for *server* (reader thread)."""
        kind, origin, payload = entry.kind, entry.origin, entry.payload
        if kind == wire.BROADCAST:
            self._broadcast_in(server, origin, payload, entry.encrypted)
        elif kind == wire.SEND:
            self._deliver(server, origin, entry.handle, payload, entry.encrypted)
        elif kind == wire.DISCONNECT:
            server.disconnect_client(entry.handle)
        elif kind == wire.UNDELIVERABLE:
            target = entry.target
            self._bp._report_lost([Outgoing(stream, {}, "send_to", origin, target, payload)],
                                  f"send_to {target}: {entry.reason}")

    def _broadcast_in(self, server: Server, origin: str, payload: bytes,
                      encrypted: bool) -> None:
        """Another node's broadcast for this node's clients; a failure is reported here."""
        try:
            server._broadcast_local(payload, encrypted)
        except MorsockError as exc:  # no key here for it, or over max_message_size
            reason = f"broadcast from node {origin} not delivered on {self._bp.node_id}: {exc}"
            self._bp._report_incoming("broadcast", origin, 1, payload, reason)

    def _deliver(self, server: Server, origin: str, handle: int, payload: bytes,
                 encrypted: bool) -> None:
        """A send_to for one of this node's clients; a failure goes back to its origin."""
        bp = self._bp
        client = server.find_client(handle)
        if client is None:
            reason = f"no client {handle} on node {bp.node_id} (disconnected)"
        else:
            try:
                client.send_data(payload, encrypted)
                return
            except NotConnectedError:
                reason = f"client {client.client_id} disconnected"
            except (SendBufferFullError, CryptoError, ValueError) as exc:
                reason = f"client {client.client_id} refused it: {exc}"
        bp._log.info("cluster: send_to from %s not delivered: %s", origin, reason)
        fields = wire.undeliverable_fields(f"{bp.node_id}:{handle}", reason, payload)
        bp._enqueue(Outgoing(bp._keys.inbox(origin), fields, "send_to report", origin,
                             None, None))
