"""The measurement grid: its cells (model, content form, batch size, concurrency and lane), their
payloads, the compute floor, and the repeated timed windows.

Each cell is run against every target back to back (order alternating between repeats), so the
floor and our server see the same moment of a noisy machine and repeat i pairs across targets.
The replies are checked first, in bench/speed/checks.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc

from ...protos import grpc_service_pb2 as pb
from ...protos import grpc_service_pb2_grpc as pb_grpc
from ..servers import cpu_seconds, memory_mb
from .floors import measure_compute
from .loadgen import LoadGenerator, LoadSpec
from .payloads import build_request, make_feeds
from .stats import PHASES, latency_summary_us, measurement, median_figures, phase_means_us

log = logging.getLogger(__name__)

FORMS = ("fp32_contents", "raw_input_contents")
NARROW_SHAPES = ((1, 1), (1, 8), (1, 32), (64, 8))  # (batch, concurrency), issue 5
WIDE_SHAPES = ((1, 1), (1, 8))
# A model with text columns (palmerpenguins' `species`, `island` as BYTES inputs), raw form.
TEXT_SHAPES = ((1, 8), (64, 8))
TEXT_FORM = "raw_input_contents"
# ModelStreamInfer at batch 1 (issue 14): (streams, requests in flight per stream), 8 in all, so
# each is read against the unary cell of the same concurrency.
STREAM_SHAPES = ((8, 1), (1, 8))
STREAM_FORM = "raw_input_contents"
PEER_FORM = "raw_input_contents"  # the peers are measured on the main model's unary raw cells


@dataclass(frozen=True)
class Cell:
    model: str
    form: str  # one of FORMS
    batch: int
    concurrency: int  # requests in flight in all
    streams: int = 0  # 0: unary ModelInfer calls; N: N ModelStreamInfer streams share them

    @property
    def key(self) -> str:
        base = f"{self.model}/{self.form}/b{self.batch}/c{self.concurrency}"
        return f"{base}/stream{self.streams}x{self.depth}" if self.streams else base

    @property
    def depth(self) -> int:
        """Requests in flight on each stream (the concurrency for a unary cell)."""
        return self.concurrency // max(1, self.streams)

    def unary(self) -> Cell:
        """The unary cell of the same model, form, batch and concurrency."""
        return replace(self, streams=0)


def build_grid(model: str, wide_model: str | None, text_model: str | None = None) -> list[Cell]:
    cells = [Cell(model, form, b, c) for form in FORMS for b, c in NARROW_SHAPES]
    if wide_model:
        cells += [Cell(wide_model, form, b, c) for form in FORMS for b, c in WIDE_SHAPES]
    if text_model:  # issue 13: what BYTES decoding and the category lookup cost
        cells += [Cell(text_model, TEXT_FORM, b, c) for b, c in TEXT_SHAPES]
    cells += [Cell(model, STREAM_FORM, 1, s * d, s) for s, d in STREAM_SHAPES]
    return cells


def is_peer_cell(cell: Cell, main_model: str) -> bool:
    return cell.model == main_model and cell.form == PEER_FORM and not cell.streams


METHODS = {  # by lane: a cell's streams == 0 or not
    False: "/inference.GRPCInferenceService/ModelInfer",
    True: "/inference.GRPCInferenceService/ModelStreamInfer",
}


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
    name: str  # "ours", "transport_floor", "model_floor" or a peer's name
    address: str
    pid: int | None  # None: a server we did not start, so no CPU/RSS figures


def build_requests(
    cells: Sequence[Cell], manifests: Mapping[str, Mapping[str, Any]]
) -> dict[str, pb.ModelInferRequest]:
    """cell key -> its request; the same rows every time (seeded) for every target."""
    return {
        cell.key: build_request(
            cell.model, manifests[cell.model], make_feeds(manifests[cell.model], cell.batch),
            cell.form,
        )
        for cell in cells
    }  # fmt: skip


def model_path(repository: Path, model: str) -> Path:
    versions = [int(p.name) for p in (repository / model).iterdir() if p.name.isdigit()]
    versions = [v for v in versions if v > 0]  # Triton's rule: versions are positive integers
    return repository / model / str(max(versions)) / "model.onnx"


def compute_floors(
    repository: Path,
    cells: Sequence[Cell],
    manifests: Mapping[str, Mapping[str, Any]],
    timing: Timing,
) -> dict[tuple[str, int], dict[str, float]]:
    """(model, batch) -> session.run figures on the cells' rows, medians over the repeats."""
    floors: dict[tuple[str, int], dict[str, float]] = {}
    for model, batch in sorted({(c.model, c.batch) for c in cells}):
        feeds = make_feeds(manifests[model], batch)
        runs = []
        for _ in range(timing.repeats):
            sample = measure_compute(
                model_path(repository, model), feeds, timing.window_s / 2, 1_000_000
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
    """Triton's ModelStatistics counters (count, ns) of the model's versions, summed; zeros when
    the server keeps none (the transport floor) or has no such RPC (the peers)."""
    totals = dict.fromkeys(PHASES, (0, 0))
    try:
        reply = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=5)
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
        return totals
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
        target.address, METHODS[cell.streams > 0], payload, cell.concurrency, processes,
        timing.warmup_s, timing.window_s, timing.max_requests, timing.connections, cell.streams,
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
    peers: Sequence[Target] = (),
    peer_cells: Collection[str] = (),
) -> dict[str, dict[str, list[dict[str, float]]]]:
    """cell key -> target name -> the figures of each of `timing.repeats` windows, in order;
    within a repeat every target is measured back to back, so repeat i pairs across targets.
    The peers join the targets on the cells whose keys are in `peer_cells`."""
    payloads = {key: request.SerializeToString() for key, request in requests.items()}
    channels = {t.name: grpc.insecure_channel(t.address) for t in [*targets, *peers]}
    stubs = {name: pb_grpc.GRPCInferenceServiceStub(ch) for name, ch in channels.items()}  # type: ignore[no-untyped-call]
    runs: dict[str, dict[str, list[dict[str, float]]]] = {}
    for cell in cells:
        names = [t.name for t in targets] + [p.name for p in peers if cell.key in peer_cells]
        runs[cell.key] = {name: [] for name in names}
    for repeat in range(timing.repeats):
        for cell in cells:
            measured = [*targets, *(peers if cell.key in peer_cells else ())]
            order = measured if repeat % 2 == 0 else measured[::-1]
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
    "FORMS",
    "NARROW_SHAPES",
    "PEER_FORM",
    "STREAM_FORM",
    "STREAM_SHAPES",
    "TEXT_FORM",
    "TEXT_SHAPES",
    "WIDE_SHAPES",
    "Cell",
    "Target",
    "Timing",
    "build_grid",
    "build_request",
    "build_requests",
    "compute_floors",
    "is_peer_cell",
    "model_path",
    "run_grid",
]
