"""Portability on a Linux-only test machine.

* ``portability_child.py`` runs in a subprocess where POSIX-only modules and names
  (``fcntl``, ``os.pipe``, ``TCP_KEEPIDLE``, ``SO_REUSEPORT``, ``sendmsg`` ...) are
  gone, the selector is ``select()`` and ``socketpair()`` is a TCP pair, as on Windows:
  every morsock module must import and the library must work there.
* The ``select()`` connection cap (Windows: at most 512 sockets per selector) is tested
  here by making ``selectors.DefaultSelector`` the ``SelectSelector`` and lowering the cap.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest

import morsock
import morsock.server
from morsock import ErrorCode
from morsock.testing import RawPeer, running_server

from helpers import Recorder, scaled

CHILD = Path(__file__).resolve().parent / "portability_child.py"
CHILD_TIMEOUT = scaled(240.0)  # bound of the subprocess: a shared 2-core machine can be slow


def test_library_runs_without_posix_only_names(tmp_path: Path) -> None:
    # cwd = an empty directory: the child imports the same morsock as this process
    proc = subprocess.run([sys.executable, str(CHILD)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=CHILD_TIMEOUT)
    report = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, report
    lines = proc.stdout.splitlines()
    assert lines[0] == "morsock " + os.path.dirname(os.path.abspath(morsock.__file__)), report
    imported = next(line for line in lines if line.startswith("imported ")).split()[1:]
    for name in ("morsock.connection", "morsock.server", "morsock.client", "morsock.reactor",
                 "morsock.cli", "morsock.tls", "morsock.crypto", "morsock.testing"):
        assert name in imported, report
    for step in ("configure_socket ok", "round trips ok", "select cap and reuse_port ok",
                 "cli ok", "demo ok"):
        assert step in lines, report
    assert lines[-1] == "PORTABILITY OK", report


# ------------------------------------------------------------------------ the select() cap

@pytest.fixture
def select_platform(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Behave as on Windows: the reactors made from now on use select(); cap lowered to 2."""
    monkeypatch.setattr(selectors, "DefaultSelector", selectors.SelectSelector)
    monkeypatch.setattr(morsock.server, "SELECT_MAX_CONNECTIONS", 2)
    yield


def _events(rec: Recorder) -> Dict[str, Any]:
    return {name: rec.handler(name) for name in ("on_connect", "on_disconnect", "on_error")}


def _cap_warnings(caplog: pytest.LogCaptureFixture) -> list:
    return [r for r in caplog.records
            if r.name == "morsock" and r.levelno == logging.WARNING and "capped" in r.message]


def test_select_selector_caps_max_connections(select_platform: None,
                                              caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder()
    with caplog.at_level(logging.WARNING, logger="morsock"):
        with running_server(max_connections=5, **_events(rec)) as server:
            assert server._reactor._selector.__class__ is selectors.SelectSelector
            assert len(_cap_warnings(caplog)) == 1  # logged by start()
            assert "max_connections=5 capped at 2" in _cap_warnings(caplog)[0].message
            with RawPeer.to(server) as a, RawPeer.to(server) as b:
                assert a.request(b"a") == b"a" and b.request(b"b") == b"b"
                for expected_rejections in (1, 2):
                    with RawPeer.to(server) as extra:
                        assert extra.expect_close() == b""
                    rec.wait_for(lambda ev, n=expected_rejections:
                                 sum(1 for e in ev if e[0] == "on_error") >= n)
                full = rec.named("on_error")
                assert [(e[1], e[3]) for e in full] == [(None, ErrorCode.SERVER_FULL)] * 2
                assert "max_connections=2" in full[0][2]
                assert server.max_connections == 5  # the setting is kept; only the use is capped
                assert server.client_count == 2 and server.total_rejected_connections == 2
                assert a.request(b"still served") == b"still served"
            rec.wait_count("on_disconnect", 2)
        assert len(_cap_warnings(caplog)) == 1  # once per server, however many refusals
    assert rec.count("on_connect") == 2


def test_no_cap_and_no_warning_within_the_limit(select_platform: None,
                                               caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder()
    with caplog.at_level(logging.WARNING, logger="morsock"):
        with running_server(max_connections=2, **_events(rec)) as server:
            with RawPeer.to(server) as a, RawPeer.to(server) as b:
                assert a.request(b"a") == b"a" and b.request(b"b") == b"b"
                with RawPeer.to(server) as extra:  # refused by max_connections itself
                    assert extra.expect_close() == b""
                rec.wait_for(lambda ev: any(e[0] == "on_error" for e in ev))
                assert "max_connections=2" in rec.named("on_error")[0][2]
            rec.wait_count("on_disconnect", 2)
    assert _cap_warnings(caplog) == []


def test_no_cap_with_epoll_or_kqueue(monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture) -> None:
    assert selectors.DefaultSelector is not selectors.SelectSelector  # Linux: epoll
    monkeypatch.setattr(morsock.server, "SELECT_MAX_CONNECTIONS", 2)
    rec = Recorder()
    with caplog.at_level(logging.WARNING, logger="morsock"):
        with running_server(max_connections=5, **_events(rec)) as server:
            peers = [RawPeer.to(server) for _ in range(4)]
            try:
                for i, peer in enumerate(peers):
                    assert peer.request(b"%d" % i) == b"%d" % i
                assert server.client_count == 4 and server.total_rejected_connections == 0
            finally:
                for peer in peers:
                    peer.close()
            rec.wait_count("on_disconnect", 4)
    assert _cap_warnings(caplog) == [] and rec.named("on_error") == []


# ------------------------------------------------------------------------ SO_REUSEADDR

@pytest.mark.parametrize("reuse", [True, False])
def test_reuse_address_only_where_it_is_safe(monkeypatch: pytest.MonkeyPatch,
                                            reuse: bool) -> None:
    """SO_REUSEADDR on POSIX; not on Windows, where it would let two servers share a port."""
    assert morsock.server._REUSE_ADDRESS is (os.name != "nt")
    monkeypatch.setattr(morsock.server, "_REUSE_ADDRESS", reuse)
    with running_server() as server:
        listener = server._listener
        assert listener is not None
        assert bool(listener.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)) is reuse
        with RawPeer.to(server) as peer:
            assert peer.request(b"ok") == b"ok"
