"""The REST front's wire: KServe v2 JSON inference requests read into the codec's neutral tensors,
and replies written from an inference's outputs, with Triton's binary tensor data extension.

A request body is JSON, or (binary extension) a JSON header of `Inference-Header-Content-Length`
bytes followed by the inputs' bytes, each input saying how many are its own in
`parameters.binary_data_size` (raw little-endian, BYTES as 4-byte length-prefixed elements: the
gRPC raw form). This module only reads the JSON's structure into the neutral `WireTensor`s (nested
`data` flattened, row-major); every judgement of the tensors themselves is the codec's
(`Codec.decode_tensors`), so both fronts answer a bad tensor with the same message. Outputs are
JSON `data`, or binary when asked (`outputs[].parameters.binary_data` or the request's
`parameters.binary_data_output`): then the reply is a JSON header plus the bytes, and its
`Inference-Header-Content-Length` says where the header ends. Entry counts and parameters are
bounded as gRPC's are (grpc/bounds.py; the limits are codec.py's), before any tensor is built.

JSON has no NaN (a missing value): `null` is read as NaN, as is Python's `NaN` token.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import orjson

from ..codec import (
    MAX_INPUTS,
    MAX_OUTPUTS,
    MAX_RANK,
    InferRequest,
    WireTensor,
    check_count,
    check_parameters,
)
from ..dataplane import Inferred
from ..datatypes import DATATYPES, DTYPES
from ..errors import InvalidRequestError, clip

MAX_DATA_DEPTH = 32  # nesting of one tensor's `data` (its rank); far above any real tensor
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"


class RestInference(NamedTuple):
    """An inference request as the REST front read it, before any tensor check."""

    id: str
    tensors: list[WireTensor]
    outputs: list[str]  # asked for by name, in order (empty: every output)
    binary: frozenset[str]  # outputs to return as binary data
    binary_all: bool  # parameters.binary_data_output: every output binary


class RestReply(NamedTuple):
    body: bytes
    header_length: int | None  # set when binary data follows the JSON header


def load_json(data: bytes, what: str = "request") -> Any:
    """Parse JSON (orjson: nesting capped at 1024 levels), accepting Python's NaN/Infinity tokens
    (its json module writes them) through the standard parser, whose nesting is capped too. The
    standard parser accepts what orjson refuses (integers of any size, lone surrogates in text),
    so what it returns must pass orjson too: integers are read as orjson reads them (floats past
    64 bits), and text orjson could not write back is refused here, not at the reply (a 500)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as err:
        problem = str(err)
    if b"NaN" in data or b"Infinity" in data:
        try:
            document = json.loads(data, parse_int=_integer)
            orjson.dumps(document)  # raises on a lone surrogate anywhere in it
            return document
        except (ValueError, RecursionError, TypeError) as err:
            problem = str(err)
    raise InvalidRequestError(f"{what}: not valid JSON ({clip(problem, 200)})")


def _integer(text: str) -> int | float:
    """A JSON integer as orjson reads it: an int within 64 bits, else a float (inf if huge)."""
    value = int(text)
    return value if -(2**63) <= value < 2**64 else float(text)


def dump_json(document: Any) -> bytes:
    return orjson.dumps(document)


def _expect(value: Any, kind: type | tuple[type, ...], where: str, expected: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise InvalidRequestError(f"{where}: got {_kind(value)}, expected {expected}")
    return value


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"the number {clip(repr(value))}"
    return names.get(type(value), type(value).__name__)


def _flatten(data: list[Any], where: str, depth: int = 1) -> list[Any]:
    """Row-major values of a flat or nested list (the codec checks how many and what they are)."""
    if not data or not isinstance(data[0], list):
        return data
    if depth >= MAX_DATA_DEPTH:
        raise InvalidRequestError(f"{where}: nested deeper than {MAX_DATA_DEPTH} levels")
    flat: list[Any] = []
    for item in data:
        if not isinstance(item, list):
            raise InvalidRequestError(f"{where}: got lists mixed with values at one level")
        flat.extend(_flatten(item, where, depth + 1))
    return flat


def _parameters(value: Any, where: str) -> Mapping[str, Any]:
    found: Mapping[str, Any] = _expect(
        {} if value is None else value, dict, f"{where}.parameters", "an object"
    )
    check_parameters(found, f"{where}.parameters")
    return found


def _tensor(index: int, doc: Any, binary: memoryview, offset: int) -> tuple[WireTensor, int]:
    where = f"inputs[{index}]"
    doc = _expect(doc, dict, where, "an object")
    name = _expect(doc.get("name"), str, f"{where}.name", "a string")
    datatype = _expect(doc.get("datatype"), str, f"{where}.datatype", "a string")
    shape = _expect(doc.get("shape"), list, f"{where}.shape", "a list of integers")
    check_count(shape, f"{where}.shape", MAX_RANK)
    for dim in shape:
        if type(dim) is not int:
            raise InvalidRequestError(f"{where}.shape: got {_kind(dim)} in it, expected integers")
    size = _parameters(doc.get("parameters"), where).get("binary_data_size")
    raw = None
    if size is not None:
        _expect(size, int, f"{where}.parameters.binary_data_size", "an integer")
        if not 0 <= size <= len(binary) - offset:
            raise InvalidRequestError(
                f"{where}.parameters.binary_data_size: got {size}, expected at most the "
                f"{len(binary) - offset} bytes of binary data left"
            )
        raw, offset = bytes(binary[offset : offset + size]), offset + size
    values: dict[str, list[Any]] = {}
    if "data" in doc:
        data = _expect(doc["data"], list, f"{where}.data", "a list")
        # Named as the typed contents field the codec expects, whichever front built it.
        known = DATATYPES.get(datatype)
        field = known.contents_field if known is not None and known.contents_field else "data"
        values[field] = _flatten(data, f"{where}.data")
    elif raw is None:
        raise InvalidRequestError(
            f"input '{clip(name)}': got neither data nor parameters.binary_data_size, expected one"
        )
    return WireTensor(name, datatype, shape, raw, values), offset


def parse_infer(body: bytes, header_length: int | None) -> RestInference:
    """An infer request's body (JSON, or a JSON header + binary data) as neutral tensors."""
    if header_length is not None and not 0 <= header_length <= len(body):
        raise InvalidRequestError(
            f"Inference-Header-Content-Length: got {header_length}, expected 0..{len(body)} "
            "(the body's length)"
        )
    split = len(body) if header_length is None else header_length
    doc = _expect(load_json(body[:split]), dict, "request", "a JSON object")
    binary = memoryview(body)[split:]
    request_id = _expect(doc.get("id", ""), str, "id", "a string")
    inputs = _expect(doc.get("inputs"), list, "inputs", "a list of tensors")
    check_count(inputs, "inputs", MAX_INPUTS)
    requested = _expect(doc.get("outputs", []), list, "outputs", "a list")
    check_count(requested, "outputs", MAX_OUTPUTS)
    every = _parameters(doc.get("parameters"), "request").get("binary_data_output", False)
    tensors, offset = [], 0
    for index, tensor_doc in enumerate(inputs):
        tensor, offset = _tensor(index, tensor_doc, binary, offset)
        tensors.append(tensor)
    if offset != len(binary):
        raise InvalidRequestError(
            f"binary data: got {len(binary) - offset} bytes past the inputs' "
            "binary_data_size, expected none"
        )
    names, binary_names = [], set()
    for index, output in enumerate(requested):
        where = f"outputs[{index}]"
        output = _expect(output, dict, where, "an object")
        names.append(_expect(output.get("name"), str, f"{where}.name", "a string"))
        wanted = _parameters(output.get("parameters"), where).get("binary_data", False)
        if _expect(wanted, bool, f"{where}.parameters.binary_data", "true or false"):
            binary_names.add(names[-1])
    every = _expect(every, bool, "parameters.binary_data_output", "true or false")
    return RestInference(request_id, tensors, names, frozenset(binary_names), every)


def request_of(inference: RestInference) -> InferRequest:
    """What the dataplane decodes: each input in the form it chose (JSON data or binary data)."""
    return InferRequest(inference.id, inference.tensors, inference.outputs, 0, True)


def reply_of(inference: RestInference, inferred: Inferred) -> RestReply:
    """The reply: JSON, or a JSON header and the outputs asked for as binary data."""
    decoded, codec = inferred.decoded, inferred.codec
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for spec in decoded.outputs:
        array = inferred.results[spec.name]
        dtype = DTYPES[spec.datatype]
        array = array if array.dtype == dtype else array.astype(dtype)
        entry: dict[str, Any] = {
            "name": spec.name, "datatype": spec.datatype, "shape": [decoded.rows, spec.width]
        }  # fmt: skip
        if inference.binary_all or spec.name in inference.binary:
            data = np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = array.ravel().tolist()
        outputs.append(entry)
    reply: dict[str, Any] = {"model_name": codec.model_name}
    reply["model_version"] = codec.model_version
    if inference.id:
        reply["id"] = inference.id
    reply["outputs"] = outputs
    header = orjson.dumps(reply)
    if not chunks:
        return RestReply(header, None)
    return RestReply(b"".join([header, *chunks]), len(header))


__all__ = [
    "BINARY_CONTENT_TYPE",
    "JSON_CONTENT_TYPE",
    "MAX_DATA_DEPTH",
    "RestInference",
    "RestReply",
    "dump_json",
    "load_json",
    "parse_infer",
    "reply_of",
    "request_of",
]
