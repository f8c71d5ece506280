"""`stablemlp bench`: our server against the transport, model and compute floors (and, asked
for, other KServe v2 servers), in one run.

Starts (or targets) our server and the floors on 127.0.0.1, checks every server answers every
payload correctly, times the grid (unary and streaming cells) from separate load processes, adds
perf_analyzer's figures when its environment exists, and writes OUT/bench.json, OUT/bench.md and
OUT/bench.png. `--workers-scaling` measures `--workers N` instead (bench/speed/scaling.py).
`stablemlp bench quality ...` runs the model-quality suite instead (bench/quality.py).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from .peers.environments import parse_peers
from .servers import ROOT, is_loopback, measure_import, pin_servers
from .speed.checks import check_targets
from .speed.floors import read_manifests
from .speed.grid import (
    NARROW_SHAPES,
    Target,
    Timing,
    build_grid,
    build_requests,
    compute_floors,
    is_peer_cell,
    run_grid,
)
from .speed.lineup import (
    build_repository,
    checked_peers,
    install_peers,
    start_floors,
    start_ours,
    start_peers,
)
from .speed.loadgen import LoadGenerator
from .speed.perfanalyzer import compare, resolve_wrapper, streaming_check
from .speed.report import FORMAT, clean_json, machine_facts, targets, write_report
from .speed.rest_cells import rest_cells
from .speed.scaling import parse_counts, scaling_main
from .speed.stats import cell_documents

log = logging.getLogger(__name__)

STREAM_PA_SHAPES = ((1, 1), (1, 8))  # perf_analyzer --streaming: (batch, concurrency)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stablemlp bench", description=__doc__)
    p.add_argument(
        "--model-repository",
        type=Path,
        help="repository to serve (default: train and export a small one; needs the train extra)",
    )
    p.add_argument("--model", default="breast_cancer", help="the main model")
    p.add_argument(
        "--wide-model",
        default="breast_cancer_wide",
        help="the wider model measured at batch 1 ('' to skip)",
    )
    p.add_argument(
        "--text-model",
        default="penguins",
        help="a model with text columns, measured at batch 1 and 64 ('' to skip; trained on "
        "palmerpenguins' CSV when the bench builds the repository)",
    )
    p.add_argument(
        "--server",
        metavar="HOST:PORT",
        help="measure this running server instead of starting ours (no CPU, memory or "
        "start-up figures then); --model-repository must be what it serves",
    )
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra flag for `stablemlp serve` (repeat; e.g. --server-arg=--workers=2)",
    )
    p.add_argument("--output", type=Path, default=Path("bench/results/serving"),
                   help="folder for bench.json, bench.md, bench.png")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="timed windows per cell and target")
    p.add_argument("--warmup-s", type=float, default=0.5, help="load before each window")
    p.add_argument("--window-s", type=float, default=2.0, help="length of each timed window")
    p.add_argument("--max-requests", type=int, default=500_000, help="per client process/window")
    p.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="load processes for concurrency > 1 (concurrency 1 uses one). One by default: on "
        "2 cores a second one lowered the transport floor ~20%% (its event loop takes CPU the "
        "server needs) and left ours unchanged",
    )
    p.add_argument(
        "--connections",
        type=int,
        default=1,
        help="TCP connections per client process (several let the kernel spread load over "
        "server processes sharing a port with SO_REUSEPORT)",
    )
    p.add_argument(
        "--pin",
        action="store_true",
        help="bind the servers to one half of the cores and the load generators (and "
        "perf_analyzer) to the other, as if they ran on separate machines",
    )
    p.add_argument("--cold-starts", type=int, default=3, help="server starts timed")
    p.add_argument(
        "--perf-analyzer",
        type=Path,
        metavar="VENV",
        help="environment from scripts/setup_triton_venv.sh (default $STABLEMLP_TRITON_VENV "
        "or .venv-triton when present; not used by --smoke unless given)",
    )
    p.add_argument("--no-perf-analyzer", action="store_true", help="skip perf_analyzer")
    p.add_argument(
        "--peers",
        metavar="NAMES",
        help="also measure these servers on the same model.onnx: kserve, mlserver, "
        "mlserver-inline (comma list; each installed pinned into its own .venv-<peer> on first "
        "use, minutes)",
    )
    p.add_argument("--peer-venvs", type=Path, default=ROOT, metavar="DIR",
                   help="folder for the peers' .venv-<peer> environments")  # fmt: skip
    p.add_argument(
        "--workers-scaling",
        metavar="COUNTS",
        help="instead of the grid: req/s of `serve --workers N` for each N (e.g. 1,2,4,8); "
        "with --pin, N workers on N cores and the load on cores none of them uses",
    )
    p.add_argument(
        "--rest",
        action="store_true",
        help="also time REST (JSON and binary tensors) beside gRPC at batch 1 and 64, "
        "concurrency 8 (bench/speed/rest_cells.py)",
    )
    p.add_argument(
        "--rest-peer",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help="with --rest, another KServe v2 REST server to time in the same cells (repeat)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny windows, one repeat, one cold start: checks the benchmark works",
    )
    return p


def _timing(args: argparse.Namespace) -> Timing:
    if args.smoke:
        return Timing(
            warmup_s=0.1,
            window_s=0.3,
            max_requests=args.max_requests,
            repeats=1,
            client_processes=args.client_processes,
            connections=args.connections,
        )
    return Timing(args.warmup_s, args.window_s, args.max_requests, args.repeats,
                  args.client_processes, args.connections)  # fmt: skip


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> dict[str, Any]:
    timing, machine = _timing(args), machine_facts()
    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stablemlp-bench-")))
    peers = parse_peers(args.peers) if args.peers else []
    venvs, peer_docs = install_peers(peers, args.peer_venvs)  # before any server: minutes
    wide: str | None = args.wide_model or None
    text: str | None = args.text_model or None
    repository = args.model_repository or build_repository(work, args.model, wide, text)
    manifests = read_manifests(repository)
    if args.model not in manifests:
        raise RuntimeError(f"model {args.model!r} is not in {repository}")
    if wide and wide not in manifests:
        log.warning("wide model %r is not in the repository: its cells are skipped", wide)
        wide = None
    if text and text not in manifests:
        log.warning("text model %r is not in the repository: its cells are skipped", text)
        text = None
    cells = build_grid(args.model, wide, text)
    imports = measure_import()
    startup: dict[str, Any] = {
        "import_seconds": imports.seconds,
        "interpreter_seconds": imports.interpreter_seconds,
        "torch_imported": imports.torch_imported,
    }
    if args.server:
        ours = Target("ours", args.server, None)
    else:
        server, started = start_ours(repository, args.server_arg, args.cold_starts, stack)
        startup.update(started)
        ours = Target("ours", server.address, server.pid)
    floor, model_floor = start_floors(repository, stack)
    peer_targets, started_docs = start_peers(peers, venvs, repository, args.model, work, stack)
    peer_docs.update(started_docs)
    servers = [ours, floor, model_floor, *peer_targets]
    cores = pin_servers([t.pid for t in servers if t.pid is not None], stack) if args.pin else None
    requests = build_requests(cells, manifests)
    check_targets(repository, cells, requests, ours=ours, floors=(floor, model_floor))
    peer_cells = [c for c in cells if is_peer_cell(c, args.model)]
    peer_targets = checked_peers(peer_targets, ours, peer_cells, requests, peer_docs)
    compute = compute_floors(repository, cells, manifests, timing)
    with LoadGenerator(max(1, args.client_processes)) as generator:
        grid = run_grid(generator, [floor, model_floor, ours], cells, requests, timing,
                        peer_targets, {c.key for c in peer_cells})  # fmt: skip
        rest = None
        if args.rest:  # our REST port (and peers') beside our gRPC, in the same run
            rest_peers = [peer.rpartition("=")[::2] for peer in args.rest_peer]
            if not all(is_loopback(address) for _, address in rest_peers):
                raise RuntimeError("--rest-peer: loopback addresses only")
            log_text = "" if args.server else server.log()
            rest = rest_cells(generator, rest_peers, ours.address, log_text, args.model,
                              manifests[args.model], timing)  # fmt: skip
    wrapper = None if args.no_perf_analyzer else resolve_wrapper(args.perf_analyzer, args.smoke)
    addresses = [(t.name, t.address) for t in (floor, ours)]
    perf = compare(wrapper, args.model, addresses, NARROW_SHAPES, timing.window_s, work)
    perf_stream = streaming_check(
        wrapper, args.model, ours.address, STREAM_PA_SHAPES, timing.window_s, work
    )
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    docs = cell_documents(cells, grid, compute)
    return {
        "format": FORMAT,
        "created_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": ["stablemlp", "bench", *args.argv],
        "smoke": bool(args.smoke),
        "machine": machine,
        "settings": {
            "warmup_s": timing.warmup_s,
            "window_s": timing.window_s,
            "repeats": timing.repeats,
            "max_requests": timing.max_requests,
            "client_processes": timing.client_processes,
            "connections_per_process": timing.connections,
            "server_args": list(args.server_arg),
            "external_server": bool(args.server),
            "pinned": cores,
        },
        "models": {"main": args.model, "wide": wide, "text": text},
        "startup": startup,
        "cells": docs,
        "compute_floor": [{"model": m, "batch": b, **f} for (m, b), f in sorted(compute.items())],
        "perf_analyzer": perf,
        "perf_analyzer_streaming": perf_stream,
        "peers": peer_docs,
        "rest": rest,
        "targets": targets(docs, startup),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["quality"]:  # the model-quality suite (bench/quality.py); needs [train]
        from .quality import main as quality_main

        return quality_main(argv[1:])
    args = build_parser().parse_args(argv)
    args.argv = list(argv)  # recorded in bench.json: the command that made the figures
    if args.server and not args.model_repository:
        print("stablemlp bench: --server needs --model-repository (the floors read it)",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.server and not is_loopback(args.server):
        print(f"stablemlp bench: --server {args.server}: loopback addresses only", file=sys.stderr)
        return 2
    try:
        if args.peers:
            parse_peers(args.peers)
        counts = parse_counts(args.workers_scaling) if args.workers_scaling else None
    except ValueError as err:
        print(f"stablemlp bench: {err}", file=sys.stderr)
        return 2
    try:
        with contextlib.ExitStack() as stack:
            if counts:
                return scaling_main(args, counts, stack)
            doc = clean_json(run(args, stack))
    except (RuntimeError, OSError, TimeoutError, AssertionError) as err:
        print(f"stablemlp bench: {err}", file=sys.stderr)
        return 1
    write_report(doc, args.output)
    for t in doc["targets"]:
        met = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        measured = "-" if t["measured"] is None else f"{t['measured']:.3g}"
        print(f"{t['name']}: {measured} ({t['comparison']} {t['limit']:g}) {met}")
    failed = {name: p["error"] for name, p in doc["peers"].items() if p.get("error")}
    for name, error in failed.items():
        print(f"peer {name}: NOT measured: {error.splitlines()[0]}", file=sys.stderr)
    print(f"report: {args.output / 'bench.md'}")
    return 1 if failed else 0


__all__ = ["build_parser", "is_loopback", "main", "run"]
