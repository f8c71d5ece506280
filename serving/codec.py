"""The codec of one model version: a request's neutral tensors in, numpy arrays out.

Each front reads its protocol into an `InferRequest` of `WireTensor`s (grpc/wire.py from protobuf,
rest/wire.py from JSON) without judging them; this module, compiled once per loaded version from
its manifest and shared by every request to it, makes every judgement, so no request can be judged
two ways: `decode` first tries `_recognize`, which accepts only well-formed requests (declared
names and datatypes, one content form, sizes that add up, finite numbers, clean text) with a few
attribute reads and no copy of numeric data, and never refuses anything; whatever it does not
recognize goes to `decode_tensors`, which holds every check and error message.

Datatypes: FP32 (NaN = missing; an infinity is refused) and BYTES (UTF-8 text, surrounding
whitespace stripped; raw form: each element a 4-byte little-endian length, then its bytes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Sized
from typing import Any, NamedTuple

import numpy as np

from .datatypes import BYTES, DATATYPES, FP32, LENGTH_PREFIX_BYTES
from .errors import InvalidRequestError, clip, clip_items
from .manifest import MAX_TENSORS, Manifest, TensorSpec

MAX_TEXT_BYTES = 1024  # longest text element; categories are words, not documents
_PREFIX = LENGTH_PREFIX_BYTES
# Entry counts and parameters a request may hold, whichever front read it (grpc/bounds.py checks
# them on a message's bytes, rest/wire.py on parsed JSON): the model contract's with room.
MAX_INPUTS = MAX_TENSORS  # `inputs` entries (and raw_input_contents): a manifest's most tensors
MAX_OUTPUTS = MAX_TENSORS
MAX_RANK = 32  # `shape` entries of one input (the contract's tensors have 2)
MAX_PARAMETERS = 64  # entries of one `parameters` map (request, each input, each output)
MAX_PARAMETER_KEY_BYTES = 128
MAX_PARAMETER_VALUE_BYTES = 4096  # a string parameter's UTF-8 bytes


class WireTensor(NamedTuple):
    """An input as a front received it, before any check."""

    name: str
    datatype: str
    shape: Sequence[int]
    raw: bytes | None  # raw_input_contents / binary data, if sent so
    # typed contents field name -> values, for each one set (a front may hold FP32 as an array)
    values: Mapping[str, Sequence[Any] | np.ndarray]


class InferRequest(NamedTuple):
    """An inference request as a front read it, before any check."""

    id: str
    tensors: Sequence[WireTensor]
    outputs: Sequence[str]  # asked for by name, in order (empty: every output)
    raw_entries: int  # gRPC: how many raw_input_contents the message held (all inputs or none)
    mixed_forms: bool  # REST: each input chooses JSON data or binary data (Triton's extension)


class Decoded(NamedTuple):  # a tuple: built per request, cheaper than a dataclass
    inputs: dict[str, np.ndarray]  # name -> array of the declared shape and dtype
    outputs: tuple[TensorSpec, ...]  # the outputs to return, in reply order
    raw: bool  # the request used raw_input_contents, so the reply does too
    rows: int  # batch size


def split_raw_text(data: bytes, count: int, name: str = "") -> list[bytes] | None:
    """`count` length-prefixed elements filling `data` exactly, each at most MAX_TEXT_BYTES.
    Without `name` (the fast path) None if they do not; with it, InvalidRequestError saying why."""
    items, pos, end = [], 0, len(data)
    for index in range(count):
        if pos + _PREFIX > end:
            _refuse(
                name, f"element {index}: the 4-byte length prefix at byte {pos} is past the end "
                f"({end} bytes), expected {count} length-prefixed elements",
            )  # fmt: skip
            return None
        length = int.from_bytes(data[pos : pos + _PREFIX], "little")
        pos += _PREFIX
        if length > MAX_TEXT_BYTES:
            _refuse(name, f"element {index}: got {length} bytes, expected at most {MAX_TEXT_BYTES}")
            return None
        if pos + length > end:
            _refuse(
                name, f"element {index}: length {length} at byte {pos - _PREFIX} runs past the "
                f"end ({end} bytes)",
            )  # fmt: skip
            return None
        items.append(data[pos : pos + length])
        pos += length
    if pos != end:
        _refuse(name, f"got {end - pos} bytes after the {count} elements, expected none")
        return None
    return items


def _refuse(name: str, problem: str) -> None:
    """Raise, when judging (a name given); the fast path only learns it must not decide."""
    if name:
        raise InvalidRequestError(f"raw_input_contents for input '{name}' {problem}")


def text_array(
    items: Sequence[Any] | np.ndarray, shape: tuple[int, int], name: str = ""
) -> np.ndarray | None:
    """UTF-8 elements as an object array of stripped str. Without `name` (the fast path) None
    if one is not UTF-8 of at most MAX_TEXT_BYTES; with it, InvalidRequestError naming the row."""
    values = []
    for index, item in enumerate(items):
        if isinstance(item, str):  # JSON (REST) sends text as str
            item = item.encode("utf-8", "surrogatepass")
        problem = ""
        if not isinstance(item, bytes):
            problem = f"got {type(item).__name__}, expected UTF-8 bytes"
        elif len(item) > MAX_TEXT_BYTES:
            problem = f"got {len(item)} bytes, expected at most {MAX_TEXT_BYTES}"
        else:
            try:
                values.append(item.decode("utf-8").strip())
            except UnicodeDecodeError as err:
                problem = (
                    f"got bytes that are not UTF-8 ({err.reason} at byte {err.start}), "
                    "expected UTF-8 text"
                )
        if problem:
            if not name:
                return None
            raise InvalidRequestError(f"input '{name}' row {index // shape[1]}: {problem}")
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array.reshape(shape)


class _Input:
    """What the fast path needs of one declared input, computed once."""

    __slots__ = ("datatype", "name", "row_bytes", "text", "width")

    def __init__(self, spec: TensorSpec) -> None:
        self.name, self.datatype, self.width = spec.name, spec.datatype, spec.width
        self.text = spec.datatype == BYTES.name
        self.row_bytes = FP32.width * spec.width

    def from_raw(self, data: bytes, rows: int) -> np.ndarray | None:
        if self.text:
            items = split_raw_text(data, rows * self.width)
            return None if items is None else text_array(items, (rows, self.width))
        if len(data) != rows * self.row_bytes:
            return None
        array = np.ndarray((rows, self.width), FP32.dtype, data)  # a view: no copy
        # count_nonzero, not .any(): ~0.7 against ~1.5 us on a row (.any() goes through numpy's
        # Python-level _methods)
        return None if np.count_nonzero(np.isinf(array)) else array

    def from_values(
        self, values: Mapping[str, Sequence[Any] | np.ndarray], rows: int
    ) -> np.ndarray | None:
        """Typed contents: text elements, or FP32 values a front already holds as a float32 array
        (grpc/wire.py views packed fp32_contents so); a plain list takes the checked path."""
        if len(values) != 1:
            return None
        count = rows * self.width
        if self.text:
            items = values.get(BYTES.contents_field)
            if items is None or len(items) != count:
                return None
            return text_array(items, (rows, self.width))
        array = values.get(FP32.contents_field)
        if not isinstance(array, np.ndarray) or array.dtype != FP32.dtype or len(array) != count:
            return None
        array = array.reshape(rows, self.width)
        return None if np.count_nonzero(np.isinf(array)) else array


class Codec:
    """Decode and encode for one model version; safe to share (no per-request state)."""

    def __init__(self, manifest: Manifest, max_batch_size: int, name: str, version: str) -> None:
        self.inputs, self.outputs = manifest.inputs, manifest.outputs
        self.max_batch_size = max_batch_size
        self.model_name, self.model_version = name, version  # served under its folder names
        self._plans = {spec.name: _Input(spec) for spec in self.inputs}
        self._specs = {spec.name: spec for spec in self.inputs}
        self._by_output = {spec.name: spec for spec in self.outputs}
        self._selections: dict[tuple[str, ...], tuple[TensorSpec, ...]] = {}

    def max_request_bytes(self) -> int:
        """The largest well-formed request's tensor data (either content form)."""
        per_row = sum(
            spec.width * (_PREFIX + MAX_TEXT_BYTES if spec.datatype == BYTES.name else FP32.width)
            for spec in self.inputs
        )
        return self.max_batch_size * per_row

    # ------------------------------------------------------------------ decode

    def decode(self, request: InferRequest) -> Decoded:
        """The request's arrays, or InvalidRequestError naming the field and what was expected."""
        decoded = self._recognize(request)
        if decoded is None:
            decoded = self.decode_tensors(
                request.tensors, request.outputs, request.raw_entries, request.mixed_forms
            )
        return decoded

    def _recognize(self, request: InferRequest) -> Decoded | None:
        tensors, plans, entries = request.tensors, self._plans, request.raw_entries
        if len(tensors) != len(plans) or (entries and entries != len(tensors)):
            return None
        arrays: dict[str, np.ndarray] = {}
        rows = 0
        raw = True
        for tensor in tensors:
            plan = plans.get(tensor.name)
            shape = tensor.shape
            if plan is None or tensor.datatype != plan.datatype or len(shape) != 2:
                return None
            if shape[1] != plan.width or not 0 < shape[0] <= self.max_batch_size:
                return None
            if rows and shape[0] != rows:
                return None
            rows = shape[0]
            if tensor.raw is not None:
                array = None if tensor.values else plan.from_raw(tensor.raw, rows)
            else:
                raw = False
                array = plan.from_values(tensor.values, rows)
            if array is None:
                return None
            arrays[plan.name] = array
        outputs = self._requested(request.outputs, strict=False)
        if outputs is None or len(arrays) != len(plans):
            return None
        return Decoded(arrays, outputs, raw, rows)

    def decode_tensors(
        self,
        tensors: Sequence[WireTensor],
        outputs: Sequence[str],
        raw_entries: int = 0,
        mixed_forms: bool = False,
    ) -> Decoded:
        """Every check, in order; the first that fails raises InvalidRequestError.
        `raw_entries`: how many raw_input_contents the message carried (gRPC). `mixed_forms`:
        each input may choose its own form (REST: JSON data or binary data, Triton's binary
        extension); gRPC's raw_input_contents is all inputs or none."""
        got = [tensor.name for tensor in tensors]
        for i, name in enumerate(got):
            if name not in self._specs or got.index(name) != i:
                expected = ", ".join(f"'{spec.name}'" for spec in self.inputs)
                raise InvalidRequestError(
                    f"inputs[{i}].name: got '{clip(name)}', expected {expected} (once each)"
                )
        if len(got) != len(self.inputs):
            missing = ", ".join(f"'{spec.name}'" for spec in self.inputs if spec.name not in got)
            raise InvalidRequestError(
                f"inputs: got {len(got)} tensors, expected {len(self.inputs)} (missing {missing})"
            )
        raw = [tensor.raw is not None for tensor in tensors]
        entries = raw_entries or sum(raw)
        if entries and entries != len(tensors) and not mixed_forms:
            raise InvalidRequestError(
                f"raw_input_contents: got {entries} entries, "
                f"expected {len(tensors)} (one per input, in order)"
            )
        arrays = {t.name: self._decode_one(self._specs[t.name], t) for t in tensors}
        rows = {array.shape[0] for array in arrays.values()}
        if len(rows) != 1:
            raise InvalidRequestError(
                f"inputs shape[0]: got batch sizes {sorted(rows)}, expected one batch size"
            )
        selected = self._requested(outputs)
        assert selected is not None  # strict: refused above otherwise
        return Decoded(arrays, selected, all(raw), rows.pop())

    def _decode_one(self, spec: TensorSpec, tensor: WireTensor) -> np.ndarray:
        name = spec.name
        if tensor.datatype != spec.datatype:
            raise InvalidRequestError(
                f"input '{name}' datatype: got '{clip(tensor.datatype)}', "
                f"expected '{spec.datatype}'"
            )
        shape = _check_shape(spec, list(tensor.shape), self.max_batch_size)
        count = shape[0] * shape[1]
        if tensor.raw is not None:
            if tensor.values:
                raise InvalidRequestError(
                    f"input '{name}': got both contents.{next(iter(tensor.values))} and "
                    "raw_input_contents, expected exactly one"
                )
            if spec.datatype == BYTES.name:
                items = split_raw_text(tensor.raw, count, name)
                return _checked(text_array(items or [], shape, name))
            if len(tensor.raw) != count * FP32.width:
                raise InvalidRequestError(
                    f"raw_input_contents for input '{name}': got {len(tensor.raw)} bytes, "
                    f"expected {count * FP32.width} (shape {list(shape)} x {FP32.width} bytes FP32)"
                )
            return _finite(name, np.frombuffer(tensor.raw, FP32.dtype).reshape(shape))
        field = DATATYPES[spec.datatype].contents_field
        other = next((f for f in tensor.values if f != field), None)
        if other is not None:
            raise InvalidRequestError(
                f"input '{name}' contents: got {other}, expected {field} for {spec.datatype}"
            )
        values = tensor.values.get(field, ())
        if len(values) != count:
            raise InvalidRequestError(
                f"input '{name}' contents.{field}: got {len(values)} elements, "
                f"expected {count} (shape {list(shape)})"
            )
        if spec.datatype == BYTES.name:
            return _checked(text_array(values, shape, name))
        # JSON (REST) gives a list; numpy would read "1.5", "nan" and true as numbers, so only
        # numbers and null (missing) pass. protobuf's repeated float holds floats alone.
        if isinstance(values, list) and not FP32.json_types.issuperset(map(type, values)):
            bad = next(v for v in values if type(v) not in FP32.json_types)
            raise InvalidRequestError(
                f"input '{name}' contents.{field}: got a value that is not a number "
                f"({clip(repr(bad))}), expected {count} numbers (null = missing)"
            )
        try:
            array = np.asarray(values, dtype=FP32.dtype).reshape(shape)
        except (TypeError, ValueError, OverflowError):  # a front's values that are not numbers
            raise InvalidRequestError(
                f"input '{name}' contents.{field}: got a value that is not a number, expected "
                f"{count} numbers (NaN = missing)"
            ) from None
        return _finite(name, array)

    def _requested(
        self, names: Sequence[str], strict: bool = True
    ) -> tuple[TensorSpec, ...] | None:
        """The outputs asked for (all when none are named), if each is known and named once;
        otherwise InvalidRequestError, or None when not `strict` (the fast path)."""
        key = tuple(names)
        found = self._selections.get(key)
        if found is not None:
            return found
        for i, name in enumerate(key):
            problem = ""
            if name not in self._by_output:
                expected = ", ".join(f"'{spec.name}'" for spec in self.outputs)
                problem = f"got '{clip(name)}', expected one of {expected}"
            elif name in key[:i]:
                problem = f"got '{clip(name)}' twice, expected each at most once"
            if problem and strict:
                raise InvalidRequestError(f"outputs[{i}].name: {problem}")
            if problem:
                return None
        found = tuple(self._by_output[name] for name in key) or self.outputs
        found = self.outputs if found == self.outputs else found  # the common reply shape
        if len(self._selections) < 64:  # orders of the outputs: few; bounded anyway
            self._selections[key] = found
        return found


def _check_shape(spec: TensorSpec, shape: list[int], max_batch_size: int) -> tuple[int, int]:
    where = f"input '{spec.name}' shape"
    if len(shape) != 2:
        raise InvalidRequestError(
            f"{where}: got {clip_items(shape)} (rank {len(shape)}), expected rank 2 "
            f"{list(spec.shape)}"
        )
    if shape[1] != spec.width:
        raise InvalidRequestError(
            f"{where}[1]: got {shape[1]}, expected {spec.width} (shape {list(spec.shape)})"
        )
    if not 1 <= shape[0] <= max_batch_size:
        raise InvalidRequestError(
            f"{where}[0] (batch size): got {shape[0]}, expected 1..{max_batch_size}"
        )
    return shape[0], shape[1]


def _checked(array: np.ndarray | None) -> np.ndarray:
    assert array is not None  # with a name, a failure raised instead
    return array


def _finite(name: str, array: np.ndarray) -> np.ndarray:
    """NaN means "missing" (the graph imputes it); an infinity means nothing, so it is refused."""
    infinite = np.isinf(array)
    if infinite.any():
        row, column = (int(i) for i in np.argwhere(infinite)[0])
        raise InvalidRequestError(
            f"input '{name}' value at index [{row}, {column}]: got {array[row, column]}, "
            "expected a finite number or NaN (missing)"
        )
    return array


def check_count(items: Sized, where: str, limit: int) -> None:
    """A parsed (REST) list or object: at most `limit` entries."""
    if len(items) > limit:
        raise InvalidRequestError(f"{where}: got {len(items)} entries, expected at most {limit}")


def check_parameters(parameters: Mapping[str, Any], where: str) -> None:
    """A parsed (REST) `parameters` object: few entries, short keys, scalar values (a string of
    at most MAX_PARAMETER_VALUE_BYTES), as the gRPC InferParameter allows."""
    check_count(parameters, where, MAX_PARAMETERS)
    for key, value in parameters.items():
        if len(key) > MAX_PARAMETER_KEY_BYTES:
            raise InvalidRequestError(
                f"{where} key '{clip(key)}': got {len(key)} characters, expected at most "
                f"{MAX_PARAMETER_KEY_BYTES}"
            )
        if isinstance(value, str) and len(value) > MAX_PARAMETER_VALUE_BYTES:
            raise InvalidRequestError(
                f"{where}['{clip(key)}']: got a string of {len(value)} characters, expected at "
                f"most {MAX_PARAMETER_VALUE_BYTES}"
            )
        if not isinstance(value, (str, int, float, bool)) and value is not None:
            raise InvalidRequestError(
                f"{where}['{clip(key)}']: got a {type(value).__name__}, expected a string, "
                "number or boolean"
            )


__all__ = [
    "MAX_INPUTS",
    "MAX_OUTPUTS",
    "MAX_PARAMETERS",
    "MAX_PARAMETER_KEY_BYTES",
    "MAX_PARAMETER_VALUE_BYTES",
    "MAX_RANK",
    "MAX_TEXT_BYTES",
    "Codec",
    "Decoded",
    "WireTensor",
    "check_count",
    "check_parameters",
    "split_raw_text",
    "text_array",
]
