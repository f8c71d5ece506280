"""The gRPC reply of one model version: a ModelInferResponse from its outputs, in the content form
the request used (raw little-endian bytes, or the typed `contents` fields).

Made once per loaded version by its codec; the names and shapes of a reply are built once per
batch size (a template copied per request), the outputs' data filled in per request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ...protos import grpc_service_pb2 as pb
from ..datatypes import DATATYPES, DTYPES
from ..manifest import TensorSpec

MAX_TEMPLATES = 256  # reply shapes kept: the common batch sizes; bounded


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


__all__ = ["ReplyEncoder"]
