"""`stablemlp serve`: load and warm the repository, then serve KServe v2 gRPC, health, reflection.

Shutdown on SIGTERM/SIGINT: readiness and health go NOT_SERVING first (so load balancers stop
sending), then in-flight calls get `grace_period_s` to finish; the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # stubs lack aio
from grpc_reflection.v1alpha import reflection

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc

from .errors import ServingError
from .repository import ModelRepository
from .runtime import RuntimeOptions
from .servicer import InferenceServicer
from .settings import Settings, add_arguments, load_settings

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    reflection.SERVICE_NAME,
)


class Built(NamedTuple):
    server: grpc.aio.Server
    port: int  # the bound port (the real one when settings.port is 0)
    stop: Callable[
        [float], Awaitable[None]
    ]  # graceful: health NOT_SERVING, then server.stop(grace)


def server_version() -> str:
    try:
        return importlib.metadata.version("stablemlp")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def build_server(settings: Settings) -> Built:
    """Load, verify and warm every model, then assemble and bind (not start) the server."""
    repository = ModelRepository(
        settings.model_repository,
        policy=settings.version_policy,
        options=RuntimeOptions(
            device=settings.device,
            intra_op_threads=settings.intra_op_threads,
            inter_op_threads=settings.inter_op_threads,
            cuda_device_id=settings.cuda_device_id,
            cuda_memory_limit=settings.cuda_memory_limit,
        ),
        warmup_batch_sizes=tuple(sorted({1, settings.max_batch_size})),
        warmup_runs=settings.warmup_runs,
        only=settings.models,
    )
    await asyncio.to_thread(repository.load_all)
    executor = ThreadPoolExecutor(settings.inference_workers, thread_name_prefix="infer")
    health = health_aio.HealthServicer()
    servicer = InferenceServicer(
        repository,
        health,
        executor,
        max_batch_size=settings.max_batch_size,
        version_policy=settings.version_policy,
        server_version=server_version(),
    )
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a taken port must fail, not be silently shared
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(SERVICE_NAMES, server)
    address = _address(settings.host, settings.port)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as err:  # grpc reports a failed bind this way
        raise OSError(f"cannot listen on {address}: {err}") from None
    await servicer.publish_health()

    async def stop(grace: float) -> None:
        repository.begin_shutdown()
        await health.enter_graceful_shutdown()
        await server.stop(grace)
        executor.shutdown(wait=False, cancel_futures=True)

    return Built(server, port, stop)


async def serve(settings: Settings) -> int:
    server, port, stop = await build_server(settings)
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    log.info("ready: listening on %s", _address(settings.host, port))
    await stopping.wait()
    log.info(
        "shutting down: NOT_SERVING, %.1f s grace for in-flight calls", settings.grace_period_s
    )
    await stop(settings.grace_period_s)
    log.info("stopped")
    return 0


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
        return asyncio.run(serve(settings))
    except (ServingError, OSError) as err:
        print(f"stablemlp serve: cannot start: {err}", file=sys.stderr)
        return 1


__all__ = ["SERVICE_NAMES", "Built", "build_parser", "build_server", "main", "serve"]
