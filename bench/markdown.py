"""bench.md: the benchmark's JSON document as Markdown tables, targets first."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .rest import markdown as rest_markdown
from .stats import PHASES
from .tables import cost_rows, peer_rows, perf_analyzer_streaming_rows, spread, stream_rows
from .tables import key as _key
from .tables import num as _num


def _range(cell: Mapping[str, Any], key: str) -> str:
    return spread(cell.get("vs_transport_floor_range", {}).get(key))


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
            f"{_key(c)}| {_num(ours.get('requests_per_s'))} | {_num(floor.get('requests_per_s'))} "
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
        lines.append(f"{_key(c)}| {phases} | {_num(ours.get('p50_us'))} |")
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
        "|" + " --- |" * 10,
    ]
    for c in cells:
        mf, vs, of = c["model_floor"], c["vs_model_floor"], c["model_floor_vs_transport_floor"]
        out.append(
            f"{_key(c)}| {_num(mf.get('requests_per_s'))} "
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
        "## Targets (issues 5 and 14)",
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
    out += stream_rows(doc["cells"])
    out += peer_rows(doc)
    out += cost_rows(doc["cells"])
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
        f"- `import stablemlp.serving.server`: {_num(startup.get('import_seconds'), 3)} s "
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
    out += perf_analyzer_streaming_rows(doc.get("perf_analyzer_streaming"))
    if doc.get("rest"):  # `--rest`: REST servers beside our gRPC (bench/rest.py)
        out += ["", rest_markdown(doc["rest"])]
    out += ["", f"Plot: {doc['plot'] or 'not written (matplotlib missing)'}", ""]
    return "\n".join(out)


__all__ = ["markdown"]
