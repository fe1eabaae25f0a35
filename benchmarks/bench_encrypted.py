#!/usr/bin/env python3
"""What per-message encryption costs a morsock server, against the cost of the crypto itself.

Run from the repository: ``python benchmarks/bench_encrypted.py [--rounds 3] [--secs 4]``
(the default run takes about 1.5 minutes).

* Server: ``python -m morsock server --key K --mode M --profile P --threads N`` (the CLI
  echo server of this checkout), a fresh process for every measurement, on a free port.
  Its CPU is read from ``/proc/PID/stat`` (utime + stime, all threads).
* Load: this process, one ``selectors`` loop over non-blocking sockets; every connection
  keeps ``depth`` ENCRYPTED frames in flight and answers each reply with a new request.
  MORMOT requests are sealed before the run (a ring of 64 distinct frames, so the load
  costs almost nothing); AUTHENTICATED connections do the morsock handshake
  (:class:`morsock.crypto.ClientHandshake`) and seal every request with their own
  :class:`~morsock.crypto.AuthSession` (its sequence numbers). Replies are checked by
  size and header; the first reply of each connection is also decrypted and compared.
  The load generator's own crypto is in ``lg%``, never in the server's figures.
* Part 1, "cost" (server pinned to one CPU, the load to another): for 64 B and 64 KiB
  payloads, a plaintext echo (no key) and CBC / CTR / GCM in both profiles. Per scenario:
  req/s, server CPU us per request, and

  - ``raw us``: the bare pycryptodome (+ hmac) work the server must do per request,
    timed in this process on prebuilt inputs (median of repeats): decrypt the request and
    encrypt the reply, i.e. MORMOT 2 x (new cipher + decrypt/encrypt); AUTHENTICATED the
    same plus 2 x HMAC-SHA256 (CBC, CTR) or the GCM tag (update AAD + digest / verify);
  - ``lib us``: the same two steps done by morsock's crypto module in this process
    (``MormotCipher.decrypt`` + ``seal_frame``; ``AuthSession.open`` + ``seal``);
  - ``ratio`` = (server us/req - plaintext echo us/req) / raw us. 1.0 means the server
    adds nothing to the crypto it cannot avoid; the target is <= 1.2.
  - ``raw srv``: the same raw work done by a server under the same load -- a plaintext
    morsock echo (``--serve-raw``, the CLI server's settings) whose handler runs it on
    prebuilt inputs before answering -- i.e. that server's us/req minus the plaintext
    echo's. At the encrypted request rate the load generator sleeps between replies and
    every reply has to wake it, which costs the server's kernel time that the fast
    plaintext echo it is compared with does not pay; ``raw srv`` includes that, ``raw
    us`` does not. ``@srv`` = (server us/req - plaintext echo us/req) / raw srv: what
    morsock's encrypted path costs against the bare crypto under equal conditions.
* Part 2, "parallel" (server NOT pinned; the machine's cores are shared by the server and
  the load): 64 KiB encrypted messages over several connections with thread_pool_size
  1, 2 and 4: MB/s (payload both ways), server CPU % (over 100 = more than one core
  busy), and the gain over one thread. Beside it, what bounds that gain on this machine:
  ``ceiling`` (the bare crypto in 2 processes / 2 threads against 1), ``cpu room`` (the
  CPUs over what the server and the load generator keep busy with 1 thread: an
  AUTHENTICATED load generator seals every request itself, about half a core at 64 KiB)
  and the thread wake-up round trip (see :func:`wakeup_round_trip`).

Rounds are interleaved (every scenario once per round, the order reversed every other
round) and the tables show medians. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from Crypto import __version__ as CRYPTO_VERSION  # noqa: E402
from Crypto.Cipher import AES  # noqa: E402

from morsock.crypto import (AuthSession, ClientHandshake, MormotCipher,  # noqa: E402
                            authenticated_payload_size, mormot_key, mormot_payload_size,
                            server_handshake)
from morsock.enums import AESMode  # noqa: E402
from morsock.protocol import (FLAG_AUTHENTICATED, FLAG_MORMOT, FLAG_PLAIN,  # noqa: E402
                              HEADER, HEADER_SIZE, MAGIC, encode_frame)

KEY = "bench-encrypted key"
KEY_BITS = 256
PLAIN = "PLAIN"
MORMOT = "MORMOT"
AUTH = "AUTHENTICATED"
PROFILES = (MORMOT, AUTH)
MODES = ("CBC", "CTR", "GCM")
SIZES = (64, 64 * 1024)
#: payload size -> (connections, frames in flight per connection) of the cost part
LOAD_SHAPE = {64: (16, 8), 64 * 1024: (8, 2)}
PARALLEL_DEFAULT = "MORMOT/CBC,AUTHENTICATED/GCM"
_TICK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------- /proc helpers

def proc_stat(pid: int) -> Tuple[float, float, int]:
    """(user + system CPU seconds, system CPU seconds, minor page faults) of process
    *pid*, all threads, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK, int(fields[12]) / _TICK, int(fields[7])


def rss_bytes(pid: int) -> int:
    """Current VmRSS of process *pid* in bytes (0 if unknown)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pin_cpus(no_pin: bool) -> Tuple[Optional[int], Optional[int]]:
    """(server CPU, load CPU): the first two allowed CPUs, or (None, None)."""
    cpus = sorted(os.sched_getaffinity(0))
    if no_pin or len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]


# ---------------------------------------------------------------------- the server

class ServerProcess:
    """A server subprocess on a free 127.0.0.1 port; ``with`` starts it and always stops
    it (SIGTERM, then SIGKILL after 15 s, then wait). Raises RuntimeError if it does not
    come up within 60 s."""

    def __init__(self, cmd: Sequence[str], cpu: Optional[int] = None,
                 port_file: bool = True, port: int = 0,
                 env: Optional[Dict[str, str]] = None) -> None:
        self.cmd = list(cmd)
        self.extra_env = dict(env or {})
        self.cpu = cpu
        self.use_port_file = port_file
        self.port = port
        self.proc: Optional[subprocess.Popen] = None
        self._tmp: Optional[tempfile.TemporaryDirectory] = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> "ServerProcess":
        self._tmp = tempfile.TemporaryDirectory(prefix="morsock-bench-")
        log = open(os.path.join(self._tmp.name, "server.log"), "wb")
        cmd = list(self.cmd)
        port_path = os.path.join(self._tmp.name, "port")
        if self.use_port_file:
            cmd += ["--port", "0", "--port-file", port_path]
        else:
            cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.update(self.extra_env)
        cpu = self.cpu
        pre = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
        try:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, preexec_fn=pre)
        finally:
            log.close()
        try:
            self._wait_ready(port_path)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self, port_path: str) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + 60
        while True:
            if self.use_port_file:
                try:
                    with open(port_path) as fh:
                        self.port = int(fh.read())
                    return
                except (OSError, ValueError):
                    pass
            else:
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                        return
                except OSError:
                    pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {' '.join(self.cmd)}\n{self.log_tail()}")
            time.sleep(0.05)   # polling a condition with a deadline (no event to wait on)

    def log_tail(self) -> str:
        if self._tmp is None:
            return ""
        try:
            with open(os.path.join(self._tmp.name, "server.log"), "rb") as fh:
                return fh.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    def __exit__(self, *exc: Any) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        elif proc is not None:
            proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def morsock_cmd(profile: str, mode: str, threads: int) -> List[str]:
    """The CLI echo server; PLAIN = no key."""
    cmd = [sys.executable, "-m", "morsock", "server", "--host", "127.0.0.1",
           "--status", "off", "--threads", str(threads)]
    if profile != PLAIN:
        cmd += ["--key", KEY, "--mode", mode, "--key-size", str(KEY_BITS), "--profile", profile]
    return cmd


def raw_server_cmd(profile: str, mode: str, size: int, threads: int) -> List[str]:
    """A plaintext echo server (morsock, as the CLI's) whose handler also does the bare
    crypto work of one request (:func:`raw_work`, prebuilt inputs) before it answers."""
    return [sys.executable, str(Path(__file__).resolve()), "--serve-raw",
            f"{profile}/{mode}/{size}/{threads}", "--host", "127.0.0.1"]


def serve_raw(spec: str, host: str, port: int, port_file: str) -> None:
    """``--serve-raw PROFILE/MODE/SIZE/THREADS``: run the server of :func:`raw_server_cmd`
    until SIGTERM; its port goes to *port_file* (as the CLI's ``--port-file``)."""
    from morsock import Server
    from morsock.cli import _keep_freed_memory
    profile, mode, size, threads = spec.split("/")
    _keep_freed_memory()   # as the CLI server does
    work = raw_work(profile, mode, int(size))

    def echo(sender: Any, client: Any, data: bytes) -> bytes:
        work()
        return data

    server = Server(port, host, thread_pool_size=int(threads), on_handle_command=echo)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server.start()
    try:
        with open(port_file + ".tmp", "w") as fh:
            fh.write(f"{server.port}\n")
        os.replace(port_file + ".tmp", port_file)
        stop.wait()
    finally:
        server.stop()


# ---------------------------------------------------------------------- the load

class _Conn:
    __slots__ = ("sock", "buf", "out", "want_write", "session", "checked", "dead")

    def __init__(self, sock: socket.socket, session: Optional[AuthSession]) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.out = bytearray()
        self.want_write = False
        self.session = session
        self.checked = False
        self.dead = False


def _recv_frame(sock: socket.socket) -> Tuple[int, bytes]:
    """Read one whole frame from a blocking socket: (flag, payload)."""
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("server closed the connection during the handshake")
            data += chunk
        return data
    magic, size, flag = HEADER.unpack(exactly(HEADER_SIZE))
    if magic != MAGIC:
        raise ConnectionError("bad magic from the server")
    return flag, exactly(size)


def reply_size(profile: str, mode: str, size: int) -> Tuple[int, int]:
    """(flag, payload size) of the server's reply to a *size*-byte request."""
    if profile == PLAIN:
        return FLAG_PLAIN, size
    if profile == MORMOT:
        return FLAG_MORMOT, mormot_payload_size(size)
    return FLAG_AUTHENTICATED, authenticated_payload_size(mode, size)


def drive(port: int, server_pid: int, profile: str, mode: str, size: int, conns: int,
          depth: int, warmup: float, secs: float) -> Dict[str, float]:
    """Run one load against the server on *port*; return the measured figures.

    The measured window starts after *warmup* seconds and lasts *secs*; ``us_req`` is the
    server's CPU in the window divided by the replies in the window.
    """
    payload = os.urandom(size)
    cipher = MormotCipher(KEY, mode, KEY_BITS) if profile == MORMOT else None
    ring: List[bytes] = []
    if profile == PLAIN:
        ring = [encode_frame(payload)]
    elif cipher is not None:
        ring = [cipher.seal_frame(payload) for _ in range(64)]
    flag, rsize = reply_size(profile, mode, size)
    frame_len = HEADER_SIZE + rsize
    sel = selectors.DefaultSelector()
    clients: List[_Conn] = []
    errors = 0
    ring_pos = 0

    def requests(c: _Conn, n: int) -> None:
        nonlocal ring_pos
        if c.session is not None:
            seal = c.session.seal
            for _ in range(n):
                c.out += seal(payload)
            return
        for _ in range(n):
            c.out += ring[ring_pos]
            ring_pos = (ring_pos + 1) % len(ring)

    try:
        for _ in range(conns):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            session = None
            if profile == AUTH:
                try:
                    hs = ClientHandshake(KEY, mode, KEY_BITS)
                    sock.sendall(hs.hello_frame)
                    _, hello = _recv_frame(sock)
                    session = hs.finish(hello)
                except BaseException:
                    sock.close()
                    raise
            sock.setblocking(False)
            c = _Conn(sock, session)
            clients.append(c)
            sel.register(sock, selectors.EVENT_READ, c)
        replies = 0
        scratch = bytearray(512 * 1024)
        view = memoryview(scratch)

        def kill(c: _Conn) -> None:
            nonlocal errors
            errors += 1
            c.dead = True
            sel.unregister(c.sock)

        def flush(c: _Conn) -> None:
            if c.dead:
                return
            try:
                n = c.sock.send(c.out)
            except BlockingIOError:
                n = 0
            except OSError:
                kill(c)
                return
            if n:
                del c.out[:n]
            want = bool(c.out)
            if want != c.want_write:
                c.want_write = want
                sel.modify(c.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0), c)

        def check_first(c: _Conn, frame: bytes) -> bool:
            body = frame[HEADER_SIZE:]
            if c.session is not None:
                got = c.session.open(body)   # recv seq 0: the first reply only
            elif cipher is not None:
                got = cipher.decrypt(body)
            else:
                got = body
            return got == payload

        def on_read(c: _Conn) -> int:
            nonlocal errors
            while True:
                try:
                    n = c.sock.recv_into(scratch)
                except BlockingIOError:
                    break
                except OSError:
                    kill(c)
                    return 0
                if not n:      # the server closed it: never expected
                    kill(c)
                    return 0
                c.buf += view[:n]
                if n < len(scratch):
                    break
            buf = c.buf
            full = len(buf) // frame_len     # every reply has the same size
            if not full:
                return 0
            magic, length, fl = HEADER.unpack_from(buf, (full - 1) * frame_len)
            if magic != MAGIC or length != rsize or fl != flag:
                errors += 1
            if not c.checked:
                c.checked = True
                try:
                    ok = check_first(c, bytes(buf[:frame_len]))
                except Exception:   # noqa: BLE001 - a bad reply is counted, not raised
                    ok = False
                errors += not ok
            del buf[:full * frame_len]
            return full

        for c in clients:
            requests(c, depth)
            flush(c)
        start = time.monotonic()
        t_warm = start + warmup
        t_end = t_warm + secs
        measuring = False
        base = 0
        cpu0 = sys0 = lg0 = t0 = 0.0
        flt0 = 0
        while True:
            now = time.monotonic()
            if not measuring and now >= t_warm:
                measuring = True
                base, lg0, t0 = replies, time.process_time(), now
                cpu0, sys0, flt0 = proc_stat(server_pid)
            if now >= t_end:
                break
            for key, mask in sel.select(0.2):
                c = key.data
                if c.dead:
                    continue
                if mask & selectors.EVENT_READ:
                    got = on_read(c)
                    if got:
                        replies += got
                        requests(c, got)
                        flush(c)
                if mask & selectors.EVENT_WRITE and c.out:
                    flush(c)
        t1 = time.monotonic()
        (cpu1, sys1, flt1), lg1 = proc_stat(server_pid), time.process_time()
    finally:
        for c in clients:
            c.sock.close()
        sel.close()
    done = replies - base
    wall = max(t1 - t0, 1e-9)
    unchecked = sum(not c.checked for c in clients)   # connections that never got a reply
    return {"req_s": done / wall, "mb_s": done * size * 2 / wall / 1e6,
            "us_req": (cpu1 - cpu0) / max(done, 1) * 1e6,
            "sys_us_req": (sys1 - sys0) / max(done, 1) * 1e6,
            "flt_req": (flt1 - flt0) / max(done, 1),
            "srv_pct": (cpu1 - cpu0) / wall * 100, "lg_pct": (lg1 - lg0) / wall * 100,
            "errors": errors + unchecked, "replies": done}


#: glibc malloc settings that keep freed big buffers (freeing and re-faulting 64 KiB
#: buffers per request otherwise shows up as system time)
MALLOC_TUNE = {"MALLOC_TRIM_THRESHOLD_": "268435456", "MALLOC_MMAP_THRESHOLD_": "268435456"}


def measure(profile: str, mode: str, size: int, threads: int, conns: int, depth: int,
            warmup: float, secs: float, server_cpu: Optional[int],
            env: Optional[Dict[str, str]] = None, raw_in_handler: bool = False
            ) -> Dict[str, float]:
    """Start a fresh server (pinned to *server_cpu* unless None, *env* added to its
    environment), load it, stop it. *raw_in_handler*: the plaintext server of
    :func:`raw_server_cmd` doing *profile*/*mode*'s bare crypto, under a plaintext load."""
    cmd = (raw_server_cmd(profile, mode, size, threads) if raw_in_handler
           else morsock_cmd(profile, mode, threads))
    with ServerProcess(cmd, cpu=server_cpu, env=env) as srv:
        r = drive(srv.port, srv.pid, PLAIN if raw_in_handler else profile, mode, size, conns,
                  depth, warmup, secs)
        r["rss_mb"] = rss_bytes(srv.pid) / 1e6
    return r


# ---------------------------------------------------------------------- in-process crypto cost

def _median_time(fn: Callable[[], object], min_time: float, repeat: int) -> float:
    """Median seconds per call of *fn* over *repeat* runs of at least *min_time* each."""
    number = 1
    while True:
        t = time.perf_counter()
        for _ in range(number):
            fn()
        if time.perf_counter() - t >= min_time:
            break
        number *= 2
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter() - t) / number)
    return statistics.median(runs)


def _pad(data: bytes) -> bytes:
    n = 16 - len(data) % 16
    return data + bytes((n,)) * n


def raw_work(profile: str, mode: str, size: int) -> Callable[[], object]:
    """The bare per-request work of a server: decrypt one request, encrypt one reply."""
    pt = os.urandom(size)
    iv = os.urandom(16)
    if profile == MORMOT:
        key = mormot_key(KEY, KEY_BITS)
        if mode == "CBC":
            def new(): return AES.new(key, AES.MODE_CBC, iv=iv)
        elif mode == "CTR":
            def new(): return AES.new(key, AES.MODE_CTR, nonce=b"", initial_value=iv)
        else:   # MORMOT GCM = GCM's CTR keystream, no tag
            def new(): return AES.new(key, AES.MODE_CTR, nonce=iv[:12], initial_value=2)
        padded = _pad(pt)
        ct = new().encrypt(padded)

        def work() -> None:
            new().decrypt(ct)
            new().encrypt(padded)
        return work
    key = os.urandom(KEY_BITS // 8)
    mac_key = os.urandom(32)
    aad = os.urandom(16)
    if mode == "GCM":
        nonce = os.urandom(12)
        c = AES.new(key, AES.MODE_GCM, nonce=nonce)
        c.update(aad)
        ct, tag = c.encrypt_and_digest(pt)

        def work() -> None:
            d = AES.new(key, AES.MODE_GCM, nonce=nonce)
            d.update(aad)
            d.decrypt(ct)
            d.verify(tag)
            e = AES.new(key, AES.MODE_GCM, nonce=nonce)
            e.update(aad)
            e.encrypt(pt)
            e.digest()
        return work
    if mode == "CBC":
        def new(): return AES.new(key, AES.MODE_CBC, iv=iv)
        data = _pad(pt)
    else:
        def new(): return AES.new(key, AES.MODE_CTR, nonce=iv[:8], initial_value=0)
        data = pt
    ct = new().encrypt(data)
    mac_in = aad + iv + ct    # header || seq || iv || ciphertext, prebuilt

    def work() -> None:
        hmac.digest(mac_key, mac_in, "sha256")
        new().decrypt(ct)
        new().encrypt(data)
        hmac.digest(mac_key, mac_in, "sha256")
    return work


def lib_work(profile: str, mode: str, size: int
             ) -> Tuple[Callable[[], None], Callable[[], None], int]:
    """The same work through morsock.crypto: ``(prepare, run, n)``; ``run()`` opens *n*
    requests and seals *n* replies; ``prepare()`` (not timed) makes its inputs.

    MORMOT: ``MormotCipher.decrypt`` + ``seal_frame`` of one ciphertext, n = 1.
    AUTHENTICATED: a server-side ``AuthSession`` opens frames a client-side session
    sealed beforehand (in order, as on a connection) and seals its replies, n = 256.
    """
    pt = os.urandom(size)
    if profile == MORMOT:
        cipher = MormotCipher(KEY, mode, KEY_BITS)
        body = cipher.encrypt(pt)

        def run_one() -> None:
            cipher.seal_frame(cipher.decrypt(body))
        return (lambda: None), run_one, 1
    hs = ClientHandshake(KEY, mode, KEY_BITS)
    reply, server = server_handshake(KEY, mode, KEY_BITS, hs.hello_frame[HEADER_SIZE:])
    client = hs.finish(reply[HEADER_SIZE:])
    batch: List[bytes] = []

    def prepare() -> None:
        batch[:] = [client.seal(pt)[HEADER_SIZE:] for _ in range(256)]

    def run() -> None:
        for body in batch:
            server.seal(server.open(body))
    return prepare, run, 256


def crypto_costs(scenarios: Sequence[Tuple[str, str, int]], min_time: float = 0.05,
                 repeat: int = 5) -> Dict[Tuple[str, str, int], Tuple[float, float]]:
    """{(profile, mode, size): (raw us, lib us)} per request, timed in this process
    (medians of *repeat* runs of at least *min_time* seconds)."""
    out = {}
    for profile, mode, size in scenarios:
        raw = _median_time(raw_work(profile, mode, size), min_time, repeat)
        prepare, run, n = lib_work(profile, mode, size)
        if n == 1:
            lib = _median_time(run, min_time, repeat)
        else:
            runs = []
            for _ in range(repeat):
                total, count = 0.0, 0
                while total < min_time:
                    prepare()
                    t = time.perf_counter()
                    run()
                    total += time.perf_counter() - t
                    count += n
                runs.append(total / count)
            lib = statistics.median(runs)
        out[(profile, mode, size)] = (raw * 1e6, lib * 1e6)
    return out


def _count_calls(fn: Callable[[], object], secs: float, stop_at: Optional[float] = None) -> int:
    """Calls of *fn* completed in *secs* seconds (or until the monotonic time *stop_at*)."""
    end = stop_at if stop_at is not None else time.monotonic() + secs
    n = 0
    while time.monotonic() < end:
        fn()
        n += 1
    return n


def ceiling_worker(profile: str, mode: str, size: int, secs: float) -> None:
    """``--ceiling-worker``: print how many raw requests this process does in *secs*."""
    fn = raw_work(profile, mode, size)
    fn()
    print(_count_calls(fn, secs) / secs, flush=True)


def machine_ceiling(profile: str, mode: str, size: int, secs: float = 1.0
                    ) -> Tuple[float, float]:
    """How much faster 2 workers do the raw crypto of a request than 1, on this machine:
    (2 processes / 1 process, 2 threads / 1 thread in one process).

    Processes show what the CPUs allow (2.0 on two free cores; less when the VM's vCPUs
    share a physical core or the host is busy); threads add the GIL and pycryptodome's
    own locking. The parallel gain of a server cannot exceed these.
    """
    cmd = [sys.executable, __file__, "--ceiling-worker", profile, mode, str(size), str(secs)]

    def procs(n: int) -> float:
        ps = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(n)]
        total = 0.0
        try:
            for p in ps:
                out, _ = p.communicate(timeout=secs + 60)
                total += float(out.strip() or 0)
        finally:
            for p in ps:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        return total

    def threads(n: int) -> float:
        fns = [raw_work(profile, mode, size) for _ in range(n)]
        counts = [0] * n
        stop_at = time.monotonic() + secs

        def one(i: int) -> None:
            counts[i] = _count_calls(fns[i], secs, stop_at)
        ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return sum(counts) / secs

    p1, p2 = procs(1), procs(2)
    t1, t2 = threads(1), threads(2)
    return p2 / max(p1, 1e-9), t2 / max(t1, 1e-9)


def wakeup_round_trip(count: int = 500) -> float:
    """Median microseconds for one Python thread to wake another and be woken back
    (``threading.Event`` ping-pong, threads not pinned).

    A pycryptodome call releases the GIL for as long as it runs; another thread gains
    from that only if it wakes up and takes the GIL within that time. On a VM whose
    cross-CPU wake-ups are slow, calls shorter than about half this round trip (CTR or
    GHASH over 64 KiB: 16-18 us here) give other threads nothing to do in parallel.
    """
    ping, pong = threading.Event(), threading.Event()

    def echo() -> None:
        for _ in range(count):
            if not ping.wait(5):
                return
            ping.clear()
            pong.set()
    t = threading.Thread(target=echo, daemon=True)
    t.start()
    times = []
    try:
        for _ in range(count):
            start = time.perf_counter()
            ping.set()
            if not pong.wait(5):
                break
            pong.clear()
            times.append(time.perf_counter() - start)
    finally:
        t.join(10)
    return statistics.median(times) * 1e6 if times else float("nan")


# ---------------------------------------------------------------------- reporting

def size_label(size: int) -> str:
    if size >= 1 << 20 and size % (1 << 20) == 0:
        return f"{size >> 20} MiB"
    if size >= 1024 and size % 1024 == 0:
        return f"{size >> 10} KiB"
    return f"{size} B"


def med(runs: List[Dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def env_line() -> str:
    import platform
    return (f"{time.strftime('%Y-%m-%d %H:%M')} {platform.node()} cpus={os.cpu_count()} "
            f"Python {platform.python_version()} pycryptodome {CRYPTO_VERSION}")


def _timed_on(cpu: Optional[int], back: Optional[int], key: Tuple[str, str, int]
              ) -> Tuple[float, float]:
    """(raw us, lib us) of *key*, timed in this process on *cpu* (the server's CPU, idle
    at that moment), then moved back to *back*."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        return crypto_costs([key], min_time=0.04, repeat=3)[key]
    finally:
        if back is not None:
            os.sched_setaffinity(0, {back})


def run_cost(args: argparse.Namespace, server_cpu: Optional[int], load_cpu: Optional[int]
             ) -> Dict[Tuple[str, str, int], List[Dict[str, float]]]:
    """Part 1: every scenario once per round; the raw and lib costs of each encrypted
    scenario are timed right before and right after its server run (on the server's CPU),
    and the ratio is computed against the plaintext echo of the same round."""
    scen: List[Tuple[str, str, int]] = [(PLAIN, "-", s) for s in args.sizes]
    scen += [(p, m, s) for s in args.sizes for p in args.profiles for m in args.modes]
    results: Dict[Tuple[str, str, int], List[Dict[str, float]]] = {k: [] for k in scen}
    print("\n== part 1: cost per request" + (
        f" (server pinned to CPU {server_cpu}, load to CPU {load_cpu})"
        if server_cpu is not None else " (not pinned)"), flush=True)
    for rnd in range(args.rounds):
        for size in args.sizes:
            group = [k for k in scen if k[2] == size]
            if rnd % 2:
                group = group[::-1]
            plain_runs: List[Dict[str, float]] = []
            pending: List[Dict[str, float]] = []
            for key in group:
                profile, mode, _ = key
                conns, depth = LOAD_SHAPE.get(size, (8, 2))
                before = _timed_on(server_cpu, load_cpu, key) if profile != PLAIN else (0.0, 0.0)
                r = measure(profile, mode, size, args.threads, conns, depth, args.warmup,
                            args.secs, server_cpu, args.env)
                after = _timed_on(server_cpu, load_cpu, key) if profile != PLAIN else (0.0, 0.0)
                r["raw_us"] = (before[0] + after[0]) / 2
                r["lib_us"] = (before[1] + after[1]) / 2
                if profile != PLAIN:  # the same bare crypto, done by a plaintext server
                    raw_srv = measure(profile, mode, size, args.threads, conns, depth,
                                      args.warmup, args.secs, server_cpu, args.env,
                                      raw_in_handler=True)
                    r["raw_srv_req"] = raw_srv["us_req"]
                    r["errors"] += raw_srv["errors"]
                results[key].append(r)
                (plain_runs if profile == PLAIN else pending).append(r)
                print(f"  round {rnd + 1} {size_label(size):>6} {profile:13} {mode:3} "
                      f"{r['req_s']:8.0f} req/s {r['us_req']:7.1f} us/req srv {r['srv_pct']:4.0f}% "
                      f"lg {r['lg_pct']:4.0f}% raw {r['raw_us']:6.1f} us"
                      + (f" raw in server {r['raw_srv_req']:6.1f} us/req" if 'raw_srv_req' in r
                         else "") + f" err {r['errors']}", flush=True)
            base = plain_runs[0]["us_req"]
            for r in pending:   # against the plaintext echo of the same round
                r["extra_us"] = r["us_req"] - base
                r["ratio"] = r["extra_us"] / r["raw_us"]
                r["srv_lib"] = r["extra_us"] / r["lib_us"]
                r["raw_srv_us"] = r["raw_srv_req"] - base
                r["ratio_srv"] = r["extra_us"] / r["raw_srv_us"]
    return results


def print_cost(args: argparse.Namespace, results: Dict) -> int:
    print(f"\nper-request cost, medians of {args.rounds} round(s) x {args.secs:g} s; "
          f"thread_pool_size {args.threads}; crypto = us/req - plaintext us/req (same round); "
          "ratio = crypto / raw us (target <= 1.2); srv/lib = crypto / lib us; "
          "raw srv = us/req of a plaintext echo whose handler does the raw work, minus "
          "plaintext us/req (same load, same round); @srv = crypto / raw srv; "
          "sys = system CPU us/req; flt = minor page faults per request")
    hdr = (f"{'size':>6} {'profile':13} {'mode':4} {'load':>5} {'req/s':>8} {'MB/s':>7} "
           f"{'us/req':>7} {'crypto':>7} {'raw us':>7} {'lib us':>7} {'ratio':>6} "
           f"{'srv/lib':>7} {'raw srv':>7} {'@srv':>5} "
           f"{'sys':>5} {'flt':>5} {'srv%':>5} {'lg%':>5} {'err':>4}")
    print(hdr)
    status = 0
    worst = worst_srv = 0.0
    for size in args.sizes:
        conns, depth = LOAD_SHAPE.get(size, (8, 2))
        shape = f"{conns}x{depth}"
        for key, runs in results.items():
            if key[2] != size:
                continue
            profile, mode, _ = key
            errs = sum(int(r["errors"]) for r in runs)
            status |= errs > 0
            cells = ["-"] * 7
            if profile != PLAIN:
                ratio = med(runs, "ratio")
                worst = max(worst, ratio)
                worst_srv = max(worst_srv, med(runs, "ratio_srv"))
                cells = [f"{med(runs, 'extra_us'):.1f}", f"{med(runs, 'raw_us'):.1f}",
                         f"{med(runs, 'lib_us'):.1f}", f"{ratio:.2f}",
                         f"{med(runs, 'srv_lib'):.2f}", f"{med(runs, 'raw_srv_us'):.1f}",
                         f"{med(runs, 'ratio_srv'):.2f}"]
            print(f"{size_label(size):>6} {profile:13} {mode:4} {shape:>5} "
                  f"{med(runs, 'req_s'):8.0f} {med(runs, 'mb_s'):7.1f} {med(runs, 'us_req'):7.1f} "
                  f"{cells[0]:>7} {cells[1]:>7} {cells[2]:>7} {cells[3]:>6} {cells[4]:>7} "
                  f"{cells[5]:>7} {cells[6]:>5} "
                  f"{med(runs, 'sys_us_req'):5.1f} {med(runs, 'flt_req'):5.1f} "
                  f"{med(runs, 'srv_pct'):5.0f} {med(runs, 'lg_pct'):5.0f} {errs:4d}")
    print(f"worst ratio: {worst:.2f} ({'within' if worst <= 1.2 else 'ABOVE'} the 1.2 target)")
    print(f"worst @srv (against the same raw work done by a server under the same load): "
          f"{worst_srv:.2f}")
    if any(m == "CBC" for m in args.modes) and any(s >= 16384 for s in args.sizes):
        print("note: pycryptodome's CBC decryption of big buffers runs at one of two speeds "
              "chosen per process (address layout) on some CPUs, so big-CBC ratios swing "
              "between runs; see benchmarks/README.rst")
    return status


def run_parallel(args: argparse.Namespace) -> Dict[Tuple[str, str, int], List[Dict[str, float]]]:
    size = args.parallel_size
    print(f"\n== part 2: parallel gain, {size_label(size)} messages, {args.parallel_conns} "
          f"connections x depth {args.parallel_depth}, server not pinned", flush=True)
    keys = [(p, m, t) for p, m in args.parallel for t in args.thread_counts]
    results: Dict[Tuple[str, str, int], List[Dict[str, float]]] = {k: [] for k in keys}
    args.ceilings = {}
    args.wakeups = []
    for rnd in range(args.rounds):
        args.wakeups.append(wakeup_round_trip())
        print(f"  round {rnd + 1} thread wake-up round trip (Event ping-pong, median): "
              f"{args.wakeups[-1]:.1f} us", flush=True)
        for profile, mode in args.parallel:
            ceiling = machine_ceiling(profile, mode, size)
            args.ceilings.setdefault((profile, mode), []).append(ceiling)
            print(f"  round {rnd + 1} {profile:13} {mode:3} raw crypto, 2 workers / 1: "
                  f"processes x{ceiling[0]:.2f}, threads x{ceiling[1]:.2f}", flush=True)
        for key in (keys if rnd % 2 == 0 else keys[::-1]):
            profile, mode, threads = key
            r = measure(profile, mode, size, threads, args.parallel_conns, args.parallel_depth,
                        args.warmup, args.secs, None, args.env)
            results[key].append(r)
            print(f"  round {rnd + 1} {profile:13} {mode:3} threads {threads} "
                  f"{r['mb_s']:7.1f} MB/s {r['us_req']:7.1f} us/req srv {r['srv_pct']:4.0f}% "
                  f"lg {r['lg_pct']:4.0f}% err {r['errors']}", flush=True)
    return results


def print_parallel(args: argparse.Namespace, results: Dict) -> int:
    print(f"\nparallel gain, {size_label(args.parallel_size)} messages, medians of "
          f"{args.rounds} round(s); gain = MB/s / MB/s with 1 thread; ceiling = the raw "
          "crypto of a request done by 2 processes (threads) / by 1, on this machine; "
          "cpu room = the machine's CPUs / (srv% + lg%) with 1 thread, the most any "
          "server could gain while the load generator takes its share")
    print(f"thread wake-up round trip (median of rounds): "
          f"{statistics.median(args.wakeups):.1f} us")
    print(f"{'profile':13} {'mode':4} {'threads':>7} {'req/s':>8} {'MB/s':>8} {'gain':>5} "
          f"{'us/req':>7} {'srv%':>5} {'lg%':>5} {'err':>4}")
    status = 0
    for profile, mode in args.parallel:
        one = None
        for threads in args.thread_counts:
            runs = results[(profile, mode, threads)]
            errs = sum(int(r["errors"]) for r in runs)
            status |= errs > 0
            mb = med(runs, "mb_s")
            one = one if one is not None else mb
            print(f"{profile:13} {mode:4} {threads:7d} {med(runs, 'req_s'):8.0f} {mb:8.1f} "
                  f"{mb / one:5.2f} {med(runs, 'us_req'):7.1f} {med(runs, 'srv_pct'):5.0f} "
                  f"{med(runs, 'lg_pct'):5.0f} {errs:4d}")
        ceil = args.ceilings.get((profile, mode))
        if ceil:
            by_procs = statistics.median(c[0] for c in ceil)
            by_threads = statistics.median(c[1] for c in ceil)
            print(f"{'':13} {'':4} ceiling: processes x{by_procs:.2f}, threads x{by_threads:.2f}")
        if 1 in args.thread_counts:
            runs = results[(profile, mode, 1)]
            busy = med(runs, "srv_pct") + med(runs, "lg_pct")
            cpus = len(os.sched_getaffinity(0))
            print(f"{'':13} {'':4} cpu room: x{cpus * 100 / max(busy, 1e-9):.2f} "
                  f"({cpus} CPUs / {busy:.0f}% busy with 1 thread)")
    return status


def _csv(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds (1; use 3+)")
    ap.add_argument("--secs", type=float, default=2.0, help="measured seconds per run (2)")
    ap.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per run (0.5)")
    ap.add_argument("--threads", type=int, default=4,
                    help="server thread_pool_size in part 1 (4, the default of the CLI)")
    ap.add_argument("--sizes", default="64,65536", help="payload sizes of part 1 (64,65536)")
    ap.add_argument("--modes", default=",".join(MODES), help="AES modes of part 1 (CBC,CTR,GCM)")
    ap.add_argument("--profiles", default=",".join(PROFILES),
                    help="profiles of part 1 (MORMOT,AUTHENTICATED)")
    ap.add_argument("--parallel", default=PARALLEL_DEFAULT,
                    help=f"PROFILE/MODE list of part 2 ({PARALLEL_DEFAULT}); '' skips it")
    ap.add_argument("--thread-counts", default="1,2,4", help="part 2 thread_pool_size (1,2,4)")
    ap.add_argument("--parallel-size", type=int, default=64 * 1024, help="part 2 payload (65536)")
    ap.add_argument("--parallel-conns", type=int, default=8, help="part 2 connections (8)")
    ap.add_argument("--parallel-depth", type=int, default=2, help="part 2 frames in flight (2)")
    ap.add_argument("--skip-cost", action="store_true", help="only part 2")
    ap.add_argument("--no-pin", action="store_true", help="part 1: do not pin server and load")
    ap.add_argument("--malloc-tune", action="store_true",
                    help="run the servers with MALLOC_TRIM_THRESHOLD_ and MALLOC_MMAP_THRESHOLD_ "
                         "= 256 MiB (glibc keeps freed buffers: fewer page faults on big frames)")
    ap.add_argument("--json", help="also write the raw results to this file")
    ap.add_argument("--ceiling-worker", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--serve-raw", help=argparse.SUPPRESS)   # see raw_server_cmd
    ap.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port-file", help=argparse.SUPPRESS)
    return ap


def main() -> int:
    args = build_parser().parse_args()
    if args.ceiling_worker:
        profile, mode, size, secs = args.ceiling_worker
        ceiling_worker(profile, mode, int(size), float(secs))
        return 0
    if args.serve_raw:
        serve_raw(args.serve_raw, args.host, args.port, args.port_file)
        return 0
    args.sizes = [int(s) for s in _csv(args.sizes)]
    args.modes = [AESMode.parse(m).name for m in _csv(args.modes)]
    args.profiles = [p.upper() for p in _csv(args.profiles)]
    args.parallel = [tuple(x.upper().split("/")) for x in _csv(args.parallel)]
    args.thread_counts = [int(t) for t in _csv(args.thread_counts)]
    for p in args.profiles + [p for p, _ in args.parallel]:
        if p not in PROFILES:
            raise SystemExit(f"unknown profile {p!r}")
    server_cpu, load_cpu = pin_cpus(args.no_pin)
    args.env = MALLOC_TUNE if args.malloc_tune else None
    print(f"# {env_line()}{'; server malloc tuned' if args.malloc_tune else ''}; pinned: "
          + ("no" if server_cpu is None else f"server CPU {server_cpu}, load CPU {load_cpu}"),
          flush=True)
    status = 0
    dump: Dict[str, Any] = {"env": env_line(), "args": dict(vars(args))}
    allowed = os.sched_getaffinity(0)
    try:
        if not args.skip_cost:
            if load_cpu is not None:
                os.sched_setaffinity(0, {load_cpu})
            results = run_cost(args, server_cpu, load_cpu)
            os.sched_setaffinity(0, allowed)
            status |= print_cost(args, results)
            dump["cost"] = {"/".join(map(str, k)): v for k, v in results.items()}
        if args.parallel:
            par = run_parallel(args)
            status |= print_parallel(args, par)
            dump["parallel"] = {"/".join(map(str, k)): v for k, v in par.items()}
            dump["ceilings"] = {"/".join(k): v for k, v in args.ceilings.items()}
            dump["wakeup_round_trip_us"] = args.wakeups
    finally:
        os.sched_setaffinity(0, allowed)
    if args.json:
        Path(args.json).write_text(json.dumps(dump, indent=1, default=str))
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
