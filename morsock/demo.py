"""``python -m morsock demo``: placeholder until the full tour lands (issue 7)."""

from __future__ import annotations


def run_demo(quiet: bool = False) -> int:
    """Run the demo; return the process exit code."""
    from .client import Client
    from .testing import running_server

    with running_server(lambda s, c, d: b"Echo: " + d) as server:
        with Client("127.0.0.1", server.port) as client:
            reply = client.request(b"Hello morsock")
    ok = reply == b"Echo: Hello morsock"
    print(f"plain echo: {reply!r} -> {'OK' if ok else 'FAILED'}")
    print("(the full feature tour is coming soon)")
    return 0 if ok else 1
