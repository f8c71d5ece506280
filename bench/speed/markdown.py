"""The benchmark's Markdown: one table writer for every report bench/ writes, and bench.md (the
benchmark's JSON document as tables, targets first)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .stats import PHASES


def num(value: Any, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def spread(low_high: Sequence[float] | None) -> str:
    """A ratio's range over repeats, "(low..high)"; "" when there is none."""
    return f"({low_high[0]:.2f}..{low_high[1]:.2f})" if low_high and len(low_high) == 2 else ""


def table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A Markdown table's lines: the header, its rule, one line per row of cells."""
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


CELL_HEAD = ("model", "form", "batch", "conc")


def cell_key(cell: Mapping[str, Any]) -> list[str]:
    """A row's first four cells: model, form (and lane), batch, concurrency."""
    form = cell["form"].split("_")[0]
    if streams := cell.get("streams", 0):
        form += f", {streams} stream{'s' if streams > 1 else ''} x {cell['concurrency'] // streams}"
    return [cell["model"], form, str(cell["batch"]), str(cell["concurrency"])]


def _pair(ours: Mapping[str, Any], other: Mapping[str, Any], key: str, digits: int = 0) -> str:
    return f"{num(ours.get(key), digits)} / {num(other.get(key), digits)}"


def _latencies(figures: Mapping[str, Any], keys: Sequence[str] = ("p50_us", "p99_us")) -> str:
    return "/".join(num(figures.get(k)) for k in keys)


def _cell_rows(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    head = [*CELL_HEAD, "ours req/s", "floor req/s", "ratio (range)", "ours p50/p90/p99 µs"]
    head += ["floor p50/p90/p99 µs", "p50 ratio", "p99 ratio", "server CPU µs/req ours / floor"]
    head += ["CPU ratio"]
    head += ["RSS MB ours / floor"]
    every = ("p50_us", "p90_us", "p99_us")
    rows = []
    for c in cells:
        ours, floor, vs = c["ours"], c["transport_floor"], c["vs_transport_floor"]
        rng = spread(c.get("vs_transport_floor_range", {}).get("requests_per_s"))
        rows.append([
            *cell_key(c), num(ours.get("requests_per_s")), num(floor.get("requests_per_s")),
            f"{num(vs.get('requests_per_s'), 2)} {rng}",
            _latencies(ours, every), _latencies(floor, every),
            num(vs.get("p50_us"), 2), num(vs.get("p99_us"), 2),
            _pair(ours, floor, "server_cpu_us_per_request"),
            num(vs.get("server_cpu_us_per_request"), 2), _pair(ours, floor, "rss_mb"),
        ])  # fmt: skip
    return table(head, rows)


def _stream_rows(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    """The streaming lane: ModelStreamInfer req/s against the unary transport floor."""
    streams = [c for c in cells if c.get("streams")]
    if not streams:
        return []
    head = ["streams x in flight", "ours req/s", "unary floor req/s", "ours / unary floor (range)"]
    head += ["stream floor req/s", "ours / stream floor", "ours p50/p99 µs"]
    head += ["server CPU-s per 1,000 req ours / stream floor"]
    rows = []
    for c in streams:
        ours, floor, vs = c["ours"], c["transport_floor"], c["vs_unary_transport_floor"]
        rng = spread(c["vs_unary_transport_floor_range"].get("requests_per_s"))
        rows.append([
            f"{c['streams']} x {c['concurrency'] // c['streams']}",
            num(ours.get("requests_per_s")), num(c["unary_transport_floor"].get("requests_per_s")),
            f"{num(vs.get('requests_per_s'), 2)} {rng}", num(floor.get("requests_per_s")),
            num(c["vs_transport_floor"].get("requests_per_s"), 2), _latencies(ours),
            _pair(ours, floor, "server_cpu_s_per_1000", 3),
        ])  # fmt: skip
    return [
        "",
        "## Streaming lane: ModelStreamInfer at batch 1 (raw_input_contents)",
        "",
        "*ours / unary floor* is issue 14's yardstick: our stream req/s over the transport "
        "floor's unary ModelInfer req/s at the same concurrency, paired repeat by repeat (range: "
        "lowest..highest repeat). *stream floor* is the transport floor answering the same "
        "stream (one fixed reply per message).",
        "",
        *table(head, rows),
    ]


def _cost_rows(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    """Server CPU-seconds per 1,000 requests and RSS under load, for every server."""
    peers = sorted({name for c in cells for name in c.get("peers", {})})
    rows = []
    for c in cells:
        figures = [c["ours"], c["transport_floor"], c["model_floor"]]
        figures += [c.get("peers", {}).get(p, {}).get("figures", {}) for p in peers]
        cost = [
            f"{num(f.get('server_cpu_s_per_1000'), 3)} / {num(f.get('rss_mb'))}" for f in figures
        ]
        rows.append([*cell_key(c), *cost])
    return [
        "",
        "## Cost: server CPU-seconds per 1,000 requests / RSS MB under load (medians)",
        "",
        "CPU is user + system time of the server's process tree over the timed window; RSS is "
        "read at the window's end.",
        "",
        *table([*CELL_HEAD, "ours", "transport floor", "model floor", *peers], rows),
    ]


def _peer_notes(peers: Mapping[str, Any]) -> list[str]:
    notes = []
    for name, info in sorted(peers.items()):
        versions = ", ".join(f"{k} {v}" for k, v in (info.get("versions") or {}).items())
        if info.get("error"):
            reason = info["error"].strip().splitlines()[0]
            needs = ", ".join(info["requirements"])
            notes.append(f"- **{name}**: NOT measured: {reason} (requirements: {needs})")
            continue
        notes.append(
            f"- **{name}** ({versions}): {info.get('note', '')}; ready "
            f"{num(info.get('seconds_to_ready'), 2)} s after start, idle RSS "
            f"{num(info.get('idle_rss_mb'))} MB"
        )
    return notes


def _peer_rows(doc: Mapping[str, Any]) -> list[str]:
    """Ours against other servers of the same protocol, same ONNX file, same load."""
    peers = doc.get("peers") or {}
    if not peers:
        return []
    head = ["peer", "batch", "conc", "ours req/s", "peer req/s", "ours / peer req/s (range)"]
    head += ["p50 µs ours / peer", "p99 µs ours / peer", "CPU-s per 1,000 req ours / peer"]
    head += ["RSS MB ours / peer"]
    rows = []
    for name in sorted(peers):
        for c in (c for c in doc["cells"] if name in c.get("peers", {})):
            ours, peer = c["ours"], c["peers"][name]["figures"]
            vs = c["peers"][name]["ours_vs_peer"]
            rng = spread(c["peers"][name]["ours_vs_peer_range"].get("requests_per_s"))
            rows.append([
                name, str(c["batch"]), str(c["concurrency"]), num(ours.get("requests_per_s")),
                num(peer.get("requests_per_s")), f"{num(vs.get('requests_per_s'), 2)} {rng}",
                _pair(ours, peer, "p50_us"), _pair(ours, peer, "p99_us"),
                _pair(ours, peer, "server_cpu_s_per_1000", 3), _pair(ours, peer, "rss_mb"),
            ])  # fmt: skip
    return [
        "",
        "## Peers: the same model.onnx in other KServe v2 servers",
        "",
        *_peer_notes(peers),
        "",
        "*ours / peer* is the median of per-repeat ratios (range: lowest..highest repeat); "
        "above 1 for req/s means ours serves more, below 1 for latency and CPU means ours is "
        "faster or cheaper.",
        "",
        *table(head, rows),
    ]


def _model_floor_rows(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    """The model floor splits each gap: what running the model costs any server, and the rest."""
    head = [*CELL_HEAD, "model floor req/s", "model floor / transport floor", "ours / model floor"]
    head += ["p50 µs model floor", "p50 ratio ours / model floor", "server CPU µs/req model floor"]
    rows = []
    for c in cells:
        mf, vs, of = c["model_floor"], c["vs_model_floor"], c["model_floor_vs_transport_floor"]
        rows.append([
            *cell_key(c), num(mf.get("requests_per_s")), num(of.get("requests_per_s"), 2),
            num(vs.get("requests_per_s"), 2), num(mf.get("p50_us")), num(vs.get("p50_us"), 2),
            num(mf.get("server_cpu_us_per_request")),
        ])  # fmt: skip
    return [
        "",
        "## The model floor: the transport floor plus session.run on the request's rows",
        "",
        "What any server that runs this model on its event loop pays at least (zero-copy view of "
        "the rows, one session.run, a pre-built reply). *model floor / transport floor* is the "
        "share of the transport floor's figure left once the model runs; *ours / model floor* "
        "is our serving overhead alone.",
        "",
        *table(head, rows),
    ]


def _phase_rows(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    """Our server's own account (ModelStatistics deltas over warm-up + window) of each request."""
    head = [*CELL_HEAD, "in handler", "queue", "decode", "infer", "encode", "client p50 µs"]
    rows = [
        [*cell_key(c), *(num(c["ours"].get(f"server_{p}_us"), 1) for p in PHASES),
         num(c["ours"].get("p50_us"))]
        for c in cells
    ]  # fmt: skip
    return [
        "",
        "## Where our server's time goes (its ModelStatistics, mean µs per request)",
        "",
        "Wall time inside the handler; queue = waiting for an inference worker.",
        "",
        *table(head, rows),
    ]


def _perf_analyzer_rows(section: Mapping[str, Any]) -> list[str]:
    out = ["", "## perf_analyzer (Triton's C++ load generator, raw input)", ""]
    if not section["cells"]:
        return [*out, f"not run: {section['note']}"]
    head = ["model", "batch", "conc", "ours infer/s", "floor infer/s", "ratio", "ours p50/p99 µs"]
    rows = []
    for c in section["cells"]:
        ours, floor = c["ours"] or {}, c["transport_floor"] or {}
        rows.append([
            c["model"], str(c["batch"]), str(c["concurrency"]), num(ours.get("inferences_per_s")),
            num(floor.get("inferences_per_s")), num(c["ratio_throughput"], 2), _latencies(ours),
            _latencies(floor),
        ])  # fmt: skip
    return [*out, *table([*head, "floor p50/p99 µs"], rows)]


def _perf_analyzer_streaming_rows(section: Mapping[str, Any] | None) -> list[str]:
    """perf_analyzer --streaming against our server: Triton's own client on our stream."""
    out = ["", "## perf_analyzer --streaming against our server (ModelStreamInfer, raw input)", ""]
    if not section or not section["cells"]:
        return [*out, f"not run: {(section or {}).get('note', 'not asked for')}"]
    rows = []
    for c in section["cells"]:
        f = c["ours"] or {}
        lat = _latencies(f, ("p50_us", "p90_us", "p99_us"))
        figures = [num(f.get("inferences_per_s")), lat] if f else ["failed (see the log)", "-"]
        rows.append([c["model"], str(c["batch"]), str(c["concurrency"]), *figures])
    head = ["model", "batch", "conc", "infer/s", "p50/p90/p99 µs"]
    return [*out, f"{section['note']}.", "", *table(head, rows)]


def rest_markdown(section: Mapping[str, Any]) -> str:
    """The REST cells (bench/speed/rest_cells.py): req/s per target, protocol and form, a column per
    (batch, concurrency) in the order measured."""
    shapes = list(dict.fromkeys((c["batch"], c["concurrency"]) for c in section["cells"]))
    keys = dict.fromkeys((c["target"], c["protocol"], c["form"]) for c in section["cells"])
    rows = []
    for key in keys:
        figures = {(c["batch"], c["concurrency"]): c["requests_per_s"] for c in section["cells"]
                   if (c["target"], c["protocol"], c["form"]) == key}  # fmt: skip
        rows.append([*key, *(f"{figures.get(shape, float('nan')):.0f}" for shape in shapes)])
    head = ["target", "protocol", "form", *(f"b{b} c{c} req/s" for b, c in shapes)]
    return "\n".join(["## REST beside gRPC", "", section["note"], "", *table(head, rows)]) + "\n"


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


def _startup(startup: Mapping[str, Any]) -> list[str]:
    return [
        "",
        "## Start-up",
        "",
        f"- start to health SERVING: {num(startup.get('seconds_to_serving_median'), 2)} s "
        f"(runs: {startup.get('seconds_to_serving')})",
        f"- idle RSS after SERVING: {num(startup.get('idle_rss_mb'), 1)} MB",
        f"- `import stablemlp.serving.server`: {num(startup.get('import_seconds'), 3)} s "
        f"(bare interpreter {num(startup.get('interpreter_seconds'), 3)} s); "
        f"torch imported: {startup.get('torch_imported')}",
    ]


def markdown(doc: Mapping[str, Any]) -> str:
    """bench.md from bench.json's document."""
    s = doc["settings"]
    met = {True: "yes", False: "**no**", None: "not measured"}
    targets = [
        [t["name"], num(t["measured"], 2), f"{t['comparison']} {t['limit']:g}", met[t["met"]]]
        for t in doc["targets"]
    ]
    compute = [
        [f["model"], str(f["batch"]), num(f["requests_per_s"]), num(f["p50_us"], 1),
         num(f["p99_us"], 1)]
        for f in doc["compute_floor"]
    ]  # fmt: skip
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
        *table(["figure", "measured", "target", "met"], targets),
        "",
        "## Ours vs the transport floor (same load generator, same payloads)",
        "",
        *_cell_rows(doc["cells"]),
        *_stream_rows(doc["cells"]),
        *_peer_rows(doc),
        *_cost_rows(doc["cells"]),
        *_model_floor_rows(doc["cells"]),
        *_phase_rows(doc["cells"]),
        "",
        "## Compute floor: in-process ONNX Runtime session.run, one thread",
        "",
        *table(["model", "batch", "runs/s", "p50 µs", "p99 µs"], compute),
        *_startup(doc["startup"]),
        *_perf_analyzer_rows(doc["perf_analyzer"]),
        *_perf_analyzer_streaming_rows(doc.get("perf_analyzer_streaming")),
    ]
    if doc.get("rest"):  # `--rest`: REST servers beside our gRPC (bench/speed/rest_cells.py)
        out += ["", rest_markdown(doc["rest"])]
    out += ["", f"Plot: {doc['plot'] or 'not written (matplotlib missing)'}", ""]
    return "\n".join(out)


__all__ = ["CELL_HEAD", "cell_key", "markdown", "num", "rest_markdown", "spread", "table"]
