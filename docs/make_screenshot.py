#!/usr/bin/env python3
"""Regenerate ``docs/tk_server.png``: a real screenshot of ``samples/tk_server.py`` at work.

    python docs/make_screenshot.py [--output docs/tk_server.png]

Runs the sample's ``ServerApp`` (with a key, AES-256-GCM) on 127.0.0.1, connects a few
``morsock.Client``\\ s from this process (plain and encrypted), exchanges some messages,
broadcasts one, disconnects a client, then captures the window.

Needs a display: when ``DISPLAY`` is unset it starts its own ``Xvfb`` (Debian:
``apt-get install xvfb``). Captures with ImageMagick's ``import`` (``apt-get install
imagemagick``), or ``xwd`` + ``convert`` when ``import`` is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import time
import tkinter as tk
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import morsock

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def load_sample(name: str) -> Any:
    """Import ``samples/NAME.py`` as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "samples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def virtual_display(size: str = "1280x800x24") -> Iterator[Optional[str]]:
    """Yield the display to use: the current one, or a fresh Xvfb (stopped afterwards)."""
    if os.environ.get("DISPLAY"):
        yield os.environ["DISPLAY"]
        return
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        raise SystemExit("no DISPLAY and no Xvfb: apt-get install xvfb")
    number = next(n for n in range(90, 200)
                  if not os.path.exists(f"/tmp/.X{n}-lock")
                  and not os.path.exists(f"/tmp/.X11-unix/X{n}"))
    proc = subprocess.Popen([xvfb, f":{number}", "-screen", "0", size, "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(f"/tmp/.X11-unix/X{number}"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("Xvfb did not start")
            time.sleep(0.05)  # polling for the socket to appear, with a deadline
        os.environ["DISPLAY"] = f":{number}"
        yield os.environ["DISPLAY"]
    finally:
        os.environ.pop("DISPLAY", None)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pump_until(root: tk.Misc, condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Run Tk's event loop until *condition()* holds; SystemExit after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for the window to reach the expected state")
        root.update()
        time.sleep(0.01)  # a GUI loop tick, not synchronisation


def capture(window_id: str, output: Path) -> None:
    """Save X window *window_id* as a PNG."""
    if shutil.which("import"):
        subprocess.run(["import", "-window", window_id, str(output)], check=True, timeout=60)
    elif shutil.which("xwd") and shutil.which("convert"):
        xwd = subprocess.run(["xwd", "-silent", "-id", window_id], check=True,
                             stdout=subprocess.PIPE, timeout=60).stdout
        subprocess.run(["convert", "xwd:-", str(output)], input=xwd, check=True, timeout=60)
    else:
        raise SystemExit("no capture tool: apt-get install imagemagick")


def make(output: Path) -> None:
    tk_server = load_sample("tk_server")
    root = tk.Tk()
    tk_server.apply_theme(root)
    key = "correct horse battery staple"
    app = tk_server.ServerApp(root, port=3434, host="127.0.0.1", key=key, mode="GCM",
                              event_queue=morsock.EventQueue())
    clients: List[morsock.Client] = []
    try:
        if not app.start():  # 3434 busy: any free port
            app.port_var.set("0")
            if not app.start():
                raise SystemExit("the server did not start")
        port = app.server.port
        for i in range(4):
            client = morsock.Client("127.0.0.1", port, encryption_key=key if i % 2 else "",
                                    encryption_mode="GCM")
            client.connect()
            clients.append(client)
        for i, client in enumerate(clients, 1):
            encrypted = bool(client.encryption_key)
            for n in range(1, 3 if i < 3 else 2):
                client.request(f"hello #{n} from client {i}", encrypted=encrypted)
        pump_until(root, lambda: len(app.client_rows()) == 4)
        app.broadcast("Server maintenance at 18:00", encrypted=False)
        clients.pop().disconnect()
        pump_until(root, lambda: len(app.client_rows()) == 3
                   and "disconnected" in app.log_text())
        # A few seconds of traffic at a changing rate, for the chart; then a burst that
        # the log coalesces.
        started = time.monotonic()
        while time.monotonic() - started < 8:
            second = int(time.monotonic() - started)
            for n in range(40 * (1 + second % 4)):
                clients[n % 3].send_data(f"reading {second}.{n}")
            root.update()
            time.sleep(0.1)  # pacing the traffic, not synchronisation
        app.tree.selection_set(app.tree.get_children()[1])
        pump_until(root, lambda: len(app.chart.history) >= 6, timeout=15)
        app.refresh()
        root.update()
        root.update_idletasks()
        capture(root.wm_frame(), output)
    finally:
        for client in clients:
            client.disconnect()
        app.close()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=HERE / "tk_server.png",
                        help="PNG to write (default docs/tk_server.png)")
    args = parser.parse_args(argv)
    with virtual_display():
        make(args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
