"""Run by ``tests/test_portability.py`` in a fresh interpreter (never imported by pytest).

It first hides what a non-Linux platform (Windows above all) lacks -- POSIX-only modules,
``os``/``socket``/``signal`` names, the socket methods ``sendmsg``/``recvmsg``, the
epoll/poll selectors (``selectors.DefaultSelector`` becomes ``SelectSelector``, as on
Windows) and the native ``socket.socketpair`` (replaced by a TCP pair, as Windows builds
it) -- and only then imports every morsock module and runs the library: socket
configuration, a server and client round trip (plain, both encryption profiles, a large
payload), the select() connection cap, ``reuse_port``, the command-line server and client,
and the demo. A module that grows an unguarded use of a hidden name fails here.

Prints ``morsock <path of the package>`` first and ``PORTABILITY OK`` last; exits 0 on
success. Every wait is bounded.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import sys

# Third-party dependency first: on POSIX, pycryptodome finds its native code through
# platform.architecture(), which runs `file` in a subprocess (os.pipe, fork); on Windows
# it takes another path. Only morsock's own code is checked here.
import Crypto.Cipher.AES  # noqa: E402, F401

# -- 1. hide what other platforms lack (before morsock is imported) --------------------------
HIDDEN_MODULES = ("fcntl", "resource", "termios", "tty", "pty", "pwd", "grp", "syslog")
HIDDEN_OS = ("pipe", "pipe2", "fork", "forkpty", "register_at_fork", "getuid", "geteuid",
             "getgid", "getegid", "setsid", "getpgid", "killpg", "sched_getaffinity",
             "sched_setaffinity", "mkfifo", "openpty", "sysconf", "getloadavg", "uname")
HIDDEN_SOCKET = ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT", "TCP_USER_TIMEOUT",
                 "SO_REUSEPORT", "AF_UNIX", "MSG_NOSIGNAL", "TCP_QUICKACK", "TCP_CORK",
                 "TCP_DEFER_ACCEPT", "SO_BINDTODEVICE", "SO_PEERCRED", "CMSG_LEN",
                 "CMSG_SPACE", "sethostname")
HIDDEN_SIGNAL = ("SIGHUP", "SIGQUIT", "SIGKILL", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGPIPE",
                 "SIGCHLD", "alarm", "setitimer", "getitimer", "pthread_kill",
                 "pthread_sigmask", "sigwait", "siginterrupt")
HIDDEN_METHODS = ("sendmsg", "recvmsg", "recvmsg_into", "sendmsg_afalg")

for _name in HIDDEN_MODULES:
    sys.modules[_name] = None  # "import fcntl" now raises ImportError
for _module, _names in ((os, HIDDEN_OS), (socket, HIDDEN_SOCKET), (signal, HIDDEN_SIGNAL)):
    for _name in _names:
        if hasattr(_module, _name):
            delattr(_module, _name)


def _hidden(name: str) -> property:
    def get(self: object) -> None:
        raise AttributeError(f"'socket' object has no attribute {name!r} (hidden)")
    return property(get)


# accept(), socketpair() and create_connection() build sockets through this module-level
# name, so every socket the library gets is one of these.
socket.socket = type("socket", (socket.socket,),
                     {name: _hidden(name) for name in HIDDEN_METHODS})

def _tcp_socketpair(family: int = socket.AF_INET, type: int = socket.SOCK_STREAM,
                    proto: int = 0) -> tuple[socket.socket, socket.socket]:
    """What Windows' socket.socketpair() does: a connected pair over 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        a = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        a.settimeout(10)
        a.connect(listener.getsockname())
        listener.settimeout(10)
        b, _ = listener.accept()
    a.settimeout(None)
    b.settimeout(None)
    return a, b


socket.socketpair = _tcp_socketpair
selectors.DefaultSelector = selectors.SelectSelector

# -- 2. import every module -------------------------------------------------------------------
import importlib  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import pkgutil  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from contextlib import redirect_stdout  # noqa: E402

import morsock  # noqa: E402

print("morsock", os.path.dirname(os.path.abspath(morsock.__file__)), flush=True)

WAIT = 30.0
imported = []
for info in pkgutil.walk_packages(morsock.__path__, "morsock."):
    if info.name == "morsock.__main__":
        continue  # runs the command line when imported; its only import is morsock.cli
    if info.name == "morsock.tk":
        try:
            import tkinter  # noqa: F401
        except ImportError:
            print("note: tkinter missing, morsock.tk not imported", flush=True)
            continue
    importlib.import_module(info.name)
    imported.append(info.name)
print("imported", " ".join(imported), flush=True)

from morsock import (  # noqa: E402
    Client,
    EncryptionProfile,
    ErrorCode,
    MorsockError,
    Server,
)
from morsock.connection import configure_socket  # noqa: E402


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


warnings = _Warnings()
logging.getLogger("morsock").addHandler(warnings)


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"FAILED: {what}")


def echo(sender: Server, client: object, data: bytes) -> bytes:
    return data


# -- 3. socket options ------------------------------------------------------------------------
with socket.create_server(("127.0.0.1", 0)) as listener:
    listener.settimeout(WAIT)
    with socket.create_connection(listener.getsockname(), timeout=WAIT) as a:
        b, _ = listener.accept()
        with b:
            configure_socket(a, no_delay=True, keep_alive=True, keepalive_idle=7,
                             keepalive_interval=3, keepalive_count=2)
            configure_socket(b, no_delay=False, keep_alive=False)
            check(a.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0, "keep-alive on")
            check(a.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0, "no-delay on")
            check(b.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0, "keep-alive off")
print("configure_socket ok", flush=True)

# -- 4. round trips ---------------------------------------------------------------------------
big = bytes(range(256)) * 512  # 128 KiB: past the size where Linux would use sendmsg
for profile in (None, EncryptionProfile.AUTHENTICATED, EncryptionProfile.MORMOT):
    key = "" if profile is None else "portability"
    settings = {} if profile is None else {"encryption_key": key, "encryption_profile": profile}
    with Server(0, "127.0.0.1", on_handle_command=echo, **settings) as server:
        with Client("127.0.0.1", server.port, connection_timeout=WAIT,
                    **settings) as client:
            encrypted = profile is not None
            check(client.request(b"ping", timeout=WAIT, encrypted=encrypted) == b"ping",
                  f"round trip ({profile})")
            check(client.request(big, timeout=WAIT, encrypted=encrypted) == big,
                  f"large round trip ({profile})")
        check(server.state.name == "LISTENING", "server still listening")
    check(server.state.name == "DISCONNECTED", "server stopped")
from morsock.reactor import Reactor  # noqa: E402

reactor = Reactor("portability-reactor")
try:
    wake = reactor._wake_w
    check(wake.family == socket.AF_INET, "the wake-up pair is TCP here, as on Windows")
    check(wake.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0,
          "no Nagle delay on a TCP wake-up pair")
finally:
    reactor.stop()
print("round trips ok", flush=True)

# -- 5. the select() cap: max_connections 1000 > 500 -> capped, warned once ----------------
capped = [m for m in warnings.messages if "capped at 500" in m]
check(len(capped) == 3, f"one cap warning per server, got {warnings.messages}")
with Server(0, "127.0.0.1", max_connections=500) as server:
    pass
check(len([m for m in warnings.messages if "capped" in m]) == 3, "no warning at 500")

# -- 6. reuse_port where SO_REUSEPORT does not exist: a clean MorsockError -------------------
try:
    Server(0, "127.0.0.1", reuse_port=True).start()
except MorsockError as exc:
    check(exc.code == ErrorCode.BIND_FAILED, f"BIND_FAILED, got {exc.code}")
else:
    raise SystemExit("FAILED: reuse_port=True started without SO_REUSEPORT")
print("select cap and reuse_port ok", flush=True)

# -- 7. the command line: server in this (main) thread, client from another ------------------
from morsock import cli  # noqa: E402

with tempfile.TemporaryDirectory() as tmp:
    port_file = os.path.join(tmp, "port")
    client_output = io.StringIO()
    client_status: list[int] = []

    def run_client() -> None:
        try:
            deadline = time.monotonic() + WAIT
            while not os.path.exists(port_file):  # polled with a deadline: no event to wait on
                if time.monotonic() > deadline:
                    return
                time.sleep(0.02)
            with open(port_file, encoding="ascii") as f:
                port = f.read().strip()
            with redirect_stdout(client_output):
                client_status.append(cli.main(["client", "--port", port, "--timeout", "20",
                                               "hello"]))
        finally:
            signal.raise_signal(signal.SIGINT)  # stops the server (its handler sets an Event)

    helper = threading.Thread(target=run_client, name="portability-cli-client")
    helper.start()
    status = cli.main(["server", "--host", "127.0.0.1", "--port", "0", "--prefix", "echo:",
                       "--status", "off", "--port-file", port_file])
    helper.join(WAIT)
    check(not helper.is_alive(), "cli client finished")
    check(status == 0, f"cli server exit status {status}")
    check(client_status == [0], f"cli client exit status {client_status}")
    check(client_output.getvalue().strip() == "echo:hello",
          f"cli client output {client_output.getvalue()!r}")
print("cli ok", flush=True)

# -- 8. the demo --------------------------------------------------------------------------------
from morsock.demo import run_demo  # noqa: E402

report = io.StringIO()
check(run_demo(quiet=True, out=report) == 0, f"demo failed: {report.getvalue()}")
print("demo ok", flush=True)

left = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
check(not left, f"threads left running: {left}")
print("PORTABILITY OK", flush=True)
