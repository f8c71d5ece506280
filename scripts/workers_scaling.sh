#!/usr/bin/env bash
# `serve --workers N` scaling (issue 14) on a machine with the cores for it:
#
#   scripts/workers_scaling.sh [COUNTS] [OUT]   (defaults 1,2,4,8 and bench/results/workers-scaling)
#
# With --pin the server with N workers runs on the first N cores and the load generators (one
# client process per remaining core) on the cores above the largest N, so COUNTS up to 8 need at
# least 9 usable cores; 16 leave 8 cores of load, enough to keep 8 workers busy. The benchmark
# trains and exports its own model repository (the train extra, installed by `make install`).
# Extra arguments after OUT go to `stablemlp bench` (e.g. --repeats 5).
set -euo pipefail

cd "$(dirname "$0")/.."
COUNTS="${1:-1,2,4,8}"
OUT="${2:-bench/results/workers-scaling}"
shift $(( $# > 2 ? 2 : $# ))

largest=$(tr ',' '\n' <<<"$COUNTS" | sort -n | tail -1)
cores=$(nproc)
if (( cores <= largest )); then
  echo "workers_scaling.sh: $COUNTS workers with the load on other cores needs more than" \
    "$largest usable cores; this machine has $cores" >&2
  exit 2
fi

make install >/dev/null
.venv/bin/stablemlp bench --workers-scaling "$COUNTS" --pin --repeats 3 --output "$OUT" "$@"
