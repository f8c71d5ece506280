"""The benchmark's report: bench.json (everything), bench.md (tables), bench.png (plot).

Every file is written atomically (a temporary file in the same folder, then a rename), so a
reader never sees half a report. The plot needs matplotlib (the train extra); without it the
report says so and the other two files are still written.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FORMAT = "stablemlp.bench/1"
THROUGHPUT_TARGET = 0.85  # issue 5: >= 0.85 x the transport floor
LATENCY_TARGET = 1.15  # issue 5: p50 at concurrency 1 <= 1.15 x the transport floor's
START_TARGET_S = 1.0
IDLE_RSS_TARGET_MB = 150.0
PHASES = ("success", "queue", "compute_input", "compute_infer", "compute_output")


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


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)  # mkstemp makes the file 0600; give it the usual permissions
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    """Issue 5's figures to reach, each with what this run measured (None: not measured)."""
    rows = []
    for cell in cells:
        if cell["model"] != cells[0]["model"]:
            continue  # the figures are stated for the main model
        vs = cell["vs_transport_floor"]
        shape = f"batch {cell['batch']}, concurrency {cell['concurrency']}, {cell['form']}"
        if cell["concurrency"] == 8 and cell["batch"] in (1, 64):
            rows.append(
                _target(
                    f"throughput / floor, {shape}",
                    vs.get("requests_per_s"),
                    THROUGHPUT_TARGET,
                    at_least=True,
                )
            )
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


def _num(value: Any, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _range(cell: Mapping[str, Any], key: str) -> str:
    low_high = cell.get("vs_transport_floor_range", {}).get(key) or []
    return f"({low_high[0]:.2f}..{low_high[1]:.2f})" if len(low_high) == 2 else ""


def _cell_rows(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [
        "| model | form | batch | conc | ours req/s | floor req/s | ratio (range)"
        " | ours p50/p90/p99 µs | floor p50/p90/p99 µs | p50 ratio | p99 ratio"
        " | server CPU µs/req ours / floor | RSS MB ours / floor |",
        "|" + " --- |" * 13,
    ]
    for c in cells:
        ours, floor, vs = c["ours"], c["transport_floor"], c["vs_transport_floor"]

        def lat(f: Mapping[str, Any]) -> str:
            return "/".join(_num(f.get(k)) for k in ("p50_us", "p90_us", "p99_us"))

        lines.append(
            f"| {c['model']} | {c['form'].split('_')[0]} | {c['batch']} | {c['concurrency']} "
            f"| {_num(ours.get('requests_per_s'))} | {_num(floor.get('requests_per_s'))} "
            f"| {_num(vs.get('requests_per_s'), 2)} {_range(c, 'requests_per_s')} "
            f"| {lat(ours)} | {lat(floor)} "
            f"| {_num(vs.get('p50_us'), 2)} | {_num(vs.get('p99_us'), 2)} "
            f"| {_num(ours.get('server_cpu_us_per_request'))} / "
            f"{_num(floor.get('server_cpu_us_per_request'))} "
            f"| {_num(ours.get('rss_mb'))} / {_num(floor.get('rss_mb'))} |"
        )
    return lines


def _phase_rows(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    """Our server's own account (ModelStatistics deltas over warm-up + window) of each request."""
    lines = [
        "",
        "## Where our server's time goes (its ModelStatistics, mean µs per request)",
        "",
        "Wall time inside the handler; queue = waiting for an inference worker.",
        "",
        "| model | form | batch | conc | in handler | queue | decode | infer | encode"
        " | client p50 µs |",
        "|" + " --- |" * 10,
    ]
    for c in cells:
        ours = c["ours"]
        phases = " | ".join(_num(ours.get(f"server_{p}_us"), 1) for p in PHASES)
        lines.append(
            f"| {c['model']} | {c['form'].split('_')[0]} | {c['batch']} "
            f"| {c['concurrency']} | {phases} | {_num(ours.get('p50_us'))} |"
        )
    return lines


def _model_floor_rows(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    """The model floor splits each gap: what running the model costs any server, and the rest."""
    out = [
        "",
        "## The model floor: the transport floor plus session.run on the request's rows",
        "",
        "What any server that runs this model on its event loop pays at least (zero-copy view of "
        "the rows, one session.run, a pre-built reply). *model floor / transport floor* is the "
        "share of the transport floor's figure left once the model runs; *ours / model floor* "
        "is our serving overhead alone.",
        "",
        "| model | form | batch | conc | model floor req/s | model floor / transport floor "
        "| ours / model floor | p50 µs model floor | p50 ratio ours / model floor "
        "| server CPU µs/req model floor |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in cells:
        mf, vs, of = c["model_floor"], c["vs_model_floor"], c["model_floor_vs_transport_floor"]
        out.append(
            f"| {c['model']} | {c['form'].split('_')[0]} | {c['batch']} "
            f"| {c['concurrency']} | {_num(mf.get('requests_per_s'))} "
            f"| {_num(of.get('requests_per_s'), 2)} | {_num(vs.get('requests_per_s'), 2)} "
            f"| {_num(mf.get('p50_us'))} | {_num(vs.get('p50_us'), 2)} "
            f"| {_num(mf.get('server_cpu_us_per_request'))} |"
        )
    return out


def _placement(pinned: Mapping[str, Sequence[int]] | None) -> str:
    if not pinned:
        return (
            "Placement: unpinned; the servers and the load generator share every core as the "
            "kernel schedules them."
        )
    return (
        f"Placement: pinned (--pin); servers on cores {list(pinned['server_cores'])}, load "
        f"generators and perf_analyzer on {list(pinned['load_cores'])}, as on separate machines."
    )


def markdown(doc: Mapping[str, Any]) -> str:
    s, startup = doc["settings"], doc["startup"]
    out = [
        "# stablemlp serving benchmark",
        "",
        f"{doc['created_utc']}; {doc['machine']['cores']} cores; load average at start/end "
        f"{doc['machine']['load_average_start']} / {doc['machine']['load_average_end']}; "
        f"{'SMOKE RUN (tiny windows, figures meaningless); ' if doc['smoke'] else ''}"
        f"{s['repeats']} repeats x {s['window_s']} s windows after {s['warmup_s']} s warm-up, "
        f"medians; load from up to {s['client_processes']} client processes (grpc.aio, "
        "pre-serialized requests). Ratios are ours / floor: the median over repeats of the "
        "ratio within each repeat, where both were measured back to back (range: lowest..highest "
        "repeat).",
        "",
        _placement(s.get("pinned")),
        "",
        "## Targets (issue 5)",
        "",
        "| figure | measured | target | met |",
        "| --- | --- | --- | --- |",
    ]
    for t in doc["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        out.append(
            f"| {t['name']} | {_num(t['measured'], 2)} | {t['comparison']} {t['limit']:g} | {met} |"
        )
    out += ["", "## Ours vs the transport floor (same load generator, same payloads)", ""]
    out += _cell_rows(doc["cells"])
    out += _model_floor_rows(doc["cells"])
    out += _phase_rows(doc["cells"])
    out += [
        "",
        "## Compute floor: in-process ONNX Runtime session.run, one thread",
        "",
        "| model | batch | runs/s | p50 µs | p99 µs |",
        "| --- | --- | --- | --- | --- |",
    ]
    for f in doc["compute_floor"]:
        out.append(
            f"| {f['model']} | {f['batch']} | {_num(f['requests_per_s'])} "
            f"| {_num(f['p50_us'], 1)} | {_num(f['p99_us'], 1)} |"
        )
    out += [
        "",
        "## Start-up",
        "",
        f"- start to health SERVING: {_num(startup.get('seconds_to_serving_median'), 2)} s "
        f"(runs: {startup.get('seconds_to_serving')})",
        f"- idle RSS after SERVING: {_num(startup.get('idle_rss_mb'), 1)} MB",
        f"- `import serving.server`: {_num(startup.get('import_seconds'), 3)} s "
        f"(bare interpreter {_num(startup.get('interpreter_seconds'), 3)} s); "
        f"torch imported: {startup.get('torch_imported')}",
    ]
    pa = doc["perf_analyzer"]
    out += ["", "## perf_analyzer (Triton's C++ load generator, raw input)", ""]
    if not pa["cells"]:
        out.append(f"not run: {pa['note']}")
    else:
        out += [
            "| model | batch | conc | ours infer/s | floor infer/s | ratio | ours p50/p99 µs"
            " | floor p50/p99 µs |",
            "|" + " --- |" * 8,
        ]
        for c in pa["cells"]:
            ours, floor = c["ours"] or {}, c["transport_floor"] or {}
            out.append(
                f"| {c['model']} | {c['batch']} | {c['concurrency']} "
                f"| {_num(ours.get('inferences_per_s'))} | {_num(floor.get('inferences_per_s'))} "
                f"| {_num(c['ratio_throughput'], 2)} "
                f"| {_num(ours.get('p50_us'))}/{_num(ours.get('p99_us'))} "
                f"| {_num(floor.get('p50_us'))}/{_num(floor.get('p99_us'))} |"
            )
    out += ["", f"Plot: {doc['plot'] or 'not written (matplotlib missing)'}", ""]
    return "\n".join(out)


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
        cells = [c for c in doc["cells"] if (c["model"], c["form"], c["batch"]) == (main, form, 1)]
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
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return True


def write_report(doc: dict[str, Any], out_dir: Path) -> None:
    doc["plot"] = "bench.png" if plot(doc, out_dir / "bench.png") else None
    atomic_write(
        out_dir / "bench.json", lambda tmp: tmp.write_text(json.dumps(doc, indent=2) + "\n")
    )
    atomic_write(out_dir / "bench.md", lambda tmp: tmp.write_text(markdown(doc)))


__all__ = [
    "FORMAT",
    "atomic_write",
    "clean_json",
    "machine_facts",
    "markdown",
    "plot",
    "targets",
    "write_report",
]
