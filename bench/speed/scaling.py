"""`stablemlp bench --workers-scaling 1,2,4,8`: our server's req/s as `serve --workers N` grows
(issue 14), for a machine with the cores for it (a 2-core one can only check the plumbing).

One server per N runs at once, each idle while another is measured, so repeat i of every N is
taken back to back and their ratios pair like the grid's. With --pin, the server with N workers
runs on the first N cores (it starts with that affinity, so it sizes its threads to them) and the
load generators on the cores above the largest N; the load comes from one client process per load
core, each with several connections, because SO_REUSEPORT spreads connections, not calls.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ...files import atomic_write_bytes
from ..servers import OUR_SERVER_ENV, our_server_command, start_server
from .checks import check_reply
from .floors import read_manifests
from .grid import Cell, Target, Timing, build_requests, model_path, run_grid
from .lineup import build_repository
from .loadgen import LoadGenerator
from .markdown import spread, table
from .payloads import feeds_of
from .report import FORMAT, clean_json, machine_facts
from .stats import median_figures, paired_ratios, ratio_range

SHAPES = ((1, 64), (64, 16))  # (batch, concurrency): enough in flight to keep 8 workers busy
CONNECTIONS = 4  # per client process


def parse_counts(text: str) -> list[int]:
    """'1,2,4,8' -> [1, 2, 4, 8] (sorted, unique); ValueError for anything else."""
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"--workers-scaling {text!r}: worker counts such as 1,2,4,8") from None
    if not counts or counts[0] < 1:
        raise ValueError(f"--workers-scaling {text!r}: worker counts of at least 1")
    return counts


def placement(cores: Sequence[int], counts: Sequence[int]) -> tuple[dict[int, set[int]], set[int]]:
    """N workers on the first N cores; the load on the cores above the largest N."""
    ordered, top = sorted(cores), max(counts)
    if len(ordered) <= top:
        raise ValueError(
            f"--workers-scaling up to {top} with --pin needs more than {top} cores, "
            f"found {len(ordered)}"
        )
    return {n: set(ordered[:n]) for n in counts}, set(ordered[top:])


@contextlib.contextmanager
def affinity(cores: set[int] | None) -> Iterator[None]:
    """Run the block with this thread on `cores` (processes started in it inherit them)."""
    before = os.sched_getaffinity(0)
    if cores:
        os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _documents(
    cells: Sequence[Cell], runs: Mapping[str, Mapping[str, Sequence[Mapping[str, float]]]]
) -> list[dict[str, Any]]:
    """Per cell and N: medians, and N workers / 1 worker paired by repeat (with the range)."""
    docs = []
    for cell in cells:
        names = list(runs[cell.key])
        base = runs[cell.key][names[0]]
        for name in names:
            mine = runs[cell.key][name]
            docs.append({
                "batch": cell.batch,
                "concurrency": cell.concurrency,
                "workers": int(name.split("_")[1]),
                "figures": median_figures(mine),
                "vs_fewest_workers": paired_ratios(mine, base),
                "vs_fewest_workers_range": ratio_range(mine, base, "requests_per_s"),
                "repeats": list(mine),
            })  # fmt: skip
    return docs


def markdown(doc: Mapping[str, Any]) -> str:
    s = doc["settings"]
    pinned = s["pinned"]
    where = (
        f"pinned: N workers on the first N of cores {pinned['server_cores']}, the load on "
        f"{pinned['load_cores']}"
        if pinned
        else "unpinned: servers and load share every core (checks the plumbing only)"
    )
    out = [
        "# stablemlp `--workers N` scaling",
        "",
        f"{doc['created_utc']}; {doc['machine']['cores']} cores; {where}; "
        f"{s['repeats']} repeats x {s['window_s']} s windows; {s['client_processes']} client "
        f"processes x {s['connections_per_process']} connections; raw_input_contents. "
        f"`{' '.join(doc['command'])}`",
        "",
    ]
    rows = []
    for c in doc["cells"]:
        f, vs = c["figures"], c["vs_fewest_workers"]
        rows.append([
            str(c["batch"]), str(c["concurrency"]), str(c["workers"]),
            f"{f['requests_per_s']:,.0f}",
            f"{vs.get('requests_per_s') or 0:.2f} {spread(c['vs_fewest_workers_range'])}",
            f"{f['p50_us']:,.0f}/{f['p99_us']:,.0f}", f"{f.get('server_cpu_s_per_1000') or 0:.3f}",
            f"{f.get('rss_mb') or 0:,.0f}",
        ])  # fmt: skip
    head = ["batch", "conc", "workers", "req/s", "vs fewest workers (range)", "p50/p99 µs"]
    out += table([*head, "server CPU-s per 1,000 req", "RSS MB"], rows)
    return "\n".join(out) + "\n"


def scaling_main(args: argparse.Namespace, counts: list[int], stack: contextlib.ExitStack) -> int:
    """Start one server per worker count, check it, measure all of them, write OUT/scaling.*."""
    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stablemlp-scaling-")))
    repository = args.model_repository or build_repository(work, args.model, None)
    manifests = read_manifests(repository)
    cells = [Cell(args.model, "raw_input_contents", b, c) for b, c in SHAPES]
    requests = build_requests(cells, manifests)
    usable = sorted(os.sched_getaffinity(0))
    server_cores, load_cores = placement(usable, counts) if args.pin else ({}, set())
    targets = []
    for n in counts:
        command = our_server_command(repository, [*args.server_arg, "--workers", str(n)])
        with affinity(server_cores.get(n)):
            server = start_server(f"workers_{n}", command, OUR_SERVER_ENV)
        stack.callback(server.stop)
        targets.append(Target(f"workers_{n}", server.address, server.pid))
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path(repository, args.model)))
    for cell in cells:
        (expected,) = session.run(["probability"], feeds_of(requests[cell.key]))
        for target in targets:
            check_reply(target.address, requests[cell.key], expected)
    processes = len(load_cores) if args.pin else max(1, args.client_processes)
    repeats = 1 if args.smoke else args.repeats
    warmup, window = (0.1, 0.3) if args.smoke else (args.warmup_s, args.window_s)
    timing = Timing(warmup, window, args.max_requests, repeats, processes, CONNECTIONS)
    with affinity(load_cores or None), LoadGenerator(processes) as generator:
        runs = run_grid(generator, targets, cells, requests, timing)
    pinned = None
    if args.pin:
        pinned = {
            "server_cores": sorted(server_cores[max(counts)]),
            "load_cores": sorted(load_cores),
        }
    doc = {
        "format": FORMAT,
        "created_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": ["stablemlp", "bench", *args.argv],
        "smoke": bool(args.smoke),
        "machine": machine_facts(),
        "settings": {
            "worker_counts": counts,
            "warmup_s": timing.warmup_s,
            "window_s": timing.window_s,
            "repeats": timing.repeats,
            "client_processes": processes,
            "connections_per_process": CONNECTIONS,
            "server_args": list(args.server_arg),
            "pinned": pinned,
        },
        "cells": _documents(cells, runs),
    }
    doc = clean_json(doc)
    atomic_write_bytes(args.output / "scaling.json", (json.dumps(doc, indent=2) + "\n").encode())
    atomic_write_bytes(args.output / "scaling.md", markdown(doc).encode())
    print(f"report: {args.output / 'scaling.md'}")
    return 0


__all__ = ["parse_counts", "placement", "scaling_main"]
