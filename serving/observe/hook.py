"""The dataplane's one optional hook: tracing (tracing.py) and request logs (request_log.py).

`DataPlane.hook` is None when both are off. When one is on, each inference is watched by a
`Watched`: it takes the admission's place in the dataplane's `with` (so it sees how the call ended,
with the status the metrics count) and the front's wire (so it times decode and encode, and keeps
the decoded inputs and the outputs). When the call ends it hands the facts to the tracer and the
request log; neither can fail the call (a failure there is logged, rate-limited).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ..codec import Codec, Decoded
from ..errors import OK, message_of, status_of
from ..runtime.admission import Admission
from ..runtime.batcher import Results
from .call_log import log_failure
from .request_log import Record, RequestLog
from .telemetry import Call
from .tracing import Tracing, provider_from_env, tracing_requested

log = logging.getLogger(__name__)

Carrier = Callable[[], Iterable[tuple[str, str]]] | None


class Hook:
    def __init__(self, tracing: Tracing | None, request_log: RequestLog | None) -> None:
        self.tracing, self.request_log = tracing, request_log

    def watch(
        self,
        call: Call,
        admission: Admission,
        name: str,
        version: str,
        request: Any,
        wire: Any,
        carrier: Carrier,
    ) -> Watched:
        return Watched(self, call, admission, name, version, request, wire, carrier)

    def close(self, timeout_s: float) -> None:
        """Write and export what is pending, within `timeout_s` for both."""
        deadline = time.monotonic() + timeout_s
        if self.request_log is not None:
            self.request_log.close(timeout_s)
        if self.tracing is not None:
            self.tracing.close(max(0.1, deadline - time.monotonic()))


class Watched:
    """One watched inference: a context manager around the admission, and the front's wire."""

    __slots__ = ("admission", "call", "carrier", "codec", "decode_ns", "decoded", "encode_ns",
                 "encoded_ns", "hook", "logged", "name", "protocol", "request", "results",
                 "version", "wire")  # fmt: skip

    def __init__(
        self,
        hook: Hook,
        call: Call,
        admission: Admission,
        name: str,
        version: str,
        request: Any,
        wire: Any,
        carrier: Carrier,
    ) -> None:
        self.hook, self.call, self.admission, self.wire = hook, call, admission, wire
        self.name, self.version, self.request, self.carrier = name, version, request, carrier
        self.protocol: str = wire.protocol
        self.codec: Codec | None = None
        self.decoded: Decoded | None = None
        self.results: Results | None = None
        self.decode_ns = self.encode_ns = self.encoded_ns = 0
        log_ = hook.request_log
        self.logged = log_ is not None and log_.sampled()

    def __enter__(self) -> Watched:
        try:
            self.admission.__enter__()
        except Exception as err:  # refused (busy, draining): still a call to trace and log
            self._finish(err)
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, _: Any) -> None:
        self.admission.__exit__(kind, err, _)
        self._finish(err)

    def decode(self, codec: Codec, request: Any) -> Decoded:
        self.codec, self.decode_ns = codec, time.perf_counter_ns()
        decoded: Decoded = self.wire.decode(codec, request)
        self.decoded = decoded
        return decoded

    def encode(self, codec: Codec, request: Any, decoded: Decoded, results: Results) -> Any:
        self.results, self.encode_ns = results, time.perf_counter_ns()
        reply = self.wire.encode(codec, request, decoded, results)
        self.encoded_ns = time.perf_counter_ns()
        return reply

    def served_version(self) -> str:
        return self.codec.model_version if self.codec is not None else ""

    def _finish(self, err: BaseException | None) -> None:
        ended = time.perf_counter_ns()
        if err is None:
            code = OK
        elif isinstance(err, asyncio.CancelledError):
            code = self.call.cancelled()
        elif isinstance(err, Exception):
            code = status_of(err)
        else:
            return  # interpreter exit and the like: nothing to report
        try:
            if self.hook.tracing is not None:
                self.hook.tracing.record(self, code, ended)
            if self.logged and self.hook.request_log is not None:
                self.hook.request_log.put(self._record(code, err, ended))
        except Exception as problem:  # observing must never fail the call itself
            log_failure("observe", "INTERNAL", f"{type(problem).__name__}: {problem}")

    def _record(self, code: str, err: BaseException | None, ended: int) -> Record:
        call = self.call
        offset = time.time_ns() - time.perf_counter_ns()
        decoded = self.decoded
        return Record(
            started_unix_ns=call.start + offset,
            request_id=str(getattr(self.request, "id", "")),
            model=self.name,
            version=self.served_version() or self.version,
            protocol=self.protocol,
            status=code,
            duration_ns=ended - call.start,
            rows=decoded.rows if decoded is not None else 0,
            inputs=decoded.inputs if decoded is not None else None,
            outputs=(
                {spec.name: self.results[spec.name] for spec in decoded.outputs}
                if decoded is not None and self.results is not None and code == OK
                else None
            ),
            error=message_of(err) if isinstance(err, Exception) else "",
        )


def build_hook(
    request_log: Path | None, sample: float, env: Mapping[str, str], provider: Any = None
) -> Hook | None:
    """The hook the settings and OTEL_* variables ask for, or None (both off). `provider`: a
    TracerProvider to use instead of the environment's (tests: the SDK's in-memory exporter)."""
    if provider is None and tracing_requested(env):
        provider = provider_from_env(env)
    tracing = Tracing(provider) if provider is not None else None
    logs = RequestLog(request_log, sample) if request_log is not None else None
    if tracing is None and logs is None:
        return None
    if logs is not None:
        log.info("request log: %s (%.0f%% of inferences)", request_log, 100 * sample)
    if tracing is not None:
        log.info("tracing: OpenTelemetry spans per inference (decode, queue, run, encode)")
    return Hook(tracing, logs)


__all__ = ["Hook", "Watched", "build_hook"]
