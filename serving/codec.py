"""Wire <-> numpy for ModelInfer: every check on a request's tensors lives here, and only here.

Inputs arrive as `raw_input_contents` (little-endian bytes, read zero-copy with np.frombuffer) or as
typed `contents`; the reply uses the form the request used. No per-element Python on the hot path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..protos import grpc_service_pb2 as pb
from .errors import InvalidRequestError, clip, clip_items

# Datatypes of the inference protocol that this server can carry, as little-endian numpy types.
DTYPES: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
# The InferTensorContents field that carries each datatype (protocol spec, "Tensor Data").
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
# Fixed-width packed fields: their serialized body *is* the little-endian array, so it can be read
# with np.frombuffer instead of converting element by element (field numbers from the .proto).
_PACKED_FIXED = {"fp32_contents": 6, "fp64_contents": 7}


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the protocol describes it; -1 marks the batch dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.datatype} {list(self.shape)}"


class DecodedRequest(NamedTuple):  # a tuple: built per request, cheaper than a dataclass
    inputs: dict[str, np.ndarray]  # name -> array of the declared shape and dtype
    outputs: tuple[TensorSpec, ...]  # the outputs to return, in reply order
    raw: bool  # the request used raw_input_contents, so the reply does too
    rows: int  # batch size


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    for _ in range(10):  # a varint is at most 10 bytes
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise ValueError("malformed varint")


def _contents_array(
    contents: pb.InferTensorContents, field: str, dtype: np.dtype[np.generic]
) -> np.ndarray:
    if field not in _PACKED_FIXED:
        return np.asarray(getattr(contents, field), dtype=dtype)
    data = contents.SerializeToString()  # only `field` is set (checked), so: tag, length, body
    if not data:
        return np.empty(0, dtype=dtype)
    length, start = _read_varint(data, 1)
    return np.frombuffer(data, dtype=dtype, count=length // dtype.itemsize, offset=start)


def _check_shape(spec: TensorSpec, shape: list[int], max_batch_size: int) -> None:
    where = f"input '{spec.name}' shape"
    if len(shape) != len(spec.shape):
        raise InvalidRequestError(
            f"{where}: got {clip_items(shape)} (rank {len(shape)}), "
            f"expected rank {len(spec.shape)} {list(spec.shape)}"
        )
    for axis, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
        if want >= 0 and got != want:
            raise InvalidRequestError(
                f"{where}[{axis}]: got {got}, expected {want} (shape {list(spec.shape)})"
            )
    if not 1 <= shape[0] <= max_batch_size:
        raise InvalidRequestError(
            f"{where}[0] (batch size): got {shape[0]}, expected 1..{max_batch_size}"
        )


def _decode_tensor(
    tensor: pb.ModelInferRequest.InferInputTensor,
    raw: bytes | None,
    spec: TensorSpec,
    max_batch_size: int,
) -> np.ndarray:
    if tensor.datatype != spec.datatype:
        raise InvalidRequestError(
            f"input '{spec.name}' datatype: got '{clip(tensor.datatype)}', "
            f"expected '{spec.datatype}'"
        )
    shape = list(tensor.shape)
    _check_shape(spec, shape, max_batch_size)
    dtype, count = DTYPES[spec.datatype], int(np.prod(shape))
    set_fields = [f.name for f, _ in tensor.contents.ListFields()]
    if raw is not None:
        if set_fields:
            raise InvalidRequestError(
                f"input '{spec.name}': got both contents.{set_fields[0]} and raw_input_contents, "
                "expected exactly one"
            )
        if len(raw) != count * dtype.itemsize:
            raise InvalidRequestError(
                f"raw_input_contents for input '{spec.name}': got {len(raw)} bytes, expected "
                f"{count * dtype.itemsize} (shape {shape} x {dtype.itemsize} bytes {spec.datatype})"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    field = CONTENTS_FIELD[spec.datatype]
    if any(name != field for name in set_fields):
        other = next(name for name in set_fields if name != field)
        raise InvalidRequestError(
            f"input '{spec.name}' contents: got {other}, expected {field} for {spec.datatype}"
        )
    array = _contents_array(tensor.contents, field, dtype)
    if array.size != count:
        raise InvalidRequestError(
            f"input '{spec.name}' contents.{field}: got {array.size} elements, "
            f"expected {count} (shape {shape})"
        )
    return array.reshape(shape)


def _check_finite(spec: TensorSpec, array: np.ndarray) -> None:
    """NaN means "missing" (the graph imputes it); an infinity means nothing, so it is refused."""
    if array.dtype.kind != "f":
        return
    infinite = np.isinf(array)
    if infinite.any():
        index = tuple(int(i) for i in np.argwhere(infinite)[0])
        raise InvalidRequestError(
            f"input '{spec.name}' value at index {list(index)}: got {array[index]}, "
            "expected a finite number or NaN (missing)"
        )


def _requested_outputs(
    request: pb.ModelInferRequest, outputs: Sequence[TensorSpec]
) -> tuple[TensorSpec, ...]:
    by_name = {spec.name: spec for spec in outputs}
    known = list(by_name)
    if not request.outputs:
        return tuple(outputs)
    names: list[str] = []
    for i, wanted in enumerate(request.outputs):
        if wanted.name not in known:
            expected = ", ".join(f"'{name}'" for name in known)
            raise InvalidRequestError(
                f"outputs[{i}].name: got '{clip(wanted.name)}', expected one of {expected}"
            )
        if wanted.name in names:
            raise InvalidRequestError(
                f"outputs[{i}].name: got '{clip(wanted.name)}' twice, expected each at most once"
            )
        names.append(wanted.name)
    return tuple(by_name[name] for name in names)


def decode_request(
    request: pb.ModelInferRequest,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    max_batch_size: int,
) -> DecodedRequest:
    """Check a ModelInferRequest against the model's tensors and return its arrays."""
    by_name = {spec.name: spec for spec in inputs}
    got = [tensor.name for tensor in request.inputs]
    for i, name in enumerate(got):
        if name not in by_name or got.index(name) != i:
            expected = ", ".join(f"'{spec.name}'" for spec in inputs)
            raise InvalidRequestError(
                f"inputs[{i}].name: got '{clip(name)}', expected {expected} (once each)"
            )
    if len(got) != len(inputs):
        missing = ", ".join(f"'{spec.name}'" for spec in inputs if spec.name not in got)
        raise InvalidRequestError(
            f"inputs: got {len(got)} tensors, expected {len(inputs)} (missing {missing})"
        )
    raw_contents = request.raw_input_contents
    if raw_contents and len(raw_contents) != len(got):
        raise InvalidRequestError(
            f"raw_input_contents: got {len(raw_contents)} entries, "
            f"expected {len(got)} (one per input, in order)"
        )
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        spec = by_name[tensor.name]
        raw = raw_contents[i] if raw_contents else None
        arrays[spec.name] = _decode_tensor(tensor, raw, spec, max_batch_size)
        _check_finite(spec, arrays[spec.name])
    rows = {array.shape[0] for array in arrays.values()}
    if len(rows) != 1:
        raise InvalidRequestError(
            f"inputs shape[0]: got batch sizes {sorted(rows)}, expected one batch size"
        )
    return DecodedRequest(
        arrays, _requested_outputs(request, outputs), bool(raw_contents), rows.pop()
    )


def encode_response(
    request: pb.ModelInferRequest,
    model_version: str,
    results: Mapping[str, np.ndarray],
    outputs: Sequence[TensorSpec],
    raw: bool,
) -> pb.ModelInferResponse:
    """The reply to `request`: its id echoed, `results` in the order of `outputs`."""
    response = pb.ModelInferResponse(
        model_name=request.model_name, model_version=model_version, id=request.id
    )
    for spec in outputs:
        array = np.ascontiguousarray(results[spec.name], dtype=DTYPES[spec.datatype])
        tensor = response.outputs.add(name=spec.name, datatype=spec.datatype, shape=array.shape)
        if raw:
            response.raw_output_contents.append(array.tobytes())
        else:  # outputs are one value per row: small, so a list is cheap here
            getattr(tensor.contents, CONTENTS_FIELD[spec.datatype]).extend(array.ravel().tolist())
    return response


__all__ = [
    "CONTENTS_FIELD",
    "DTYPES",
    "DecodedRequest",
    "TensorSpec",
    "decode_request",
    "encode_response",
]
