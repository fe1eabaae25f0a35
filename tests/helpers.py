"""Shared helpers of the component tests: an event recorder, bounded waits, a free port,
the interop vectors with an independent (hand-rolled) MORMOT-profile decoder, and child
processes (``python ARGS``) read line by line."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from Crypto.Cipher import AES

#: Every bound of a wait in these tests is multiplied by this factor, read from the
#: environment variable ``MORSOCK_TEST_TIMEOUT_FACTOR`` (default 1; raise it on a slow
#: machine). Waits end as soon as their condition holds, so a larger factor only makes a
#: failing test take longer to fail.
TIMEOUT_FACTOR = float(os.environ.get("MORSOCK_TEST_TIMEOUT_FACTOR", "1") or "1")
if not TIMEOUT_FACTOR > 0:
    raise ValueError("MORSOCK_TEST_TIMEOUT_FACTOR must be a number above 0, "
                     f"not {os.environ.get('MORSOCK_TEST_TIMEOUT_FACTOR')!r}")


def scaled(seconds: float) -> float:
    """*seconds* times :data:`TIMEOUT_FACTOR`: the bound to give a wait."""
    return seconds * TIMEOUT_FACTOR


#: Default bound of every wait in these tests (generous: the machine is shared).
TIMEOUT = scaled(10.0)


class Recorder:
    """Collects events (tuples) from any thread; tests wait on it with a deadline.

    ``rec.handler("on_connect")`` returns a callable that records
    ``("on_connect", *args_without_sender)``; :meth:`wait_for` blocks until a predicate
    over the recorded list holds (or fails the test after *timeout*).
    """

    def __init__(self) -> None:
        self.events: List[Tuple[Any, ...]] = []
        self._cond = threading.Condition()
        #: Callables run with each recorded event, after it is recorded, on the thread
        #: that recorded it.
        self.hooks: List[Callable[[Tuple[Any, ...]], None]] = []

    @property
    def cond(self) -> threading.Condition:
        """The condition guarding :attr:`events` (hold it to read them consistently)."""
        return self._cond

    def add(self, *item: Any) -> None:
        """Record one event (any thread), then run :attr:`hooks` with it."""
        with self._cond:
            self.events.append(item)
            self._cond.notify_all()
        for hook in list(self.hooks):
            hook(item)

    def holds(self, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
        """Wait until ``predicate()`` (evaluated under :attr:`cond`) is true; return
        whether it became true within *timeout* seconds (no exception)."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def handler(self, name: str, result: Any = None,
                thread: bool = False) -> Callable[..., Any]:
        """An event handler that records ``(name, *args[1:])`` (sender dropped); with
        *thread*, ``threading.get_ident()`` is appended."""
        def record(sender: Any, *args: Any) -> Any:
            if thread:
                self.add(name, *args, threading.get_ident())
            else:
                self.add(name, *args)
            return result
        return record

    def named(self, name: str) -> List[Tuple[Any, ...]]:
        """Snapshot of the events called *name*."""
        with self._cond:
            return [e for e in self.events if e[0] == name]

    def count(self, name: str) -> int:
        return len(self.named(name))

    def snapshot(self) -> List[Tuple[Any, ...]]:
        with self._cond:
            return list(self.events)

    def wait_for(self, predicate: Callable[[List[Tuple[Any, ...]]], bool],
                 timeout: float = TIMEOUT, what: str = "") -> List[Tuple[Any, ...]]:
        """Wait until ``predicate(events)`` is true; return the events; AssertionError
        after *timeout* seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.events):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what or predicate}; "
                                         f"recorded: {self.events[-20:]}")
                self._cond.wait(left)
            return list(self.events)

    def wait_count(self, name: str, n: int, timeout: float = TIMEOUT) -> List[Tuple[Any, ...]]:
        """Wait until at least *n* events called *name* are recorded; return them."""
        self.wait_for(lambda ev: sum(1 for e in ev if e[0] == name) >= n, timeout,
                      f"{n} x {name}")
        return self.named(name)


def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT,
               what: str = "") -> None:
    """Poll *predicate* until true (for state with no event to wait on, e.g. counters
    updated after the bytes left); AssertionError after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.005)  # polling a condition with a deadline, not timing


@contextlib.contextmanager
def log_lines(name: str, level: int) -> Iterator[List[str]]:
    """The messages of logger *name* while the block runs, with its level set to *level*
    and its records kept from its parents; its level and propagation are restored."""
    lines: List[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger(name)
    handler = Collect()
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def frame_size(payload_len: int) -> int:
    """Wire size of a plaintext frame."""
    return 9 + payload_len


def read_frame(sock: socket.socket, timeout: float = TIMEOUT) -> Tuple[int, bytes]:
    """Read one frame from a blocking socket: (flag, payload)."""
    sock.settimeout(timeout)

    def exact(n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed inside a frame")
            buf += chunk
        return bytes(buf)

    magic, size, flag = struct.unpack("<IIB", exact(9))
    assert magic == 0xCAFEBABE, hex(magic)
    return flag, exact(size)


# ----------------------------------------------------------------------- interop vectors

#: The frames the original Pascal code produced (the project's shared
#: ``interop/mormot_v103_vectors.json``), kept in the repository so that every checkout runs
#: the interop tests; test_crypto checks it against its SHA-256 and the shared original.
VENDORED_VECTORS = Path(__file__).resolve().parent / "data" / "mormot_v103_vectors.json"
VENDORED_VECTORS_SHA256 = "1fe81383ec963983689e2a5586793b47006c9d916dd23c6dd4888628cac156ac"
SHARED_VECTORS = (Path(__file__).resolve().parents[2] / "shared" / "interop"
                  / "mormot_v103_vectors.json")


def vectors_path() -> Path:
    """``$MORSOCK_INTEROP_VECTORS`` if set, else the repository's copy."""
    env = os.environ.get("MORSOCK_INTEROP_VECTORS")
    return Path(env) if env else VENDORED_VECTORS


def load_vectors() -> Dict[str, Any]:
    """The interop vectors; a missing file is an error, never a reason to skip."""
    with vectors_path().open(encoding="utf-8") as fh:
        data: Dict[str, Any] = json.load(fh)
    return data


VECTORS = load_vectors()
VECTOR_KEY = "MySecretKey123!"
VECTOR_MODES = ["ECB", "CBC", "CFB", "OFB", "CTR", "GCM", "CFC", "OFC", "CTC"]


def vector_cases(mode: str) -> List[Dict[str, Any]]:
    """The encrypted Delphi cases with the public key, AES-256, in *mode*."""
    return [c for c in VECTORS.get("cases", ())
            if c["key"] == VECTOR_KEY and c["key_size"] == 256 and c["mode"] == mode]


def vector_edge(name: str, mode: str) -> Optional[Dict[str, Any]]:
    for case in VECTORS.get("edge_cases", ()):
        if case["name"] == name and case["mode"] == mode:
            return case
    return None


def vector_aes_key(key_text: str = VECTOR_KEY, key_size: int = 256) -> bytes:
    """PBKDF2-HMAC-SHA256(key, 'mormot_protocol_salt_2024', 1000, 32)[:key_size/8]."""
    return hashlib.pbkdf2_hmac("sha256", key_text.encode("utf-8"),
                               b"mormot_protocol_salt_2024", 1000, 32)[:key_size // 8]


def _vector_cipher(mode: str, key: bytes, iv: bytes) -> Any:
    """A pycryptodome cipher following the vectors' "about.modes" text."""
    if mode == "ECB":
        return AES.new(key, AES.MODE_ECB)
    if mode == "CBC":
        return AES.new(key, AES.MODE_CBC, iv=iv)
    if mode in ("CFB", "CFC"):
        return AES.new(key, AES.MODE_CFB, iv=iv, segment_size=128)
    if mode in ("OFB", "OFC"):
        return AES.new(key, AES.MODE_OFB, iv=iv)
    if mode in ("CTR", "CTC"):
        return AES.new(key, AES.MODE_CTR, nonce=b"", initial_value=iv)
    if mode == "GCM":  # keystream only: counter blocks IV[0:12] || 00000002, ...
        return AES.new(key, AES.MODE_CTR, nonce=iv[:12], initial_value=2)
    raise ValueError(mode)


def vector_decrypt(mode: str, payload: bytes, key: Optional[bytes] = None) -> bytes:
    """Decrypt a flag-1 payload by the vector rules (IV || AES(plaintext || PKCS#7));
    ValueError on a bad length or padding."""
    key = key or vector_aes_key()
    if len(payload) < 32 or len(payload) % 16:
        raise ValueError(f"invalid payload length {len(payload)}")
    iv, body = payload[:16], payload[16:]
    padded = _vector_cipher(mode, key, iv).decrypt(body)
    pad = padded[-1]
    if not 1 <= pad <= 16 or padded[-pad:] != bytes([pad]) * pad:
        raise ValueError("invalid padding")
    return padded[:-pad]


# -- child processes -------------------------------------------------------------------------

#: The repository root: the working directory of every child process.
ROOT = Path(__file__).resolve().parent.parent
#: Bound of every subprocess wait (a child starts an interpreter: slower than a thread).
CHILD_WAIT = scaled(60.0)
CHILD_ENV = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")


def run_python(args: List[str], **kwargs: Any) -> "subprocess.CompletedProcess[str]":
    """``python ARGS`` in :data:`ROOT` to its end (at most :data:`CHILD_WAIT` unless
    *timeout* is given), stdout and stderr captured as text."""
    kwargs.setdefault("timeout", CHILD_WAIT)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                          env=CHILD_ENV, **kwargs)


class Child:
    """``python ARGS`` running in :data:`ROOT`, its stdout lines read by a thread.

    stdin is ``/dev/null`` and stderr a pipe unless *stdin* / *stderr* say otherwise
    (other keywords go to :class:`subprocess.Popen`). :meth:`close` kills and reaps it.
    """

    def __init__(self, args: List[str], **kwargs: Any) -> None:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.PIPE)
        self.proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                                     text=True, cwd=ROOT, env=CHILD_ENV, **kwargs)
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self.out: List[str] = []
        self._reader = threading.Thread(target=self._read, name="child-stdout-reader")
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.out.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def expect(self, pattern: str, timeout: float = CHILD_WAIT) -> "re.Match[str]":
        """The first coming stdout line that matches *pattern* (earlier lines are skipped);
        fails the test if none comes within *timeout* or the process ends first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no line matching {pattern!r} within {timeout} s: {self.out}")
            if line is None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                pytest.fail(f"process ended before {pattern!r}: {self.out} {err}")
            match = re.search(pattern, line)
            if match:
                return match

    def stop(self, sig: int = signal.SIGINT) -> int:
        """Send *sig* (SIGINT: what Ctrl+C sends), wait for the exit; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(CHILD_WAIT)

    def interrupt(self) -> "tuple[int, str, str]":
        """SIGINT, then ``(exit code, all of stdout, stderr)``."""
        code = self.stop(signal.SIGINT)
        self._reader.join(CHILD_WAIT)
        err = self.proc.stderr.read() if self.proc.stderr else ""
        return code, "".join(self.out), err

    def close(self) -> None:
        """Kill if still running, reap, join the reader, close the pipes (idempotent)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(CHILD_WAIT)
        self._reader.join(CHILD_WAIT)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@contextlib.contextmanager
def child(args: List[str], **kwargs: Any) -> Iterator[Child]:
    """A :class:`Child` closed (killed if need be, and reaped) when the block ends."""
    proc = Child(args, **kwargs)
    try:
        yield proc
    finally:
        proc.close()


def read_terminal(master: int, pattern: str, seen: str = "",
                  timeout: float = CHILD_WAIT) -> str:
    """Read the pty *master* until *seen* plus what was read matches *pattern*; return
    all of it. Fails the test after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, seen):
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"no {pattern!r} on the terminal: {seen!r}")
        ready, _, _ = select.select([master], [], [], left)
        if ready:
            seen += os.read(master, 4096).decode(errors="replace")
    return seen
