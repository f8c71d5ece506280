"""The KServe v2 tensor datatypes, each described once: what it is in numpy, in protobuf, in ONNX
Runtime, in Triton's model config and in JSON. Every other module reads this table.

Sources: the Open Inference Protocol's "Tensor Data Types" and InferTensorContents
(grpc_service.proto), Triton's model_config.proto DataType, ONNX Runtime's type strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

LENGTH_PREFIX_BYTES = 4  # a raw BYTES element: a 4-byte little-endian length, then its bytes


@dataclass(frozen=True)
class Datatype:
    name: str  # the v2 name, e.g. "FP32"
    dtype: np.dtype[Any] | None  # little-endian numpy type; BYTES: Python str objects; None: none
    contents_field: str  # the InferTensorContents field carrying it ("": raw form only)
    ort_type: str  # ONNX Runtime's NodeArg.type
    config_type: int  # model_config.proto DataType (TYPE_FP32 = 11, ...)
    json_types: frozenset[type]  # Python types a JSON value may parse to (None: null, missing)
    json: str  # how JSON writes its values (the OpenAPI document says it)
    width: int  # bytes per element in the raw form; 0: BYTES, length-prefixed elements

    @property
    def config_name(self) -> str:
        """The DataType's name in Triton's config (JSON, config.pbtxt): TYPE_FP32, ..., and
        TYPE_STRING for BYTES."""
        return "TYPE_STRING" if self.name == "BYTES" else f"TYPE_{self.name}"


def _datatype(
    name: str, dtype: str | None, field: str, ort: str, config: int, json: str, *kinds: type
) -> Datatype:
    numpy = None if dtype is None else np.dtype(dtype)
    width = 0 if numpy is None or numpy.kind == "O" else numpy.itemsize
    if name == "BF16":
        width = 2  # numpy has no bfloat16; raw elements are still 2 bytes
    return Datatype(name, numpy, field, ort, config, frozenset(kinds), json, width)


_NONE = type(None)
# NaN is a missing value: JSON has no NaN, so null stands for it (FP32 inputs).
_MISSING = "numbers, null = missing (NaN)"
# In the protocol's order (the OpenAPI document's enum lists them so).
DATATYPES: dict[str, Datatype] = {
    d.name: d
    for d in (
        _datatype("BOOL", "?", "bool_contents", "tensor(bool)", 1, "true/false", bool),
        _datatype("UINT8", "u1", "uint_contents", "tensor(uint8)", 2, "integers", int),
        _datatype("UINT16", "<u2", "uint_contents", "tensor(uint16)", 3, "integers", int),
        _datatype("UINT32", "<u4", "uint_contents", "tensor(uint32)", 4, "integers", int),
        _datatype("UINT64", "<u8", "uint64_contents", "tensor(uint64)", 5, "integers", int),
        _datatype("INT8", "i1", "int_contents", "tensor(int8)", 6, "integers", int),
        _datatype("INT16", "<i2", "int_contents", "tensor(int16)", 7, "integers", int),
        _datatype("INT32", "<i4", "int_contents", "tensor(int32)", 8, "integers", int),
        _datatype("INT64", "<i8", "int64_contents", "tensor(int64)", 9, "integers", int),
        _datatype("FP16", "<f2", "", "tensor(float16)", 10, "numbers", float, int),
        _datatype("FP32", "<f4", "fp32_contents", "tensor(float)", 11, _MISSING, float, int, _NONE),
        _datatype("FP64", "<f8", "fp64_contents", "tensor(double)", 12, "numbers", float, int),
        _datatype("BYTES", "O", "bytes_contents", "tensor(string)", 13, "strings", str),
        _datatype("BF16", None, "", "tensor(bfloat16)", 14, "numbers", float, int),
    )
}
FP32, INT64, BYTES = DATATYPES["FP32"], DATATYPES["INT64"], DATATYPES["BYTES"]
# The numpy type of each datatype that has one.
DTYPES: dict[str, np.dtype[Any]] = {
    d.name: d.dtype for d in DATATYPES.values() if d.dtype is not None
}
BY_ORT_TYPE: dict[str, Datatype] = {d.ort_type: d for d in DATATYPES.values()}


__all__ = [
    "BYTES",
    "BY_ORT_TYPE",
    "DATATYPES",
    "DTYPES",
    "FP32",
    "INT64",
    "LENGTH_PREFIX_BYTES",
    "Datatype",
]
