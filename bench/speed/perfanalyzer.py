"""Triton's perf_analyzer as a second, independent load generator (C++, no Python client cost).

It lives in a separate environment (scripts/setup_triton_venv.sh: tritonclient's stubs clash with
ours in one process) and runs through that environment's `stablemlp-perf-analyzer` wrapper, which
puts the CUDA runtime it links against on LD_LIBRARY_PATH. Each (batch, concurrency) is one bounded
run; its CSV (`-f`) gives throughput and latency percentiles in microseconds.
"""

from __future__ import annotations

import csv
import logging
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..servers import ROOT

log = logging.getLogger(__name__)

WRAPPER = Path("bin") / "stablemlp-perf-analyzer"  # inside the environment
# A noisy shared 2-core machine: perf_analyzer's default 10 % stability (max/min of the last 3
# windows) failed at concurrency 32 within 6 trials, so it is looser here and the trials bounded.
STABILITY_PCT, MAX_TRIALS = "50", "8"
TIMEOUT_S = 120.0  # one stabilised measurement: up to MAX_TRIALS windows plus start-up
# CSV column -> our figure name (perf_analyzer reports latencies in microseconds).
COLUMNS = {
    "Inferences/Second": "inferences_per_s",
    "p50 latency": "p50_us",
    "p90 latency": "p90_us",
    "p99 latency": "p99_us",
}


def find_wrapper(venv: Path) -> Path | None:
    wrapper = venv / WRAPPER
    return wrapper if wrapper.is_file() else None


def resolve_wrapper(venv: Path | None, smoke: bool) -> Path | None:
    """The wrapper in `venv`, else in $STABLEMLP_TRITON_VENV or .venv-triton (not for smoke runs,
    which stay short unless asked)."""
    if venv is None and smoke:
        return None
    default = Path(os.environ.get("STABLEMLP_TRITON_VENV", ROOT / ".venv-triton"))
    return find_wrapper(venv or default)


def parse_csv(path: Path, batch: int) -> dict[str, float]:
    """The first row of perf_analyzer's CSV as our figures (requests/s = infer/s ÷ batch)."""
    with path.open(newline="") as handle:
        row = next(csv.DictReader(handle))
    figures = {ours: float(row[theirs]) for theirs, ours in COLUMNS.items()}
    figures["requests_per_s"] = figures["inferences_per_s"] / batch
    return figures


def run_perf_analyzer(
    wrapper: Path,
    address: str,
    model: str,
    batch: int,
    concurrency: int,
    workdir: Path,
    window_ms: int,
    timeout_s: float,
    streaming: bool = False,
) -> dict[str, float] | None:
    """One stabilised measurement (`streaming`: through ModelStreamInfer); None (with a warning)
    when it fails or runs out of time."""
    lane = "-stream" if streaming else ""
    name = f"pa-{model}-b{batch}-c{concurrency}{lane}-{address.replace(':', '_')}.csv"
    csv_path = workdir / name
    command = [
        *(str(wrapper), "-m", model, "-u", address, "-i", "grpc", "-b", str(batch)),
        *("--concurrency-range", f"{concurrency}:{concurrency}", "-p", str(window_ms)),
        *("-s", STABILITY_PCT, "-r", MAX_TRIALS, "--input-data", "random", "-f", str(csv_path)),
        *(["--streaming"] if streaming else []),
    ]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("perf_analyzer %s b%d c%d: %s", address, batch, concurrency, err)
        return None
    if out.returncode != 0 or not csv_path.is_file():
        tail = (out.stdout + out.stderr).strip().splitlines()[-3:]
        log.warning("perf_analyzer %s b%d c%d failed: %s", address, batch, concurrency, tail)
        return None
    return parse_csv(csv_path, batch)


def compare(
    wrapper: Path | None,
    model: str,
    targets: Sequence[tuple[str, str]],  # (name, HOST:PORT)
    shapes: Sequence[tuple[int, int]],
    window_s: float,
    workdir: Path,
) -> dict[str, Any]:
    """perf_analyzer against each target at each (batch, concurrency): the report's section."""
    if wrapper is None:
        return {"note": "no perf_analyzer environment (scripts/setup_triton_venv.sh)", "cells": []}
    window_ms = max(500, int(window_s * 500))
    cells = []
    for batch, concurrency in shapes:
        figures = {
            name: run_perf_analyzer(wrapper, address, model, batch, concurrency, workdir,
                                    window_ms, TIMEOUT_S)
            for name, address in targets
        }  # fmt: skip
        ours, floor = figures.get("ours"), figures.get("transport_floor")
        ratio = ours["inferences_per_s"] / floor["inferences_per_s"] if ours and floor else None
        cells.append({"model": model, "batch": batch, "concurrency": concurrency, **figures,
                      "ratio_throughput": ratio})  # fmt: skip
    note = f"-p {window_ms} ms windows, stability {STABILITY_PCT} %, at most {MAX_TRIALS} trials"
    return {"note": note, "cells": cells}


def streaming_check(
    wrapper: Path | None,
    model: str,
    address: str,
    shapes: Sequence[tuple[int, int]],
    window_s: float,
    workdir: Path,
) -> dict[str, Any]:
    """perf_analyzer --streaming against our server (issue 14: Triton's own client must work
    with our ModelStreamInfer); its figures, or why there are none."""
    if wrapper is None:
        return {"note": "no perf_analyzer environment (scripts/setup_triton_venv.sh)", "cells": []}
    window_ms = max(500, int(window_s * 500))
    cells = []
    for batch, concurrency in shapes:
        ours = run_perf_analyzer(wrapper, address, model, batch, concurrency, workdir, window_ms,
                                 TIMEOUT_S, streaming=True)  # fmt: skip
        cells.append({"model": model, "batch": batch, "concurrency": concurrency, "ours": ours})
    note = f"--streaming, -p {window_ms} ms windows, stability {STABILITY_PCT} %"
    return {"note": note, "cells": cells}


__all__ = [
    "COLUMNS",
    "compare",
    "find_wrapper",
    "parse_csv",
    "resolve_wrapper",
    "run_perf_analyzer",
    "streaming_check",
]
