"""Prove the CUDA execution provider on a real GPU; scripts/gpu_check.sh runs this in its own venv.

    python scripts/gpu_check.py --device-kind cuda|cpu [--output DIR] [--run RUN --repository REPO]

Trains briefly on CPU and exports (unless given --run and --repository), then:
1. serves with `--device cuda`: ModelConfig must report KIND_GPU and providers CUDA first;
2. parity: served predictions on the held-out rows and on seeded random batches (1, 7 and 4096
   rows, sent in requests of the server's max_batch_size as the client does) against a
   `--device cpu` server and in-process ONNX Runtime on CPU: max abs diff <= 1e-5, same labels;
3. throughput of in-process `session.run` and of the servers at batch 1, 64, 1024 and 8192, on
   CUDA and on CPU in the same run, and each server's time from process start to health SERVING;
4. `--device cuda` with no CUDA device visible must exit non-zero with a reason naming CUDA;
   `--device auto` must then fall back to CPU with a warning (and pick CUDA with the GPU visible);
5. the runtime-cuda image built and run with the GPU, where podman can reach it (else why not);
and writes gpu_check.json and gpu_check.md to --output. Exit 0 when every check passed, else 1.

`--device-kind cpu` runs every part that needs no GPU: the subject server is a `--device cpu` one,
so parity and figures check the harness, not CUDA, and the report says so. Only the stablemlp CLI,
the KServe v2 gRPC protocol and the client API are used. Every wait and load loop is bounded, and
every server is stopped (SIGTERM, then SIGKILL) on the way out, on failures and signals too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import gpu_check_container
import gpu_check_report as report_io
import grpc
import numpy as np
from gpu_check_serving import CheckError, child_env
from gpu_check_steps import (
    CPU,
    CUDA,
    NO_GPU,
    Run,
    check_auto,
    check_figures,
    check_parity,
    check_refusal,
    check_serve,
    newest_version,
)

ROOT = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 300.0
CPU_NOTE = (
    "CPU-only mode: the subject server runs --device cpu in place of --device cuda, so parity and "
    "figures check this harness, not CUDA. The refusal and fallback checks are real."
)


# --- the model -------------------------------------------------------------------------------
def stablemlp(*args: str) -> None:
    command = [sys.executable, "-m", "stablemlp", *args]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, env=child_env(NO_GPU)
    )
    if done.returncode != 0:
        tail = " / ".join((done.stdout + done.stderr).strip().splitlines()[-5:])
        raise CheckError(f"stablemlp {args[0]} exited {done.returncode}: {tail}")


def prepare_model(args: argparse.Namespace) -> tuple[Path, Path]:
    """(run folder, repository): the given ones, or trained briefly and exported under --work."""
    if args.run:
        return args.run, args.repository
    run, repository = args.work / "run", args.work / "repository"
    for folder in (run, repository):
        shutil.rmtree(folder, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    stablemlp(
        "train", "--epochs", str(args.epochs), "--seed", "0", "--no-progress", "--output", str(run)
    )
    stablemlp("export", str(run), "--repository", str(repository))
    return run, repository


# --- the run ---------------------------------------------------------------------------------
def step(report: dict[str, Any], name: str, key: str, action: Callable[[], dict]) -> bool:
    """Runs one check; its section goes under report[key], its verdict into report["checks"]."""
    try:
        section = action()
    except Exception as err:  # any failure becomes a recorded FAIL: the report is always written
        if isinstance(err, grpc.RpcError):
            text = f"{err.code().name}: {err.details()}"  # type: ignore[attr-defined]
        else:
            text = str(err) if isinstance(err, CheckError) else f"{type(err).__name__}: {err}"
        section = {"passed": False, "detail": text}
    if key:
        report[key] = section
    report["checks"].append(
        {"name": name, "passed": section["passed"], "detail": section["detail"]}
    )
    print(f"{report_io.verdict(section['passed']):7} {name}: {section['detail']}", flush=True)
    return bool(section["passed"])


def check_all(args: argparse.Namespace, report: dict[str, Any]) -> None:
    found: dict[str, Path] = {}

    def model() -> dict[str, Any]:
        found["run"], found["repository"] = prepare_model(args)
        name, version = newest_version(found["repository"])
        manifest = json.loads((version / "manifest.json").read_text(encoding="utf-8"))
        sha = manifest["files"]["model.onnx"]["sha256"]
        report["model"] = {
            "name": name,
            "version": int(version.name),
            "sha256": sha,
            "trained_here": not args.run,
            "epochs": None if args.run else args.epochs,
        }
        how = "given" if args.run else f"trained {args.epochs} epochs on CPU torch, exported"
        return {"passed": True, "detail": f"{name}/{version.name} ({how}), sha256 {sha[:12]}"}

    if not step(report, "model", "", model):
        return
    with np.load(found["run"] / "test_split.npz", allow_pickle=False) as saved:
        heldout = np.array(saved["features"], dtype=np.float32)
    run = Run(args, found["repository"], heldout)
    cuda = args.device_kind == "cuda"
    targets = [(CUDA, "subject"), (CPU, "reference")] if cuda else [(CPU, "subject")]
    serving = [
        ("serve --device cuda" if cuda else "serve --device cpu (subject, standing in for cuda)",
         "subject", partial(check_serve, run, "subject", args.device_kind, report)),
        ("serve --device cpu (reference)", "reference",
         partial(check_serve, run, "reference", "cpu", report)),
        ("parity with the CPU provider", "parity", partial(check_parity, run)),
        *[(f"throughput on {provider.removesuffix('ExecutionProvider')}", "",
           partial(check_figures, run, provider, role, report)) for provider, role in targets],
    ]  # fmt: skip
    devices = [
        ("--device cuda refused without CUDA", "refusal", partial(check_refusal, run)),
        ("--device auto falls back to CPU", "fallback", partial(check_auto, run, NO_GPU, CPU)),
        *([("--device auto picks CUDA", "auto_cuda", partial(check_auto, run, {}, CUDA))]
          if cuda else []),
    ]  # fmt: skip
    try:
        for name, key, action in serving:
            step(report, name, key, action)
        run.fleet.stop_all()  # the next checks start servers of their own
        for name, key, action in devices:
            step(report, name, key, action)
    finally:
        run.fleet.stop_all()
    if cuda and args.container == "auto":
        check = partial(gpu_check_container.check, args, found["repository"], run)
        step(report, "runtime-cuda image", "container", check)
    else:
        why = "CPU-only mode: the image needs a GPU" if not cuda else "--container skip"
        report["container"] = {"status": "skipped", "reason": why}


def sizes(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,64: got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add(
        "--device-kind",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cuda: the real check; cpu: every part that needs no GPU (default cuda)",
    )
    add("--output", type=Path, default=ROOT / "bench" / "results" / "gpu", help="report folder")
    add("--work", type=Path, default=ROOT / "build" / "gpu-check", help="scratch folder")
    add("--run", type=Path, help="use this training run (with --repository) instead of training")
    add("--repository", type=Path, help="its exported repository (with --run)")
    add("--epochs", type=int, default=5, help="training epochs (default 5)")
    add(
        "--batches",
        type=sizes,
        default=[1, 64, 1024, 8192],
        help="throughput batch sizes (default 1,64,1024,8192)",
    )
    add(
        "--parity-batches",
        type=sizes,
        default=[1, 7, 4096],
        help="random parity batch sizes (default 1,7,4096)",
    )
    add("--concurrency", type=sizes, default=[1, 8], help="served calls in flight (default 1,8)")
    add("--seconds", type=float, default=2.0, help="longest time per throughput cell (default 2)")
    add(
        "--max-calls",
        type=int,
        default=20000,
        help="most calls per throughput cell (default 20000)",
    )
    add("--intra-op-threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    add(
        "--start-timeout",
        type=float,
        default=120.0,
        help="seconds a server may take to start (default 120)",
    )
    add(
        "--container",
        choices=("auto", "skip"),
        default="auto",
        help="auto: build and run the runtime-cuda image if podman can reach the GPU",
    )
    add(
        "--base-image",
        default="localhost/debian:bookworm-slim",
        help="BASE_IMAGE for the image (scripts/container_check.sh makes this one)",
    )
    add(
        "--container-timeout",
        type=float,
        default=300.0,
        help="seconds for the image build (default 300)",
    )
    args = parser.parse_args(argv)
    if (args.run is None) != (args.repository is None):
        parser.error("--run and --repository go together")
    return args


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every `finally`: servers get stopped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    started = time.perf_counter()
    driver = ["python", "scripts/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]
    report: dict[str, Any] = {
        "format": "stablemlp.gpu_check/1",
        "mode": args.device_kind,
        "passed": False,
        "started_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": shlex.join(driver),
        "note": CPU_NOTE if args.device_kind == "cpu" else "",
        "machine": {"gpu": report_io.gpu_facts(), "cpu": report_io.cpu_facts()},
        "software": report_io.software_facts(),
        "checks": [],
        "startup": [],
        "throughput": {
            "seconds_per_cell": args.seconds,
            "intra_op_threads": args.intra_op_threads,
            "cells": [],
        },
    }
    try:
        check_all(args, report)
    except BaseException as stop:  # a signal or Ctrl-C: say so in the report, then stop
        report["checks"].append(
            {"name": "run", "passed": False, "detail": f"interrupted: {type(stop).__name__} {stop}"}
        )
        raise
    finally:
        report["wall_s"] = round(time.perf_counter() - started, 1)
        checks = report["checks"]
        report["passed"] = bool(checks) and all(c["passed"] is not False for c in checks)
        clean = report_io.scrub(report, report_io.known_folders(args.work))
        paths = report_io.write(clean, args.output)
        print(
            f"gpu-check: {'PASS' if report['passed'] else 'FAIL'} in {report['wall_s']:.0f} s; "
            f"wrote {paths[0].name} and {paths[1].name} in {args.output}"
        )
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
