"""Per-version inference statistics, counted once and read by both ModelStatistics and Prometheus.

Every inference call (a ModelInfer, one ModelStreamInfer message, a REST infer) is tracked by
`Telemetry.track` and lands in its version's `VersionStats` (Triton's counters plus histograms), or,
if it failed before a version was chosen (unknown model, overload), in a per-status count. The
timings come from the `Executed` record the scheduler returns; nothing below writes into this.
`/metrics` is rendered from those same objects at scrape time, on its own HTTP port: the hot path
pays for a few integer additions, not for a metrics library's locks.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ..errors import OK, status_of
from ..settings import address

if TYPE_CHECKING:  # the scheduler's record of a run; metrics only read it
    from ..runtime.batcher import Executed

# Seconds: a one-row call of the served MLP takes ~0.1-0.5 ms end to end, a 1024-row one a few ms.
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 0.5, 1.0, 2.5)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)  # rows; 1024 = default max batch
NS = 1_000_000_000  # per second
log = logging.getLogger(__name__)


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


class Histogram:
    """Counts per bucket (upper bounds, +Inf last) and the sum: what Prometheus exposes.

    Observations are integers in 1/`scale` of the exposed unit (ns for seconds), so the hot path
    neither divides nor makes floats; `buckets` and `total` convert."""

    def __init__(self, bounds: tuple[float, ...], scale: int = 1) -> None:
        self.labels = [*map(floatToGoString, bounds), "+Inf"]
        self.bounds = [round(bound * scale) for bound in bounds]
        self.counts = [0] * (len(bounds) + 1)
        self.sum, self.scale = 0, scale

    def observe(self, value: int) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        counts, total = list(self.counts), 0  # a copy: the event loop may be adding meanwhile
        cumulative = []
        for label, count in zip(self.labels, counts, strict=True):
            total += count
            cumulative.append((label, float(total)))
        return cumulative

    def total(self) -> float:
        return self.sum / self.scale


@dataclass
class BatchStats:
    """Triton's InferBatchStatistics: one per batch size seen."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class VersionStats:
    """One version's counters; updated on the event loop thread only, read by scrapes as-is."""

    last_success_ns: int = 0  # perf_counter_ns of the latest success (see last_inference)
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
    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS_S, NS))
    queue_time: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS_S, NS))
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))

    def record(self, call: Call, code: str, now_ns: int) -> None:
        """Count one finished call: straight-line integer updates, no allocation."""
        elapsed = now_ns - call.start
        codes = self.codes
        codes[code] = codes.get(code, 0) + 1
        self.latency.observe(elapsed)
        executed = call.executed
        if code != OK or executed is None:
            self.fail.add(elapsed)
            return
        self.success.add(elapsed)
        self.last_success_ns = now_ns  # perf_counter time: `last_inference` converts
        self.inference_count += call.rows
        queue = executed.started_ns - call.decoded
        self.queue.add(queue)
        self.queue_time.observe(queue)
        compute_input = call.decoded - call.start
        compute_infer = executed.ended_ns - executed.started_ns
        compute_output = now_ns - executed.ended_ns
        self.compute_input.add(compute_input)
        self.compute_infer.add(compute_infer)
        self.compute_output.add(compute_output)
        if executed.lead:  # a merged run counts once, as Triton counts executions and batches
            self.execution_count += 1
            self.batch_size.observe(executed.batch_rows)
            batch = self.batches.get(executed.batch_rows)
            if batch is None:
                batch = self.batches[executed.batch_rows] = BatchStats()
            batch.compute_input.add(compute_input)
            batch.compute_infer.add(compute_infer)
            batch.compute_output.add(compute_output)

    @property
    def last_inference(self) -> int:
        """Triton's last_inference: ms since the epoch of the latest success (0: none yet)."""
        if not self.last_success_ns:
            return 0
        ago_ns = time.perf_counter_ns() - self.last_success_ns
        return (time.time_ns() - ago_ns) // 1_000_000


class Call:
    """One inference call: its version once resolved, when it was decoded, and how it ran.

    A context manager: leaving it counts the call once in its version's stats (or, if it failed
    before a version was chosen, by status alone) and lets any exception through."""

    __slots__ = ("cancelled", "decoded", "executed", "rows", "start", "stats", "telemetry")

    def __init__(self, telemetry: Telemetry, cancelled: Callable[[], str]) -> None:
        self.telemetry, self.cancelled = telemetry, cancelled
        self.start = self.decoded = time.perf_counter_ns()
        self.rows = 0  # rows of this request
        self.executed: Executed | None = None
        self.stats: VersionStats | None = None

    def __enter__(self) -> Call:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, _: Any) -> None:
        self.finish(err)

    def finish(self, err: BaseException | None) -> None:
        """Count the call once: a success, or a failure by the status `err` maps to."""
        if err is None:
            code = OK
        elif isinstance(err, asyncio.CancelledError):
            code = self.cancelled()
        elif isinstance(err, Exception):  # counted here, mapped and logged at the front
            code = status_of(err)
        else:
            return
        if self.stats is not None:
            self.stats.record(self, code, time.perf_counter_ns())
        else:
            unresolved = self.telemetry.unresolved
            unresolved[code] = unresolved.get(code, 0) + 1


# (model, version, ready, stats) for every version the repository knows.
Snapshot = Callable[[], Iterable[tuple[str, str, bool, VersionStats]]]


class Telemetry(Collector):
    """Tracks inference calls; `collect` renders them and the repository's state for Prometheus."""

    def __init__(self, snapshot: Snapshot, inflight: Callable[[], int], limit: int) -> None:
        super().__init__()
        self._snapshot, self._inflight, self._limit = snapshot, inflight, limit
        self.unresolved: dict[str, int] = {}  # code -> calls that failed before a version
        self.auth_failures = 0

    def track(self, cancelled: Callable[[], str]) -> Call:
        """`with telemetry.track(cancelled) as call:` counts the call once, whatever happens;
        `cancelled()` names why, should the call be cancelled (the front knows: its deadline, or
        its client went away)."""
        return Call(self, cancelled)

    def count_auth_failure(self) -> None:
        self.auth_failures += 1

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
            "stablemlp_inference_batch_size",
            "Rows per session.run (merged batches counted once, as Triton's batch statistics)",
            labels=labels,
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
                family.add_metric([model, version], histogram.buckets(), histogram.total())
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


# The /metrics port serves scrapers (Prometheus opens one connection per scrape): a few at once,
# each closed when silent this long. prometheus_client's own server starts a thread per
# connection and never times one out: 2,000 silent sockets held 2,000 threads for good.
METRICS_CONNECTIONS = 16
METRICS_TIMEOUT_S = 10.0


class _Handler(WSGIRequestHandler):
    timeout = METRICS_TIMEOUT_S  # the socket's: a read or write waiting longer ends the request

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no access log: scrapes every few seconds would drown the server's


class _MetricsServer(ThreadingMixIn, WSGIServer):
    """A thread per scrape, METRICS_CONNECTIONS at most: a connection beyond them is closed
    unread."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[WSGIRequestHandler]) -> None:
        self._slots = threading.BoundedSemaphore(METRICS_CONNECTIONS)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def serve_metrics(host: str, port: int, collector: Collector) -> tuple[int, Callable[[], None]]:
    """Serve `collector` (a server's Telemetry, or the workers' merged metrics) at /metrics on
    its own thread; returns the bound port and a stop."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    server_class = type("MetricsServer", (_MetricsServer,), {"address_family": family})
    httpd = server_class((host, port), _Handler)
    httpd.set_app(make_wsgi_app(registry))
    thread = threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True)
    thread.start()

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)

    return int(httpd.server_port), stop


def start_metrics(
    host: str, port: int, telemetry: Telemetry
) -> tuple[int | None, Callable[[], None]]:
    """The /metrics port (none when `port` is negative): the bound port, and what stops it."""
    if port < 0:
        return None, lambda: None
    try:
        bound, stop = serve_metrics(host, port, telemetry)
    except OSError as err:
        raise OSError(f"metrics: cannot listen on port {port}: {err}") from None
    log.info("metrics: http://%s/metrics", address(host, bound))
    return bound, stop


__all__ = [
    "BATCH_BUCKETS",
    "LATENCY_BUCKETS_S",
    "METRICS_CONNECTIONS",
    "METRICS_TIMEOUT_S",
    "BatchStats",
    "Call",
    "Duration",
    "Histogram",
    "Telemetry",
    "VersionStats",
    "serve_metrics",
    "start_metrics",
]
