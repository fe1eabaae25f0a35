"""The sessions chaos run at full volume: 100,000 messages each way through a proxy that
cuts the connection every 50-500 ms (RST, FIN, or an orphaned server side), mixed sizes,
one in five encrypted (AUTHENTICATED), requests on two more threads; then the same
without sessions. Prints what was lost, duplicated, reordered or refused, and the
resume time after a cut (p50/p99).

    python benchmarks/sessions_chaos.py                    # 100,000 each way, both runs
    python benchmarks/sessions_chaos.py --messages 20000 --rate 4000
    python benchmarks/sessions_chaos.py --no-key           # plaintext

The engine is tests/session_chaos.py (tests/test_sessions_chaos.py runs it small).
Exits non-zero if the run with sessions lost, duplicated or reordered anything.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))

from session_chaos import KEY, run_chaos  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=2500.0,
                        help="most messages a second per stream")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-key", action="store_true")
    parser.add_argument("--only-sessions", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)  # every cut logs an error
    key = "" if args.no_key else KEY
    ok = True
    for sessions in ((True,) if args.only_sessions else (True, False)):
        result = run_chaos(args.messages, sessions=sessions, seed=args.seed, key=key,
                           rate=args.rate, deadline=600.0, drain=5.0)
        print(json.dumps(result), flush=True)
        if sessions:
            ok = not (result["lost"] or result["duplicated"] or result["out_of_order"]
                      or result["wrong_replies"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
