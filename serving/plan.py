"""A model version's wire plan: codec.py's checks with their per-model part done once, at load.

`decode` answers a well-formed request (inputs named and typed as declared, in order, one content
form, finite values) with a few attribute reads and one `np.frombuffer` per input, no per-element
Python; anything else goes to `codec.decode_request`, which accepts or refuses it with the message
naming the field. So the fast path never decides an error: it only spots requests that the one set
of checks would accept anyway. `encode` fills a reply built once per output selection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..protos import grpc_service_pb2 as pb
from .codec import CONTENTS_FIELD, DTYPES, DecodedRequest, TensorSpec, decode_request
from .codec import encode_response as encode_general

# Fixed-width packed `contents` fields read with one np.frombuffer: (field number << 3) | 2, the
# tag of a length-delimited field (protobuf encoding; numbers from grpc_service.proto).
_PACKED_TAGS = {"fp32_contents": 6 << 3 | 2, "fp64_contents": 7 << 3 | 2}
BYTE_SEARCH_MAX = 512  # bytes: up to here searching the bytes beats np.isinf (0.3 vs 1 us)


class _Input:
    """One declared input, with what its checks need precomputed."""

    __slots__ = ("datatype", "dtype", "fixed", "inf", "name", "rank", "row_bytes", "shape", "tag")

    def __init__(self, spec: TensorSpec) -> None:
        self.name, self.datatype, self.rank = spec.name, spec.datatype, len(spec.shape)
        self.fixed = list(spec.shape[1:])  # compared with a shape slice, itself a list
        self.shape = tuple(self.fixed)  # the array's shape after its rows
        self.dtype = DTYPES[spec.datatype]
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.fixed))
        self.tag = _PACKED_TAGS.get(CONTENTS_FIELD[spec.datatype], -1)
        # Infinities are refused (NaN means missing). A few rows: their little-endian bytes,
        # searched for in the tensor's bytes (a match off an element boundary is a false alarm
        # that only sends the request to codec.py's exact check). More rows: np.isinf, since the
        # byte search grows ~0.12 us per row (8 us at 64 rows, 122 us at 1024; isinf: 1.3, 3).
        self.inf: tuple[bytes, bytes] | None = None  # (+inf, -inf) of a floating type
        if self.dtype.kind == "f":
            positive, negative = (np.array([v], self.dtype).tobytes() for v in (np.inf, -np.inf))
            self.inf = (positive, negative)

    def finite(self, data: bytes, array: np.ndarray) -> bool:
        """No infinity among the elements of `array`, the view of `data` (possibly a false "no"
        for a small one: see above)."""
        inf = self.inf
        if inf is None:
            return True
        if len(data) <= BYTE_SEARCH_MAX:
            return not (inf[0] in data or inf[1] in data)
        return not np.isinf(array).any()

    def contents(self, contents: pb.InferTensorContents, rows: int) -> np.ndarray | None:
        """The packed field's body as an array, if it is the only field set, the right size, and
        holds no infinity."""
        if self.tag < 0:
            return None
        data = contents.SerializeToString()
        want = rows * self.row_bytes
        # tag, varint length, body: nothing else may be set (the lengths would not add up)
        if len(data) < 2 or data[0] != self.tag:
            return None
        length, start = 0, 1
        for shift in range(0, 70, 7):  # the body's length: a varint of at most 10 bytes
            if start >= len(data):
                return None
            byte = data[start]
            start += 1
            length |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
        if length != want or start + length != len(data):
            return None
        array = np.ndarray((rows, *self.shape), self.dtype, data, start)
        return array if self.finite(data, array) else None


class WirePlan:
    """Decode and encode for one model version; safe to share (holds no per-request state)."""

    def __init__(
        self,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        max_batch_size: int,
        model_name: str = "",
        model_version: str = "",
    ) -> None:
        self.inputs, self.outputs = tuple(inputs), tuple(outputs)
        self.max_batch_size = max_batch_size
        self.model_name, self.model_version = model_name, model_version
        # The model contract has one input (runtime.check_manifest); others take the full path.
        self._input = _Input(self.inputs[0]) if len(self.inputs) == 1 else None
        self._by_name = {spec.name: spec for spec in outputs}
        self._selections: dict[tuple[str, ...], tuple[TensorSpec, ...]] = {}
        self._fields = [(s.name, DTYPES[s.datatype], CONTENTS_FIELD[s.datatype]) for s in outputs]
        self._templates: dict[int, pb.ModelInferResponse] = {}  # rows -> reply without data

    def decode(self, request: pb.ModelInferRequest) -> DecodedRequest:
        """codec.decode_request's result for `request` (and its error, if any)."""
        decoded = self._decode_common(request)
        if decoded is None:
            return decode_request(request, self.inputs, self.outputs, self.max_batch_size)
        return decoded

    def _decode_common(self, request: pb.ModelInferRequest) -> DecodedRequest | None:
        spec, tensors = self._input, request.inputs
        if spec is None or len(tensors) != 1:
            return None
        tensor = tensors[0]
        shape = tensor.shape
        if tensor.name != spec.name or tensor.datatype != spec.datatype:
            return None
        if len(shape) != spec.rank or shape[1:] != spec.fixed:
            return None
        rows = shape[0]
        if not 0 < rows <= self.max_batch_size:
            return None
        raw = request.raw_input_contents
        if raw:
            data = raw[0]
            if len(raw) != 1 or len(data) != rows * spec.row_bytes or tensor.HasField("contents"):
                return None
            view = np.ndarray((rows, *spec.shape), spec.dtype, data)  # no copy
            array = view if spec.finite(data, view) else None
        else:
            array = spec.contents(tensor.contents, rows)
        outputs = self._selection(request) if request.outputs else self.outputs
        if array is None or outputs is None:
            return None
        return DecodedRequest({spec.name: array}, outputs, bool(raw), rows)

    def _selection(self, request: pb.ModelInferRequest) -> tuple[TensorSpec, ...] | None:
        """The outputs asked for, if they name known outputs once each (cached per list)."""
        key = tuple(wanted.name for wanted in request.outputs)
        found = self._selections.get(key)
        if found is None and len(set(key)) == len(key) and all(k in self._by_name for k in key):
            found = tuple(self._by_name[k] for k in key)
            found = self.outputs if found == self.outputs else found  # the common reply shape
            if len(self._selections) < 64:  # orders of the outputs: few; bounded anyway
                self._selections[key] = found
        return found

    def encode(
        self,
        request: pb.ModelInferRequest,
        results: Mapping[str, np.ndarray],
        decoded: DecodedRequest,
    ) -> pb.ModelInferResponse:
        """codec.encode_response's reply; every output's reply starts from a template per size."""
        if decoded.outputs is not self.outputs or request.model_name != self.model_name:
            return encode_general(
                request, self.model_version, results, decoded.outputs, decoded.raw
            )
        response = pb.ModelInferResponse()
        response.CopyFrom(self._template(decoded.rows))
        if request.id:
            response.id = request.id
        if decoded.raw:
            response.raw_output_contents.extend(
                [_cast(results[name], dtype).tobytes() for name, dtype, _ in self._fields]
            )
        else:  # outputs are one value per row: small, so a list is cheap here
            for tensor, (name, dtype, field) in zip(response.outputs, self._fields, strict=True):
                values = _cast(results[name], dtype).ravel().tolist()
                getattr(tensor.contents, field).extend(values)
        return response

    def _template(self, rows: int) -> pb.ModelInferResponse:
        template = self._templates.get(rows)
        if template is None:
            template = pb.ModelInferResponse(
                model_name=self.model_name, model_version=self.model_version
            )
            for spec in self.outputs:
                shape = (rows, *spec.shape[1:])
                template.outputs.add(name=spec.name, datatype=spec.datatype, shape=shape)
            if len(self._templates) < 256:  # the common batch sizes; bounded
                self._templates[rows] = template
        return template


def _cast(array: np.ndarray, dtype: np.dtype[np.generic]) -> np.ndarray:
    """ONNX Runtime's outputs already have the declared dtype (the warm-up checks it)."""
    return array if array.dtype == dtype else array.astype(dtype)


__all__ = ["WirePlan"]
