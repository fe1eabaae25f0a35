"""The cluster's wire format: Redis key names, stream entry fields, the heartbeat value.

morsock.cluster's docstring is the spec; this module is its one implementation, so a
field or a key is named in one place. Pure: no I/O, no locks; RedisBackplane's writer
and reader threads call it. Decoding is lazy: a malformed field raises (KeyError,
ValueError) only when it is read, and the reader logs that entry and goes on.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

#: Most stream entries written in one pipeline, or read by one XREAD.
BATCH = 512

#: Entry kinds (field ``k``).
BROADCAST, JOIN, LEAVE = b"b", b"j", b"l"
SEND, DISCONNECT, UNDELIVERABLE, WAKE = b"s", b"d", b"n", b"x"
#: Kinds that only tell the others about a node (no sequence number, no payload).
CONTROL = (JOIN, LEAVE, WAKE)


class Keys:
    """The Redis keys of one cluster *channel* (``C`` in the spec)."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.all = f"{channel}:all".encode()
        self.nodes = f"{channel}:nodes"
        self.epoch = f"{channel}:epoch"

    def inbox(self, node: str) -> bytes:
        return f"{self.channel}:inbox:{node}".encode()

    def heartbeat(self, node: str) -> str:
        return f"{self.channel}:node:{node}"

    def presence(self, node: str) -> str:
        return f"{self.channel}:presence:{node}"


def _flag(encrypted: bool) -> bytes:
    return b"1" if encrypted else b"0"


def broadcast_fields(payload: bytes, encrypted: bool) -> dict[bytes, bytes]:
    return {b"k": BROADCAST, b"e": _flag(encrypted), b"p": payload}


def send_fields(handle: int, payload: bytes, encrypted: bool) -> dict[bytes, bytes]:
    return {b"k": SEND, b"h": b"%d" % handle, b"e": _flag(encrypted), b"p": payload}


def disconnect_fields(handle: int) -> dict[bytes, bytes]:
    return {b"k": DISCONNECT, b"h": b"%d" % handle}


def undeliverable_fields(client_id: str, reason: str, payload: bytes) -> dict[bytes, bytes]:
    """A send_to its node could not deliver, sent back to its origin's inbox."""
    return {b"k": UNDELIVERABLE, b"c": client_id.encode(), b"r": reason.encode(),
            b"p": payload}


def control_fields(kind: bytes, origin: str) -> dict[bytes, bytes]:
    """A join, leave or wake-up entry of *origin*."""
    return {b"k": kind, b"o": origin.encode()}


def stamp(fields: dict[bytes, bytes], origin: str, run: str) -> None:
    """Name the origin node and its run in a message's *fields* (before queueing)."""
    fields[b"o"] = origin.encode()
    fields[b"i"] = run.encode()


def number(fields: dict[bytes, bytes], seq: int) -> None:
    """Give a message its sequence number (the writer, when first sent)."""
    fields[b"q"] = b"%d" % seq


def _text(value: bytes) -> str:
    return value.decode(errors="replace")


class Entry:
    """A stream entry read from Redis; each field decoded when read."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[bytes, bytes]) -> None:
        self.fields = fields

    @property
    def kind(self) -> bytes | None:
        return self.fields.get(b"k")

    @property
    def origin(self) -> str:
        return _text(self.fields.get(b"o", b""))

    @property
    def seq(self) -> int:
        return int(self.fields.get(b"q", b"0"))

    @property
    def run(self) -> str:
        return _text(self.fields.get(b"i", b""))

    @property
    def handle(self) -> int:
        return int(self.fields[b"h"])

    @property
    def payload(self) -> bytes:
        return self.fields.get(b"p", b"")

    @property
    def encrypted(self) -> bool:
        return self.fields.get(b"e") == b"1"

    @property
    def target(self) -> str:
        return _text(self.fields.get(b"c", b""))

    @property
    def reason(self) -> str:
        return _text(self.fields.get(b"r", b""))


def heartbeat_value(run: str, written: dict[bytes, int]) -> str:
    """A node's heartbeat: its pid, host, run and last confirmed number per stream."""
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run": run,
                       "seq": {k.decode(): v for k, v in written.items()}})


def parse_heartbeat(beat: bytes) -> tuple[str, Any] | None:
    """``(run, seq)`` of a heartbeat value (``seq`` as found: a dict unless another
    writer sent something else); None if it is not a JSON object."""
    try:
        value = json.loads(beat)
        return str(value.get("run", "")), value.get("seq", {})
    except (ValueError, AttributeError):
        return None


class Outgoing:
    """One message waiting for the writer thread, and what a report about it says."""

    __slots__ = ("stream", "fields", "since", "kind", "node", "target", "payload", "seq")

    def __init__(self, stream: bytes, fields: dict[bytes, bytes], kind: str,
                 node: str | None, target: str | None, payload: bytes | None) -> None:
        self.stream = stream
        self.fields = fields
        self.since = time.monotonic()
        self.kind = kind
        self.node = node
        self.target = target
        self.payload = payload
        self.seq = 0  # given by the writer when first sent (kept for a retry)
