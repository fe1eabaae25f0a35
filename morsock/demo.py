"""``python -m morsock demo``: a self-contained tour of the features on 127.0.0.1.

Starts servers and clients in this process, on free ports, and walks through plain echo,
encrypted echo in both profiles, broadcast, a forced disconnect with automatic
reconnection, requests from several threads and the final statistics. One report line
per step (OK or FAILED), then a summary; the exit code is 0 only when every step passed.
Everything started is stopped and joined before :func:`run_demo` returns.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from typing import Any, Callable, TextIO

from . import __version__
from .client import Client
from .enums import AESMode, EncryptionProfile, ReconnectStrategy
from .errors import ConnectError
from .server import Server, ServerClient

__all__ = ["run_demo"]

KEY = "demo passphrase"
WAIT = 10.0  # seconds: the bound of every wait; a healthy run needs a fraction of it


def _silent_logger() -> logging.Logger:
    """A logger for components whose errors the demo provokes on purpose."""
    log = logging.getLogger("morsock.demo.expected")
    log.propagate = False
    if not log.handlers:
        log.addHandler(logging.NullHandler())
    return log


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll *predicate* until true; AssertionError naming *what* after *timeout* s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)  # polling a condition with a deadline


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


class _Tour:
    """The steps, sharing one echo server and the counts the statistics step checks."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.stack = stack
        self.server = self.start_server()
        self.clients: list[Client] = []
        self.expected_in = 0       # messages the main server must have received
        self.expected_out = 0      # messages it must have sent
        self.expected_connections = 0

    # -- helpers ----------------------------------------------------------------------------
    @staticmethod
    def handler(server: Server, client: ServerClient, data: bytes) -> bytes:
        if data == b"/whoami":
            return str(client.handle).encode()
        return b"Echo: " + data

    def start_server(self, **settings: Any) -> Server:
        server = Server(0, "127.0.0.1", on_handle_command=self.handler, **settings)
        server.start()
        self.stack.callback(server.stop)
        return server

    def client(self, server: Server, **settings: Any) -> Client:
        client = Client("127.0.0.1", server.port, connection_timeout=WAIT, **settings)
        self.stack.callback(client.disconnect)
        client.connect()
        if server is self.server:
            self.clients.append(client)
            self.expected_connections += 1
        return client

    def request(self, client: Client, data: bytes, **kwargs: Any) -> bytes:
        reply = client.request(data, timeout=WAIT, **kwargs)
        if client.port == self.server.port:
            self.expected_in += 1
            self.expected_out += 1
        return reply

    # -- steps ------------------------------------------------------------------------------
    def plain_echo(self) -> str:
        client = self.client(self.server)
        started = time.perf_counter()
        reply = self.request(client, b"Hello morsock")
        elapsed = (time.perf_counter() - started) * 1000
        _check(reply == b"Echo: Hello morsock", f"unexpected reply {reply!r}")
        return f"'Hello morsock' -> {reply.decode()!r} in {elapsed:.1f} ms"

    def encrypted_echo(self, profile: EncryptionProfile, mode: AESMode) -> str:
        quiet = _silent_logger()
        server = self.start_server(encryption_key=KEY, encryption_mode=mode,
                                   encryption_profile=profile, logger=quiet)
        client = self.client(server, encryption_key=KEY, encryption_mode=mode,
                             encryption_profile=profile)
        reply = self.request(client, b"secret message", encrypted=True)
        _check(reply == b"Echo: secret message", f"unexpected reply {reply!r}")
        _check(client.encryption_info == server.encryption_info,
               f"{client.encryption_info} != {server.encryption_info}")
        detail = f"{server.encryption_info}"
        if profile is EncryptionProfile.AUTHENTICATED:
            intruder = Client("127.0.0.1", server.port, connection_timeout=WAIT,
                              encryption_key="wrong " + KEY, encryption_mode=mode,
                              encryption_profile=profile, logger=quiet)
            try:
                intruder.connect()
                refused = False
            except ConnectError:
                refused = True
            finally:
                intruder.disconnect()
            _check(refused, "a client with the wrong key was accepted")
            detail += "; a client with a wrong key is refused"
        else:
            detail += ", the Delphi components' format"
        return detail

    def broadcast(self) -> str:
        received: dict[int, bytes] = {}
        lock = threading.Lock()
        all_in = threading.Event()
        listeners = 3

        def on_message(index: int) -> Callable[[Client, bytes], None]:
            def handler(sender: Client, data: bytes) -> None:
                with lock:
                    received[index] = data
                    if len(received) == listeners:
                        all_in.set()
            return handler

        for i in range(listeners):
            self.client(self.server, on_handle_command=on_message(i))
        connected = len(self.clients)
        _wait_for(lambda: self.server.client_count == connected, "the server to see everyone")
        queued = self.server.broadcast_data(b"Hello everybody")
        self.expected_out += queued
        _check(queued == connected, f"queued for {queued} clients, {connected} connected")
        _check(all_in.wait(WAIT), f"only {len(received)} of {listeners} listeners got it")
        _check(set(received.values()) == {b"Hello everybody"}, f"got {received!r}")
        earlier = queued - listeners
        return (f"broadcast to all {queued} connected clients ({earlier} from the earlier "
                f"steps + {listeners} new); each of the {listeners} new ones received it")

    def reconnect(self) -> str:
        connects: list[float] = []
        disconnected = threading.Event()
        reconnected = threading.Event()

        def on_connect(sender: Client) -> None:
            connects.append(time.monotonic())
            if len(connects) == 2:
                reconnected.set()

        client = self.client(self.server, auto_reconnect=True,
                             reconnect_strategy=ReconnectStrategy.IMMEDIATE,
                             on_connect=on_connect,
                             on_disconnect=lambda sender: disconnected.set())
        old = int(self.request(client, b"/whoami"))
        dropped_at = time.monotonic()
        _check(self.server.disconnect_client(old), f"client #{old} not found")
        _check(disconnected.wait(WAIT), "the client did not notice the disconnect")
        _check(reconnected.wait(WAIT), "the client did not reconnect")
        self.expected_connections += 1
        new = int(self.request(client, b"/whoami"))
        _check(new != old, "same handle after reconnecting")
        reply = self.request(client, b"still here")
        _check(reply == b"Echo: still here", f"unexpected reply {reply!r}")
        delay = (connects[1] - dropped_at) * 1000
        return f"#{old} dropped by the server, back as #{new} in {delay:.0f} ms, echoing"

    def threaded_requests(self, threads: int = 8, per_thread: int = 25) -> str:
        client = self.client(self.server)
        errors: list[str] = []
        lock = threading.Lock()

        def worker(index: int) -> None:
            try:
                for n in range(per_thread):
                    payload = f"thread {index} request {n}".encode()
                    reply = client.request(payload, timeout=WAIT)
                    if reply != b"Echo: " + payload:
                        raise AssertionError(f"{payload!r} got {reply!r}")
            except Exception as exc:
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")

        workers = [threading.Thread(target=worker, args=(i,), name=f"demo-requester-{i}")
                   for i in range(threads)]
        started = time.perf_counter()
        for t in workers:
            t.start()
        for t in workers:
            t.join(WAIT * 3)
        elapsed = time.perf_counter() - started
        _check(not any(t.is_alive() for t in workers), "a requesting thread is stuck")
        total = threads * per_thread
        self.expected_in += total
        self.expected_out += total
        _check(not errors, f"{len(errors)} errors, first: {errors[:1]}")
        return f"{total}/{total} replies matched their request ({total / elapsed:,.0f} req/s)"

    def statistics(self) -> str:
        server = self.server
        for client in self.clients:
            client.disconnect()
        _wait_for(lambda: server.client_count == 0, "every client to be gone")
        sent_by_clients = sum(c.total_bytes_sent for c in self.clients)
        received_by_clients = sum(c.total_bytes_received for c in self.clients)
        checks: list[tuple[str, int, int]] = [
            ("connections", server.total_connections, self.expected_connections),
            ("messages in", server.total_messages_received, self.expected_in),
            ("messages out", server.total_messages_sent, self.expected_out),
            ("bytes in", server.total_bytes_received, sent_by_clients),
            ("bytes out", server.total_bytes_sent, received_by_clients),
        ]
        wrong = [f"{name} {got} != {want}" for name, got, want in checks if got != want]
        _check(not wrong, "; ".join(wrong))
        return (f"{server.total_connections} connections, msg in/out "
                f"{server.total_messages_received}/{server.total_messages_sent}, bytes in/out "
                f"{server.total_bytes_received:,}/{server.total_bytes_sent:,}: exact")


def run_demo(quiet: bool = False, out: TextIO | None = None) -> int:
    """Run the tour, write the report to *out* (default stdout); return the exit code."""
    out = out if out is not None else sys.stdout
    started = time.monotonic()
    results: list[tuple[str, bool, str]] = []

    def say(text: str) -> None:
        if not quiet:
            print(text, file=out, flush=True)

    with contextlib.ExitStack() as stack:
        tour = _Tour(stack)
        say(f"morsock {__version__} demo: echo server on 127.0.0.1:{tour.server.port}")
        steps: list[tuple[str, Callable[[], str]]] = [
            ("plain echo", tour.plain_echo),
            ("encrypted echo, AUTHENTICATED",
             lambda: tour.encrypted_echo(EncryptionProfile.AUTHENTICATED, AESMode.GCM)),
            ("encrypted echo, MORMOT",
             lambda: tour.encrypted_echo(EncryptionProfile.MORMOT, AESMode.CBC)),
            ("broadcast", tour.broadcast),
            ("forced disconnect, reconnect", tour.reconnect),
            ("requests from 8 threads", tour.threaded_requests),
            ("final statistics", tour.statistics),
        ]
        for number, (title, step) in enumerate(steps, 1):
            try:
                detail, ok = step(), True
            except Exception as exc:
                detail, ok = f"{type(exc).__name__}: {exc}", False
            results.append((title, ok, detail))
            label = f"{number}. {title} ".ljust(34, ".")
            say(f"{label} {'OK' if ok else 'FAILED'}  {detail}")
    failed = sum(1 for _, ok, _ in results if not ok)
    elapsed = time.monotonic() - started
    if failed:
        verdict = f"morsock demo: {failed} of {len(results)} steps FAILED ({elapsed:.1f} s)"
    else:
        verdict = f"morsock demo: all {len(results)} steps OK ({elapsed:.1f} s)"
    print(verdict, file=out, flush=True)
    return 1 if failed else 0
