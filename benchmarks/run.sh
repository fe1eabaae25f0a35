#!/usr/bin/env bash
# Run the shared benchmark harness against morsock and the reference servers, scenario by
# scenario in one interleaved run (see ../shared/bench/README.md).
#   benchmarks/run.sh                 full matrix (~15 min)
#   benchmarks/run.sh --quick         ~2 s per scenario
#   benchmarks/run.sh --scenarios lat1,pipe64
# Extra arguments go to the harness. MORSOCK_PYTHON picks the interpreter (default: the
# one on PATH, which must have morsock installed).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bench=${MORSOCK_BENCH:-$here/../../shared/bench/run}
[ -x "$bench" ] || bench=$here/../shared/bench/run
if [ ! -x "$bench" ]; then
  echo "benchmarks/run.sh: the shared benchmark harness (shared/bench/run, beside the" \
       "repository) is not here; set MORSOCK_BENCH to its run script" >&2
  exit 2
fi
py=${MORSOCK_PYTHON:-python3}
exec "$bench" --anchors --only "${MORSOCK_ANCHORS:-asyncio_proto,selectors_reactor}" --interleave \
    --server "$py -m morsock server --host 127.0.0.1 --port {port}" --name morsock "$@"
