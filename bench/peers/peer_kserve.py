"""KServe's side of `stablemlp bench --peers kserve`: run by the peer's own environment, never
imported by stablemlp (kserve is not installed there).

KServe's documented custom model (python/custom_model in kserve/kserve): a `kserve.Model` whose
load() opens the ONNX file and whose predict() runs it, served by `kserve.ModelServer` with its
gRPC v2 server. The benchmark copies this file into a temporary folder and runs it with
`.venv-kserve/bin/python FILE --model_name M --model-path P --grpc_port G --http_port H`.

Two departures from KServe's defaults, both for a like-for-like measurement: the listen addresses
(KServe 0.21 binds 0.0.0.0 and [::]; everything the benchmark starts binds 127.0.0.1) and
per-request logging (`--enable_latency_logging false`, and KServe's logger at WARNING so its gRPC
interceptor's INFO line per call is off: our server logs no line per request either).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer, model_server
from kserve.logging import logger as kserve_logger
from kserve.protocol.grpc import server as grpc_server
from kserve.protocol.rest import server as rest_server

LOOPBACK = "127.0.0.1"


class OnnxModel(Model):  # type: ignore[misc]  # kserve is untyped here
    """The exported model.onnx, one ONNX Runtime session made as `stablemlp serve` makes its own
    (one intra-op and one inter-op thread, all graph optimizations)."""

    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self.session: Any = None
        self.input = ""

    def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.ready = True
        return True

    def predict(
        self, payload: InferRequest, headers: dict[str, str] | None = None
    ) -> InferResponse:
        rows = payload.inputs[0].as_numpy()
        probability, label = self.session.run(["probability", "label"], {self.input: rows})
        outputs = [
            InferOutput("probability", list(probability.shape), "FP32", data=probability),
            InferOutput("label", list(label.shape), "INT64", data=label),
        ]
        return InferResponse(payload.id, self.name, outputs, from_grpc=payload.from_grpc)


def _loopback_grpc_server(*args: Any, **kwargs: Any) -> Any:
    """grpc.aio.server() whose add_insecure_port binds 127.0.0.1 on the port it is given."""
    server = _aio_server(*args, **kwargs)
    bind = server.add_insecure_port
    server.add_insecure_port = lambda address: bind(f"{LOOPBACK}:{address.rpartition(':')[2]}")
    return server


class _LoopbackConfig(rest_server.uvicorn.Config):  # type: ignore[misc]
    """uvicorn's Config with the host KServe hard-codes replaced by 127.0.0.1."""

    def __init__(self, app: Any, **kwargs: Any) -> None:
        super().__init__(app, **{**kwargs, "host": LOOPBACK})


_aio_server = grpc_server.aio.server


def main() -> int:
    parser = argparse.ArgumentParser(parents=[model_server.parser])
    parser.add_argument("--model-path", required=True)
    args, _ = parser.parse_known_args()
    # The two listen addresses: the only places KServe names a host (module globals it reads).
    grpc_server.aio = argparse.Namespace(server=_loopback_grpc_server)
    rest_server.uvicorn.Config = _LoopbackConfig
    model = OnnxModel(args.model_name, args.model_path)
    model.load()
    server = ModelServer()  # reads --grpc_port, --http_port, ... as KServe documents
    kserve_logger.setLevel(logging.WARNING)
    server.start([model])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
