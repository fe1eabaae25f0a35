"""Command line: ``python -m morsock server|client|demo`` (API.md §8).

* ``server`` -- an echo server (payload sent back unchanged, or prefixed with
  ``--prefix``) until SIGINT/SIGTERM, then a clean stop. On a terminal, a one-line live
  status goes to stderr.
* ``client`` -- connect, send each argument (or each stdin line), print each reply.
* ``demo`` -- a self-contained tour on 127.0.0.1 that prints a report; exit 0 on success.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import ssl
import sys
import threading
import time
from typing import Any, Callable

from . import __version__
from .client import Client
from .enums import AESMode, EncryptionProfile, KeySize
from .errors import MorsockError
from .server import Server


def _add_crypto_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("encryption")
    group.add_argument("--key", default="", help="encryption key text (default: none)")
    group.add_argument("--mode", default="CBC", type=AESMode.parse,
                       help="AES mode: " + ", ".join(m.name for m in AESMode) + " (default CBC)")
    group.add_argument("--key-size", default=256, type=KeySize.parse,
                       help="128, 192 or 256 (default 256)")
    group.add_argument("--profile", default="AUTHENTICATED", type=EncryptionProfile.parse,
                       help="AUTHENTICATED (default) or MORMOT (Delphi-compatible)")


def _add_tls_args(parser: argparse.ArgumentParser, server: bool) -> None:
    group = parser.add_argument_group("TLS")
    if server:
        group.add_argument("--certfile", help="PEM certificate (chain) of this server: "
                                              "turns TLS on")
        group.add_argument("--keyfile", help="PEM private key (default: inside --certfile)")
        group.add_argument("--cafile", help="PEM CA certificate(s) that sign client "
                                            "certificates (verified when presented)")
        group.add_argument("--require-client-cert", action="store_true",
                           help="refuse clients without a certificate signed by --cafile")
    else:
        group.add_argument("--tls", action="store_true",
                           help="connect with TLS, trusting the system CAs")
        group.add_argument("--cafile", help="PEM CA certificate(s) to trust for the server "
                                            "(implies --tls)")
        group.add_argument("--certfile", help="PEM client certificate for mutual TLS "
                                              "(implies --tls)")
        group.add_argument("--keyfile", help="PEM private key (default: inside --certfile)")
        group.add_argument("--server-hostname",
                           help="name the server certificate must match (default: --host)")


def _tls_context(args: argparse.Namespace, server: bool) -> ssl.SSLContext | None:
    """The ``ssl.SSLContext`` the TLS flags ask for (None: no TLS). Raises ValueError
    for inconsistent flags, OSError / ssl.SSLError for unreadable or bad files."""
    if server:
        if not args.certfile:
            if args.keyfile or args.cafile or args.require_client_cert:
                raise ValueError("--keyfile, --cafile and --require-client-cert need --certfile")
            return None
        if args.require_client_cert and not args.cafile:
            raise ValueError("--require-client-cert needs --cafile (the CA of the client "
                             "certificates)")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.certfile, args.keyfile or None)
        if args.cafile:
            ctx.load_verify_locations(args.cafile)
            ctx.verify_mode = ssl.CERT_REQUIRED if args.require_client_cert else ssl.CERT_OPTIONAL
        return ctx
    if not (args.tls or args.cafile or args.certfile):
        if args.keyfile:
            raise ValueError("--keyfile needs --certfile")
        return None
    ctx = ssl.create_default_context(cafile=args.cafile or None)
    if args.certfile:
        ctx.load_cert_chain(args.certfile, args.keyfile or None)
    return ctx


def _add_metrics_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("metrics (needs: pip install 'morsock[metrics]')")
    group.add_argument("--metrics-port", type=int, metavar="P",
                       help="serve Prometheus metrics at http://127.0.0.1:P/metrics "
                            "(0: a free port; the address is printed on stderr)")
    group.add_argument("--metrics-host", default="127.0.0.1", metavar="H",
                       help="address of the metrics endpoint (default 127.0.0.1)")


def _serve_metrics(server: Server, args: argparse.Namespace) -> Callable[[], None] | None:
    """With ``--metrics-port``: register *server* in prometheus_client's default registry
    and serve it over HTTP on a thread of its own; returns the function that stops that
    thread and unregisters (None without the flag). Raises ImportError without the
    extra, OSError when the address cannot be bound."""
    if args.metrics_port is None:
        return None
    from prometheus_client import start_http_server

    from .metrics import register
    registration = register(server)
    try:
        httpd, thread = start_http_server(args.metrics_port, args.metrics_host)
    except BaseException:
        registration.unregister()
        raise
    host = args.metrics_host if ":" not in args.metrics_host else f"[{args.metrics_host}]"
    print(f"metrics at http://{host}:{httpd.server_port}/metrics", file=sys.stderr, flush=True)

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)
        registration.unregister()
    return stop


# -- cluster: --redis, --processes (API.md §11) -------------------------------------------
#: Set by the parent of ``--processes N`` for each worker it starts:
#: ``"<index>:<parent pid>:<port>:<port file>"``.
_WORKER_ENV = "MORSOCK_CLUSTER_WORKER"


def _add_cluster_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cluster (--redis needs: pip install 'morsock[redis]')")
    group.add_argument("--redis", metavar="URL",
                       help="join the cluster of the servers sharing this Redis "
                            "(redis://host:port/db): broadcasts and counts cover them all")
    group.add_argument("--redis-channel", default="morsock", metavar="NAME",
                       help="the cluster's key prefix in Redis (default morsock)")
    group.add_argument("--processes", type=int, default=1, metavar="N",
                       help="run N server processes on one port (SO_REUSEPORT), started "
                            "and stopped together; with --metrics-port P, worker i serves "
                            "metrics on P+i (default 1)")


def _as_worker(args: argparse.Namespace) -> int | None:
    """In a worker of ``--processes``: take the port, port file and index its parent
    chose; die with the parent (Linux). Returns an exit code if the parent is gone."""
    spec = os.environ.pop(_WORKER_ENV, None)
    if spec is None:
        return None
    index, parent, port, port_file = spec.split(":", 3)
    if sys.platform.startswith("linux"):
        import ctypes
        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != int(parent):
        return 1  # the parent died before the line above
    args.processes, args.port, args.port_file, args.status = 1, int(port), port_file, "off"
    if args.metrics_port:
        args.metrics_port += int(index)
    args.reuse_port = True
    return None


def _join_cluster(server: Server, args: argparse.Namespace) -> None:
    """Give *server* what --redis and a worker's SO_REUSEPORT ask for (server stopped).
    Raises ImportError without redis-py, ValueError for a bad URL."""
    if getattr(args, "reuse_port", False):
        server.reuse_port = True
    if args.redis:
        from .cluster import RedisBackplane
        server.backplane = RedisBackplane(args.redis, channel=args.redis_channel)


def _run_processes(args: argparse.Namespace) -> int:
    """``--processes N``: reserve the port, start N workers (this same command line) on
    it, and stop them all on SIGINT/SIGTERM or when one of them exits. Returns the exit
    code (0 after a requested stop)."""
    import subprocess
    import tempfile
    if args.processes < 1:
        print("error: --processes must be >= 1", file=sys.stderr)
        return 2
    if not hasattr(socket, "SO_REUSEPORT"):
        print("error: --processes needs SO_REUSEPORT, which this platform lacks",
              file=sys.stderr)
        return 2
    if not args.redis:
        print("warning: --processes without --redis: each process broadcasts to its own "
              "clients only", file=sys.stderr)
    stop = threading.Event()
    for name in ("SIGINT", "SIGTERM"):
        signal.signal(getattr(signal, name), lambda signum, frame: stop.set())
    # Bound, never listening: holds the port (and its SO_REUSEPORT group) for the workers.
    holder = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    workdir = tempfile.mkdtemp(prefix="morsock-workers-")
    workers: list[Any] = []
    status = 0
    try:
        try:
            holder.bind((args.host, args.port))
        except OSError as exc:
            print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
            return 1
        port = holder.getsockname()[1]
        files = [os.path.join(workdir, f"port-{i}") for i in range(args.processes)]
        for index, port_file in enumerate(files):
            env = dict(os.environ)
            env[_WORKER_ENV] = f"{index}:{os.getpid()}:{port}:{port_file}"
            workers.append(subprocess.Popen([sys.executable, "-m", "morsock", *args.argv],
                                            env=env, stdin=subprocess.DEVNULL))
        announced = False
        while not stop.wait(0.1 if not announced else 1.0):
            if any(w.poll() is not None for w in workers) and not stop.is_set():
                print("error: a worker process exited; stopping the others", file=sys.stderr)
                status = 1
                break
            if not announced and all(os.path.exists(f) for f in files):
                announced = True
                if args.port_file:
                    with open(args.port_file + ".tmp", "w", encoding="ascii") as f:
                        f.write(f"{port}\n")
                    os.replace(args.port_file + ".tmp", args.port_file)
                if args.status == "on" or (args.status == "auto" and sys.stderr.isatty()):
                    print(f"morsock: {args.processes} server processes on "
                          f"{args.host}:{port}; Ctrl+C to stop", file=sys.stderr)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.terminate()
        for worker in workers:
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        holder.close()
        import shutil
        shutil.rmtree(workdir, ignore_errors=True)
    return status


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m morsock",
                                     description="morsock: threaded framed TCP components")
    parser.add_argument("--version", action="version", version=f"morsock {__version__}")
    parser.add_argument("--log-level", default="WARNING",
                        help="logging level for the 'morsock' logger (default WARNING)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    srv = sub.add_parser("server", help="run an echo server until Ctrl+C",
                         description="Echo every message back (optionally prefixed) "
                                     "until SIGINT/SIGTERM.")
    srv.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    srv.add_argument("--port", type=int, default=3434, help="port (default 3434; 0 = any free)")
    srv.add_argument("--threads", type=int, default=4, help="worker threads (default 4)")
    srv.add_argument("--max-connections", type=int, default=100_000,
                     help="connection limit (default 100000, so the open-file limit is "
                          "what bounds it; the Server class defaults to 1000)")
    srv.add_argument("--prefix", default="", help="text put before each echoed payload")
    srv.add_argument("--status", choices=("auto", "on", "off"), default="auto",
                     help="live status line on stderr (auto: only on a terminal)")
    srv.add_argument("--port-file", metavar="PATH",
                     help="once listening, write the port to PATH (handy with --port 0)")
    _add_crypto_args(srv)
    _add_tls_args(srv, server=True)
    _add_metrics_args(srv)
    _add_cluster_args(srv)

    cli = sub.add_parser("client", help="send messages and print the replies",
                         description="Connect, send each MESSAGE (or each line of stdin "
                                     "when none is given) and print each reply.")
    cli.add_argument("messages", nargs="*", metavar="MESSAGE")
    cli.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    cli.add_argument("--port", type=int, default=3434, help="server port (default 3434)")
    cli.add_argument("--timeout", type=float, default=10.0,
                     help="seconds to wait for each reply (default 10)")
    cli.add_argument("--encrypted", action="store_true", help="send encrypted (needs --key)")
    _add_crypto_args(cli)
    _add_tls_args(cli, server=False)

    demo = sub.add_parser("demo", help="a self-contained tour of the features on 127.0.0.1",
                          description="Start a server and clients in this process on a free "
                                      "port and walk through the features; exit 0 on success.")
    demo.add_argument("--quiet", action="store_true", help="print only the final verdict")
    return parser


def _raise_open_file_limit() -> None:
    """Lift the soft limit on open files to the hard one (POSIX only; else no effect)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


#: glibc mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep up to 64 MiB of freed memory instead of handing it back
    to the kernel at once. Each worker thread allocates from an arena of its own, and
    glibc trims an arena as soon as 128 KiB lie free at its top: with 64 KiB messages
    that is after almost every message, and the next one page-faults its memory in again
    (measured: server CPU per 64 KiB echo about halved). Equivalent to the environment
    ``MALLOC_TRIM_THRESHOLD_=67108864 MALLOC_MMAP_THRESHOLD_=33554432``, which embedding
    programs can use. Returns False where there is no glibc (no effect)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    # An explicit trim threshold also freezes the mmap threshold, so set that too: blocks
    # up to 32 MiB come from the arenas (reused) rather than a fresh mmap each time.
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
                and mallopt(_M_TRIM_THRESHOLD, 64 * 1024 * 1024))


def _run_server(args: argparse.Namespace) -> int:
    exit_code = _as_worker(args)
    if exit_code is not None:
        return exit_code
    if args.processes != 1:
        return _run_processes(args)
    prefix = args.prefix.encode("utf-8")
    _raise_open_file_limit()
    _keep_freed_memory()

    def echo(sender: Server, client: Any, data: bytes) -> bytes:
        return prefix + data if prefix else data

    try:
        ssl_context = _tls_context(args, server=True)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    server = Server(args.port, args.host, thread_pool_size=args.threads, ssl_context=ssl_context,
                    max_connections=args.max_connections, encryption_key=args.key,
                    encryption_mode=args.mode, encryption_key_size=args.key_size,
                    encryption_profile=args.profile, on_handle_command=echo)
    try:
        _join_cluster(server, args)
    except (ImportError, ValueError) as exc:
        print(f"error: --redis: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    for name in ("SIGINT", "SIGTERM"):  # SIGTERM: not on every platform
        signum = getattr(signal, name, None)
        if signum is not None:
            signal.signal(signum, on_signal)
    try:
        server.start()
    except MorsockError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        stop_metrics = _serve_metrics(server, args)
    except (ImportError, OSError) as exc:
        print(f"error: metrics: {exc}", file=sys.stderr)
        server.stop()
        return 1
    if args.port_file:
        with open(args.port_file + ".tmp", "w", encoding="ascii") as f:
            f.write(f"{server.port}\n")
        os.replace(args.port_file + ".tmp", args.port_file)  # readers never see half a file
    show = args.status == "on" or (args.status == "auto" and sys.stderr.isatty())
    if show:
        print(f"morsock server on {server.host}:{server.port} ({server.encryption_info}); "
              f"Ctrl+C to stop", file=sys.stderr)
    last_msgs, last_bytes, last_t = 0, 0, time.monotonic()
    while not stop.wait(1.0):
        if not show:
            continue
        now = time.monotonic()
        msgs = server.total_messages_received + server.total_messages_sent
        nbytes = server.total_bytes_received + server.total_bytes_sent
        dt = max(now - last_t, 1e-6)
        sys.stderr.write(f"\rclients {server.client_count:5d} | "
                         f"{(msgs - last_msgs) / dt:9.0f} msg/s | "
                         f"{(nbytes - last_bytes) / dt / 1e6:8.2f} MB/s | "
                         f"up {server.up_time:6d} s ")
        sys.stderr.flush()
        last_msgs, last_bytes, last_t = msgs, nbytes, now
    if show:
        sys.stderr.write("\n")
    server.stop()
    if stop_metrics is not None:
        stop_metrics()
    return 0


def _run_client(args: argparse.Namespace) -> int:
    if args.encrypted and not args.key:
        print("error: --encrypted needs --key", file=sys.stderr)
        return 2
    try:
        ssl_context = _tls_context(args, server=False)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    client = Client(args.host, args.port, ssl_context=ssl_context,
                    server_hostname=args.server_hostname or None,
                    encryption_key=args.key, encryption_mode=args.mode,
                    encryption_key_size=args.key_size, encryption_profile=args.profile)
    try:
        client.connect()
    except MorsockError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    status = 0
    try:
        messages = args.messages or (line.rstrip("\r\n") for line in sys.stdin)
        for message in messages:
            try:
                reply = client.request(message, timeout=args.timeout, encrypted=args.encrypted)
            except MorsockError as exc:
                print(f"error: {exc}", file=sys.stderr)
                status = 1
                break
            print(reply.decode("utf-8", errors="replace"), flush=True)
    finally:
        client.disconnect()
    return status


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m morsock`` and the ``morsock`` script; returns the exit code."""
    args = _build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for --processes' workers
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "server":
        return _run_server(args)
    if args.command == "client":
        return _run_client(args)
    from .demo import run_demo
    return run_demo(quiet=args.quiet)
