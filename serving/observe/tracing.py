"""OpenTelemetry tracing of inference calls: optional, off unless the standard OTEL_* variables
ask for it (`pip install 'stablemlp[tracing]'`).

On when OTEL_TRACES_EXPORTER names an exporter other than `none`, or an OTLP endpoint is set
(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT); OTEL_SDK_DISABLED=true keeps it
off. Exporters: `otlp` (gRPC, or HTTP when OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL says
http/protobuf and that exporter is installed) and `console`; the SDK itself reads the rest
(service name and resource, sampler, endpoint, headers, batch sizes).

Each inference becomes one SERVER span, a child of the W3C `traceparent` the call carried (gRPC
metadata or HTTP header), with children `decode`, `queue`, `run` and `encode`. The spans are made
once the call has ended, from the timestamps the dataplane took anyway, so a traced request does
no tracing work while it runs; with tracing off nothing here is imported.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import OK

if TYPE_CHECKING:  # the dataplane imports the hook, which imports this module
    from ..dataplane import Inference


log = logging.getLogger(__name__)

SERVICE_NAME = "stablemlp"  # when OTEL_SERVICE_NAME does not say
PROPAGATED = ("traceparent", "tracestate")  # W3C Trace Context
INSTALL_HINT = "pip install 'stablemlp[tracing]'"


def tracing_requested(env: Mapping[str, str]) -> bool:
    """Whether the OTEL_* variables ask for traces."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return exporters != "none"
    return bool(
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def provider_from_env(env: Mapping[str, str]) -> Any:
    """A TracerProvider exporting where the OTEL_* variables say; ValueError if they ask for
    something not installed or not known."""
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        raise ValueError(f"tracing: OTEL_* variables ask for traces; {INSTALL_HINT}") from None
    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or SERVICE_NAME})
    # Sampler: OTEL_TRACES_SAMPLER, as the SDK reads it. No atexit shutdown: close() bounds it by
    # the grace period (the SDK's own waits up to 30 s for an unreachable collector).
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    for name in env.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(","):
        name = name.strip()
        if name == "console":
            exporter: Any = ConsoleSpanExporter()
        elif name == "otlp":
            exporter = _otlp_exporter(env)
        else:
            raise ValueError(f"OTEL_TRACES_EXPORTER: got {name!r}, expected otlp, console or none")
        provider.add_span_processor(BatchSpanProcessor(exporter))  # exports off the event loop
    return provider


def _otlp_exporter(env: Mapping[str, str]) -> Any:
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
    )
    try:
        if protocol.strip() == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter,
            )
    except ImportError:
        raise ValueError(f"tracing: no OTLP exporter for {protocol!r}; {INSTALL_HINT}") from None
    return OTLPSpanExporter()


class Tracing:
    """Turns finished calls into spans on `provider`'s tracer."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self._tracer = provider.get_tracer("stablemlp.serving")
        self._propagator = TraceContextTextMapPropagator()
        self._in_context, self._server = trace.set_span_in_context, SpanKind.SERVER
        self._status: Any = Status
        self._error_code: Any = StatusCode.ERROR

    def record(self, inference: Inference, code: str, ended_ns: int) -> None:
        """One span for the call and one per phase it reached; times are perf_counter_ns."""
        call = inference.call
        offset = time.time_ns() - time.perf_counter_ns()  # perf_counter -> Unix time
        parent = self._propagator.extract(_headers(inference.carrier))
        attributes: dict[str, Any] = {
            "rpc.system" if inference.protocol == "grpc" else "network.protocol.name":
                inference.protocol,
            "stablemlp.model.name": inference.name,
            "stablemlp.model.version": inference.served_version(),
            "stablemlp.status": code,
        }  # fmt: skip
        if call.rows:
            attributes["stablemlp.rows"] = call.rows
        executed = call.executed
        if executed is not None:
            attributes["stablemlp.batch_rows"] = executed.batch_rows  # rows of the merged run
        span = self._tracer.start_span(
            f"{inference.protocol} infer", context=parent, kind=self._server,
            start_time=call.start + offset, attributes=attributes,
        )  # fmt: skip
        if not span.is_recording():  # sampled out (OTEL_TRACES_SAMPLER): no children either
            return
        phases = [("decode", inference.decode_ns, call.decoded if call.rows else 0)]
        if executed is not None:
            phases += [("queue", call.decoded, executed.started_ns),
                       ("run", executed.started_ns, executed.ended_ns)]  # fmt: skip
        phases.append(("encode", inference.encode_ns, ended_ns))
        context = self._in_context(span)
        for name, start, end in phases:
            if start and end:
                child = self._tracer.start_span(name, context=context, start_time=start + offset)
                child.end(end_time=end + offset)
        if code != OK:
            span.set_status(self._status(self._error_code, code))
        span.end(end_time=ended_ns + offset)

    def close(self, timeout_s: float) -> None:
        """Export what is pending, for at most `timeout_s` (the rest of the grace period); an
        unreachable collector must not hold the shutdown past it."""
        stop = threading.Thread(target=self._shutdown, args=(timeout_s,), daemon=True)
        stop.start()
        stop.join(timeout_s)
        if stop.is_alive():
            log.warning("tracing: spans not exported within %.1f s were dropped", timeout_s)

    def _shutdown(self, timeout_s: float) -> None:
        self.provider.force_flush(int(timeout_s * 1000))
        self.provider.shutdown()


def _headers(carrier: Any) -> dict[str, str]:
    """The trace context headers of a call (keys lower-cased, as both protocols allow)."""
    if carrier is None:
        return {}
    pairs: Iterable[tuple[str, Any]] = carrier() or ()
    return {
        key.lower(): value
        for key, value in pairs
        if isinstance(value, str) and key.lower() in PROPAGATED
    }


__all__ = ["INSTALL_HINT", "Tracing", "provider_from_env", "tracing_requested"]
