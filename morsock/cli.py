"""Command line: ``python -m morsock server|client|demo``.

* ``server`` -- an echo server (payload sent back unchanged, or prefixed with
  ``--prefix``) until SIGINT/SIGTERM, then a clean stop and a summary. A banner on stdout
  says where it listens, with TLS and per-message encryption; on a terminal, a one-line
  live status goes to stderr (log records never land on that line).
* ``client`` -- connect, send each argument (or each stdin line), print each reply; every
  error is printed once, on stderr.
* ``demo`` -- a self-contained tour on 127.0.0.1 that prints a report; exit 0 on success.

Bad arguments end with argparse's usage message and exit code 2; runtime failures
(cannot listen, cannot connect) with ``error: ...`` and exit code 1; Ctrl+C with exit
code 0 for the server (after its summary) and 130 for the client.

The parser is built by one function per command (:func:`add_server_command` ...), and
the server's settings are gathered by :func:`server_settings`, so a command or an
option group is added in one place.
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
from collections.abc import Iterable, Sequence
from typing import IO, Any, Callable

from . import __version__
from .client import Client
from .enums import AESMode, EncryptionProfile, KeySize
from .errors import MorsockError
from .server import Server

#: The rest serves the command line, its tests and the samples (``human_bytes``, ``hms``),
#: not applications.
__all__ = ["main"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


# -- argument types: the library's own parsing and validation, argparse's messages --------

def choice_of(parse: Callable[[str], Any], choices: Sequence[str],
              name: str) -> Callable[[str], Any]:
    """An argparse ``type`` that parses with the library's *parse* (so every spelling the
    library accepts works, e.g. ``cbc`` or ``amCBC``) and, when it refuses, says so with
    the list of *choices*."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(
                f"invalid choice: {text!r} (choose from {', '.join(choices)})") from None
    convert.__name__ = name
    return convert


def setting_of(component: type, name: str,
               parse: Callable[[str], Any] = int) -> Callable[[str], Any]:
    """An argparse ``type`` for the setting *name* of *component* (``Server``,
    ``Client``): *parse* turns the text into a value, then the setting's own converter
    checks its range, so the command line refuses exactly what the library refuses, with
    the library's words."""
    setting = getattr(component, name)
    check = getattr(setting, "convert", None)

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            kind = "a whole number" if parse is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        if check is not None:
            try:
                check(value)
            except (TypeError, ValueError) as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
        return value
    convert.__name__ = name
    return convert


def existing_file(text: str) -> str:
    """An argparse ``type``: a path that names a readable file."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    if not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"cannot read {text}")
    return text


# -- option groups ---------------------------------------------------------------------

def add_crypto_args(parser: argparse.ArgumentParser) -> None:
    """``--key --mode --key-size --profile`` (per-message encryption)."""
    group = parser.add_argument_group("per-message encryption")
    modes = [m.name for m in AESMode]
    sizes = [str(int(s)) for s in KeySize]
    profiles = [p.name for p in EncryptionProfile]
    group.add_argument("--key", default="", metavar="TEXT",
                       help="encryption key text (default: none, messages travel unencrypted)")
    group.add_argument("--mode", default=AESMode.CBC, metavar="MODE",
                       type=choice_of(AESMode.parse, modes, "mode"),
                       help=f"AES mode: {', '.join(modes)} (default CBC)")
    group.add_argument("--key-size", default=KeySize.AES256, metavar="BITS",
                       type=choice_of(KeySize.parse, sizes, "key size"),
                       help=f"{', '.join(sizes)} (default 256)")
    group.add_argument("--profile", default=EncryptionProfile.AUTHENTICATED, metavar="PROFILE",
                       type=choice_of(EncryptionProfile.parse, profiles, "profile"),
                       help="AUTHENTICATED (default) or MORMOT (Delphi-compatible)")


def add_tls_args(parser: argparse.ArgumentParser, server: bool) -> None:
    """The TLS flags of the server or the client."""
    group = parser.add_argument_group("TLS")
    if server:
        group.add_argument("--certfile", type=existing_file, metavar="PEM",
                           help="PEM certificate (chain) of this server: turns TLS on")
        group.add_argument("--keyfile", type=existing_file, metavar="PEM",
                           help="PEM private key (default: inside --certfile)")
        group.add_argument("--cafile", type=existing_file, metavar="PEM",
                           help="PEM CA certificate(s) that sign client certificates "
                                "(verified when presented)")
        group.add_argument("--require-client-cert", action="store_true",
                           help="refuse clients without a certificate signed by --cafile")
    else:
        group.add_argument("--tls", action="store_true",
                           help="connect with TLS, trusting the system CAs")
        group.add_argument("--cafile", type=existing_file, metavar="PEM",
                           help="PEM CA certificate(s) to trust for the server (implies --tls)")
        group.add_argument("--certfile", type=existing_file, metavar="PEM",
                           help="PEM client certificate for mutual TLS (implies --tls)")
        group.add_argument("--keyfile", type=existing_file, metavar="PEM",
                           help="PEM private key (default: inside --certfile)")
        group.add_argument("--server-hostname",
                           help="name the server certificate must match (default: --host)")


def add_metrics_args(parser: argparse.ArgumentParser) -> None:
    """``--metrics-port --metrics-host`` (Prometheus endpoint)."""
    group = parser.add_argument_group("metrics (needs: pip install 'morsock[metrics]')")
    group.add_argument("--metrics-port", type=setting_of(Server, "port"), metavar="P",
                       help="serve Prometheus metrics at http://127.0.0.1:P/metrics "
                            "(0: a free port; the address is printed on stderr)")
    group.add_argument("--metrics-host", default="127.0.0.1", metavar="H",
                       help="address of the metrics endpoint (default 127.0.0.1)")


def _load_chain(ctx: ssl.SSLContext, certfile: str, keyfile: str | None) -> None:
    try:
        ctx.load_cert_chain(certfile, keyfile or None)
    except ssl.SSLError as exc:
        files = f"--certfile {certfile}" + (f" / --keyfile {keyfile}" if keyfile else "")
        raise ValueError(f"{files}: not a usable PEM certificate and private key "
                         f"({exc.reason or exc})") from exc


def _load_cas(ctx: ssl.SSLContext, cafile: str) -> None:
    try:
        ctx.load_verify_locations(cafile)
    except ssl.SSLError as exc:
        raise ValueError(f"--cafile {cafile}: not a usable PEM CA certificate "
                         f"({exc.reason or exc})") from exc


def tls_context(args: argparse.Namespace, server: bool) -> ssl.SSLContext | None:
    """The ``ssl.SSLContext`` the TLS flags ask for (None: no TLS). Raises ValueError,
    naming the flag and the file, for inconsistent flags or unusable files."""
    return _server_tls_context(args) if server else _client_tls_context(args)


def _server_tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """:func:`tls_context` for the server command (same contract)."""
    if not args.certfile:
        if args.keyfile or args.cafile or args.require_client_cert:
            raise ValueError("--keyfile, --cafile and --require-client-cert need --certfile")
        return None
    if args.require_client_cert and not args.cafile:
        raise ValueError("--require-client-cert needs --cafile (the CA of the client "
                         "certificates)")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _load_chain(ctx, args.certfile, args.keyfile)
    if args.cafile:
        _load_cas(ctx, args.cafile)
        ctx.verify_mode = ssl.CERT_REQUIRED if args.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def _client_tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """:func:`tls_context` for the client command (same contract)."""
    if not (args.tls or args.cafile or args.certfile):
        if args.keyfile:
            raise ValueError("--keyfile needs --certfile")
        return None
    ctx = ssl.create_default_context()
    if args.cafile:
        _load_cas(ctx, args.cafile)
    if args.certfile:
        _load_chain(ctx, args.certfile, args.keyfile)
    return ctx


# -- cluster: --redis, --processes (docs/guide/cluster.rst) ---------------------------------------
#: Set by the parent of ``--processes N`` for each worker it starts:
#: ``"<index>:<parent pid>:<port>:<port file>"``.
_WORKER_ENV = "MORSOCK_CLUSTER_WORKER"


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    """The --redis, --redis-channel and --processes flags of the server command."""
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
    import shutil
    import tempfile
    refused = _processes_refused(args)
    if refused is not None:
        return refused
    stop = threading.Event()
    for name in ("SIGINT", "SIGTERM"):
        signal.signal(getattr(signal, name), lambda signum, frame: stop.set())
    # Bound, never listening: holds the port (and its SO_REUSEPORT group) for the workers.
    holder = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    workdir = tempfile.mkdtemp(prefix="morsock-workers-")
    workers: list[Any] = []
    try:
        try:
            holder.bind((args.host, args.port))
        except OSError as exc:
            print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
            return 1
        port = holder.getsockname()[1]
        files = [os.path.join(workdir, f"port-{i}") for i in range(args.processes)]
        _start_workers(args, port, files, workers)
        return _supervise_workers(args, port, files, workers, stop)
    finally:
        _stop_workers(workers)
        holder.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _processes_refused(args: argparse.Namespace) -> int | None:
    """Exit code 2, said on stderr, if ``--processes`` cannot run as asked; else None
    (with a warning on stderr when there is no --redis)."""
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
    return None


def _start_workers(args: argparse.Namespace, port: int, files: list[str],
                   workers: list[Any]) -> None:
    """Start one worker per port file, appending each to *workers* as it starts (so the
    caller stops those already started if a later one fails to start)."""
    import subprocess
    for index, port_file in enumerate(files):
        env = dict(os.environ)
        env[_WORKER_ENV] = f"{index}:{os.getpid()}:{port}:{port_file}"
        # stdout: this process's own first line says where they listen
        workers.append(subprocess.Popen([sys.executable, "-m", "morsock", *args.argv],
                                        env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL))


def _supervise_workers(args: argparse.Namespace, port: int, files: list[str],
                       workers: list[Any], stop: threading.Event) -> int:
    """Wait for *stop* (0) or a worker's exit (1, said on stderr); announce once, when
    every worker has written its port file."""
    announced = False
    while not stop.wait(0.1 if not announced else 1.0):
        if any(w.poll() is not None for w in workers) and not stop.is_set():
            print("error: a worker process exited; stopping the others", file=sys.stderr)
            return 1
        if not announced and all(os.path.exists(f) for f in files):
            announced = True
            _announce_workers(args, port)
    return 0


def _announce_workers(args: argparse.Namespace, port: int) -> None:
    """Write --port-file (atomically) and print the line saying where the workers listen."""
    if args.port_file:
        with open(args.port_file + ".tmp", "w", encoding="ascii") as f:
            f.write(f"{port}\n")
        os.replace(args.port_file + ".tmp", args.port_file)
    print(f"{args.processes} server processes listening on {args.host}:{port}"
          f"{' (cluster ' + args.redis_channel + ')' if args.redis else ''}; "
          f"Ctrl+C to stop", flush=True)


def _stop_workers(workers: list[Any]) -> None:
    """Terminate the workers still running and reap them all (kill after 30 s)."""
    import subprocess
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()
    for worker in workers:
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


# -- the parser ------------------------------------------------------------------------

def add_server_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]
                       ) -> argparse.ArgumentParser:
    """The ``server`` command's parser."""
    srv = sub.add_parser("server", help="run an echo server until Ctrl+C",
                         description="Echo every message back (optionally prefixed) until "
                                     "SIGINT/SIGTERM, then print a summary. The first line "
                                     "on stdout says where it listens.")
    srv.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    srv.add_argument("--port", type=setting_of(Server, "port"), default=3434,
                     help="port (default 3434; 0 = any free)")
    srv.add_argument("--threads", type=setting_of(Server, "thread_pool_size"), default=4,
                     metavar="N",
                     help="worker threads (default 4)")
    srv.add_argument("--max-connections", type=setting_of(Server, "max_connections"),
                     default=100_000, metavar="N",
                     help="connection limit (default 100000, so the open-file limit is "
                          "what bounds it; the Server class defaults to 1000)")
    srv.add_argument("--prefix", default="", metavar="TEXT",
                     help="text put before each echoed payload")
    srv.add_argument("--status", choices=("auto", "on", "off"), default="auto",
                     help="live status line on stderr (auto: only on a terminal)")
    srv.add_argument("--port-file", metavar="PATH",
                     help="once listening, write the port to PATH (handy with --port 0)")
    add_crypto_args(srv)
    add_tls_args(srv, server=True)
    add_metrics_args(srv)
    add_cluster_args(srv)
    return srv


def add_client_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]
                       ) -> argparse.ArgumentParser:
    """The ``client`` command's parser."""
    cli = sub.add_parser("client", help="send messages and print the replies",
                         description="Connect, send each MESSAGE (or each line of stdin "
                                     "when none is given) and print each reply. Errors go "
                                     "to stderr, once each; exit code 1 after an error.")
    cli.add_argument("messages", nargs="*", metavar="MESSAGE")
    cli.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    cli.add_argument("--port", type=setting_of(Client, "port"), default=3434,
                     help="server port (default 3434)")
    cli.add_argument("--timeout", type=setting_of(Client, "connection_timeout", float),
                     default=10.0, help="seconds to wait for each reply (default 10)")
    cli.add_argument("--encrypted", action="store_true", help="send encrypted (needs --key)")
    add_crypto_args(cli)
    add_tls_args(cli, server=False)
    return cli


def add_demo_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]
                       ) -> argparse.ArgumentParser:
    """The ``demo`` command's parser."""
    demo = sub.add_parser("demo", help="a self-contained tour of the features on 127.0.0.1",
                          description="Start a server and clients in this process on a free "
                                      "port and walk through the features; exit 0 on success.")
    demo.add_argument("--quiet", action="store_true", help="print only the final verdict")
    return demo


def build_parser() -> argparse.ArgumentParser:
    """The whole ``python -m morsock`` parser."""
    parser = argparse.ArgumentParser(prog="python -m morsock",
                                     description="morsock: threaded framed TCP components")
    parser.add_argument("--version", action="version", version=f"morsock {__version__}")
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, metavar="LEVEL",
                        help="level of the 'morsock' logger on stderr: "
                             f"{', '.join(LOG_LEVELS)} (default: WARNING for the server; "
                             "the client prints its errors itself and shows the log only "
                             "when this is given)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_server_command(sub)
    add_client_command(sub)
    add_demo_command(sub)
    return parser


# -- terminal output -------------------------------------------------------------------

class StatusLine:
    """The live one-line status on a terminal *stream*, rewritten in place with ``\\r``.

    Anything else written to that stream (log records through :class:`StatusLogHandler`)
    goes through :meth:`interrupt`, which wipes the line first and draws it again after,
    so no message is glued onto the status. Thread-safe.
    """

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.lock = threading.RLock()
        self.text = ""

    def show(self, text: str) -> None:
        """Replace the status with *text*."""
        with self.lock:
            self.stream.write("\r" + text.ljust(len(self.text)))
            self.text = text
            self.stream.flush()

    def interrupt(self, write: Callable[[], None]) -> None:
        """Run *write* (which writes whole lines) with the status wiped, then redraw it."""
        with self.lock:
            if self.text:
                self.stream.write("\r" + " " * len(self.text) + "\r")
            write()
            if self.text:
                self.stream.write(self.text)
            self.stream.flush()

    def end(self) -> None:
        """Leave the last status on its own line (nothing more is drawn)."""
        with self.lock:
            if self.text:
                self.stream.write("\n")
                self.stream.flush()
            self.text = ""


class StatusLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stderr log handler that writes around a :class:`StatusLine`."""

    def __init__(self, status: StatusLine) -> None:
        super().__init__(status.stream)
        self.status = status

    def emit(self, record: logging.LogRecord) -> None:
        self.status.interrupt(lambda: super(StatusLogHandler, self).emit(record))


def _setup_logging(level: str, status: StatusLine | None) -> None:
    handler: logging.Handler = (StatusLogHandler(status) if status is not None
                                else logging.StreamHandler(sys.stderr))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def hms(seconds: float) -> str:
    """``3725`` -> ``"01:02:05"``."""
    whole = int(seconds)
    return f"{whole // 3600:02d}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def say(line: str) -> None:
    """Print *line* on stdout at once; a reader that went away (``| head -1``) is no
    error: the rest of the output is dropped."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's exit flush is quiet
        os.close(devnull)


def describe_listening(server: Server, args: argparse.Namespace) -> str:
    """The banner: where *server* listens, its TLS and its per-message encryption."""
    if server.ssl_context is None:
        tls = "TLS off"
    elif args.require_client_cert:
        tls = "TLS on (client certificate required)"
    elif args.cafile:
        tls = "TLS on (client certificates verified when presented)"
    else:
        tls = "TLS on"
    if server.encryption_key:
        encryption = f"per-message encryption {server.encryption_info}"
        if server.encryption_profile is EncryptionProfile.AUTHENTICATED:
            encryption += " (AUTHENTICATED)"
    else:
        encryption = "per-message encryption off (no --key)"
    host = server.host if ":" not in server.host else f"[{server.host}]"
    return f"morsock server listening on {host}:{server.port}; {tls}; {encryption}"


def server_summary(server: Server, seconds: float) -> str:
    """The last line of the server command: what it did in *seconds* of listening."""
    return (f"morsock server stopped after {hms(seconds)}: "
            f"{server.total_connections} client(s) served, "
            f"{server.total_messages_received} message(s) received "
            f"({human_bytes(server.total_bytes_received)}), "
            f"{server.total_messages_sent} sent ({human_bytes(server.total_bytes_sent)})")


# -- server ----------------------------------------------------------------------------

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
    that is after almost every message, and the next one page-faults its memory in
    again. Equivalent to the environment ``MALLOC_TRIM_THRESHOLD_=67108864
    MALLOC_MMAP_THRESHOLD_=33554432``, which embedding programs can use. Returns False
    where there is no glibc (no effect)."""
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


def _stop_on_signals(stop: threading.Event) -> None:
    """SIGINT and SIGTERM set *stop* instead of raising (main thread only)."""
    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    for name in ("SIGINT", "SIGTERM"):  # SIGTERM: not on every platform
        signum = getattr(signal, name, None)
        if signum is not None:
            signal.signal(signum, on_signal)


def server_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of the command's :class:`Server`, from the parsed *args*.
    Raises ValueError (naming the flag and the file) for unusable TLS flags."""
    prefix = args.prefix.encode("utf-8")

    def echo(sender: Server, client: Any, data: bytes) -> bytes:
        return prefix + data if prefix else data

    return dict(port=args.port, host=args.host, thread_pool_size=args.threads,
                ssl_context=tls_context(args, server=True),
                max_connections=args.max_connections, encryption_key=args.key,
                encryption_mode=args.mode, encryption_key_size=args.key_size,
                encryption_profile=args.profile, on_handle_command=echo)


def run_server(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """The ``server`` command; returns the exit code."""
    exit_code = _as_worker(args)
    if exit_code is not None:
        return exit_code
    if args.processes != 1:
        return _run_processes(args)
    stop = threading.Event()
    _stop_on_signals(stop)  # first: a Ctrl+C during start-up is a clean stop too
    show = args.status == "on" or (args.status == "auto" and sys.stderr.isatty())
    status = StatusLine(sys.stderr) if show else None
    _setup_logging(args.log_level or "WARNING", status)
    _raise_open_file_limit()
    _keep_freed_memory()
    try:
        server = Server(**server_settings(args))
        _join_cluster(server, args)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    except ImportError as exc:
        print(f"error: --redis: {exc}", file=sys.stderr)
        return 2
    try:
        server.start()
    except MorsockError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    started = time.monotonic()
    try:
        try:
            stop_metrics = _serve_metrics(server, args)
        except (ImportError, OSError) as exc:
            print(f"error: metrics: {exc}", file=sys.stderr)
            return 1
        try:
            if args.port_file:
                with open(args.port_file + ".tmp", "w", encoding="ascii") as f:
                    f.write(f"{server.port}\n")
                os.replace(args.port_file + ".tmp", args.port_file)  # never half a file
            say(describe_listening(server, args) + ("; Ctrl+C to stop" if show else ""))
            _watch(server, stop, status)
        finally:
            if stop_metrics is not None:
                stop_metrics()
    finally:
        if status is not None:
            status.end()
        server.stop()
    say(server_summary(server, time.monotonic() - started))
    return 0


def _watch(server: Server, stop: threading.Event, status: StatusLine | None) -> None:
    """Wait for *stop*; with a *status* line, redraw it every second."""
    last_msgs, last_bytes, last_t = 0, 0, time.monotonic()
    while not stop.wait(1.0):
        if status is None:
            continue
        now = time.monotonic()
        msgs = server.total_messages_received + server.total_messages_sent
        nbytes = server.total_bytes_received + server.total_bytes_sent
        dt = max(now - last_t, 1e-6)
        status.show(f"clients {server.client_count:5d} | "
                    f"{(msgs - last_msgs) / dt:9.0f} msg/s | "
                    f"{(nbytes - last_bytes) / dt / 1e6:8.2f} MB/s | "
                    f"up {server.up_time:6d} s ")
        last_msgs, last_bytes, last_t = msgs, nbytes, now


# -- client ----------------------------------------------------------------------------

class ErrorPrinter:
    """Prints ``error: TEXT`` on stderr, once per error: the client's ``on_error`` and the
    exception of the call it failed often tell the same thing (one may quote the other),
    so a text that contains, or is contained in, one already printed is skipped.
    Thread-safe."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.lock = threading.Lock()
        self.printed: set[str] = set()

    def __call__(self, text: str) -> None:
        with self.lock:
            if any(text in done or done in text for done in self.printed):
                return
            self.printed.add(text)
            print(f"error: {text}", file=self.stream, flush=True)


def run_client(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """The ``client`` command; returns the exit code."""
    if args.encrypted and not args.key:
        parser.error("--encrypted needs --key")
    if args.log_level:
        _setup_logging(args.log_level, None)
    else:  # the errors are printed below, once: not by the library's log as well
        logging.getLogger("morsock").setLevel(logging.CRITICAL + 1)
    report = ErrorPrinter(sys.stderr)
    try:
        client = Client(args.host, args.port, ssl_context=tls_context(args, server=False),
                        server_hostname=args.server_hostname or None, auto_reconnect=False,
                        encryption_key=args.key, encryption_mode=args.mode,
                        encryption_key_size=args.key_size, encryption_profile=args.profile,
                        on_error=lambda sender, message, code: report(message))
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    try:
        client.connect()
    except MorsockError as exc:
        report(str(exc))
        return 1
    try:
        messages: Iterable[str] = (args.messages
                                   or (line.rstrip("\r\n") for line in sys.stdin))
        for message in messages:
            try:
                reply = client.request(message, timeout=args.timeout,
                                       encrypted=args.encrypted)
            except MorsockError as exc:
                report(str(exc))
                return 1
            print(reply.decode("utf-8", errors="replace"), flush=True)
    finally:
        client.disconnect()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m morsock`` and the ``morsock`` script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for --processes' workers
    try:
        if args.command == "server":
            return run_server(args, parser)
        if args.command == "client":
            return run_client(args, parser)
        _setup_logging(args.log_level or "WARNING", None)
        from .demo import run_demo
        return run_demo(quiet=args.quiet)
    except ValueError as exc:  # unusable TLS flags or files
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the client, or the demo (the server handles SIGINT)
        print("interrupted", file=sys.stderr)
        return 130
