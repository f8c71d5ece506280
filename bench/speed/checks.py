"""Before anything is timed: every server answers every payload well, and those that run the
model (ours, the peers) with the probabilities in-process ONNX Runtime computes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np

from ...protos import grpc_service_pb2 as pb
from ...protos import grpc_service_pb2_grpc as pb_grpc
from .grid import Cell, Target, model_path
from .payloads import feeds_of

TOLERANCE = 1e-5  # probabilities, as export's parity check
CALL_TIMEOUT_S = 10.0


def call_once(address: str, request: pb.ModelInferRequest, stream: bool) -> pb.ModelInferResponse:
    """One ModelInfer call, or one ModelStreamInfer call carrying the request twice (both replies
    must come back, in order, without an error_message); the (last) reply."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        if not stream:
            return cast(pb.ModelInferResponse, stub.ModelInfer(request, timeout=CALL_TIMEOUT_S))
        replies = list(stub.ModelStreamInfer(iter([request, request]), timeout=CALL_TIMEOUT_S))
    if len(replies) != 2 or any(r.error_message for r in replies):
        errors = [r.error_message for r in replies]
        raise AssertionError(f"{address}: stream of 2 got {len(replies)} replies, errors {errors}")
    return cast(pb.ModelInferResponse, replies[-1].infer_response)


def probabilities(address: str, request: pb.ModelInferRequest, stream: bool = False) -> np.ndarray:
    """The reply's `probability` output as [rows, 1] float32, its shape checked."""
    reply = call_once(address, request, stream)
    names = [t.name for t in reply.outputs]
    if "probability" not in names:
        raise AssertionError(f"{address}: no 'probability' output in {names}")
    index = names.index("probability")
    rows = request.inputs[0].shape[0]
    if list(reply.outputs[index].shape) != [rows, 1]:
        raise AssertionError(f"{address}: probability shape {list(reply.outputs[index].shape)}")
    if reply.raw_output_contents:
        got = np.frombuffer(reply.raw_output_contents[index], dtype="<f4")
    else:
        got = np.asarray(reply.outputs[index].contents.fp32_contents, dtype=np.float32)
    return got.reshape(rows, 1)


def check_reply(
    address: str, request: pb.ModelInferRequest, expected: np.ndarray | None, stream: bool = False
) -> None:
    """A well-formed reply and, unless `expected` is None (a floor), those probabilities."""
    got = probabilities(address, request, stream)
    if expected is not None and not np.allclose(got, expected, atol=TOLERANCE):
        worst = float(np.max(np.abs(got - expected)))
        raise AssertionError(f"{address}: probabilities differ from the reference by {worst:.2e}")


def check_targets(
    repository: Path,
    cells: Sequence[Cell],
    requests: Mapping[str, pb.ModelInferRequest],
    *,
    ours: Target,
    floors: Sequence[Target],
) -> None:
    """Every payload, in its cell's lane, gets a well-formed reply from every server, and ours
    the probabilities in-process ONNX Runtime computes (so it really runs the model)."""
    import onnxruntime as ort

    sessions: dict[str, Any] = {}
    for cell in cells:
        request = requests[cell.key]
        if cell.model not in sessions:
            path = str(model_path(repository, cell.model))
            sessions[cell.model] = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        session = sessions[cell.model]
        (expected,) = session.run(["probability"], feeds_of(request))
        for floor in floors:
            check_reply(floor.address, request, None, bool(cell.streams))
        check_reply(ours.address, request, expected, bool(cell.streams))


def check_peer(
    peer: Target, ours: Target, cells: Sequence[Cell], requests: Mapping[str, pb.ModelInferRequest]
) -> None:
    """The peer answers each of its cells' payloads with our server's probabilities (±1e-5)."""
    for cell in cells:
        request = requests[cell.key]
        expected = probabilities(ours.address, request)
        try:
            check_reply(peer.address, request, expected)
        except grpc.RpcError as err:
            raise AssertionError(
                f"{peer.name} {cell.key}: {err.code().name}: {err.details()}"
            ) from None


__all__ = [
    "TOLERANCE",
    "call_once",
    "check_peer",
    "check_reply",
    "check_targets",
    "probabilities",
]
