"""The dataplane's one optional hook: tracing (tracing.py) and request logs (request_log.py).

`DataPlane.hook` is None when both are off. When one is on, each inference, as it ends (counted,
with the status the metrics count), is handed over with its facts: its phases' times, decoded
inputs and outputs. Neither can fail the call (a failure there is logged, rate-limited).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import OK, message_of, status_of
from .call_log import log_failure
from .request_log import Record, RequestLog
from .tracing import Tracing, provider_from_env, tracing_requested

if TYPE_CHECKING:  # the dataplane imports this module's Hook
    from ..dataplane import Inference

log = logging.getLogger(__name__)


class Hook:
    def __init__(self, tracing: Tracing | None, request_log: RequestLog | None) -> None:
        self.tracing, self.request_log = tracing, request_log

    def finish(self, inference: Inference, err: BaseException | None, ended: int) -> None:
        """Trace and log one ended inference; `err`: why it failed (None: it did not)."""
        if err is None:
            code = OK
        elif isinstance(err, asyncio.CancelledError):
            code = inference.call.cancelled()
        elif isinstance(err, Exception):
            code = status_of(err)
        else:
            return  # interpreter exit and the like: nothing to report
        try:
            if self.tracing is not None:
                self.tracing.record(inference, code, ended)
            if self.request_log is not None and self.request_log.sampled():
                self.request_log.put(_record(inference, code, err, ended))
        except Exception as problem:  # observing must never fail the call itself
            log_failure("observe", "INTERNAL", f"{type(problem).__name__}: {problem}")

    def close(self, timeout_s: float) -> None:
        """Write and export what is pending, within `timeout_s` for both."""
        deadline = time.monotonic() + timeout_s
        if self.request_log is not None:
            self.request_log.close(timeout_s)
        if self.tracing is not None:
            self.tracing.close(max(0.1, deadline - time.monotonic()))


def _record(inference: Inference, code: str, err: BaseException | None, ended: int) -> Record:
    call, decoded, results = inference.call, inference.decoded, inference.results
    offset = time.time_ns() - time.perf_counter_ns()
    return Record(
        started_unix_ns=call.start + offset,
        request_id=inference.request.id,
        model=inference.name,
        version=inference.served_version(),
        protocol=inference.protocol,
        status=code,
        duration_ns=ended - call.start,
        rows=decoded.rows if decoded is not None else 0,
        inputs=decoded.inputs if decoded is not None else None,
        outputs=(
            {spec.name: results[spec.name] for spec in decoded.outputs}
            if decoded is not None and results is not None and code == OK
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


__all__ = ["Hook", "build_hook"]
