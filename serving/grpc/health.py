"""grpc.health.v1 for the server and each model, fed from the repository's readiness.

Our own servicer rather than grpcio-health-checking's asyncio one: that one shares one condition
per service between its watchers and deletes it when any watcher leaves, after which the others
never hear of a change again (so a SIGTERM's NOT_SERVING never reached them). Here every watcher
waits on one event that each change replaces, and a watcher ends its stream once the server has
said NOT_SERVING for good (shutdown), so an open Watch never holds up the stop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ...protos import grpc_service_pb2 as pb
from ..dataplane import DataPlane
from ..errors import clip

Status = health_pb2.HealthCheckResponse
INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]  # untyped stubs
    def __init__(self, max_watchers: int = 32) -> None:
        self._status: dict[str, int] = {"": Status.SERVING}
        self._changed = asyncio.Event()  # replaced by a fresh one at every change
        self._stopping = False
        # Each open Watch holds one of the server's calls at once for its life, and health needs
        # no token: without a cap, idle watchers could take every call slot from inference.
        self._max_watchers, self._watchers = max_watchers, 0

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> Any:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"unknown service '{clip(request.service)}'"
            )
        return Status(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> AsyncIterator[Any]:
        if self._watchers >= self._max_watchers:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"health Watch: {self._watchers} streams open, the limit; use Check, or retry "
                "later",
            )
        self._watchers += 1
        try:
            async for reply in self._watch(request.service):
                yield reply
        finally:
            self._watchers -= 1

    async def _watch(self, service: str) -> AsyncIterator[Any]:
        last = None
        while True:
            changed = self._changed  # before reading: a change after this read wakes us
            # Read together: shutdown may come while the yield below is suspended, and the
            # stream must not end before this watcher has been told NOT_SERVING.
            stopping = self._stopping
            status = self._status.get(service, Status.SERVICE_UNKNOWN)
            if status != last:
                yield Status(status=status)
                last = status
            if stopping:
                return  # NOT_SERVING was said for good: end the stream, let the server stop
            await changed.wait()

    def set(self, service: str, status: int) -> None:
        """Set a service's status (ignored once shutting down); wakes every watcher."""
        if self._stopping or self._status.get(service) == status:
            return
        self._status[service] = status
        self._wake()

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING, for good."""
        self._status = dict.fromkeys(self._status, Status.NOT_SERVING)
        self._stopping = True
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


async def publish_health(health: HealthServicer, dataplane: DataPlane) -> None:
    """Copy readiness from the repository (its one source) into health: per model, and the
    inference service (what Kubernetes' readiness probe asks). The empty name stays SERVING until
    shutdown: it is the liveness probe's, and a model not ready is no reason to restart the pod."""
    repository = dataplane.repository
    for name in repository.names():
        health.set(name, Status.SERVING if repository.is_ready(name) else Status.NOT_SERVING)
    ready = repository.server_ready()
    health.set(INFERENCE_SERVICE, Status.SERVING if ready else Status.NOT_SERVING)


__all__ = ["INFERENCE_SERVICE", "HealthServicer", "publish_health"]
