"""Per-version inference statistics, counted once and read by both ModelStatistics and Prometheus.

Every inference call (a ModelInfer, or one ModelStreamInfer message) is tracked by
`Telemetry.track` and lands in its version's `VersionStats` (Triton's counters plus histograms), or,
if it failed before a version was chosen (unknown model, overload), in a per-code count.
`/metrics` is rendered from those same objects at scrape time, on its own HTTP port: the hot path
pays for a few integer additions, not for a metrics library's locks.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .errors import cancelled_code, code_for

# Seconds: a one-row call of the served MLP takes ~0.1-0.5 ms end to end, a 1024-row one a few ms.
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 0.5, 1.0, 2.5)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)  # rows; 1024 = default max batch
OK = grpc.StatusCode.OK.name


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


class Histogram:
    """Counts per bucket (upper bounds, +Inf last) and the sum: what Prometheus exposes."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        counts, total = list(self.counts), 0  # a copy: the event loop may be adding meanwhile
        cumulative = []
        for bound, count in zip([*map(floatToGoString, self.bounds), "+Inf"], counts, strict=True):
            total += count
            cumulative.append((bound, float(total)))
        return cumulative


@dataclass
class BatchStats:
    """Triton's InferBatchStatistics: one per batch size seen."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class VersionStats:
    """One version's counters; updated on the event loop thread only, read by scrapes as-is."""

    last_inference_ms: int = 0
    inference_count: int = 0  # rows
    execution_count: int = 0  # session runs
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    codes: dict[str, int] = field(default_factory=dict)  # status code name -> calls
    batches: dict[int, BatchStats] = field(default_factory=dict)  # rows -> phases
    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS_S))
    queue_time: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS_S))
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))

    def record(self, call: Call, code: str, now_ns: int) -> None:
        elapsed = now_ns - call.start
        self.codes[code] = self.codes.get(code, 0) + 1
        self.latency.observe(elapsed / 1e9)
        if code != OK:
            self.fail.add(elapsed)
            return
        self.success.add(elapsed)
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.inference_count += call.rows
        self.execution_count += 1
        phases = call.phases
        for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
            getattr(self, phase).add(phases.get(phase, 0))
        batch = self.batches.setdefault(call.rows, BatchStats())
        for phase in ("compute_input", "compute_infer", "compute_output"):
            getattr(batch, phase).add(phases.get(phase, 0))
        self.queue_time.observe(phases.get("queue", 0) / 1e9)
        self.batch_size.observe(call.rows)


class Call:
    """One inference call: its version once resolved, and its time split into Triton's phases."""

    __slots__ = ("_last", "model", "phases", "rows", "start", "stats", "version")

    def __init__(self) -> None:
        self.start = self._last = time.perf_counter_ns()
        self.phases: dict[str, int] = {}
        self.rows = 0
        self.model = self.version = ""
        self.stats: VersionStats | None = None

    def resolved(self, model: str, version: int, stats: VersionStats) -> None:
        self.model, self.version, self.stats = model, str(version), stats

    def lap(self, phase: str, until: int | None = None) -> None:
        """End the current phase (now, or at `until`) and book its time to `phase`."""
        now = time.perf_counter_ns() if until is None else until
        self.phases[phase] = self.phases.get(phase, 0) + now - self._last
        self._last = now


# (model, version, ready, stats) for every version the repository knows.
Snapshot = Callable[[], Iterable[tuple[str, str, bool, VersionStats]]]


class Telemetry(Collector):
    """Tracks inference calls; `collect` renders them and the repository's state for Prometheus."""

    def __init__(self, snapshot: Snapshot, inflight: Callable[[], int], limit: int) -> None:
        super().__init__()
        self._snapshot, self._inflight, self._limit = snapshot, inflight, limit
        self.unresolved: dict[str, int] = {}  # code -> calls that failed before a version
        self.auth_failures = 0

    @contextmanager
    def track(self, context: Any) -> Iterator[Call]:
        """Count the call once, whatever happens; exceptions propagate unchanged."""
        call, code = Call(), OK
        try:
            yield call
        except asyncio.CancelledError:
            code = cancelled_code(context).name
            raise
        except Exception as err:  # counted here, mapped and logged by the RPC boundary
            code = code_for(err).name
            raise
        finally:
            if call.stats is not None:
                call.stats.record(call, code, time.perf_counter_ns())
            else:
                self.unresolved[code] = self.unresolved.get(code, 0) + 1

    def count(self, code: str) -> int:
        """Inference requests answered with `code` so far, across every version."""
        versions = sum(stats.codes.get(code, 0) for *_, stats in self._snapshot())
        return versions + self.unresolved.get(code, 0)

    def collect(self) -> Iterator[Metric]:
        """The Prometheus collector interface: called by the metrics HTTP thread per scrape."""
        labels = ["model", "version"]
        requests = CounterMetricFamily(
            "stablemlp_inference_requests",
            "Inference requests (ModelInfer calls, ModelStreamInfer messages) by status code",
            labels=[*labels, "code"],
        )
        latency = HistogramMetricFamily(
            "stablemlp_inference_request_duration_seconds",
            "Time from a request's arrival in the servicer to its reply, every status",
            labels=labels,
        )
        queue = HistogramMetricFamily(
            "stablemlp_inference_queue_duration_seconds",
            "Time successful requests waited for an inference worker",
            labels=labels,
        )
        batch = HistogramMetricFamily(
            "stablemlp_inference_batch_size", "Rows per successful request", labels=labels
        )
        ready = GaugeMetricFamily(
            "stablemlp_model_version_ready", "1 if the version serves, else 0", labels=labels
        )
        models: set[str] = set()
        for model, version, is_ready, stats in self._snapshot():
            for code, count in dict(stats.codes).items():
                requests.add_metric([model, version, code], count)
            for family, histogram in ((latency, stats.latency), (queue, stats.queue_time),
                                      (batch, stats.batch_size)):  # fmt: skip
                family.add_metric([model, version], histogram.buckets(), histogram.sum)
            ready.add_metric([model, version], float(is_ready))
            if is_ready:
                models.add(model)
        for code, count in dict(self.unresolved).items():
            requests.add_metric(["", "", code], count)
        yield from (requests, latency, queue, batch, ready)
        yield GaugeMetricFamily(
            "stablemlp_models_loaded", "Models with at least one version serving", len(models)
        )
        yield GaugeMetricFamily(
            "stablemlp_inflight_requests",
            "Inference requests admitted and not yet answered (queued or running)",
            self._inflight(),
        )
        yield GaugeMetricFamily(
            "stablemlp_inflight_limit", "Most requests admitted at once", self._limit
        )
        yield CounterMetricFamily(
            "stablemlp_auth_failures", "Calls refused for a missing or wrong token",
            self.auth_failures,
        )  # fmt: skip


def serve_metrics(host: str, port: int, telemetry: Telemetry) -> tuple[int, Callable[[], None]]:
    """Start the /metrics HTTP server on its own thread; returns the bound port and a stop."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(telemetry)
    httpd, thread = start_http_server(port, addr=host, registry=registry)

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)

    return int(httpd.server_port), stop


__all__ = [
    "BATCH_BUCKETS",
    "LATENCY_BUCKETS_S",
    "BatchStats",
    "Call",
    "Duration",
    "Histogram",
    "Telemetry",
    "VersionStats",
    "serve_metrics",
]
