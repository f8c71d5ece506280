"""bench.md's building blocks: number and row-key formatting, and the tables of issue 14 (the
streaming lane, the peers, the cost per cell, perf_analyzer --streaming)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def num(value: Any, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def key(cell: Mapping[str, Any]) -> str:
    """A row's first four cells: model, form (and lane), batch, concurrency."""
    form = cell["form"].split("_")[0]
    if streams := cell.get("streams", 0):
        form += f", {streams} stream{'s' if streams > 1 else ''} x {cell['concurrency'] // streams}"
    return f"| {cell['model']} | {form} | {cell['batch']} | {cell['concurrency']} "


def spread(low_high: Sequence[float] | None) -> str:
    return f"({low_high[0]:.2f}..{low_high[1]:.2f})" if low_high and len(low_high) == 2 else ""


def stream_rows(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    """Issue 14's streaming lane: ModelStreamInfer req/s against the unary transport floor."""
    streams = [c for c in cells if c.get("streams")]
    if not streams:
        return []
    out = [
        "",
        "## Streaming lane: ModelStreamInfer at batch 1 (raw_input_contents)",
        "",
        "*ours / unary floor* is issue 14's yardstick: our stream req/s over the transport "
        "floor's unary ModelInfer req/s at the same concurrency, paired repeat by repeat (range: "
        "lowest..highest repeat). *stream floor* is the transport floor answering the same "
        "stream (one fixed reply per message).",
        "",
        "| streams x in flight | ours req/s | unary floor req/s | ours / unary floor (range) "
        "| stream floor req/s | ours / stream floor | ours p50/p99 µs "
        "| server CPU-s per 1,000 req ours / stream floor |",
        "|" + " --- |" * 8,
    ]
    for c in streams:
        ours, floor, vs = c["ours"], c["transport_floor"], c["vs_unary_transport_floor"]
        unary = c["unary_transport_floor"]
        rng = spread(c["vs_unary_transport_floor_range"].get("requests_per_s"))
        out.append(
            f"| {c['streams']} x {c['concurrency'] // c['streams']} "
            f"| {num(ours.get('requests_per_s'))} | {num(unary.get('requests_per_s'))} "
            f"| {num(vs.get('requests_per_s'), 2)} {rng} | {num(floor.get('requests_per_s'))} "
            f"| {num(c['vs_transport_floor'].get('requests_per_s'), 2)} "
            f"| {num(ours.get('p50_us'))}/{num(ours.get('p99_us'))} "
            f"| {num(ours.get('server_cpu_s_per_1000'), 3)} / "
            f"{num(floor.get('server_cpu_s_per_1000'), 3)} |"
        )
    return out


def cost_rows(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    """Issue 14's cost figures: server CPU-seconds per 1,000 requests and RSS under load."""
    peers = sorted({name for c in cells for name in c.get("peers", {})})
    who = ["ours", "transport floor", "model floor", *peers]
    out = [
        "",
        "## Cost: server CPU-seconds per 1,000 requests / RSS MB under load (medians)",
        "",
        "CPU is user + system time of the server's process tree over the timed window; RSS is "
        "read at the window's end.",
        "",
        "| model | form | batch | conc | " + " | ".join(who) + " |",
        "|" + " --- |" * (4 + len(who)),
    ]
    for c in cells:
        figures = [c["ours"], c["transport_floor"], c["model_floor"]]
        figures += [c.get("peers", {}).get(p, {}).get("figures", {}) for p in peers]
        row = " | ".join(
            f"{num(f.get('server_cpu_s_per_1000'), 3)} / {num(f.get('rss_mb'))}" for f in figures
        )
        out.append(f"{key(c)}| {row} |")
    return out


def peer_rows(doc: Mapping[str, Any]) -> list[str]:
    """Ours against other servers of the same protocol, same ONNX file, same load."""
    peers = doc.get("peers") or {}
    cells = [c for c in doc["cells"] if c.get("peers")]
    if not peers:
        return []
    out = ["", "## Peers: the same model.onnx in other KServe v2 servers", ""]
    for name, info in sorted(peers.items()):
        versions = ", ".join(f"{k} {v}" for k, v in (info.get("versions") or {}).items())
        if info.get("error"):
            reason = info["error"].strip().splitlines()[0]
            out.append(f"- **{name}**: NOT measured: {reason} (requirements: "
                       f"{', '.join(info['requirements'])})")  # fmt: skip
            continue
        out.append(
            f"- **{name}** ({versions}): {info.get('note', '')}; ready "
            f"{num(info.get('seconds_to_ready'), 2)} s after start, idle RSS "
            f"{num(info.get('idle_rss_mb'))} MB"
        )
    out += [
        "",
        "*ours / peer* is the median of per-repeat ratios (range: lowest..highest repeat); "
        "above 1 for req/s means ours serves more, below 1 for latency and CPU means ours is "
        "faster or cheaper.",
        "",
        "| peer | batch | conc | ours req/s | peer req/s | ours / peer req/s (range) "
        "| p50 µs ours / peer | p99 µs ours / peer "
        "| CPU-s per 1,000 req ours / peer | RSS MB ours / peer |",
        "|" + " --- |" * 10,
    ]
    for name in sorted(peers):
        for c in (c for c in cells if name in c["peers"]):
            ours, peer = c["ours"], c["peers"][name]["figures"]
            vs = c["peers"][name]["ours_vs_peer"]
            rng = spread(c["peers"][name]["ours_vs_peer_range"].get("requests_per_s"))

            def pair(key: str, digits: int = 0, o: Any = ours, p: Any = peer) -> str:
                return f"{num(o.get(key), digits)} / {num(p.get(key), digits)}"

            out.append(
                f"| {name} | {c['batch']} | {c['concurrency']} "
                f"| {num(ours.get('requests_per_s'))} | {num(peer.get('requests_per_s'))} "
                f"| {num(vs.get('requests_per_s'), 2)} {rng} | {pair('p50_us')} "
                f"| {pair('p99_us')} | {pair('server_cpu_s_per_1000', 3)} | {pair('rss_mb')} |"
            )
    return out


def perf_analyzer_streaming_rows(section: Mapping[str, Any] | None) -> list[str]:
    """perf_analyzer --streaming against our server: Triton's own client on our stream."""
    out = ["", "## perf_analyzer --streaming against our server (ModelStreamInfer, raw input)", ""]
    if not section or not section["cells"]:
        return [*out, f"not run: {(section or {}).get('note', 'not asked for')}"]
    out += [
        f"{section['note']}.",
        "",
        "| model | batch | conc | infer/s | p50/p90/p99 µs |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c in section["cells"]:
        f = c["ours"] or {}
        lat = "/".join(num(f.get(k)) for k in ("p50_us", "p90_us", "p99_us"))
        figures = f"{num(f.get('inferences_per_s'))} | {lat}" if f else "failed (see the log) | -"
        out.append(f"| {c['model']} | {c['batch']} | {c['concurrency']} | {figures} |")
    return out


__all__ = [
    "cost_rows",
    "key",
    "num",
    "peer_rows",
    "perf_analyzer_streaming_rows",
    "spread",
    "stream_rows",
]
