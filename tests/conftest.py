"""Suite-wide fixtures: every test is checked for leaked threads and file descriptors."""

from __future__ import annotations

import gc
import os
import threading
import time

import pytest


def _fds() -> set:
    try:
        return set(os.listdir("/proc/self/fd"))
    except OSError:  # pragma: no cover - not Linux
        return set()


def _wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)  # polling a condition with a deadline, not synchronising on time


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail a test that leaves threads or file descriptors behind."""
    threads_before = set(threading.enumerate())
    fds_before = _fds()
    yield
    gc.collect()
    ok = _wait_until(lambda: set(threading.enumerate()) <= threads_before, 5.0)
    extra_threads = set(threading.enumerate()) - threads_before
    assert ok, f"leaked threads: {sorted(t.name for t in extra_threads)}"
    # fds: sockets closed by another thread may take a moment to be released
    ok = _wait_until(lambda: _fds() <= fds_before, 2.0)
    extra = _fds() - fds_before
    details = []
    for fd in sorted(extra):
        try:
            details.append(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            pass
    assert ok, f"leaked file descriptors: {details}"
