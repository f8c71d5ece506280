"""inference.GRPCInferenceService: thin methods (resolve, decode, run, encode); errors.py maps.

Each inference is admitted (limits.py), counted once (metrics.py: ModelStatistics and /metrics
read the same counters) and keeps the one version it resolved until its reply is written.

Where stock clients see the model's own facts, since Triton's ModelMetadataResponse has no free-form
field: ModelConfig.parameters carries `providers`, `feature_names` (JSON list), `threshold`,
`sha256`, `opset` and ONNX Runtime's thread counts, and instance_group says CPU or GPU;
ServerMetadata.extensions lists the Triton extensions served plus one `providers=...` entry;
ModelMetadata.platform stays Triton's exact "onnxruntime_onnx" because clients compare it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # stubs lack aio

from ..protos import grpc_service_pb2 as pb
from ..protos import grpc_service_pb2_grpc as pb_grpc
from ..protos import model_config_pb2 as mc
from .batcher import BatchingOptions
from .codec import TensorSpec
from .errors import InvalidRequestError, check_decoded, clip, rpc_boundary, status_for
from .limits import Admission
from .manifest import PLATFORM
from .metrics import Duration, Telemetry, VersionStats
from .repository import ModelRepository
from .runtime import CUDA
from .scheduler import Scheduler
from .settings import VersionPolicy
from .versions import Loaded

Context = Any  # grpc.aio.ServicerContext; the generated stubs are untyped
SERVER_NAME = "stablemlp"
EXTENSIONS = ("model_repository", "model_configuration", "statistics")
CONFIG_TYPES = {"BOOL": mc.TYPE_BOOL, "UINT8": mc.TYPE_UINT8, "INT8": mc.TYPE_INT8,
                "INT16": mc.TYPE_INT16, "INT32": mc.TYPE_INT32, "INT64": mc.TYPE_INT64,
                "FP32": mc.TYPE_FP32, "FP64": mc.TYPE_FP64}  # fmt: skip


def _as_pb(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def model_statistics(name: str, version: int, stats: VersionStats) -> pb.ModelStatistics:
    """Triton's ModelStatistics from the counters /metrics also reads."""
    return pb.ModelStatistics(
        name=name, version=str(version), last_inference=stats.last_inference,
        inference_count=stats.inference_count, execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=_as_pb(stats.success), fail=_as_pb(stats.fail), queue=_as_pb(stats.queue),
            compute_input=_as_pb(stats.compute_input), compute_infer=_as_pb(stats.compute_infer),
            compute_output=_as_pb(stats.compute_output),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=rows, compute_input=_as_pb(b.compute_input),
                compute_infer=_as_pb(b.compute_infer), compute_output=_as_pb(b.compute_output),
            )
            for rows, b in sorted(dict(stats.batches).items())
        ],
    )  # fmt: skip


def model_config(
    loaded: Loaded,
    max_batch_size: int,
    policy: VersionPolicy,
    batching: BatchingOptions | None = None,
) -> mc.ModelConfig:
    """Triton's shape: batch dim implicit (max_batch_size > 0), so dims drop the leading -1."""
    manifest, runtime = loaded.runtime.manifest, loaded.runtime
    on_gpu = runtime.providers[0] == CUDA
    config = mc.ModelConfig(
        name=loaded.name, platform=PLATFORM, backend="onnxruntime",
        max_batch_size=max_batch_size, default_model_filename=runtime.path.name,
    )  # fmt: skip
    if policy.kind == "latest":
        config.version_policy.latest.num_versions = policy.count
    elif policy.kind == "all":
        config.version_policy.all.SetInParent()
    else:
        config.version_policy.specific.versions.extend(policy.versions)
    for spec in manifest.inputs:
        config.input.add(name=spec.name, data_type=CONFIG_TYPES[spec.datatype], dims=spec.shape[1:])
    for spec in manifest.outputs:
        config.output.add(
            name=spec.name, data_type=CONFIG_TYPES[spec.datatype], dims=spec.shape[1:]
        )
    if batching is not None:
        config.dynamic_batching.preferred_batch_size.extend(batching.preferred_batch_sizes)
        config.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_us
    group = config.instance_group.add(name=loaded.name, count=1)
    group.kind = mc.ModelInstanceGroup.KIND_GPU if on_gpu else mc.ModelInstanceGroup.KIND_CPU
    if on_gpu:
        group.gpus.append(runtime.options.cuda_device_id)
    parameters = {
        "providers": ",".join(runtime.providers),
        "feature_names": json.dumps(list(manifest.feature_names)),
        "threshold": repr(manifest.threshold),
        "sha256": manifest.sha256,
        "opset": str(manifest.opset),
        "intra_op_thread_count": str(runtime.options.intra_op_threads),
        "inter_op_thread_count": str(runtime.options.inter_op_threads),
        "inline_max_rows": str(runtime.inline_rows),  # runs on the event loop up to this size
    }
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        repository: ModelRepository,
        health: health_aio.HealthServicer,
        scheduler: Scheduler,
        *,
        admission: Admission,
        telemetry: Telemetry,
        max_batch_size: int,
        version_policy: VersionPolicy,
        server_version: str,
    ) -> None:
        self._repository, self._health, self._scheduler = repository, health, scheduler
        self._admission, self._telemetry = admission, telemetry
        self._max_batch_size, self._version_policy = max_batch_size, version_policy
        self._server_version = server_version

    async def publish_health(self) -> None:
        """Copy readiness from the repository (its one source) into grpc.health.v1 per model."""
        status = health_pb2.HealthCheckResponse
        for name in self._repository.names():
            ready = self._repository.is_ready(name)
            await self._health.set(name, status.SERVING if ready else status.NOT_SERVING)
        server_ready = self._repository.server_ready()
        await self._health.set(
            pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
            status.SERVING if server_ready else status.NOT_SERVING,
        )

    async def _infer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        """Admit, resolve one version (kept for the whole call), decode, run, encode; counted."""
        with self._telemetry.track(context) as call, self._admission.admit():
            loaded = self._repository.get(request.model_name, request.model_version)
            call.stats, runtime = loaded.stats, loaded.runtime
            decoded = runtime.plan.decode(request)
            call.decoded, call.rows = time.perf_counter_ns(), decoded.rows
            results = await self._scheduler.run(runtime, decoded, call)
            return runtime.plan.encode(request, results, decoded)

    @rpc_boundary
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Context
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc_boundary
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._repository.server_ready())

    @rpc_boundary
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._repository.is_ready(request.name, request.version))

    @rpc_boundary
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        providers = "providers=" + ",".join(self._repository.providers())
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=self._server_version, extensions=[*EXTENSIONS, providers]
        )

    @rpc_boundary
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        loaded = self._repository.get(request.name, request.version)
        entries = self._repository.entries(request.name)
        manifest = loaded.runtime.manifest

        def tensors(specs: Sequence[TensorSpec]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
            return [
                pb.ModelMetadataResponse.TensorMetadata(
                    name=s.name, datatype=s.datatype, shape=s.shape
                )
                for s in specs
            ]

        return pb.ModelMetadataResponse(
            name=loaded.name,
            versions=[str(v) for v in sorted(entries, reverse=True) if entries[v].runtime],
            platform=PLATFORM,
            inputs=tensors(manifest.inputs),
            outputs=tensors(manifest.outputs),
        )

    @rpc_boundary
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        return await self._infer(request, context)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Each request gets one reply; a failed one an error_message, and the stream stays open."""
        async for request in request_iterator:
            try:
                check_decoded(request)
                response = await self._infer(request, context)
            except Exception as err:  # the stream's boundary: same mapping, reported in-band
                yield pb.ModelStreamInferResponse(
                    error_message=status_for(err, "ModelStreamInfer", context.peer())[1]
                )
            else:
                yield pb.ModelStreamInferResponse(infer_response=response)

    @rpc_boundary
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Context
    ) -> pb.ModelConfigResponse:
        loaded = self._repository.get(request.name, request.version)
        config = model_config(
            loaded, self._max_batch_size, self._version_policy, self._scheduler.batching
        )
        return pb.ModelConfigResponse(config=config)

    @rpc_boundary
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        names = [request.name] if request.name else self._repository.names()
        response = pb.ModelStatisticsResponse()
        for name in names:
            entries = self._repository.entries(name)
            if request.version:
                self._repository.get(name, request.version)  # NOT_FOUND/UNAVAILABLE as for infer
            response.model_stats.extend(
                model_statistics(name, version, entry.stats)
                for version, entry in sorted(entries.items())
                if not request.version or str(version) == request.version
            )
        return response

    @rpc_boundary
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        rows = await asyncio.to_thread(self._repository.index)  # lists folders: off the loop
        Index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                Index(name=name, version=version, state=state, reason=reason)
                for name, version, state, reason in rows
                if not request.ready or state == "READY"
            ]
        )

    async def _change(self, change: Callable[[str], None], name: str) -> None:
        try:
            await asyncio.to_thread(change, name)
        finally:
            await self.publish_health()

    @rpc_boundary
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        if request.parameters:  # Triton's `config` / `file:` overrides: files come from disk only
            keys = sorted(request.parameters)
            raise InvalidRequestError(
                f"parameters: got {clip(str(keys[:4]))}, expected none (models load from the "
                "repository folder only)"
            )
        await self._change(self._repository.load, request.model_name)
        return pb.RepositoryModelLoadResponse()

    @rpc_boundary
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        await self._change(self._repository.unload, request.model_name)
        return pb.RepositoryModelUnloadResponse()


__all__ = ["EXTENSIONS", "SERVER_NAME", "InferenceServicer", "model_config", "model_statistics"]
