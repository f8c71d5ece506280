"""The benchmark's arithmetic: latency percentiles, one measurement's figures, medians, ratios.

Pure functions, so the maths is unit-tested apart from any server. Every ratio is ours / floor:
throughput wants a ratio near 1 from below, latency, CPU and memory near 1 from above.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # grid imports this module
    from .grid import Cell

PERCENTILES = (50, 90, 99)
# Triton's ModelStatistics phases, as our server's statistics report them
PHASES = ("success", "queue", "compute_input", "compute_infer", "compute_output")
# The figures a ratio to a floor means something for (counts and error tallies are left out).
RATIO_KEYS = (
    "requests_per_s",
    "inferences_per_s",
    "p50_us",
    "p90_us",
    "p99_us",
    "mean_us",
    "server_cpu_cores",
    "server_cpu_us_per_request",
    "rss_mb",
    "peak_rss_mb",
)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latency_summary_us(latencies_ns: Sequence[int]) -> dict[str, float]:
    """p50/p90/p99 and mean of one measurement, in microseconds."""
    us = [ns / 1e3 for ns in latencies_ns]
    summary = {f"p{q}_us": percentile(us, q) for q in PERCENTILES}
    summary["mean_us"] = statistics.fmean(us) if us else math.nan
    return summary


def measurement(
    latencies_ns: Sequence[int],
    requests_per_s: float,
    batch: int,
    window_s: float,
    server_cpu_s: float | None,
    client_cpu_s: float,
) -> dict[str, float]:
    """The figures of one timed window; CPU is turned into cores and into µs per request."""
    figures = {
        "requests_per_s": requests_per_s,
        "inferences_per_s": requests_per_s * batch,  # rows/s, as perf_analyzer's infer/sec
        **latency_summary_us(latencies_ns),
        "requests": float(len(latencies_ns)),
        "client_cpu_cores": client_cpu_s / window_s,
    }
    if server_cpu_s is not None:
        figures["server_cpu_cores"] = server_cpu_s / window_s
        served = requests_per_s * window_s
        figures["server_cpu_us_per_request"] = server_cpu_s / served * 1e6 if served else math.nan
        # the cost figure of issue 14: server CPU-seconds per 1,000 requests
        figures["server_cpu_s_per_1000"] = server_cpu_s / served * 1e3 if served else math.nan
    return figures


def phase_means_us(
    before: Mapping[str, tuple[int, int]], after: Mapping[str, tuple[int, int]]
) -> dict[str, float]:
    """Mean µs per request of each server-side phase between two (count, ns) snapshots, as
    `server_<phase>_us`; empty when the server counted nothing in between."""
    means = {}
    for phase, (count, ns) in after.items():
        calls = count - before[phase][0]
        if phase == "success" and calls <= 0:
            return {}
        if calls > 0:
            means[f"server_{phase}_us"] = (ns - before[phase][1]) / calls / 1e3
    return means


def median_figures(repeats: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per-figure median over repeats (keys present in every repeat only)."""
    if not repeats:
        return {}
    keys = [k for k in repeats[0] if all(k in r for r in repeats)]
    return {k: statistics.median(r[k] for r in repeats) for k in keys}


def ratio(ours: float | None, floor: float | None) -> float | None:
    """ours / floor; None when either side is missing, not finite, or the floor is not > 0."""
    if ours is None or floor is None or not math.isfinite(ours) or not math.isfinite(floor):
        return None
    return ours / floor if floor > 0 else None


def paired_ratios(
    ours: Sequence[Mapping[str, float]], floor: Sequence[Mapping[str, float]]
) -> dict[str, float | None]:
    """Median over repeats of ours_i / floor_i, repeat i of both taken back to back: a slow drift
    in machine load cancels in each pair, which a ratio of the two medians would not do."""
    medians: dict[str, float | None] = {}
    for key in RATIO_KEYS:
        pairs = [ratio(o.get(key), f.get(key)) for o, f in zip(ours, floor, strict=True)]
        values = [v for v in pairs if v is not None]
        if key in ours[0] and key in floor[0]:
            medians[key] = statistics.median(values) if values else None
    return medians


def ratio_range(
    ours: Sequence[Mapping[str, float]], floor: Sequence[Mapping[str, float]], key: str
) -> list[float]:
    """[lowest, highest] per-repeat ratio of one figure: how far the repeats disagree."""
    values = [ratio(o.get(key), f.get(key)) for o, f in zip(ours, floor, strict=True)]
    present = [v for v in values if v is not None]
    return [min(present), max(present)] if present else []


def ratios(ours: Mapping[str, float], floor: Mapping[str, float]) -> dict[str, float | None]:
    """ours / floor for every figure of RATIO_KEYS both have."""
    return {key: ratio(ours[key], floor[key]) for key in RATIO_KEYS if key in ours and key in floor}


BASE_TARGETS = ("ours", "transport_floor", "model_floor")


def _versus(
    ours: Sequence[Mapping[str, float]], other: Sequence[Mapping[str, float]]
) -> dict[str, Any]:
    """Paired ratios of ours to another target's repeats, with the range of the throughput's."""
    return {
        "ratios": paired_ratios(ours, other),
        "range": {k: ratio_range(ours, other, k) for k in ("requests_per_s", "p50_us", "p99_us")},
    }


def cell_documents(
    cells: Sequence[Cell],
    grid: Mapping[str, Mapping[str, Sequence[Mapping[str, float]]]],
    compute: Mapping[tuple[str, int], Mapping[str, float]],
) -> list[dict[str, Any]]:
    """Per cell: medians over repeats, ratios to the transport floor (median of the paired
    per-repeat ratios, with their range) and to the compute floor. A stream cell is also read
    against the unary transport floor of the same concurrency (issue 14's yardstick), and a cell
    the peers ran holds ours / peer for each."""
    docs = []
    for cell in cells:
        runs = grid[cell.key]
        ours, floor, model_floor = (runs[name] for name in BASE_TARGETS)
        ours_median = median_figures(ours)
        doc: dict[str, Any] = {
            "model": cell.model,
            "form": cell.form,
            "batch": cell.batch,
            "concurrency": cell.concurrency,
            "streams": cell.streams,
            "repeats": len(ours),
            "ours": ours_median,
            "transport_floor": median_figures(floor),
            "vs_transport_floor": paired_ratios(ours, floor),
            "vs_transport_floor_range": _versus(ours, floor)["range"],
            "model_floor": median_figures(model_floor),
            "vs_model_floor": paired_ratios(ours, model_floor),
            "model_floor_vs_transport_floor": paired_ratios(model_floor, floor),
            "vs_compute_floor": ratios(
                {k: ours_median[k] for k in ("requests_per_s", "p50_us", "p99_us")},
                compute[(cell.model, cell.batch)],
            ),
            "ours_repeats": list(ours),
            "transport_floor_repeats": list(floor),
        }
        if cell.streams:
            unary_floor = grid[cell.unary().key]["transport_floor"]
            versus = _versus(ours, unary_floor)
            doc["unary_transport_floor"] = median_figures(unary_floor)
            doc["vs_unary_transport_floor"] = versus["ratios"]
            doc["vs_unary_transport_floor_range"] = versus["range"]
        peers = {}
        for name in (n for n in runs if n not in BASE_TARGETS):
            versus = _versus(ours, runs[name])
            peers[name] = {
                "figures": median_figures(runs[name]),
                "ours_vs_peer": versus["ratios"],
                "ours_vs_peer_range": versus["range"],
                "repeats": list(runs[name]),
            }
        if peers:
            doc["peers"] = peers
        docs.append(doc)
    return docs


__all__ = [
    "BASE_TARGETS",
    "PERCENTILES",
    "PHASES",
    "RATIO_KEYS",
    "cell_documents",
    "latency_summary_us",
    "measurement",
    "median_figures",
    "paired_ratios",
    "percentile",
    "phase_means_us",
    "ratio",
    "ratio_range",
    "ratios",
]
