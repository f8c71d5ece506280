"""`stablemlp serve`: load and warm the repository, then serve KServe v2 gRPC (health, reflection)
and REST on one event loop.

Assembly only: the repository and its versions' schedulers, the dataplane and its optional hook
(tracing, request logs), the gRPC front (servicer, health, reflection) with TLS or mTLS and a token
interceptor, the REST front with the same certificate and tokens, /metrics on its own HTTP port,
and a repository poller in `poll` mode. Memory is bounded before admission: the message size is
fitted to the models (REST bodies to a multiple of it), and each port caps what clients can make
it hold (grpc/servicer.py, rest/app.py). Shutdown on
SIGTERM, SIGINT or SIGHUP: readiness and health go NOT_SERVING first (so load balancers stop
sending), then the ports stop taking calls (new ones get UNAVAILABLE / 503) while those in flight
get `grace_period_s` to finish; the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import gc
import importlib.metadata
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .dataplane import DataPlane
from .errors import ServingError
from .grpc.auth import server_credentials, token_interceptors
from .grpc.health import INFERENCE_SERVICE, HealthServicer, publish_health
from .grpc.servicer import (
    EXTENSIONS,
    InferenceServicer,
    add_inference_service,
    bind_grpc,
    grpc_server,
)
from .observe.hook import build_hook
from .observe.telemetry import Telemetry, start_metrics
from .repository.models import ModelRepository
from .repository.watcher import watch_repository
from .rest.app import RestFront, drain_rest, rest_guard, start_rest_port, stop_rest
from .rest.guard import ssl_context
from .runtime.admission import Admission
from .runtime.batcher import BatchingOptions
from .runtime.scheduler import Scheduler
from .runtime.session import ModelRuntime, RuntimeOptions
from .settings import Settings, add_arguments, address, env_name, load_settings
from .tokens import read_token
from .workers import WorkerRole, run_workers

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    INFERENCE_SERVICE,
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    reflection.SERVICE_NAME,
)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Room in a message beyond its tensor data: names, shapes, parameters, the outputs asked for.
MESSAGE_HEADROOM_BYTES = 64 * 1024
# Once every admitted call has finished, gRPC gets this long to deliver the replies already
# written; a call still open then never ends by itself and is cancelled. Under load, about 1 in 8
# SIGTERMs left one such call until the grace period ran out (tests/test_lifecycle.py, grace 3 s:
# stopped after 3.3 s instead of 0.3 s) with no task of ours left running: a call gRPC's core
# accepted as grpc.aio's accept loop stopped, never handed to a handler.
REPLY_FLUSH_S = 1.0


class Built(NamedTuple):
    server: grpc.aio.Server
    port: int  # the bound port (the real one when settings.port is 0)
    # graceful: NOT_SERVING, refuse new calls, finish those in flight; returns the calls cut off
    stop: Callable[[float], Awaitable[int]]
    telemetry: Telemetry  # the inference counts, also behind ModelStatistics and /metrics
    metrics_port: int | None  # None: no /metrics endpoint
    dataplane: DataPlane
    http_port: int | None = None  # the bound REST port; None: REST off


def server_version() -> str:
    try:
        return importlib.metadata.version("stablemlp")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _runtime_options(settings: Settings) -> RuntimeOptions:
    return RuntimeOptions(
        **{f.name: getattr(settings, f.name) for f in dataclasses.fields(RuntimeOptions)}
    )


def _batching(settings: Settings) -> BatchingOptions | None:
    if not settings.dynamic_batching:
        return None
    return BatchingOptions(
        settings.max_batch_size, settings.max_queue_delay_us, settings.preferred_batch_sizes
    )


async def build_server(
    settings: Settings, *, reuse_port: bool = False, tracer_provider: Any = None
) -> Built:
    """Load, verify and warm every model, then assemble and bind the server (REST serves at once,
    gRPC once started).

    `reuse_port`: bind with SO_REUSEPORT, for worker processes sharing one port.
    `tracer_provider`: trace with it instead of as OTEL_* say (tests: an in-memory exporter)."""
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(settings.inference_workers, thread_name_prefix="infer")
    batching = _batching(settings)

    def scheduler(runtime: ModelRuntime) -> Scheduler:
        return Scheduler(runtime, executor, batching, loop)

    repository = ModelRepository(
        settings.model_repository,
        policy=settings.version_policy,
        options=_runtime_options(settings),
        warmup_runs=settings.warmup_runs,
        scheduler=scheduler,
        only=settings.models,
    )
    admission = Admission(settings.max_inflight)
    telemetry = Telemetry(repository.snapshot, lambda: admission.inflight, admission.limit)
    # Tokens, TLS and the hook first: fail before loading.
    token = read_token(settings.auth_token, settings.auth_token_file, env_name("auth_token"))
    control = read_token(
        settings.control_token, settings.control_token_file, env_name("control_token")
    )
    interceptors = token_interceptors(
        token, control, settings.auth_exempt_health, telemetry.count_auth_failure
    )
    credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    tls = ssl_context(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    hook = build_hook(
        settings.request_log, settings.request_log_sample, os.environ, tracer_provider
    )
    await asyncio.to_thread(repository.load_all)
    message_bytes = settings.max_message_bytes or (
        repository.largest_request_bytes() + MESSAGE_HEADROOM_BYTES
    )
    server = grpc_server(settings, interceptors, message_bytes, reuse_port)
    dataplane = DataPlane(repository, admission, telemetry, settings.model_control_mode)
    dataplane.hook = hook
    health = HealthServicer(max_watchers=max(1, settings.max_concurrent_rpcs // 4))
    on_change = dataplane.on_change = functools.partial(publish_health, health, dataplane)
    servicer = InferenceServicer(
        dataplane,
        version_policy=settings.version_policy,
        batching=batching,
        server_version=server_version(),
    )
    add_inference_service(servicer, server, message_bytes)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(SERVICE_NAMES, server)
    port = bind_grpc(server, settings, credentials)
    rest = None
    if settings.http_port >= 0:
        guard = rest_guard(settings, token, control, message_bytes, telemetry.count_auth_failure)
        front = RestFront(dataplane, guard, version_policy=settings.version_policy,
                          batching=batching, server_version=server_version(),
                          extensions=EXTENSIONS)  # fmt: skip
        rest = await start_rest_port(settings, front, guard, tls, reuse_port)
    metrics_port, stop_metrics = start_metrics(settings.host, settings.metrics_port, telemetry)
    await publish_health(health, dataplane)
    log.info(
        "limits: messages up to %d bytes, %d calls at once, %d connections x %d streams, %d "
        "inferences admitted", message_bytes, settings.max_concurrent_rpcs,
        settings.max_connections, settings.max_streams_per_connection, settings.max_inflight,
    )  # fmt: skip
    watcher = None
    if settings.model_control_mode == "poll" and settings.repository_poll_s > 0:
        poll = watch_repository(repository, settings.repository_poll_s, on_change)
        watcher = asyncio.create_task(poll)

    async def stop(grace: float) -> int:
        deadline = time.monotonic() + grace
        repository.begin_shutdown()
        health.enter_graceful_shutdown()
        servicer.end_streams()
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        # Inference calls in flight finish; new ones get UNAVAILABLE from the dataplane (503 and
        # `Connection: close` over REST), so clients see a status they may retry elsewhere, not a
        # call cut at the transport. REST requests whose body is still arriving are waited for.
        remaining = max(0.0, deadline - time.monotonic())
        rest_drained = drain_rest(rest[0], remaining) if rest else asyncio.sleep(0, result=0)
        _, receiving = await asyncio.gather(admission.drain(remaining), rest_drained)
        # Still running when the grace period ended: admitted calls, and REST requests still
        # receiving their body (never admitted). Counted before anything is cut.
        cut_off = admission.inflight + receiving
        await asyncio.gather(
            server.stop(min(REPLY_FLUSH_S, max(0.0, deadline - time.monotonic()))),
            *([stop_rest(rest[0], max(0.0, deadline - time.monotonic()))] if rest else []),
        )
        executor.shutdown(wait=False, cancel_futures=True)
        stop_metrics()
        if hook is not None:  # what is queued for the request log is written, boundedly
            await asyncio.to_thread(hook.close, max(1.0, deadline - time.monotonic()))
        return cut_off

    http_port = rest[1] if rest is not None else None
    return Built(server, port, stop, telemetry, metrics_port, dataplane, http_port)


def _scheme(settings: Settings) -> str:
    return "mTLS" if settings.tls_client_ca else "TLS" if settings.tls_cert else "plaintext"


async def serve(settings: Settings, worker: WorkerRole | None = None) -> int:
    """Serve until SIGTERM/SIGINT/SIGHUP; `worker`: one of several processes on the port."""
    built = await build_server(settings, reuse_port=worker is not None)
    await built.server.start()
    gc.freeze()  # what start-up made (modules, sessions) lives on: collections need not scan it
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stopping.set)
    listening = address(settings.host, built.port)
    log.info("event loop: %s", type(loop).__module__.split(".")[0])
    if worker is None:
        log.info("ready: listening on %s (%s)", listening, _scheme(settings))
        await stopping.wait()
    else:
        log.info("%s (pid %d): serving on %s", worker.name, os.getpid(), listening)
        worker.serving(built.port, built.metrics_port)
        await worker.watch_supervisor(stopping)
    log.info(
        "shutting down: NOT_SERVING, %.1f s grace for in-flight calls", settings.grace_period_s
    )
    cut_off = await built.stop(settings.grace_period_s)
    answered = built.telemetry.count("OK")
    log.info(
        "stopped: %d inference calls answered OK in all, %d in-flight calls cut off by the grace "
        "period", answered, cut_off,
    )  # fmt: skip
    return 0


def run_loop(main: Coroutine[Any, Any, int], choice: str) -> int:
    """Run `main` on uvloop when chosen (or, with `auto`, installed), else asyncio's loop."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ValueError("event loop uvloop: not installed (pip install uvloop)") from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stablemlp serve",
        description="Serve a model repository over the KServe v2 / Triton gRPC protocol.",
        epilog="Flags override STABLEMLP_* environment variables, which override the defaults.",
    )
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = load_settings(vars(args))
    except ValueError as err:
        print(f"stablemlp serve: {err}", file=sys.stderr)
        return 2
    try:
        if settings.workers > 1:
            return run_workers(
                settings, serve, run_loop, functools.partial(address, settings.host),
                _scheme(settings),
            )  # fmt: skip
        return run_loop(serve(settings), settings.event_loop)
    except (ServingError, OSError, ValueError) as err:  # models, ports, TLS and token files
        print(f"stablemlp serve: cannot start: {err}", file=sys.stderr)
        return 1


__all__ = [
    "MESSAGE_HEADROOM_BYTES",
    "SERVICE_NAMES",
    "STOP_SIGNALS",
    "Built",
    "build_parser",
    "build_server",
    "main",
    "run_loop",
    "serve",
]
