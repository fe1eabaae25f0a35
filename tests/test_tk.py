"""The Tk bridge (morsock.tk) and the Tk samples, driven headless.

When ``DISPLAY`` is unset (or unusable) the module starts its own ``Xvfb`` for the
session and kills it at the end; it skips only when no display can be had (no Xvfb on
the machine: ``apt-get install xvfb``).
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List

import pytest

tk = pytest.importorskip("tkinter", reason="tkinter is not available in this Python")

import morsock  # noqa: E402
import morsock.tk  # noqa: E402
from morsock.testing import running_server  # noqa: E402

from helpers import scaled, wait_until  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WAIT = scaled(15.0)  # generous bound of every wait: the machine is shared


def _tk_works() -> bool:
    try:
        root = tk.Tk()
    except tk.TclError:
        return False
    root.update()
    root.destroy()
    return True


@pytest.fixture(scope="session")
def display() -> Iterator[str]:
    """A usable X display: the current one, or a private Xvfb for this session.

    Also opens and closes one Tk window first: Tk keeps its X connection and notifier
    pipe for the life of the process, which the leak checker must not blame on a test.
    """
    if os.environ.get("DISPLAY") and _tk_works():
        yield os.environ["DISPLAY"]
        return
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.skip("no usable DISPLAY and Xvfb is not installed (apt-get install xvfb)")
    number = next(n for n in range(100, 400)
                  if not os.path.exists(f"/tmp/.X{n}-lock")
                  and not os.path.exists(f"/tmp/.X11-unix/X{n}"))
    proc = subprocess.Popen([xvfb, f":{number}", "-screen", "0", "1280x800x24",
                             "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    old = os.environ.get("DISPLAY")
    try:
        deadline = time.monotonic() + WAIT
        while not os.path.exists(f"/tmp/.X11-unix/X{number}"):
            if proc.poll() is not None:
                pytest.fail(f"Xvfb :{number} exited with code {proc.returncode}")
            if time.monotonic() > deadline:
                pytest.fail(f"Xvfb :{number} did not start within {WAIT} s")
            time.sleep(0.02)  # polling for the server socket, with a deadline
        os.environ["DISPLAY"] = f":{number}"
        if not _tk_works():
            pytest.fail(f"Tk cannot open the Xvfb display :{number}")
        yield os.environ["DISPLAY"]
    finally:
        if old is None:
            os.environ.pop("DISPLAY", None)
        else:
            os.environ["DISPLAY"] = old
        proc.terminate()
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def root(display: str) -> Iterator[Any]:
    """A Tk root window, destroyed after the test if the test did not destroy it."""
    window = tk.Tk()
    yield window
    try:
        window.destroy()
    except tk.TclError:
        pass  # already destroyed


def pump_until(window: Any, condition: Callable[[], bool], what: str,
               timeout: float = WAIT) -> None:
    """Run the Tk event loop until *condition()* is true; fail naming *what* on timeout."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        window.update()
        time.sleep(0.002)  # one GUI loop tick; the condition is what we wait for


@contextlib.contextmanager
def server_app(root: Any, **kwargs: Any) -> Iterator[Any]:
    """samples/tk_server.py's ``ServerApp`` in *root* on 127.0.0.1, any free port, with an
    event queue of its own; closed when the block ends."""
    tk_server = load_sample("tk_server")
    app = tk_server.ServerApp(root, port=0, host="127.0.0.1", event_queue=morsock.EventQueue(),
                              **kwargs)
    try:
        yield app
    finally:
        app.close()


def load_sample(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"sample_{name}",
                                                  ROOT / "samples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- morsock.tk.attach ---------------------------------------------------------------------

def test_import_morsock_does_not_import_tkinter() -> None:
    code = "import sys, morsock; sys.exit('tkinter' in sys.modules or 'morsock.tk' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=scaled(60)).returncode == 0


def test_attach_runs_events_on_the_tk_thread_in_order(root: Any) -> None:
    queue = morsock.EventQueue()
    pump = morsock.tk.attach(root, queue, interval_ms=5)
    seen: List[Any] = []

    def record(i: int) -> None:
        seen.append((i, threading.get_ident()))

    def post_all() -> None:
        for i in range(500):
            queue.post(record, i)

    poster = threading.Thread(target=post_all)
    poster.start()
    poster.join(WAIT)
    pump_until(root, lambda: len(seen) == 500, "500 posted callbacks")
    assert [i for i, _ in seen] == list(range(500))
    assert {ident for _, ident in seen} == {threading.get_ident()}
    assert pump.events_run == 500
    pump.detach()


def test_default_queue_is_used_without_an_argument(root: Any) -> None:
    ran = threading.Event()
    pump = morsock.tk.attach(root)
    try:
        assert pump.queue is morsock.EventQueue.default()
        morsock.EventQueue.default().post(ran.set)
        pump_until(root, ran.is_set, "a callback on the default queue")
    finally:
        pump.detach()


def test_a_flood_is_pumped_in_bounded_ticks(root: Any) -> None:
    """Tk's own events (here an idle callback) run while a flood is being drained."""
    queue = morsock.EventQueue()
    done: List[int] = []
    for i in range(5000):
        queue.post(done.append, i)
    ran_before_idle: List[int] = []
    pump = morsock.tk.attach(root, queue, interval_ms=5, max_per_tick=100)
    root.after_idle(lambda: ran_before_idle.append(len(done)))
    pump_until(root, lambda: len(done) == 5000, "the flood to be drained")
    assert ran_before_idle and ran_before_idle[0] < 5000, ran_before_idle
    assert done == list(range(5000))
    pump.detach()


def test_an_exception_in_a_posted_callback_does_not_stop_the_pump(root: Any,
                                                                   caplog: Any) -> None:
    queue = morsock.EventQueue()
    pump = morsock.tk.attach(root, queue, interval_ms=5)
    after: List[int] = []

    def boom() -> None:
        raise RuntimeError("boom")

    queue.post(boom)
    queue.post(after.append, 1)
    pump_until(root, lambda: after == [1], "the callback after the failing one")
    assert pump.active
    assert "boom" in caplog.text
    pump.detach()


def test_detach_is_idempotent_stops_pumping_and_keeps_other_bindings(root: Any) -> None:
    queue = morsock.EventQueue()
    other: List[str] = []
    root.bind("<Destroy>", lambda event: other.append(str(event.widget)), add="+")
    pump = morsock.tk.attach(root, queue, interval_ms=5)
    pump.detach()
    pump.detach()
    assert not pump.active
    queue.post(lambda: None)
    marker = threading.Event()
    root.after(50, marker.set)
    pump_until(root, marker.is_set, "50 ms of Tk time")
    assert len(queue) == 1  # nobody pumped it
    root.destroy()
    assert other, "detach() removed the application's own <Destroy> binding"


def test_destroying_the_root_stops_the_pump_cleanly(display: str, capfd: Any) -> None:
    queue = morsock.EventQueue()
    first = tk.Tk()
    pump = morsock.tk.attach(first, queue, interval_ms=1)
    child = tk.Frame(first)
    child.pack()
    child.destroy()  # a child's <Destroy> reaches the root's bindings too: ignored
    assert pump.active
    first.update()
    first.destroy()  # with an `after` pending
    assert not pump.active
    queue.post(lambda: None)
    # Tcl timers are per thread: a pending `after` of the destroyed root would fire while
    # another root runs, and report "invalid command name".
    second = tk.Tk()
    try:
        marker = threading.Event()
        second.after(100, marker.set)
        pump_until(second, marker.is_set, "100 ms of Tk time on a second root")
    finally:
        second.destroy()
    assert len(queue) == 1
    assert "invalid command name" not in capfd.readouterr().err
    pump.detach()  # harmless after destroy


def test_attach_rejects_bad_arguments(root: Any) -> None:
    with pytest.raises(ValueError):
        morsock.tk.attach(root, morsock.EventQueue(), interval_ms=0)
    with pytest.raises(ValueError):
        morsock.tk.attach(root, morsock.EventQueue(), max_per_tick=0)


def test_server_events_run_on_the_tk_thread(root: Any) -> None:
    queue = morsock.EventQueue()
    events: List[Any] = []
    pump = morsock.tk.attach(root, queue)
    main = threading.get_ident()

    def note(name: str) -> Callable[..., None]:
        return lambda *args: events.append((name, threading.get_ident()))

    with running_server(lambda s, c, d: d, events_use_main_thread=True, event_queue=queue,
                        on_connect=note("connect"), on_disconnect=note("disconnect")) as server:
        with morsock.Client("127.0.0.1", server.port) as client:
            assert client.request(b"x", timeout=WAIT) == b"x"
        pump_until(root, lambda: len(events) == 2, "on_connect and on_disconnect")
    assert events == [("connect", main), ("disconnect", main)]
    pump.detach()


# -- samples/tk_server.py ------------------------------------------------------------------

def test_tk_server_form_shows_clients_and_statistics(root: Any) -> None:
    tk_server = load_sample("tk_server")
    app = tk_server.ServerApp(root, port=0, host="127.0.0.1", event_queue=morsock.EventQueue())
    clients: List[morsock.Client] = []
    try:
        assert app.status_text().startswith("DISCONNECTED")
        app.start_button.invoke()
        assert app.server.active
        assert app.port_var.get() == str(app.server.port) != "0"
        pump_until(root, lambda: app.status_text().startswith("LISTENING"), "LISTENING")
        assert "Clients: 0" in app.status_text()
        assert app.client_rows() == []

        got: List[threading.Event] = []
        for _ in range(2):
            arrived = threading.Event()
            got.append(arrived)
            client = morsock.Client("127.0.0.1", app.server.port,
                                    on_handle_command=lambda c, d, e=arrived: e.set())
            client.connect()
            clients.append(client)
            assert client.request(b"hello", timeout=WAIT) == b"Echo: hello"
        pump_until(root, lambda: len(app.client_rows()) == 2, "two rows in the client list")
        server_side = app.server.clients
        for row in app.client_rows():
            handle, ip, port, since, bytes_in, bytes_out, messages = row
            peer = server_side[int(handle)]
            assert (ip, port) == ("127.0.0.1", str(peer.peer_port))
            assert since == peer.connected_at.strftime("%H:%M:%S")
            assert (bytes_in, bytes_out, messages) == ("14 B", "20 B", "1/1")
        pump_until(root, lambda: "Clients: 2 | Total connections: 2" in app.status_text(),
                   "the status bar to count two clients")
        pump_until(root, lambda: app.metrics_text()["received"] == "2 msg · 28 B"
                   and app.metrics_text()["sent"] == "2 msg · 40 B"
                   and app.metrics_text()["clients"] == "2 now · 2 total",
                   "the metrics panel to count the two requests")
        pump_until(root, lambda: app.log_text().count("connected from 127.0.0.1") == 2
                   and "says: hello" in app.log_text(), "connect and message log lines")

        # The status bar refreshes by itself every second (uptime).
        pump_until(root, lambda: "Uptime: 00:00:00" not in app.status_text(),
                   "the 1-second refresh to show the uptime")

        app.broadcast_var.set("news for all")
        app.broadcast_button.invoke()
        assert all(e.wait(WAIT) for e in got)
        assert "Broadcast to 2 client(s)" in app.log_text()

        first = app.tree.get_children()[0]
        app.tree.selection_set(first)
        app.disconnect_selected_button.invoke()
        pump_until(root, lambda: len(app.client_rows()) == 1 and
                   "Clients: 1 | Total connections: 2" in app.status_text(),
                   "the selected client to leave the list")
        assert app.tree.get_children() != (first,)
        pump_until(root, lambda: f"Client #{first} disconnected" in app.log_text(),
                   "the disconnect log line")

        app.disconnect_all_button.invoke()
        pump_until(root, lambda: app.client_rows() == [] and "Clients: 0" in app.status_text(),
                   "an empty client list")

        app.stop_button.invoke()
        pump_until(root, lambda: app.status_text().startswith("DISCONNECTED"), "DISCONNECTED")
        pump_until(root, lambda: "Server stopped" in app.log_text(), "the stop log line")
    finally:
        for client in clients:
            client.disconnect()
        app.close()


def test_tk_server_form_encrypted_broadcast_and_bad_settings(root: Any) -> None:
    with server_app(root, key="k", mode="GCM", profile="MORMOT") as app:
        app.port_var.set("not a port")
        assert app.start() is False
        assert "Cannot start" in app.log_text()
        app.port_var.set("0")
        assert app.start()
        assert app.server.encryption_info == "AES-256-GCM (MORMOT)"
        replies: List[bytes] = []
        arrived = threading.Event()

        def on_message(client: morsock.Client, data: bytes) -> None:
            replies.append(data)
            arrived.set()

        with morsock.Client("127.0.0.1", app.server.port, encryption_key="k",
                            encryption_mode="GCM", encryption_profile="MORMOT",
                            on_handle_command=on_message) as client:
            assert client.request("ciphered", timeout=WAIT, encrypted=True) == b"Echo: ciphered"
            pump_until(root, lambda: len(app.client_rows()) == 1, "one row")
            assert app.broadcast("secret news", encrypted=True) == 1
            assert arrived.wait(WAIT)
        assert replies == [b"secret news"]


# -- samples/tk_client.py ------------------------------------------------------------------

def test_tk_client_form_connects_sends_and_reconnects(root: Any) -> None:
    tk_client = load_sample("tk_client")
    with running_server(lambda s, c, d: b"Echo: " + d) as server:
        app = tk_client.ClientApp(root, port=server.port, strategy="IMMEDIATE",
                                  event_queue=morsock.EventQueue())
        try:
            assert app.status_text().startswith("Disconnected")
            app.connect_button.invoke()
            pump_until(root, lambda: app.status_text().startswith("Connected to"), "Connected")
            pump_until(root, lambda: "Connected to 127.0.0.1" in app.log_text(),
                       "the connect log line")
            assert "Sent: 0 B (0 msg)" in app.status_text()

            app.message_var.set("ping")
            app.send_button.invoke()
            pump_until(root, lambda: "Received: Echo: ping" in app.log_text(), "the echo")
            pump_until(root, lambda: "Sent: 13 B (1 msg)" in app.status_text()
                       and "Received: 19 B (1 msg)" in app.status_text(),
                       "the byte counts in the status bar")

            # Forced disconnect by the server: the form's client comes back by itself.
            pump_until(root, lambda: server.client_count == 1, "the server to see the client")
            server.disconnect_all_clients()
            pump_until(root, lambda: app.log_text().count("Connected to 127.0.0.1") == 2,
                       "an automatic reconnection")
            assert "Disconnected" in app.log_text()
            pump_until(root, lambda: app.status_text().startswith("Connected to"), "Connected")
            assert app.send("again")
            pump_until(root, lambda: "Received: Echo: again" in app.log_text(), "the echo")

            app.disconnect_button.invoke()
            pump_until(root, lambda: app.status_text().startswith("Disconnected"),
                       "Disconnected")
            assert app.send("nobody listens") is False
            assert "Send failed" in app.log_text()
        finally:
            app.close()


def test_tk_client_form_reports_reconnect_attempts_and_gives_up(root: Any) -> None:
    tk_client = load_sample("tk_client")
    with socket.socket() as closed_port:  # bound, not listening: connections are refused
        closed_port.bind(("127.0.0.1", 0))
        port = closed_port.getsockname()[1]
        app = tk_client.ClientApp(root, port=port, strategy="IMMEDIATE", max_attempts=2,
                                  event_queue=morsock.EventQueue())
        try:
            assert app.connect()
            pump_until(root, lambda: "Gave up reconnecting" in app.log_text(),
                       "the client to give up")
            log = app.log_text()
            assert "attempt 1 failed" in log and "attempt 2 failed" in log
            pump_until(root, lambda: app.status_text().startswith(
                "Disconnected (gave up after 2 attempts)"), "the attempt count in the status bar")
        finally:
            app.close()


# -- what a user of the samples meets: floods, stamps, sizes, states -------------------------

STAMP = re.compile(r"^(\d\d:\d\d:\d\d\.\d\d\d)  ", re.M)


def stamp_of(log: str, text: str) -> datetime.datetime:
    """The time stamp of the first log line that contains *text* (today's date)."""
    for line in log.splitlines():
        if text in line:
            match = STAMP.match(line)
            assert match, f"no millisecond stamp on {line!r}"
            clock = datetime.datetime.strptime(match[1], "%H:%M:%S.%f").time()
            return datetime.datetime.combine(datetime.date.today(), clock)
    pytest.fail(f"no log line with {text!r}: {log!r}")


def test_tk_server_log_coalesces_a_flood_and_keeps_up(root: Any) -> None:
    total = 20_000
    with server_app(root) as app:
        assert app.start()
        with morsock.Client("127.0.0.1", app.server.port) as client:
            for n in range(total):
                client.send_data(f"flood {n}")
            pump_until(root, lambda: app.figures.read()["handled"] == total,
                       "the server to handle the flood", timeout=scaled(60))
            handled_at = time.monotonic()
            view = app.log_view
            pump_until(root, lambda: view.messages_shown + view.messages_counted == total,
                       "the log to account for every message")
            # Every message is in the log, one by one or counted; the counted ones as
            # few "… N more messages" lines, with the numbers that add up.
            log = app.log_text()
            counted = [int(n.replace(",", "")) for n in
                       re.findall(r"\u2026 ([\d,]+) more messages?$", log, re.M)]
            assert counted and sum(counted) == view.messages_counted
            assert view.messages_shown == log.count(" says: flood ")
            assert view.messages_shown <= total // 10
            # ... and it kept up: everything accounted for soon after it was handled.
            assert time.monotonic() - handled_at < 10.0
            assert len(app.queue) < 100  # the event queue did not fill with log lines


def test_tk_server_log_stamps_a_line_when_the_message_arrives(root: Any) -> None:
    with server_app(root) as app:
        assert app.start()
        with morsock.Client("127.0.0.1", app.server.port) as client:
            before = datetime.datetime.now()
            client.send_data("early bird")
            wait_until(lambda: app.figures.read()["handled"] == 1, what="the handler to run")
            handled = datetime.datetime.now()
            # The GUI is busy for a while (nothing pumps Tk): the line must still carry
            # the time the message arrived, not the time it is drawn.
            busy_until = time.monotonic() + 1.5
            while time.monotonic() < busy_until:
                time.sleep(0.05)  # a stalled GUI is what is being simulated
            drawn = datetime.datetime.now()
            pump_until(root, lambda: "early bird" in app.log_text(), "the message line")
        stamp = stamp_of(app.log_text(), "says: early bird")
        assert before - datetime.timedelta(milliseconds=5) <= stamp <= handled, \
            (before, stamp, handled)
        assert drawn - stamp > datetime.timedelta(seconds=1.4)


def test_log_view_counts_past_the_burst_in_order_with_the_events(root: Any) -> None:
    queue = morsock.EventQueue()
    view = morsock.tk.LogView(root, queue, burst=3, window=60.0)
    view.frame.pack()
    pump = morsock.tk.attach(root, queue)
    try:
        for n in range(3):
            view.message(f"m{n}")
        queue.post(view.log, "an event between")  # e.g. an on_disconnect
        for n in range(3, 8):
            view.message(f"m{n}")  # past the burst of this window: counted
        pump_until(root, lambda: view.messages_shown + view.messages_counted == 8
                   and not len(queue), "every message shown or counted")
        texts = [line.split("  ", 1)[1] for line in view.get().splitlines()]
        assert texts == ["m0", "m1", "m2", "an event between", "\u2026 5 more messages"]
        view.message("m8")  # same window: the count line grows in place
        pump_until(root, lambda: view.get().endswith("\u2026 6 more messages\n"),
                   "the count line to grow")
        assert view.lines_drawn == 5 and view.messages_shown == 3
    finally:
        pump.detach()
        view.close()


def test_log_view_keeps_the_newest_lines(root: Any) -> None:
    view = morsock.tk.LogView(root, morsock.EventQueue(), max_lines=5)
    for n in range(20):
        view.log(f"line {n}")
    assert [line.split("  ", 1)[1] for line in view.get().splitlines()] == \
        [f"line {n}" for n in range(15, 20)]
    view.close()


def test_log_view_wraps_long_lines(root: Any) -> None:
    view = morsock.tk.LogView(root, morsock.EventQueue(), width=40)
    view.frame.pack(fill="both", expand=True)
    view.log("x" * 300)
    root.update()
    assert str(view.text.cget("wrap")) == "word"
    rows = view.text.count("1.0", "end-1c", "displaylines")
    assert rows is not None and (rows[0] if isinstance(rows, tuple) else rows) >= 5
    view.close()


@pytest.mark.parametrize("sample", ["tk_server", "tk_client"])
def test_tk_forms_show_every_control_at_their_minimum_size(root: Any, sample: str) -> None:
    module = load_sample(sample)
    module.apply_theme(root)
    make = module.ServerApp if sample == "tk_server" else module.ClientApp
    app = make(root, port=0 if sample == "tk_server" else 1, event_queue=morsock.EventQueue())
    try:
        assert tuple(root.minsize()) == module.MIN_SIZE == (700, 450)
        root.geometry("400x300")  # smaller than allowed: Tk keeps the minimum
        pump_until(root, lambda: (root.winfo_width(), root.winfo_height()) == (700, 450),
                   "the window at its minimum size")
        buttons = ([app.start_button, app.stop_button, app.broadcast_button]
                   if sample == "tk_server" else
                   [app.connect_button, app.disconnect_button, app.send_button])
        right = root.winfo_rootx() + root.winfo_width()
        bottom = root.winfo_rooty() + root.winfo_height()
        for widget in [*buttons, app.status_label]:
            assert widget.winfo_ismapped(), widget
            assert widget.winfo_width() >= widget.winfo_reqwidth() - 1 or \
                widget is app.status_label, widget
            assert widget.winfo_rootx() + widget.winfo_width() <= right, widget
            assert widget.winfo_rooty() + widget.winfo_height() <= bottom, widget
            assert widget.winfo_height() >= widget.winfo_reqheight(), widget
        assert app.status_label.winfo_rooty() + app.status_label.winfo_height() == bottom
        if sample == "tk_server":  # every figure of the metrics panel, inside the panel
            app.refresh()
            root.update()
            for label in app.metric_labels.values():
                panel = label.master
                assert label.winfo_ismapped(), label
                assert (label.winfo_rooty() + label.winfo_height()
                        <= panel.winfo_rooty() + panel.winfo_height()), label
    finally:
        app.close()


def test_tk_server_form_explains_a_bad_port(root: Any) -> None:
    with server_app(root) as app:
        app.port_var.set("abc")
        assert app.start() is False
        assert ("Cannot start: the port must be a whole number from 0 to 65535 "
                "(0: any free port), not 'abc'") in app.log_text()
        assert str(app.port_entry.cget("style")) == "Invalid.TEntry"
        app.port_var.set("70000")
        assert app.start() is False
        assert "70000" in app.log_text().splitlines()[-1]
        app.port_var.set("0")
        assert app.start()
        assert str(app.port_entry.cget("style")) == "TEntry"


def test_tk_client_form_explains_a_bad_port_and_applies_the_key_size(root: Any) -> None:
    tk_client = load_sample("tk_client")
    with running_server(lambda s, c, d: b"Echo: " + d, encryption_key="k",
                        encryption_key_size=128) as server:
        app = tk_client.ClientApp(root, port=server.port, key="k",
                                  event_queue=morsock.EventQueue())
        try:
            app.port_var.set("abc")
            assert app.connect() is False
            assert ("Cannot connect: the port must be a whole number from 1 to 65535, "
                    "not 'abc'") in app.log_text()
            assert app.disconnect_button.instate(["disabled"])
            app.port_var.set(str(server.port))
            app.key_size_var.set("128")
            assert app.connect()
            pump_until(root, lambda: app.status_text().startswith("Connected to"), "Connected")
            assert app.client.encryption_key_size == 128
            assert "Encryption: AES-128-CBC" in app.status_text()
            assert app.port_entry.instate(["disabled"])  # settings apply at the next Connect
            assert app.key_size_box.instate(["disabled"])
            assert app.send("sealed", encrypted=True)
            pump_until(root, lambda: "Received: Echo: sealed" in app.log_text(), "the echo")
            # Application messages: the AUTHENTICATED handshake is not one of them.
            pump_until(root, lambda: re.search(r"Sent: \d+ B \(1 msg\) \| Received: \d+ B "
                                               r"\(1 msg\)", app.status_text()) is not None,
                       "one message each way in the status bar")
        finally:
            app.close()


def test_tk_client_form_buttons_and_status_follow_the_connection(root: Any) -> None:
    tk_client = load_sample("tk_client")
    app: Any = None
    try:
        with running_server(lambda s, c, d: d) as server:
            port = server.port
            app = tk_client.ClientApp(root, port=port, strategy="FIXED_INTERVAL",
                                      interval_ms=100, max_attempts=0,
                                      event_queue=morsock.EventQueue())
            assert app.status_text().startswith("Disconnected")
            assert app.disconnect_button.instate(["disabled"])
            assert app.send_button.instate(["disabled"])
            assert app.connect_button.instate(["!disabled"])
            app.connect_button.invoke()
            pump_until(root, lambda: app.status_text().startswith(
                f"Connected to 127.0.0.1:{port} for 00:00:0"), "Connected")
            assert app.disconnect_button.instate(["!disabled"])
            assert app.send_button.instate(["!disabled"])
            assert app.connect_button.instate(["disabled"])
        # The server is gone: the form says it is reconnecting, with the attempt number.
        pump_until(root, lambda: re.match(r"Reconnecting \(attempt ([2-9]|\d\d+)\)…",
                                          app.status_text()) is not None,
                   "the second reconnection attempt in the status bar")
        assert app.disconnect_button.instate(["!disabled"])
        assert app.send_button.instate(["disabled"])
        assert app.connect_button.instate(["disabled"])
        log = app.log_text()
        assert "Reconnection attempt 1 failed: cannot connect" in log
        assert not re.search(r"attempt (\d+) failed: reconnection attempt", log, re.I), log
        app.disconnect_button.invoke()
        pump_until(root, lambda: app.status_text().startswith("Disconnected"), "Disconnected")
        assert app.disconnect_button.instate(["disabled"])
        assert app.connect_button.instate(["!disabled"])
    finally:
        if app is not None:
            app.close()


def test_tk_server_logs_server_stopped_after_the_disconnects(root: Any) -> None:
    tk_server = load_sample("tk_server")
    app = tk_server.ServerApp(root, port=0, host="127.0.0.1", event_queue=morsock.EventQueue())
    clients: List[morsock.Client] = []
    try:
        assert app.start()
        for _ in range(2):
            client = morsock.Client("127.0.0.1", app.server.port, auto_reconnect=False)
            client.connect()
            clients.append(client)
        pump_until(root, lambda: app.log_text().count("connected from") == 2, "two clients")
        app.stop_button.invoke()
        pump_until(root, lambda: "Server stopped" in app.log_text(), "the stop line")
        lines = app.log_text().splitlines()
        stopped = next(i for i, line in enumerate(lines) if "Server stopped" in line)
        gone = [i for i, line in enumerate(lines) if " disconnected after " in line]
        assert len(gone) == 2 and max(gone) < stopped == len(lines) - 1, lines
    finally:
        for client in clients:
            client.disconnect()
        app.close()


@pytest.mark.parametrize("profile", ["AUTHENTICATED", "MORMOT"])
def test_tk_server_marks_encrypted_messages(root: Any, profile: str) -> None:
    with server_app(root, key="k", profile=profile) as app:
        assert app.start()
        with morsock.Client("127.0.0.1", app.server.port, encryption_key="k",
                            encryption_profile=profile) as client:
            assert client.request("sealed", timeout=WAIT, encrypted=True) == b"Echo: sealed"
            assert client.request("open", timeout=WAIT) == b"Echo: open"
        pump_until(root, lambda: "open" in app.log_text(), "both message lines")
        log = app.log_text()
        assert "#1 says (encrypted): sealed" in log
        assert "#1 says: open" in log


def test_tk_server_metrics_panel_shows_the_prometheus_figures(root: Any) -> None:
    pytest.importorskip("prometheus_client", reason="the metrics extra is not installed")
    with server_app(root) as app:
        assert app.figures.available
        assert app.start()
        with morsock.Client("127.0.0.1", app.server.port) as client:
            for n in range(3):
                assert client.request(f"m{n}", timeout=WAIT) == f"Echo: m{n}".encode()
        with socket.create_connection(("127.0.0.1", app.server.port), timeout=WAIT) as bad:
            bad.sendall(b"not a morsock frame")
            assert bad.recv(10) == b""
        pump_until(root, lambda: app.metrics_text()["errors"] != "none", "the error count")
        figures = app.figures.read()
        shown = app.metrics_text()
        # The registry's figures, as a scrape of /metrics would give them:
        sample = app.figures.registry.get_sample_value
        labels = {"name": "tk_server"}
        assert figures["messages_received"] == sample("morsock_messages_received_total",
                                                      labels) == 3
        assert figures["handled"] == sample("morsock_handler_duration_seconds_count",
                                            labels) == 3
        received = sample("morsock_bytes_received_total", labels)
        assert shown["received"] == f"3 msg · {received:.0f} B"
        assert shown["clients"] == "0 now · 2 total"
        assert shown["errors"] == "INVALID_PROTOCOL 1"
        assert sample("morsock_errors_total", {**labels, "code": "INVALID_PROTOCOL"}) == 1
        assert shown["handler"].startswith("3 calls · mean ")
        assert re.match(r"^p50 ≤ \d+ µs · p99 ≤ [\d.]+ (µs|ms)$", shown["handler_quantiles"])
        # Live: the panel follows without any action (the 1-second refresh).
        with morsock.Client("127.0.0.1", app.server.port) as client:
            assert client.request("one more", timeout=WAIT) == b"Echo: one more"
        pump_until(root, lambda: app.metrics_text()["received"].startswith("4 msg"),
                   "the panel to refresh by itself")
        pump_until(root, lambda: len(app.chart.history) >= 1, "a point in the rate chart")


def test_tk_server_metrics_panel_without_prometheus_client(root: Any) -> None:
    tk_server = load_sample("tk_server")
    tk_server.morsock_metrics = None  # as if the metrics extra were not installed
    app = tk_server.ServerApp(root, port=0, host="127.0.0.1", event_queue=morsock.EventQueue())
    try:
        assert not app.figures.available
        assert app.start()
        with morsock.Client("127.0.0.1", app.server.port) as client:
            assert client.request("m", timeout=WAIT) == b"Echo: m"
        with socket.create_connection(("127.0.0.1", app.server.port), timeout=WAIT) as bad:
            bad.sendall(b"not a morsock frame")
            assert bad.recv(10) == b""
        pump_until(root, lambda: app.metrics_text()["errors"] == "INVALID_PROTOCOL 1",
                   "the form's own error count")
        shown = app.metrics_text()
        # the server's statistics (the refused bytes count as received bytes)
        assert shown["received"] == f"1 msg · {app.server.total_bytes_received} B"
        assert shown["sent"] == "1 msg · 16 B"
        assert shown["handler_quantiles"] == "pip install 'morsock[metrics]'"
    finally:
        app.close()


@pytest.mark.parametrize("sample, args, ready", [
    ("tk_server", ["--autostart", "--host", "127.0.0.1", "--port", "0"],
     r"listening on 127\.0\.0\.1:\d+"),
    ("tk_client", ["--port", "1"], r"form open"),
])
def test_ctrl_c_in_the_terminal_closes_a_form_cleanly(display: str, sample: str,
                                                      args: List[str], ready: str) -> None:
    proc = subprocess.Popen([sys.executable, str(ROOT / "samples" / f"{sample}.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded by the timeout of proc.wait below
        assert re.search(ready, line), line
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, err
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=WAIT)
