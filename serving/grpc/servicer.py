"""inference.GRPCInferenceService: the gRPC front, and its port. Each method turns its message into
a dataplane call and the answer back into a message (ModelInfer: wire.py reads the request into
neutral tensors and writes the reply); `boundary.rpc` maps every failure. The port's options bound
what clients can make gRPC hold before any handler runs.

ModelMetadata.platform stays Triton's exact "onnxruntime_onnx" because clients compare it;
ServerMetadata.extensions lists the Triton extensions served plus one `providers=...` entry.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from google.protobuf import json_format

from ...protos import grpc_service_pb2 as pb
from ...protos import grpc_service_pb2_grpc as pb_grpc
from ...protos import model_config_pb2 as mc
from ..dataplane import DataPlane, Inference
from ..errors import InvalidRequestError, clip
from ..manifest import PLATFORM, TensorSpec
from ..repository.policy import VersionPolicy
from ..runtime.batcher import BatchingOptions
from ..settings import Settings, address
from ..triton import model_config, model_statistics
from .boundary import cancelled_status, lenient, rpc
from .bounds import check_infer_bytes, values_bound
from .streams import StreamCall
from .wire import reply_of, request_of

Context = Any  # grpc.aio.ServicerContext; the generated stubs are untyped
SERVER_NAME = "stablemlp"
PROTOCOL = "grpc"  # what traces and request logs say these calls came over
EXTENSIONS = ("model_repository", "model_configuration", "statistics")


def _tensors(specs: Sequence[TensorSpec]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [
        pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape)
        for s in specs
    ]


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        dataplane: DataPlane,
        *,
        version_policy: VersionPolicy,
        batching: BatchingOptions | None,
        server_version: str,
    ) -> None:
        self._dataplane, self._policy, self._batching = dataplane, version_policy, batching
        self._server_version = server_version
        self._streams: set[asyncio.Future[None]] = set()  # each open stream's reader

    @rpc
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        async with self._infer(request, context) as inferred:
            return reply_of(request, inferred)

    def _infer(self, request: pb.ModelInferRequest, context: Context) -> Inference:
        return self._dataplane.infer(
            request.model_name, request.model_version, request_of(request), PROTOCOL,
            lambda: cancelled_status(context), context.invocation_metadata,
        )  # fmt: skip

    @rpc
    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Each request gets one reply, in request order; up to STREAM_WINDOW of one stream's
        requests run at once, so they batch with each other and with other calls (streams.py).
        A failed one gets an error_message (and its id); the stream stays open."""
        call = StreamCall(functools.partial(self._infer, context=context), context)
        reader = asyncio.ensure_future(call.read(requests))
        self._streams.add(reader)
        try:
            async for reply in call.replies():
                yield reply
        finally:
            reader.cancel()
            self._streams.discard(reader)
            call.abandon()  # the client went away: what it will not read is dropped

    def end_streams(self) -> None:
        """Shutdown: every open stream takes no new request; each ends once its own are answered
        (an idle stream at once), so an open stream never holds the server up."""
        for reader in list(self._streams):
            reader.cancel()

    @rpc
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Context
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._dataplane.server_ready())

    @rpc
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(
            ready=self._dataplane.model_ready(request.name, request.version)
        )

    @rpc
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        providers = "providers=" + ",".join(self._dataplane.repository.providers())
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=self._server_version, extensions=[*EXTENSIONS, providers]
        )

    @rpc
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        facts = self._dataplane.metadata(request.name, request.version)
        return pb.ModelMetadataResponse(
            name=facts.name,
            versions=facts.versions,
            platform=PLATFORM,
            inputs=_tensors(facts.manifest.inputs),
            outputs=_tensors(facts.manifest.outputs),
        )

    @rpc
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Context
    ) -> pb.ModelConfigResponse:
        loaded = self._dataplane.resolve(request.name, request.version)
        document = model_config(loaded, self._policy, self._batching)
        return pb.ModelConfigResponse(config=json_format.ParseDict(document, mc.ModelConfig()))

    @rpc
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        rows = self._dataplane.statistics(request.name, request.version)
        stats = [
            json_format.ParseDict(model_statistics(*row), pb.ModelStatistics()) for row in rows
        ]
        return pb.ModelStatisticsResponse(model_stats=stats)

    @rpc
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        Index = pb.RepositoryIndexResponse.ModelIndex
        rows = await self._dataplane.index(request.ready)
        return pb.RepositoryIndexResponse(
            models=[Index(name=n, version=v, state=s, reason=r) for n, v, s, r in rows]
        )

    @rpc
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        if request.parameters:  # Triton's `config` / `file:` overrides: files come from disk only
            keys = sorted(request.parameters)
            raise InvalidRequestError(
                f"parameters: got {clip(str(keys[:4]))}, expected none (models load from the "
                "repository folder only)"
            )
        await self._dataplane.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        await self._dataplane.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_inference_service(
    servicer: InferenceServicer, server: grpc.aio.Server, message_bytes: int
) -> None:
    """The generated add_GRPCInferenceServiceServicer_to_server, but with `lenient` request
    deserializers, so a garbled request reaches the servicer's boundary (INVALID_ARGUMENT), and
    inference requests bounded before they are parsed (bounds.py)."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for method in service.methods:
        request_type = getattr(pb, method.input_type.name)
        kind = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        bound = (
            functools.partial(check_infer_bytes, max_values=values_bound(message_bytes))
            if request_type is pb.ModelInferRequest
            else None
        )
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=lenient(
                request_type.FromString, method.input_type.full_name, bound
            ),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)  # type: ignore[attr-defined]


STREAM_WINDOW_BYTES = 16 * 1024  # what each stream may send ahead of the server reading it


def grpc_server(
    settings: Settings, interceptors: list[Any], message_bytes: int, reuse_port: bool
) -> grpc.aio.Server:
    """gRPC reads a call's whole message before any handler runs, so what a flood can make the
    server hold is bounded here, in gRPC itself: connections x streams per connection x the
    per-stream receive window, plus the calls handled at once x the message size. BDP probing
    would grow the window to megabytes per stream; a fixed 16 KiB costs loopback and LAN clients
    nothing measurable (the window opens as each message is read)."""
    return grpc.aio.server(
        interceptors=interceptors,
        # Calls beyond this get RESOURCE_EXHAUSTED before their handler runs.
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", message_bytes),
            ("grpc.max_send_message_length", message_bytes),
            ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
            ("grpc.max_allowed_incoming_connections", settings.max_connections),
            ("grpc.http2.bdp_probe", 0),
            # Connections that send nothing (no handshake, or no call) give back their slot.
            ("grpc.server_handshake_timeout_ms", int(settings.client_timeout_s * 1000)),
            ("grpc.max_connection_idle_ms", int(settings.client_timeout_s * 1000)),
            ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
            # A taken port must fail, not be silently shared; workers share theirs on purpose.
            ("grpc.so_reuseport", int(reuse_port)),
        ],
    )


def bind_grpc(
    server: grpc.aio.Server, settings: Settings, credentials: grpc.ServerCredentials | None
) -> int:
    """The bound gRPC port (the real one when settings.port is 0)."""
    where = address(settings.host, settings.port)
    try:
        if credentials is None:
            return int(server.add_insecure_port(where))
        return int(server.add_secure_port(where, credentials))
    except RuntimeError as err:  # grpc reports a failed bind this way
        raise OSError(f"cannot listen on {where}: {err}") from None


__all__ = [
    "EXTENSIONS",
    "SERVER_NAME",
    "STREAM_WINDOW_BYTES",
    "InferenceServicer",
    "add_inference_service",
    "bind_grpc",
    "grpc_server",
]
