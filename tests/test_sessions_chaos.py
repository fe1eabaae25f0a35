"""Sessions under chaos (issue 27's "done means"): a proxy cuts the connection every
50-500 ms while both sides stream mixed sizes, some encrypted, some requests.

A CI-sized run (about 3 s each); benchmarks/sessions_chaos.py runs the full volume."""

from __future__ import annotations

import logging

from session_chaos import run_chaos


def test_chaos_with_sessions_loses_duplicates_and_reorders_nothing(caplog) -> None:
    caplog.set_level(logging.CRITICAL, logger="morsock")  # every cut logs an error
    result = run_chaos(3000, sessions=True, seed=7)
    assert result["cuts"] >= 3, result
    assert result["reconnections"] >= 2, result
    assert result["refused"] == 0 and result["request_errors"] == 0, result
    assert result["lost"] == 0, result
    assert result["duplicated"] == 0, result
    assert result["out_of_order"] == 0, result
    assert result["wrong_replies"] == 0, result
    assert result["accepted_to_server"] == 3000 + result["requests"], result
    assert result["accepted_to_client"] == 3000, result


def test_chaos_without_sessions_shows_the_loss(caplog) -> None:
    """The same run without sessions: messages accepted by send_data never arrive, or
    requests take the server's pushes for their replies (what sessions prevent)."""
    caplog.set_level(logging.CRITICAL, logger="morsock")
    result = run_chaos(3000, sessions=False, seed=7)
    assert result["cuts"] >= 3, result
    assert result["lost"] + result["wrong_replies"] > 0, result
