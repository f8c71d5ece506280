"""`stablemlp bench`: our server against the transport and compute floors, in one run.

Starts (or targets) our server and the transport floor on 127.0.0.1, checks both answer every
payload correctly, times the grid from separate load processes, adds perf_analyzer's figures when
its environment exists, and writes OUT/bench.json, OUT/bench.md and OUT/bench.png.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cells import NARROW_SHAPES, build_grid
from .floors import read_manifests
from .grid import (
    Target,
    Timing,
    build_requests,
    check_targets,
    compute_floors,
    run_grid,
)
from .loadgen import LoadGenerator
from .perfanalyzer import compare, resolve_wrapper
from .report import FORMAT, clean_json, machine_facts, targets, write_report
from .rest import rest_cells
from .servers import (
    OUR_SERVER_ENV,
    ServerProcess,
    child_env,
    floor_server_command,
    measure_import,
    memory_mb,
    our_server_command,
    pin_servers,
    start_server,
)
from .stats import cell_documents

log = logging.getLogger(__name__)

TRAIN_TIMEOUT_S = 900.0


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
        "--rest",
        action="store_true",
        help="also time REST (JSON and binary tensors) beside gRPC at batch 1 and 64, "
        "concurrency 8 (bench/rest.py)",
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


def build_repository(root: Path, model: str, wide_model: str | None) -> Path:
    """Train and export the models in subprocesses (torch stays out of this process)."""
    repository = root / "model_repository"
    jobs = [(model, ["--epochs", "3"])]
    if wide_model:
        jobs.append((wide_model, ["--epochs", "2", "--hidden", "256,256,256"]))
    for name, extra in jobs:
        run_dir = root / f"run-{name}"
        for command in (
            [
                "train",
                "--seed",
                "0",
                "--no-progress",
                "--name",
                name,
                *extra,
                "--output",
                str(run_dir),
            ],
            ["export", str(run_dir), "--repository", str(repository)],
        ):
            out = subprocess.run(
                [sys.executable, "-m", "stablemlp", *command],
                env=child_env(),
                capture_output=True,
                text=True,
                timeout=TRAIN_TIMEOUT_S,
            )
            if out.returncode != 0:
                raise RuntimeError(f"stablemlp {command[0]} failed:\n{out.stderr[-3000:]}")
    return repository


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


def start_ours(
    repository: Path, extra: Sequence[str], starts: int, stack: contextlib.ExitStack
) -> tuple[ServerProcess, dict[str, Any]]:
    """Start our server `starts` times (timing each start), keep the last one running."""
    seconds = []
    for i in range(max(1, starts)):
        server = start_server("ours", our_server_command(repository, extra), OUR_SERVER_ENV)
        seconds.append(round(server.seconds_to_serving, 3))
        if i < starts - 1:
            server.stop()
    stack.callback(server.stop)
    startup = {
        "seconds_to_serving": seconds,
        "seconds_to_serving_median": statistics.median(seconds),
        "idle_rss_mb": memory_mb(server.pid)["rss_mb"],
    }
    return server, startup


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> dict[str, Any]:
    timing, machine = _timing(args), machine_facts()
    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stablemlp-bench-")))
    wide: str | None = args.wide_model or None
    repository = args.model_repository or build_repository(work, args.model, wide)
    manifests = read_manifests(repository)
    if args.model not in manifests:
        raise RuntimeError(f"model {args.model!r} is not in {repository}")
    if wide and wide not in manifests:
        log.warning("wide model %r is not in the repository: its cells are skipped", wide)
        wide = None
    cells = build_grid(args.model, wide)
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
    floor_server = start_server("transport_floor", floor_server_command(repository))
    stack.callback(floor_server.stop)
    floor = Target("transport_floor", floor_server.address, floor_server.pid)
    model_server = start_server("model_floor", floor_server_command(repository, run_model=True))
    stack.callback(model_server.stop)
    model_floor = Target("model_floor", model_server.address, model_server.pid)
    pids = [t.pid for t in (ours, floor, model_floor) if t.pid is not None]
    cores = pin_servers(pids, stack) if args.pin else None
    requests = build_requests(cells, manifests)
    check_targets(repository, cells, requests, ours=ours, floors=(floor, model_floor))
    compute = compute_floors(repository, cells, manifests, timing)
    with LoadGenerator(max(1, args.client_processes)) as generator:
        grid = run_grid(generator, [floor, model_floor, ours], cells, requests, timing)
        rest = None
        if args.rest:  # our REST port (and peers') beside our gRPC, in the same run
            peers = [peer.rpartition("=")[::2] for peer in args.rest_peer]
            if not all(is_loopback(address) for _, address in peers):
                raise RuntimeError("--rest-peer: loopback addresses only")
            log_text = "" if args.server else server.log()
            rest = rest_cells(generator, peers, ours.address, log_text, args.model,
                              manifests[args.model], timing)  # fmt: skip
    wrapper = None if args.no_perf_analyzer else resolve_wrapper(args.perf_analyzer, args.smoke)
    addresses = [(t.name, t.address) for t in (floor, ours)]
    perf = compare(wrapper, args.model, addresses, NARROW_SHAPES, timing.window_s, work)
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    docs = cell_documents(cells, grid, compute)
    return {
        "format": FORMAT,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
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
        "models": {"main": args.model, "wide": wide},
        "startup": startup,
        "cells": docs,
        "compute_floor": [{"model": m, "batch": b, **f} for (m, b), f in sorted(compute.items())],
        "perf_analyzer": perf,
        "rest": rest,
        "targets": targets(docs, startup),
    }


def is_loopback(address: str) -> bool:
    """HOST:PORT on this machine only: the benchmark never sends load elsewhere."""
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.server and not args.model_repository:
        print("stablemlp bench: --server needs --model-repository (the floors read it)",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.server and not is_loopback(args.server):
        print(f"stablemlp bench: --server {args.server}: loopback addresses only", file=sys.stderr)
        return 2
    try:
        with contextlib.ExitStack() as stack:
            doc = clean_json(run(args, stack))
    except (RuntimeError, OSError, TimeoutError, AssertionError) as err:
        print(f"stablemlp bench: {err}", file=sys.stderr)
        return 1
    write_report(doc, args.output)
    for t in doc["targets"]:
        met = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        measured = "-" if t["measured"] is None else f"{t['measured']:.3g}"
        print(f"{t['name']}: {measured} ({t['comparison']} {t['limit']:g}) {met}")
    print(f"report: {args.output / 'bench.md'}")
    return 0


__all__ = ["build_parser", "build_repository", "is_loopback", "main", "run"]
