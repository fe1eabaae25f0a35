"""Shared helpers of the tests against the live Delphi original (../shared/delphi_peer/bin,
or ``MORSOCK_DELPHI_BIN``): the programs copied to a temporary directory (they write
beside themselves), and :class:`DelphiPeer`, one of them running with its stdout read
line by line by a thread and its stdin open for commands."""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import List, Optional

import pytest

from helpers import scaled

LOCAL = "127.0.0.1"
DELPHI_BIN = Path(os.environ.get(
    "MORSOCK_DELPHI_BIN",
    Path(__file__).resolve().parents[2] / "shared" / "delphi_peer" / "bin"))
#: Bound of every wait on a Delphi program's output.
PEER_WAIT = scaled(30.0)


@pytest.fixture(scope="module")
def delphi_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The original's programs, copied out of the read-only tree; skips, saying where it
    looked, when they are not there."""
    missing = [n for n in ("mm_client", "mm_echo_server") if not (DELPHI_BIN / n).exists()]
    if missing:
        pytest.skip(f"no Delphi peer programs ({', '.join(missing)}) in {DELPHI_BIN}; "
                    f"set MORSOCK_DELPHI_BIN to the delphi_peer/bin directory")
    d = tmp_path_factory.mktemp("delphi")
    for name in ("mm_client", "mm_echo_server"):
        shutil.copy2(DELPHI_BIN / name, d / name)
    return d


def key_args(key: str, mode: str, bits: int) -> List[str]:
    """The Delphi programs' arguments for *key* (UTF-8 text), *mode* and key size."""
    return ["--keyhex", key.encode("utf-8").hex(), "--mode", mode, "--bits", str(bits)]


class DelphiPeer:
    """One Delphi program running in *directory*: :meth:`command` writes a stdin line,
    :meth:`expect` waits for an output line; :meth:`close` ends it (``quit``, then kill)
    and reaps it. Not thread-safe: one test thread drives it."""

    def __init__(self, directory: Path, program: str, args: List[str]) -> None:
        self.proc = subprocess.Popen([str(directory / program), *args], cwd=directory,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self.out: List[str] = []
        self._reader = threading.Thread(target=self._read, name=f"{program}-stdout")
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.out.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def command(self, line: str) -> None:
        """Send one stdin command."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, pattern: str, timeout: float = PEER_WAIT) -> "re.Match[str]":
        """The first coming output line matching *pattern* (earlier ones are skipped);
        fails the test when none comes within *timeout* or the program ends first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no line matching {pattern!r} within {timeout} s: "
                            f"{''.join(self.out)[-3000:]}")
            if line is None:
                pytest.fail(f"program ended before {pattern!r}: {''.join(self.out)[-3000:]}")
            match = re.search(pattern, line)
            if match:
                return match

    def close(self) -> None:
        """``quit``, then kill if it has not ended; reap; join the reader (idempotent)."""
        if self.proc.poll() is None:
            try:
                self.command("quit")
                self.proc.wait(scaled(10))
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(scaled(10))
        self._reader.join(scaled(10))
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
