"""The benchmark's report: bench.json (everything), bench.md (tables), bench.png (plot).

Every file is written atomically (a temporary file in the same folder, then a rename), so a
reader never sees half a report. The plot needs matplotlib (the train extra); without it the
report says so and the other two files are still written.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...files import atomic_write_bytes
from .markdown import markdown

log = logging.getLogger(__name__)

FORMAT = "stablemlp.bench/1"
THROUGHPUT_TARGET = 0.85  # issue 5: >= 0.85 x the transport floor
LATENCY_TARGET = 1.15  # issue 5: p50 at concurrency 1 <= 1.15 x the transport floor's
# issues 14 and 25: ModelStreamInfer req/s at batch 1 / the unary transport floor's at concurrency
# 8, by (streams, in flight per stream)
STREAM_TARGETS = {(8, 1): 2.0, (1, 8): 1.6}
CPU_TARGET = 1.3  # issue 25: server CPU per request <= 1.3 x the transport floor's
START_TARGET_S = 1.0
IDLE_RSS_TARGET_MB = 150.0


def clean_json(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    return value


def machine_facts() -> dict[str, Any]:
    """What the figures depend on: usable cores, load, interpreter and library versions."""
    versions: dict[str, str | None] = {}
    for package in ("grpcio", "onnxruntime", "protobuf", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cores": len(os.sched_getaffinity(0)),
        "python": sys.version.split()[0],
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        **versions,
    }


def _target(name: str, measured: float | None, limit: float, at_least: bool) -> dict[str, Any]:
    met = None if measured is None else (measured >= limit if at_least else measured <= limit)
    return {
        "name": name,
        "measured": measured,
        "limit": limit,
        "comparison": ">=" if at_least else "<=",
        "met": met,
    }


def targets(cells: Sequence[Mapping[str, Any]], startup: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Issues 5, 14 and 25's figures to reach, each with what this run measured (None: not
    measured)."""
    rows = []
    for cell in cells:
        if cell["model"] != cells[0]["model"]:
            continue  # the figures are stated for the main model
        shape = f"batch {cell['batch']}, concurrency {cell['concurrency']}, {cell['form']}"
        if streams := cell.get("streams", 0):
            depth = cell["concurrency"] // streams
            limit = STREAM_TARGETS.get((streams, depth))
            if limit is not None:
                name = (f"ModelStreamInfer req/s / unary floor's, batch {cell['batch']}, "
                        f"{streams} stream(s) x {depth} in flight")  # fmt: skip
                measured = cell["vs_unary_transport_floor"].get("requests_per_s")
                rows.append(_target(name, measured, limit, at_least=True))
            continue
        vs = cell["vs_transport_floor"]
        if cell["concurrency"] == 8 and cell["batch"] in (1, 64):
            rows.append(
                _target(
                    f"throughput / floor, {shape}",
                    vs.get("requests_per_s"),
                    THROUGHPUT_TARGET,
                    at_least=True,
                )
            )
            if "server_cpu_us_per_request" in vs:  # only when both servers' CPU was read
                name = f"server CPU per request / floor's, {shape}"
                cpu = vs["server_cpu_us_per_request"]
                rows.append(_target(name, cpu, CPU_TARGET, at_least=False))
        if cell["concurrency"] == 1:
            rows.append(
                _target(f"p50 / floor's, {shape}", vs.get("p50_us"), LATENCY_TARGET, at_least=False)
            )
    rows.append(
        _target(
            "start to SERVING, s",
            startup.get("seconds_to_serving_median"),
            START_TARGET_S,
            at_least=False,
        )
    )
    rows.append(
        _target("idle RSS, MB", startup.get("idle_rss_mb"), IDLE_RSS_TARGET_MB, at_least=False)
    )
    return rows


def plot(doc: Mapping[str, Any], path: Path) -> bool:
    """Throughput and p99 vs concurrency at batch 1 for the main model; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display; set here, not at import
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is missing (train extra): no plot")
        return False
    main = doc["cells"][0]["model"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"ours": "tab:blue", "model_floor": "tab:green", "transport_floor": "tab:orange"}
    styles = {"fp32_contents": ("-", "o"), "raw_input_contents": ("--", "s")}
    ticks: set[int] = set()
    for form, (line, marker) in styles.items():
        cells = [
            c
            for c in doc["cells"]
            if (c["model"], c["form"], c["batch"], c.get("streams", 0)) == (main, form, 1, 0)
        ]
        conc = [c["concurrency"] for c in cells]
        ticks.update(conc)
        for who, color in colors.items():
            style = {
                "color": color,
                "linestyle": line,
                "marker": marker,
                "label": f"{who.replace('_', ' ')}, {form}",
            }
            left.plot(conc, [c[who].get("requests_per_s") or 0 for c in cells], **style)
            right.plot(conc, [(c[who].get("p99_us") or 0) / 1e3 for c in cells], **style)
    for ax, ylabel in ((left, "requests/s"), (right, "p99 latency, ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
        ax.set_xlabel("concurrency (batch 1)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{main}: ours vs the model and transport floors (medians)")
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    atomic_write_bytes(path, image.getvalue())
    plt.close(fig)
    return True


def write_report(doc: dict[str, Any], out_dir: Path) -> None:
    doc["plot"] = "bench.png" if plot(doc, out_dir / "bench.png") else None
    atomic_write_bytes(out_dir / "bench.json", (json.dumps(doc, indent=2) + "\n").encode())
    atomic_write_bytes(out_dir / "bench.md", markdown(doc).encode())


__all__ = [
    "CPU_TARGET",
    "FORMAT",
    "STREAM_TARGETS",
    "clean_json",
    "machine_facts",
    "plot",
    "targets",
    "write_report",
]
