"""The measurement grid: cells, their payloads, reply checks, and the repeated timed windows.

Each cell is run against every target back to back (order alternating between repeats), so the
floor and our server see the same moment of a noisy machine and repeat i pairs across targets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from ..protos import grpc_service_pb2 as pb
from ..protos import grpc_service_pb2_grpc as pb_grpc
from .cells import Cell
from .floors import measure_compute
from .loadgen import LoadGenerator, LoadSpec
from .servers import cpu_seconds, memory_mb
from .stats import PHASES, latency_summary_us, measurement, median_figures, phase_means_us

log = logging.getLogger(__name__)

METHOD = "/inference.GRPCInferenceService/ModelInfer"


@dataclass(frozen=True)
class Timing:
    warmup_s: float
    window_s: float
    max_requests: int  # per load worker and window
    repeats: int
    client_processes: int  # at most; a concurrency of 1 always uses one
    connections: int = 1  # per client process, capped by its share of the concurrency


@dataclass(frozen=True)
class Target:
    name: str  # "ours" or "transport_floor"
    address: str
    pid: int | None  # None: a server we did not start, so no CPU/RSS figures


def make_rows(batch: int, width: int, seed: int = 0) -> np.ndarray:
    """Finite FP32 rows; an MLP's cost does not depend on the values."""
    return np.random.default_rng(seed).normal(size=(batch, width)).astype(np.float32)


def input_spec(manifest: Mapping[str, Any]) -> tuple[str, int]:
    """The model's one input: its name and width, from manifest.json (shape [-1, F])."""
    (spec,) = manifest["inputs"]
    return str(spec["name"]), int(spec["shape"][1])


def build_request(model: str, input_name: str, rows: np.ndarray, form: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id="bench")
    tensor = request.inputs.add(name=input_name, datatype="FP32", shape=list(rows.shape))
    if form == "raw_input_contents":
        request.raw_input_contents.append(rows.tobytes())
    else:
        tensor.contents.fp32_contents.extend(rows.ravel().tolist())
    return request


def check_reply(address: str, request: pb.ModelInferRequest, expected: np.ndarray | None) -> None:
    """One call through the typed stub: the reply must carry `probability` of the right shape
    (and, for a real model, the values in-process ONNX Runtime gives)."""
    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)  # type: ignore[no-untyped-call]
    names = [t.name for t in reply.outputs]
    index = names.index("probability")
    rows = request.inputs[0].shape[0]
    if list(reply.outputs[index].shape) != [rows, 1]:
        raise AssertionError(f"{address}: probability shape {list(reply.outputs[index].shape)}")
    if expected is None:
        return
    if reply.raw_output_contents:
        got = np.frombuffer(reply.raw_output_contents[index], dtype="<f4")
    else:
        got = np.asarray(reply.outputs[index].contents.fp32_contents, dtype=np.float32)
    if not np.allclose(got.reshape(-1, 1), expected, atol=1e-5):
        raise AssertionError(f"{address}: probabilities differ from in-process ONNX Runtime")


def build_requests(
    cells: Sequence[Cell], manifests: Mapping[str, Mapping[str, Any]]
) -> dict[str, pb.ModelInferRequest]:
    """cell key -> its request; the same rows every time (seeded) for every target."""
    requests = {}
    for cell in cells:
        name, width = input_spec(manifests[cell.model])
        requests[cell.key] = build_request(
            cell.model, name, make_rows(cell.batch, width), cell.form
        )
    return requests


def model_path(repository: Path, model: str) -> Path:
    versions = [int(p.name) for p in (repository / model).iterdir() if p.name.isdigit()]
    versions = [v for v in versions if v > 0]  # Triton's rule: versions are positive integers
    return repository / model / str(max(versions)) / "model.onnx"


def request_rows(request: pb.ModelInferRequest) -> np.ndarray:
    tensor = request.inputs[0]
    if request.raw_input_contents:
        flat = np.frombuffer(request.raw_input_contents[0], dtype="<f4")
    else:
        flat = np.asarray(tensor.contents.fp32_contents, dtype=np.float32)
    return flat.reshape(list(tensor.shape))


def check_targets(
    repository: Path,
    cells: Sequence[Cell],
    requests: Mapping[str, pb.ModelInferRequest],
    *,
    ours: Target,
    floors: Sequence[Target],
) -> None:
    """Before timing anything: every payload gets a well-formed reply from every server, and
    ours the probabilities in-process ONNX Runtime computes (so it really runs the model)."""
    import onnxruntime as ort

    sessions: dict[str, Any] = {}
    for cell in cells:
        request = requests[cell.key]
        if cell.model not in sessions:
            path = str(model_path(repository, cell.model))
            sessions[cell.model] = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        session = sessions[cell.model]
        rows = request_rows(request)
        (expected,) = session.run(["probability"], {session.get_inputs()[0].name: rows})
        for floor in floors:
            check_reply(floor.address, request, None)
        check_reply(ours.address, request, expected)


def compute_floors(
    repository: Path,
    cells: Sequence[Cell],
    manifests: Mapping[str, Mapping[str, Any]],
    timing: Timing,
) -> dict[tuple[str, int], dict[str, float]]:
    """(model, batch) -> session.run figures on the cells' rows, medians over the repeats."""
    floors: dict[tuple[str, int], dict[str, float]] = {}
    for model, batch in sorted({(c.model, c.batch) for c in cells}):
        rows = make_rows(batch, input_spec(manifests[model])[1])
        runs = []
        for _ in range(timing.repeats):
            sample = measure_compute(
                model_path(repository, model), rows, timing.window_s / 2, 1_000_000
            )
            per_s = len(sample.latencies_ns) / (sample.elapsed_ns / 1e9)
            runs.append(
                {
                    "requests_per_s": per_s,
                    "inferences_per_s": per_s * batch,
                    **latency_summary_us(sample.latencies_ns),
                }
            )
        floors[(model, batch)] = median_figures(runs)
    return floors


def server_phases(stub: Any, model: str) -> dict[str, tuple[int, int]]:
    """Triton's ModelStatistics counters (count, ns) of the model's versions, summed; empty when
    the server keeps none (the transport floor reports zeros)."""
    reply = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=5)
    totals = dict.fromkeys(PHASES, (0, 0))
    for version in reply.model_stats:
        for phase in PHASES:
            d = getattr(version.inference_stats, phase)
            count, ns = totals[phase]
            totals[phase] = (count + d.count, ns + d.ns)
    return totals


def _measure(
    generator: LoadGenerator,
    target: Target,
    stub: Any,
    cell: Cell,
    payload: bytes,
    timing: Timing,
) -> dict[str, float]:
    cpu: list[float] = []

    def on_window(start: float, end: float) -> None:
        for mark in (start, end):
            time.sleep(max(0.0, mark - time.monotonic()))
            if target.pid is not None:
                cpu.append(cpu_seconds(target.pid))

    # Server-side phases over the whole run (warm-up included): snapshots taken while no load
    # runs, so a statistics call that is slow to answer on a loaded machine cannot miss the window.
    before = server_phases(stub, cell.model)

    processes = 1 if cell.concurrency == 1 else timing.client_processes
    spec = LoadSpec(
        target.address, METHOD, payload, cell.concurrency, processes,
        timing.warmup_s, timing.window_s, timing.max_requests, timing.connections,
    )  # fmt: skip
    result = generator.run(spec, on_window)
    if result.errors:
        log.warning("%s %s: %d failed calls, first: %s", target.name, cell.key, result.errors,
                    result.first_error)  # fmt: skip
    server_cpu = cpu[1] - cpu[0] if len(cpu) == 2 else None
    figures = measurement(result.latencies_ns, result.requests_per_s, cell.batch,
                          timing.window_s, server_cpu, result.client_cpu_s)  # fmt: skip
    figures["errors"] = float(result.errors)
    figures.update(phase_means_us(before, server_phases(stub, cell.model)))
    if target.pid is not None:
        figures.update(memory_mb(target.pid))
    return figures


def run_grid(
    generator: LoadGenerator,
    targets: Sequence[Target],
    cells: Sequence[Cell],
    requests: Mapping[str, pb.ModelInferRequest],
    timing: Timing,
) -> dict[str, dict[str, list[dict[str, float]]]]:
    """cell key -> target name -> the figures of each of `timing.repeats` windows, in order;
    within a repeat every target is measured back to back, so repeat i pairs across targets."""
    payloads = {key: request.SerializeToString() for key, request in requests.items()}
    channels = {t.name: grpc.insecure_channel(t.address) for t in targets}
    stubs = {name: pb_grpc.GRPCInferenceServiceStub(ch) for name, ch in channels.items()}  # type: ignore[no-untyped-call]
    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        c.key: {t.name: [] for t in targets} for c in cells
    }
    for repeat in range(timing.repeats):
        order = list(targets) if repeat % 2 == 0 else list(reversed(targets))
        for cell in cells:
            for target in order:
                stub = stubs[target.name]
                figures = _measure(generator, target, stub, cell, payloads[cell.key], timing)
                runs[cell.key][target.name].append(figures)
                log.info(
                    "repeat %d %s %s: %.0f req/s, p50 %.0f us, p99 %.0f us",
                    repeat + 1,
                    cell.key,
                    target.name,
                    figures["requests_per_s"],
                    figures["p50_us"],
                    figures["p99_us"],
                )
    for channel in channels.values():
        channel.close()
    return runs


__all__ = [
    "Target",
    "Timing",
    "build_request",
    "build_requests",
    "check_reply",
    "check_targets",
    "compute_floors",
    "input_spec",
    "make_rows",
    "model_path",
    "run_grid",
]
