"""`stablemlp predict` and `predict()`: send rows to a running server, get (probability, label).

    from ..serving.client import predict
    predict("localhost:8001", [[17.99, 10.38, ...]], model="breast_cancer")  # [(0.013, 0)]

Rows may hold NaN for missing values (the model imputes them). Requests carry raw little-endian
bytes and are split at the server's max_batch_size, read from ModelConfig. Secured servers:
`security=Security(ca=..., cert=..., key=..., token=...)` (TLS, client certificate, bearer token).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from ..protos import grpc_service_pb2 as pb
from ..protos import grpc_service_pb2_grpc as pb_grpc
from .manifest import DTYPES

PROBABILITY, LABEL = "probability", "label"  # output names of the model contract


@dataclass(frozen=True)
class Security:
    """How to reach a server started with --tls-cert (and --tls-client-ca) or a token."""

    ca: Path | None = None  # PEM CA that signed the server's certificate: use TLS
    cert: Path | None = None  # PEM client certificate, for servers requiring mTLS
    key: Path | None = None  # its private key
    token: str = ""  # sent as `authorization: Bearer <token>`
    server_name: str = ""  # the name to check the server's certificate against, if not the host

    def channel(self, target: str) -> grpc.Channel:
        if self.ca is None:
            return grpc.insecure_channel(target)
        credentials = grpc.ssl_channel_credentials(
            self.ca.read_bytes(),
            self.key.read_bytes() if self.key else None,
            self.cert.read_bytes() if self.cert else None,
        )
        name = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
        return grpc.secure_channel(target, credentials, options=name)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        return (("authorization", f"Bearer {self.token}"),) if self.token else None


PLAINTEXT = Security()


def _stub(channel: grpc.Channel) -> Any:
    """The generated stub (untyped: protoc's grpc plugin writes no annotations)."""
    return pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


class ClientError(ValueError):
    """Rows that do not fit the model, or no model to choose."""


def _pick_model(stub: Any, timeout: float, security: Security = PLAINTEXT) -> str:
    index = stub.RepositoryIndex(
        pb.RepositoryIndexRequest(ready=True), timeout=timeout, metadata=security.metadata
    )
    names: list[str] = sorted({entry.name for entry in index.models})
    if len(names) != 1:
        raise ClientError(f"server has ready models {names}: choose one with --model / model=")
    return names[0]


def feature_names(
    target: str, model: str, timeout: float = 10.0, security: Security = PLAINTEXT
) -> list[str]:
    """The model's feature names, from ModelConfig.parameters["feature_names"]."""
    with security.channel(target) as channel:
        stub = _stub(channel)
        request = pb.ModelConfigRequest(name=model)
        config = stub.ModelConfig(request, timeout=timeout, metadata=security.metadata).config
    names: list[str] = json.loads(config.parameters["feature_names"].string_value)
    return names


def predict(
    target: str,
    rows: Sequence[Sequence[float]] | np.ndarray,
    model: str | None = None,
    version: str = "",
    timeout: float = 30.0,
    security: Security = PLAINTEXT,
) -> list[tuple[float, int]]:
    """(probability, label) per row; `model=None` picks the server's only ready model."""
    metadata = security.metadata
    with security.channel(target) as channel:
        stub = _stub(channel)
        model = model or _pick_model(stub, timeout, security)
        config = stub.ModelConfig(
            pb.ModelConfigRequest(name=model, version=version), timeout=timeout, metadata=metadata
        )
        features = config.config.input[0]
        width = int(np.prod(features.dims))
        array = np.asarray(rows, dtype="<f4") if len(rows) else np.empty((0, width), "<f4")
        if array.ndim != 2 or array.shape[1] != width:
            raise ClientError(
                f"rows: got shape {list(array.shape)}, expected [N, {width}] for model '{model}'"
            )
        step = max(1, config.config.max_batch_size)
        results: list[tuple[float, int]] = []
        for start in range(0, len(array), step):
            chunk = np.ascontiguousarray(array[start : start + step], dtype="<f4")
            request = pb.ModelInferRequest(model_name=model, model_version=version)
            request.inputs.add(name=features.name, datatype="FP32", shape=chunk.shape)
            request.raw_input_contents.append(chunk.tobytes())
            response = stub.ModelInfer(request, timeout=timeout, metadata=metadata)
            out = {
                tensor.name: np.frombuffer(raw, dtype=DTYPES[tensor.datatype])
                for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True)
            }
            results += zip(out[PROBABILITY].tolist(), out[LABEL].tolist(), strict=True)
    return results


def _cell(text: str) -> float:
    text = text.strip()
    return math.nan if text == "" or text.lower() in {"nan", "na", "null"} else float(text)


def read_rows(path: Path, names: Sequence[str]) -> list[list[float]]:
    """A CSV with a header (columns matched by feature name; others ignored) or without one."""
    with path.open(newline="", encoding="utf-8") as stream:
        table = [row for row in csv.reader(stream) if row]
    if not table:
        return []
    try:
        return [[_cell(cell) for cell in row] for row in table]
    except ValueError:
        pass  # a non-numeric cell: the first row is a header (or the file is broken; see below)
    header = [name.strip() for name in table[0]]
    missing = [name for name in names if name not in header]
    if missing:
        raise ClientError(f"{path}: header lacks feature columns {missing}")
    columns = [header.index(name) for name in names]
    try:
        return [[_cell(row[i]) for i in columns] for row in table[1:]]
    except (ValueError, IndexError) as err:
        raise ClientError(f"{path}: {err}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stablemlp predict",
        description="Send rows to a running server; print each row's probability and label.",
    )
    parser.add_argument("--server", default="localhost:8001", help="HOST:PORT of `stablemlp serve`")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", type=Path, help="rows to score (empty cell = missing)")
    source.add_argument(
        "--features", help='one row, comma-separated: "v1,v2,..." (empty = missing)'
    )
    parser.add_argument("--model", help="model name (default: the server's only model)")
    parser.add_argument("--version", default="", help="model version (default: newest ready)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    parser.add_argument("--tls-ca", type=Path, help="PEM CA of the server's certificate: use TLS")
    parser.add_argument("--tls-cert", type=Path, help="PEM client certificate (mTLS)")
    parser.add_argument("--tls-key", type=Path, help="PEM key of --tls-cert")
    parser.add_argument("--tls-server-name", default="", help="name the certificate must carry")
    parser.add_argument(
        "--token-file", type=Path, help="bearer token file (or env STABLEMLP_AUTH_TOKEN)"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        token = os.environ.get("STABLEMLP_AUTH_TOKEN", "")
        if args.token_file:
            token = args.token_file.read_text(encoding="utf-8")
        security = Security(
            args.tls_ca, args.tls_cert, args.tls_key, token.strip(), args.tls_server_name
        )
        if args.features is not None:
            rows = [[_cell(cell) for cell in args.features.split(",")]]
        else:
            with security.channel(args.server) as channel:
                args.model = args.model or _pick_model(_stub(channel), args.timeout, security)
            names = feature_names(args.server, args.model, args.timeout, security)
            rows = read_rows(args.csv, names)
        results = predict(args.server, rows, args.model, args.version, args.timeout, security)
    except grpc.RpcError as err:
        print(f"stablemlp predict: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    except (ClientError, OSError, ValueError) as err:
        print(f"stablemlp predict: {err}", file=sys.stderr)
        return 1
    print("row,probability,label")
    for i, (probability, label) in enumerate(results):
        print(f"{i},{probability:.6f},{label}")
    return 0


__all__ = ["ClientError", "Security", "feature_names", "main", "predict", "read_rows"]
