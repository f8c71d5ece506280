"""Bounds on what one inference request may hold, checked before it is materialised.

A message under the size limit can still hold tens of thousands of tiny entries (an empty
`inputs` entry is 2 bytes on the wire, a map entry 4), and each costs far more once built: upb's
message, Python's objects, the time to build and then refuse them all. So the entry counts and
sizes are bounded first: for gRPC on the message's bytes (a walk of the wire format: tags and
lengths of the top-level fields and of each input and output, stopping at the first bound passed),
before `FromString`; for REST on the parsed JSON, before any tensor is built. The limits follow
the model contract (manifest.py: at most MAX_TENSORS inputs and outputs, rank 2) with room, and
Triton's and KServe's practice for parameters (a few small scalars).

Tensor contents longer in bytes than the bound are counted: at most `max_values` values per
input in all its typed fields (the message limit / 4: an FP32 value takes 4 bytes on the wire, a
BYTES element at least 2 and a request at most max_batch_size of them), so no packed varint list
or run of empty strings is held at 8-16 bytes for each byte sent. Whether the count is right is
the codec's call.
"""

from __future__ import annotations

from ...protos import grpc_service_pb2 as pb
from ..codec import (
    MAX_INPUTS,
    MAX_OUTPUTS,
    MAX_PARAMETER_KEY_BYTES,
    MAX_PARAMETER_VALUE_BYTES,
    MAX_PARAMETERS,
    MAX_RANK,
)
from ..errors import InvalidRequestError, clip
from ..protowire import LENGTH, VARINT, fields, packed_count

# ModelInferRequest field numbers (grpc_service.proto).
_PARAMETERS, _INPUTS, _OUTPUTS, _RAW = 4, 5, 6, 7
_INPUT_SHAPE, _INPUT_PARAMETERS, _INPUT_CONTENTS = 3, 4, 5
_OUTPUT_PARAMETERS = 2
_ENTRY_KEY, _ENTRY_VALUE = 1, 2  # a map entry
_VALUE_TAGS = 8  # an InferParameter's tag and length around a string_param's bytes, at most
# An input or output entry this short passes every bound (a parameter takes 2 bytes at least, a
# dimension or a value 1), so the usual ones ("features", "FP32", [rows, 30]) are not walked.
_SMALL_ENTRY_BYTES = MAX_RANK


def _too_many(where: str, limit: int, what: str = "entries") -> InvalidRequestError:
    return InvalidRequestError(f"{where}: got more than {limit} {what}, expected at most {limit}")


def _parameter(data: bytes, start: int, end: int, where: str) -> None:
    """One map<string, InferParameter> entry: its key and string value within their bounds."""
    for number, kind, value, after in fields(data, start, end):
        if kind != LENGTH:
            continue
        if number == _ENTRY_KEY and after - value > MAX_PARAMETER_KEY_BYTES:
            raise InvalidRequestError(
                f"{where} key: got {after - value} bytes, expected at most "
                f"{MAX_PARAMETER_KEY_BYTES}"
            )
        if number == _ENTRY_VALUE and after - value > MAX_PARAMETER_VALUE_BYTES + _VALUE_TAGS:
            key = _key(data, start, end)
            raise InvalidRequestError(
                f"{where}['{clip(key)}'] value: got {after - value} bytes, expected at most "
                f"{MAX_PARAMETER_VALUE_BYTES}"
            )


def _key(data: bytes, start: int, end: int) -> str:
    for number, kind, value, after in fields(data, start, end):
        if number == _ENTRY_KEY and kind == LENGTH:
            return data[value:after].decode("utf-8", "replace")
    return ""


def _values(contents: bytes) -> int:
    """How many values an InferTensorContents holds, in all its fields. Counted by parsing it
    alone (upb: ~1 ms for 90k elements, 10x a Python walk) and dropping it at once: what costs
    memory is a request built whole and held until its reply is sent, not this."""
    message = pb.InferTensorContents.FromString(contents)
    return sum(len(values) for _, values in message.ListFields())


def _input(data: bytes, start: int, end: int, where: str, max_values: int) -> None:
    rank = parameters = 0
    contents: list[bytes] = []  # protobuf merges a field sent twice: so are its parts here
    for number, kind, value, after in fields(data, start, end):
        if number == _INPUT_CONTENTS and kind == LENGTH:
            contents.append(data[value:after])
        elif number == _INPUT_SHAPE:
            rank += packed_count(data, value, after) if kind == LENGTH else kind == VARINT
            if rank > MAX_RANK:
                raise _too_many(f"{where}.shape", MAX_RANK, "dimensions")
        elif number == _INPUT_PARAMETERS and kind == LENGTH:
            parameters += 1
            if parameters > MAX_PARAMETERS:
                raise _too_many(f"{where}.parameters", MAX_PARAMETERS)
            _parameter(data, value, after, f"{where}.parameters")
    # Every value takes a byte at least: fewer bytes than the bound hold fewer values.
    if sum(map(len, contents)) > max_values and _values(b"".join(contents)) > max_values:
        raise _too_many(f"{where}.contents", max_values, "values")


def _output(data: bytes, start: int, end: int, where: str) -> None:
    parameters = 0
    for number, kind, value, after in fields(data, start, end):
        if number == _OUTPUT_PARAMETERS and kind == LENGTH:
            parameters += 1
            if parameters > MAX_PARAMETERS:
                raise _too_many(f"{where}.parameters", MAX_PARAMETERS)
            _parameter(data, value, after, f"{where}.parameters")


def check_infer_bytes(data: bytes, max_values: int) -> None:
    """Raise InvalidRequestError if the serialized ModelInferRequest `data` holds more entries
    than the bounds allow (`max_values`: values in one input's contents); WireError if it is not
    protobuf at all. Costs a few field reads for a well-formed request (one per element of
    unpacked contents), and at most the bounds' worth for any other."""
    counts = {_PARAMETERS: 0, _INPUTS: 0, _OUTPUTS: 0, _RAW: 0}
    small = min(_SMALL_ENTRY_BYTES, max_values)
    for number, kind, value, after in fields(data):
        if kind != LENGTH or number not in counts:
            continue
        index = counts[number]
        counts[number] = index + 1
        if number == _INPUTS:
            if index >= MAX_INPUTS:
                raise _too_many("inputs", MAX_INPUTS)
            if after - value > small:
                _input(data, value, after, f"inputs[{index}]", max_values)
        elif number == _OUTPUTS:
            if index >= MAX_OUTPUTS:
                raise _too_many("outputs", MAX_OUTPUTS)
            if after - value > small:
                _output(data, value, after, f"outputs[{index}]")
        elif number == _PARAMETERS:
            if index >= MAX_PARAMETERS:
                raise _too_many("parameters", MAX_PARAMETERS)
            _parameter(data, value, after, "parameters")
        elif index >= MAX_INPUTS:
            raise _too_many("raw_input_contents", MAX_INPUTS)


def values_bound(message_bytes: int) -> int:
    """The most values one input's contents may hold under a message limit of `message_bytes`."""
    return max(1, message_bytes // 4)


__all__ = [
    "check_infer_bytes",
    "values_bound",
]
