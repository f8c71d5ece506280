"""The floors our server is measured against, taken in the same run on the same payloads.

Transport floor: a bare grpc.aio server with our generated stubs whose ModelInfer returns a fixed,
pre-built reply of the right shape without running a model, and whose ModelStreamInfer answers each
message with it as the message arrives (`python -m stablemlp.bench.speed.floors ...`, its own
process, like our server). It also answers the metadata RPCs perf_analyzer asks for, from
the models' manifest.json. Compute floor: ONNX Runtime `session.run` in-process on the same rows.

Model floor (`--run-model`): the transport floor that also views the request's rows (no copy) and
runs them through `session.run` on the event loop before sending its fixed reply: the least any
server that really runs the model pays, so what ours costs beyond it is serving overhead alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

from ...protos import grpc_service_pb2 as pb
from ...protos import grpc_service_pb2_grpc as pb_grpc
from ...protos import model_config_pb2 as mc
from .payloads import Feeds, feeds_of

READY_LINE = "ready: listening on {address}"  # the line our server logs too
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # our server's default, so both accept the same payloads
CONFIG_TYPES = {"FP32": mc.TYPE_FP32, "INT64": mc.TYPE_INT64}
Context = Any  # grpc.aio.ServicerContext; the generated stubs are untyped


def read_manifests(repository: Path) -> dict[str, dict[str, Any]]:
    """model name -> manifest.json of its highest version (plain JSON: no ONNX Runtime here)."""
    manifests: dict[str, dict[str, Any]] = {}
    for folder in sorted(p for p in repository.iterdir() if p.is_dir()):
        versions = [int(v.name) for v in folder.iterdir() if v.name.isdigit() and int(v.name) > 0]
        if versions:
            path = folder / str(max(versions)) / "manifest.json"
            manifests[folder.name] = json.loads(path.read_text())
    return manifests


def fixed_response(
    manifest: dict[str, Any], rows: int, raw: bool, version: str
) -> pb.ModelInferResponse:
    """Zeros of the manifest's output shapes for `rows` rows, in the form the request used."""
    response = pb.ModelInferResponse(model_name=manifest["model_name"], model_version=version)
    for spec in manifest["outputs"]:
        dtype = np.float32 if spec["datatype"] == "FP32" else np.int64
        shape = [rows, *spec["shape"][1:]]
        tensor = response.outputs.add(name=spec["name"], datatype=spec["datatype"], shape=shape)
        array = np.zeros(shape, dtype=dtype)
        if raw:
            response.raw_output_contents.append(array.tobytes())
        elif spec["datatype"] == "FP32":
            tensor.contents.fp32_contents.extend(array.ravel().tolist())
        else:
            tensor.contents.int64_contents.extend(array.ravel().tolist())
    return response


class ModelRunner:
    """One model's session for the model floor, as our server makes it (one intra-op thread)."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        import onnxruntime as ort  # only here: the transport floor never runs a model

        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.outputs = [o["name"] for o in manifest["outputs"]]
        self.runs = self.rows = 0

    def run(self, request: pb.ModelInferRequest) -> None:
        """Its inputs as arrays (numbers: a zero-copy view; text: the strings), one run."""
        self.session.run(self.outputs, feeds_of(request))
        self.runs, self.rows = self.runs + 1, self.rows + request.inputs[0].shape[0]


class FloorServicer(pb_grpc.GRPCInferenceServiceServicer):
    """ModelInfer = one dict lookup (and, for the model floor, one session.run); the replies are
    built once per (model, rows, form)."""

    def __init__(
        self, manifests: dict[str, dict[str, Any]], runners: dict[str, ModelRunner] | None = None
    ) -> None:
        self._manifests, self._runners = manifests, runners or {}
        self._replies: dict[
            tuple[str, int, bool], tuple[pb.ModelInferResponse, pb.ModelStreamInferResponse]
        ] = {}

    def _reply(
        self, request: pb.ModelInferRequest
    ) -> tuple[pb.ModelInferResponse, pb.ModelStreamInferResponse]:
        """The fixed reply for the request's (model, rows, form), bare and wrapped for a stream."""
        if self._runners:
            self._runners[request.model_name].run(request)
        key = (request.model_name, request.inputs[0].shape[0], bool(request.raw_input_contents))
        replies = self._replies.get(key)
        if replies is None:
            manifest = self._manifests[request.model_name]
            reply = fixed_response(manifest, key[1], key[2], str(manifest["version"]))
            replies = (reply, pb.ModelStreamInferResponse(infer_response=reply))
            self._replies[key] = replies
        return replies

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        return self._reply(request)[0]

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """One reply per message as it arrives, in order: the least a stream can cost."""
        async for request in requests:
            yield self._reply(request)[1]

    async def ServerLive(self, request: Any, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: Any, context: Context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name in self._manifests)

    async def ServerMetadata(self, request: Any, context: Context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="transport-floor", version="0")

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        m = self._manifests[request.name]
        tensors = [
            [pb.ModelMetadataResponse.TensorMetadata(**spec) for spec in m[key]]
            for key in ("inputs", "outputs")
        ]
        return pb.ModelMetadataResponse(
            name=request.name,
            versions=[str(m["version"])],
            platform=m["platform"],
            inputs=tensors[0],
            outputs=tensors[1],
        )

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Context
    ) -> pb.ModelConfigResponse:
        m = self._manifests[request.name]
        config = mc.ModelConfig(
            name=request.name, platform=m["platform"], max_batch_size=m.get("max_batch_size", 1024)
        )
        for spec in m["inputs"]:
            config.input.add(
                name=spec["name"], data_type=CONFIG_TYPES[spec["datatype"]], dims=spec["shape"][1:]
            )
        for spec in m["outputs"]:
            config.output.add(
                name=spec["name"], data_type=CONFIG_TYPES[spec["datatype"]], dims=spec["shape"][1:]
            )
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        response = pb.ModelStatisticsResponse()
        for name in [request.name] if request.name else list(self._manifests):
            version = str(self._manifests[name]["version"])
            runner = self._runners.get(name)  # the transport floor runs nothing: zeros
            runs, rows = (runner.runs, runner.rows) if runner else (0, 0)
            response.model_stats.add(
                name=name, version=version, execution_count=runs, inference_count=rows
            )
        return response


def model_runners(repository: Path, manifests: dict[str, dict[str, Any]]) -> dict[str, ModelRunner]:
    return {
        name: ModelRunner(repository / name / str(m["version"]) / "model.onnx", m)
        for name, m in manifests.items()
    }


async def serve_floor(repository: Path, host: str, port: int, run_model: bool = False) -> int:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ]
    )
    manifests = read_manifests(repository)
    runners = model_runners(repository, manifests) if run_model else None
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        FloorServicer(manifests, runners), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stopping.set)
    print(READY_LINE.format(address=f"{host}:{bound}"), file=sys.stderr, flush=True)
    await stopping.wait()
    await server.stop(0)
    return 0


@dataclass(frozen=True)
class ComputeSample:
    """In-process session.run timings on one batch: the least a request can cost."""

    latencies_ns: list[int]
    elapsed_ns: int
    rows: int


def measure_compute(
    model_path: Path, feeds: Feeds, duration_s: float, max_runs: int, threads: int = 1
) -> ComputeSample:
    """Time session.run back to back; one intra-op thread, as the cheapest for tiny batches."""
    import onnxruntime as ort  # only here: the floor server itself never runs a model

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    for _ in range(20):  # warm-up: allocations and caches
        session.run(None, feeds)
    latencies: list[int] = []
    start = time.perf_counter_ns()
    deadline = start + int(duration_s * 1e9)
    for _ in range(max_runs):
        t0 = time.perf_counter_ns()
        session.run(None, feeds)
        t1 = time.perf_counter_ns()
        latencies.append(t1 - t0)
        if t1 >= deadline:
            break
    rows = int(next(iter(feeds.values())).shape[0])
    return ComputeSample(latencies, time.perf_counter_ns() - start, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stablemlp.bench.speed.floors",
        description="the transport- and model-floor gRPC servers",
    )
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--run-model", action="store_true", help="the model floor: session.run on every request"
    )
    args = parser.parse_args(argv)
    return asyncio.run(serve_floor(args.model_repository, args.host, args.port, args.run_model))


if __name__ == "__main__":
    raise SystemExit(main())
