"""The gRPC front's wire: a ModelInferRequest read into the codec's neutral tensors, and a
ModelInferResponse written from an inference's outputs, in the content form the request used (raw
little-endian bytes, or the typed `contents` fields).

Reading judges nothing (the codec does): it only hands each input over as protobuf parsed it, and a
packed fp32_contents as a float32 view of the message's bytes, not a Python list. A version's reply
names and shapes are built once per batch size (a template copied per request), the outputs' data
filled in per request.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ...protos import grpc_service_pb2 as pb
from ..codec import Codec, InferRequest, WireTensor
from ..dataplane import Inferred
from ..datatypes import DATATYPES, DTYPES, FP32
from ..manifest import TensorSpec

MAX_TEMPLATES = 256  # reply shapes kept: the common batch sizes; bounded
# A packed fp32_contents serializes as its tag, a varint length, then the little-endian array
# itself: (field number 6 << 3) | 2, length-delimited (protobuf encoding; grpc_service.proto).
_FP32_TAG = 6 << 3 | 2


def request_of(message: pb.ModelInferRequest) -> InferRequest:
    """The request's inputs as protobuf parsed them (unknown fields ignored, as protobuf does)."""
    raw = message.raw_input_contents
    entries = len(raw)
    tensors = [
        WireTensor(
            tensor.name,
            tensor.datatype,
            tensor.shape,
            raw[i] if i < entries else None,
            _values(tensor),
        )
        for i, tensor in enumerate(message.inputs)
    ]
    outputs = message.outputs  # most requests name none: skip building an iterator then
    names = [o.name for o in outputs] if outputs else []
    return InferRequest(message.id, tensors, names, entries, False)


def _values(tensor: pb.ModelInferRequest.InferInputTensor) -> dict[str, Any]:
    if not tensor.HasField("contents"):
        return {}
    contents = tensor.contents
    view = _packed_fp32(contents)  # the common case, tried first: ListFields costs as much
    if view is not None:
        return {FP32.contents_field: view}
    return {field.name: values for field, values in contents.ListFields()}


def _packed_fp32(contents: pb.InferTensorContents) -> np.ndarray | None:
    """fp32_contents as a view of the serialized bytes, if that is all they hold (any other field,
    known or not, would add bytes: then None, and the values are read as protobuf parsed them)."""
    data = contents.SerializeToString()
    if len(data) < 2 or data[0] != _FP32_TAG:
        return None
    length, start = 0, 1
    for shift in range(0, 35, 7):  # the body's length: a varint of at most 5 bytes here
        if start >= len(data):
            return None
        byte = data[start]
        start += 1
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
    if start + length != len(data) or length % FP32.width:
        return None
    return np.frombuffer(data, FP32.dtype, offset=start)


def reply_of(
    message: pb.ModelInferRequest,
    inferred: Inferred,
    response: pb.ModelInferResponse | None = None,
) -> pb.ModelInferResponse:
    """The reply to `message` from what its inference gave (see ReplyEncoder.encode)."""
    decoded = inferred.decoded
    return replies_for(inferred.codec).encode(
        message, inferred.results, decoded.outputs, decoded.rows, decoded.raw, response
    )


_ENCODERS: weakref.WeakKeyDictionary[Codec, ReplyEncoder] = weakref.WeakKeyDictionary()


def replies_for(codec: Codec) -> ReplyEncoder:
    """The reply encoder of a loaded version, made on its first reply; it goes with the version."""
    encoder = _ENCODERS.get(codec)
    if encoder is None:
        encoder = _ENCODERS[codec] = ReplyEncoder(codec.outputs, codec.model_name,
                                                  codec.model_version)  # fmt: skip
    return encoder


class ReplyEncoder:
    def __init__(self, outputs: Sequence[TensorSpec], name: str, version: str) -> None:
        self.outputs, self.model_name, self.model_version = tuple(outputs), name, version
        self._fields = _fields(self.outputs)
        self._templates: dict[int, pb.ModelInferResponse] = {}  # rows -> reply without data

    def encode(
        self,
        request: pb.ModelInferRequest,
        results: Mapping[str, np.ndarray],
        outputs: tuple[TensorSpec, ...],
        rows: int,
        raw: bool,
        response: pb.ModelInferResponse | None = None,
    ) -> pb.ModelInferResponse:
        """The reply to `request`: its id echoed, `outputs` (those asked for) in order; written
        into `response` if given (an empty one, e.g. inside a stream's reply: no copy then)."""
        if response is None:
            response = pb.ModelInferResponse()
        if outputs is self.outputs and request.model_name == self.model_name:
            response.CopyFrom(self._template(rows))
            fields = self._fields
        else:
            response.model_name, response.model_version = request.model_name, self.model_version
            for spec in outputs:
                response.outputs.add(
                    name=spec.name, datatype=spec.datatype, shape=(rows, spec.width)
                )
            fields = _fields(outputs)
        if request.id:
            response.id = request.id
        if raw:
            response.raw_output_contents.extend(
                [_cast(results[name], dtype).tobytes() for name, dtype, _ in fields]
            )
        else:  # outputs are one value per row: small, so a list is cheap here
            for tensor, (name, dtype, field) in zip(response.outputs, fields, strict=True):
                getattr(tensor.contents, field).extend(_cast(results[name], dtype).ravel().tolist())
        return response

    def _template(self, rows: int) -> pb.ModelInferResponse:
        template = self._templates.get(rows)
        if template is None:
            template = pb.ModelInferResponse(
                model_name=self.model_name, model_version=self.model_version
            )
            for spec in self.outputs:
                template.outputs.add(
                    name=spec.name, datatype=spec.datatype, shape=(rows, spec.width)
                )
            if len(self._templates) < MAX_TEMPLATES:
                self._templates[rows] = template
        return template


def _fields(outputs: Sequence[TensorSpec]) -> list[tuple[str, np.dtype[Any], str]]:
    return [(s.name, DTYPES[s.datatype], DATATYPES[s.datatype].contents_field) for s in outputs]


def _cast(array: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """ONNX Runtime's outputs already have the declared dtype (the warm-up checks it)."""
    return array if array.dtype == dtype else array.astype(dtype)


__all__ = ["ReplyEncoder", "replies_for", "reply_of", "request_of"]
