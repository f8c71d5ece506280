"""`stablemlp predict` and `predict()`: send rows to a running server, get (probability, label).

    from stablemlp.serving.client.calls import predict
    predict("localhost:8001", [[17.99, 10.38, ...]], model="breast_cancer")   # [(0.013, 0)]
    predict("localhost:8001", [{"island": "Biscoe", "bill_length_mm": 39.1, ...}], model="penguins")

Rows are a numeric matrix (models without text columns), records (dicts by column name), or a
pandas DataFrame; columns are matched by name (columns.py). Requests carry raw little-endian bytes
and are split at the model's max_batch_size, read from ModelConfig; `stream=True` (the CLI's choice
for files larger than one request) sends them over one ModelStreamInfer call with up to `window`
requests in flight. Secured servers: `security=Security(ca=..., cert=..., key=..., token=...)`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from ...protos import grpc_service_pb2 as pb
from ...protos import grpc_service_pb2_grpc as pb_grpc
from ..datatypes import BYTES, DTYPES, FP32
from .columns import ClientError, Columns, Schema, from_rows

PROBABILITY, LABEL = "probability", "label"  # output names of the model contract
WINDOW = 8  # requests in flight on a stream: enough to batch on the server, bounded memory here
Result = tuple[float, int]


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


def stub_for(channel: grpc.Channel) -> Any:
    """The generated stub (untyped: protoc's grpc plugin writes no annotations)."""
    return pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


def pick_model(stub: Any, timeout: float, security: Security = PLAINTEXT) -> str:
    index = stub.RepositoryIndex(
        pb.RepositoryIndexRequest(ready=True), timeout=timeout, metadata=security.metadata
    )
    names: list[str] = sorted({entry.name for entry in index.models})
    if len(names) != 1:
        raise ClientError(f"server has ready models {names}: choose one with --model / model=")
    return names[0]


def schema(stub: Any, model: str, version: str, timeout: float, security: Security) -> Schema:
    request = pb.ModelConfigRequest(name=model, version=version)
    return Schema.from_config(
        stub.ModelConfig(request, timeout=timeout, metadata=security.metadata).config
    )


def _text_bytes(values: list[str]) -> bytes:
    """BYTES raw form: each element a 4-byte little-endian length, then its UTF-8 bytes."""
    encoded = [value.encode("utf-8") for value in values]
    return b"".join(len(item).to_bytes(4, "little") + item for item in encoded)


def request_for(columns: Columns, schema: Schema, version: str, tag: str = "") -> Any:
    request = pb.ModelInferRequest(model_name=schema.model, model_version=version, id=tag)
    if schema.numeric_input:
        request.inputs.add(
            name=schema.numeric_input, datatype=FP32.name, shape=columns.numeric.shape
        )
        request.raw_input_contents.append(
            np.ascontiguousarray(columns.numeric, FP32.dtype).tobytes()
        )
    for name in schema.text_columns:
        request.inputs.add(name=name, datatype=BYTES.name, shape=[columns.rows, 1])
        request.raw_input_contents.append(_text_bytes(columns.text[name]))
    return request


def results_of(response: Any) -> list[Result]:
    out = {
        tensor.name: np.frombuffer(raw, dtype=DTYPES[tensor.datatype])
        for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }
    return list(zip(out[PROBABILITY].tolist(), out[LABEL].tolist(), strict=True))


def _chunks(columns: Columns, step: int) -> Iterator[Columns]:
    for start in range(0, columns.rows, step):
        yield columns.slice(start, start + step)


def predict(
    target: str,
    rows: Any,
    model: str | None = None,
    version: str = "",
    timeout: float = 30.0,
    security: Security = PLAINTEXT,
    stream: bool = False,
    window: int = WINDOW,
) -> list[Result]:
    """(probability, label) per row; `model=None` picks the server's only ready model."""
    with security.channel(target) as channel:
        stub = stub_for(channel)
        model = model or pick_model(stub, timeout, security)
        found = schema(stub, model, version, timeout, security)
        columns = from_rows(rows, found)
        return send(stub, columns, found, version, timeout, security, stream, window)


def send(
    stub: Any,
    columns: Columns,
    schema: Schema,
    version: str,
    timeout: float,
    security: Security,
    stream: bool,
    window: int = WINDOW,
) -> list[Result]:
    """The rows' results, in order: one unary call per batch, or one stream for them all."""
    chunks = list(_chunks(columns, schema.max_batch_size))
    answers = results(stub, chunks, schema, version, timeout, security, stream, window, len(chunks))
    return [result for answer in answers for result in answer]


def results(
    stub: Any,
    chunks: Iterable[Columns],
    schema: Schema,
    version: str,
    timeout: float,
    security: Security,
    stream: bool,
    window: int,
    count: int,
) -> Iterator[list[Result]]:
    """Each chunk's results as they come, in order; chunks may be read lazily (a large file),
    `count` bounds how many there are (the stream's deadline: `timeout` per request)."""
    if not stream:
        for chunk in chunks:
            request = request_for(chunk, schema, version)
            yield results_of(stub.ModelInfer(request, timeout=timeout, metadata=security.metadata))
        return
    # Streamed: every chunk through one ModelStreamInfer call, at most `window` unanswered at
    # once. An error raised while reading the chunks ends the stream and is raised here (gRPC
    # would only report that iterating the requests failed).
    room = threading.Semaphore(max(1, window))
    sent, failed = [0], []  # rows sent, an error met reading the chunks

    def requests() -> Iterator[Any]:
        try:
            for i, chunk in enumerate(chunks):
                if not room.acquire(timeout=timeout):  # the server stopped answering
                    return
                sent[0] += chunk.rows
                yield request_for(chunk, schema, version, tag=str(i))
        except Exception as err:  # handed to the caller's thread below
            failed.append(err)

    received = 0
    replies = stub.ModelStreamInfer(requests(), timeout=timeout * max(1, count),
                                    metadata=security.metadata)  # fmt: skip
    for i, reply in enumerate(replies):
        room.release()
        if reply.error_message:
            raise ClientError(f"request {i} (rows from {i * schema.max_batch_size}): "
                              f"{reply.error_message}")  # fmt: skip
        answer = results_of(reply.infer_response)
        received += len(answer)
        yield answer
    if failed:
        raise failed[0]
    if received != sent[0]:
        raise ClientError(f"the stream ended after {received} rows")


__all__ = [
    "ClientError",
    "Security",
    "pick_model",
    "predict",
    "request_for",
    "results",
    "results_of",
    "schema",
    "send",
    "stub_for",
]
