"""scripts/gpu_check.py's checks: each returns its report section, with "passed" and a "detail".

`Run` holds what they share: the model, the held-out rows, in-process sessions and the servers'
addresses. Servers come from `gpu_check_serving.Fleet`, so every one is stopped on the way out.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
from gpu_check_serving import (
    CheckError,
    Fleet,
    chunk_requests,
    describe,
    onnxruntime_errors,
    sequential,
    served,
    stop_reason,
    stub_for,
    timed,
    wait_ready,
    windowed,
)

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
TOLERANCE = 1e-5  # max abs difference of probabilities: the export's own parity tolerance
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}  # how "CUDA cannot be had" is made on a GPU machine
MISSING_FRACTION = 0.05  # NaN cells in the random batches, so the graph's imputation runs too


class Run:
    """What the checks share: the model, the held-out rows, sessions, servers' addresses."""

    def __init__(self, args: argparse.Namespace, repository: Path, heldout: np.ndarray) -> None:
        self.args, self.heldout = args, heldout
        self.model, self.version = newest_version(repository)
        self.fleet = Fleet(
            repository, ["--intra-op-threads", str(args.intra_op_threads)], args.start_timeout
        )
        self.addresses: dict[str, str] = {}  # "subject" / "reference" -> HOST:PORT
        self.sessions: dict[str, ort.InferenceSession] = {}
        self.configs: dict[str, dict[str, Any]] = {}

    def session(self, provider: str) -> ort.InferenceSession:
        """In-process ONNX Runtime on `provider`, with the servers' thread settings."""
        if provider not in self.sessions:
            if provider == CUDA and hasattr(ort, "preload_dlls"):
                ort.preload_dlls()  # pip's CUDA/cuDNN wheels are found only once preloaded
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.args.intra_op_threads
            options.inter_op_num_threads = 1
            providers = [CUDA, CPU] if provider == CUDA else [CPU]
            made = ort.InferenceSession(
                str(self.version / "model.onnx"), options, providers=providers
            )
            if made.get_providers()[0] != provider:
                raise CheckError(f"in-process session got {made.get_providers()}, not {provider}")
            self.sessions[provider] = made
        return self.sessions[provider]

    def address(self, role: str) -> str:
        if role not in self.addresses:
            raise CheckError(f"no {role} server (see its serve check)")
        return self.addresses[role]


def newest_version(repository: Path) -> tuple[str, Path]:
    """(model name, newest version folder) of the repository's one model."""
    models = sorted(path.parent for path in repository.glob("*/config.pbtxt"))
    if len(models) != 1:
        raise CheckError(f"expected one model in the repository, found {len(models)}")
    versions = [p for p in models[0].iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        raise CheckError(f"model {models[0].name}: no version folder")
    return models[0].name, max(versions, key=lambda p: int(p.name))


def random_rows(heldout: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Held-out rows resampled with 10 % multiplicative noise, some cells NaN (missing)."""
    rows = heldout[rng.integers(0, len(heldout), count)]
    rows = rows * (1.0 + 0.1 * rng.standard_normal(rows.shape))
    rows[rng.random(rows.shape) < MISSING_FRACTION] = np.nan
    return rows.astype(np.float32)


def check_serve(run: Run, role: str, device: str, report: dict[str, Any]) -> dict[str, Any]:
    server, address = run.fleet.serving(device)
    config = describe(address, run.model)
    run.addresses[role], run.configs[role] = address, config
    report["startup"].append(
        {
            "server": f"{role}: --device {device}",
            "ready_s": server.seconds_to_ready,
            "serving_s": server.seconds_to_serving,
        }
    )
    kind, first = ("KIND_GPU", CUDA) if device == "cuda" else ("KIND_CPU", CPU)
    passed = config["kind"] == kind and config["providers"][:1] == [first]
    detail = f"ModelConfig: {config['kind']}, providers {','.join(config['providers'])}"
    detail += f"; SERVING {server.seconds_to_serving:.2f} s after start"
    return {"device": device, **config, "passed": passed, "detail": detail}


def parity_case(name: str, got: tuple, want: tuple, against: str, step: int) -> dict[str, Any]:
    count = len(got[0])
    worst = float(np.max(np.abs(got[0] - want[0]))) if count else 0.0
    same = bool(np.array_equal(got[1], want[1]))
    return {
        "rows": name,
        "count": count,
        "requests": -(-count // step),
        "against": against,
        "max_abs_diff": worst,
        "labels_identical": same,
        "passed": worst <= TOLERANCE and same,
    }


def check_parity(run: Run) -> dict[str, Any]:
    subject, reference = run.address("subject"), run.address("reference")
    step = run.configs["subject"]["max_batch_size"]
    rng = np.random.default_rng(0)
    sets = [("held-out", run.heldout)]
    sets += [(f"random {n}", random_rows(run.heldout, n, rng)) for n in run.args.parity_batches]
    cases = []
    for name, rows in sets:
        got = served(subject, run.model, rows)
        feed = {run.configs["subject"]["input"]: rows}
        probability, label = run.session(CPU).run(["probability", "label"], feed)
        local = (probability.reshape(-1), label.reshape(-1))
        cases.append(parity_case(name, got, local, "in-process CPU", step))
        cases.append(
            parity_case(name, got, served(reference, run.model, rows), "server --device cpu", step)
        )
    worst = max(case["max_abs_diff"] for case in cases)
    passed = all(case["passed"] for case in cases)
    detail = f"{len(cases)} comparisons: max abs diff {worst:.2e} (<= {TOLERANCE:g}), labels "
    detail += "identical" if all(c["labels_identical"] for c in cases) else "DIFFER"
    return {
        "subject": f"server --device {run.args.device_kind}",
        "tolerance": TOLERANCE,
        "cases": cases,
        "passed": passed,
        "detail": detail,
    }


def measure(run: Run, provider: str, role: str) -> list[dict[str, Any]]:
    """In-process and served figures on `provider` (served by the `role` server)."""
    args, rng = run.args, np.random.default_rng(1)
    address = run.address(role)
    cells: list[dict[str, Any]] = []
    with grpc.insecure_channel(address) as channel:
        stub = stub_for(channel)
        for batch in args.batches:
            rows = random_rows(run.heldout, batch, rng)
            feed = {run.configs[role]["input"]: rows}
            session = run.session(provider)
            cell = {"provider": provider, "batch": batch}
            figures = timed(lambda s=session, f=feed: s.run(None, f), args.seconds, args.max_calls)
            cells.append(
                {"where": "in-process", **cell, "concurrency": 1, "requests_per_call": 1, **figures}
            )
            requests = chunk_requests(run.model, run.configs[role], rows)
            for concurrency in args.concurrency:
                if concurrency == 1:
                    figures = timed(sequential(stub, requests), args.seconds, args.max_calls)
                else:
                    figures = windowed(stub, requests, concurrency, args.seconds, args.max_calls)
                cells.append(
                    {
                        "where": "served",
                        **cell,
                        "concurrency": concurrency,
                        "requests_per_call": len(requests),
                        **figures,
                    }
                )
    for cell in cells:
        cell["rows_per_s"] = cell["calls_per_s"] * cell["batch"]
    return cells


def check_figures(run: Run, provider: str, role: str, report: dict[str, Any]) -> dict[str, Any]:
    cells = measure(run, provider, role)
    report["throughput"]["cells"] += cells
    best = max(cells, key=lambda c: c["rows_per_s"])
    detail = f"{len(cells)} cells; best {best['rows_per_s']:,.0f} rows/s ({best['where']}, "
    detail += f"batch {best['batch']}, concurrency {best['concurrency']})"
    return {"passed": True, "detail": detail}


def check_refusal(run: Run) -> dict[str, Any]:
    server = run.fleet.spawn("cuda", NO_GPU)
    address = wait_ready(server, run.args.start_timeout)
    code = server.stop() if address else server.process.wait(timeout=run.args.start_timeout)
    reason = stop_reason(server)
    passed = not address and code != 0 and "cuda" in reason.lower()
    detail = "it started and served" if address else f"exit {code}: {reason}"
    return {
        "environment": "CUDA_VISIBLE_DEVICES=",
        "exit_code": code,
        "started": bool(address),
        "reason": reason,
        "onnxruntime_errors": onnxruntime_errors(server)[-3:],
        "passed": passed,
        "detail": detail,
    }


def check_auto(run: Run, env: dict[str, str], want: str) -> dict[str, Any]:
    server, address = run.fleet.serving("auto", env)
    config = describe(address, run.model)
    warnings = [line.strip() for line in server.lines if "WARNING" in line and "CPU" in line]
    server.stop()
    kind = "KIND_GPU" if want == CUDA else "KIND_CPU"
    passed = config["kind"] == kind and config["providers"][:1] == [want]
    if want == CPU:
        passed = passed and bool(warnings)  # a fallback must say so
    setting = " ".join(f"{k}={v}" for k, v in env.items()) or "GPU visible"
    detail = f"{setting}: {config['kind']}, providers {','.join(config['providers'])}"
    detail += f"; warning: {warnings[-1]}" if warnings else "; no warning"
    return {
        "environment": setting,
        **config,
        "warning": warnings[-1] if warnings else "",
        "passed": passed,
        "detail": detail,
    }
