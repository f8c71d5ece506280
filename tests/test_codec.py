"""serving/codec.py: wire <-> numpy for FP32 and BYTES inputs in both content forms, every check's
message, and the decoder production runs compared with a plain reference decode (hypothesis)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from stablemlp.protos import grpc_service_pb2 as pb
from stablemlp.serving.codec import MAX_TEXT_BYTES, Codec
from stablemlp.serving.errors import InvalidRequestError
from stablemlp.serving.grpc.wire import replies_for, request_of
from stablemlp.serving.manifest import FileEntry, Manifest, TensorSpec

F = 4
MAX_BATCH = 64
OUTPUTS = (TensorSpec("probability", "FP32", (-1, 1)), TensorSpec("label", "INT64", (-1, 1)))
NUMERIC = (TensorSpec("features", "FP32", (-1, F)),)
MIXED = (*NUMERIC, TensorSpec("color", "BYTES", (-1, 1)), TensorSpec("city", "BYTES", (-1, 1)))


def _codec(inputs: tuple[TensorSpec, ...] = NUMERIC) -> Codec:
    manifest = Manifest(
        model_name="m", version=3, created_utc="2026-01-01T00:00:00Z", opset=18,
        max_batch_size=MAX_BATCH, inputs=inputs, outputs=OUTPUTS,
        feature_names=tuple(f"f{i}" for i in range(F)), threshold=0.5,
        files={"model.onnx": FileEntry("0" * 64, 1)},
    )  # fmt: skip
    return Codec(manifest, MAX_BATCH, "m", "3")


def raw_text(values: list[bytes]) -> bytes:
    return b"".join(len(v).to_bytes(4, "little") + v for v in values)


def _request(rows: np.ndarray, raw: bool = True, **tensor: object) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m", id="req-1")
    fields = {"name": "features", "datatype": "FP32", "shape": rows.shape, **tensor}
    added = request.inputs.add(**fields)
    if raw:
        request.raw_input_contents.append(rows.astype("<f4").tobytes())
    else:
        added.contents.fp32_contents.extend(rows.ravel().tolist())
    return request


def _mixed(rows: np.ndarray, colors: list[bytes], raw: bool = True) -> pb.ModelInferRequest:
    request = _request(rows, raw)
    for name, values in (("color", colors), ("city", [b"Oslo"] * len(colors))):
        tensor = request.inputs.add(name=name, datatype="BYTES", shape=[len(values), 1])
        if raw:
            request.raw_input_contents.append(raw_text(values))
        else:
            tensor.contents.bytes_contents.extend(values)
    return request


ROWS = np.arange(3 * F, dtype=np.float32).reshape(3, F) / 7


@pytest.mark.parametrize("raw", [True, False])
def test_decodes_both_forms_and_keeps_nan(raw: bool) -> None:
    rows = ROWS.copy()
    rows[1, 2] = np.nan
    decoded = _codec().decode(request_of(_request(rows, raw)))
    np.testing.assert_array_equal(decoded.inputs["features"], rows)
    assert decoded.inputs["features"].dtype == np.float32
    assert decoded.raw is raw and decoded.rows == 3
    assert decoded.outputs == OUTPUTS


def test_raw_input_is_read_without_a_copy() -> None:
    array = _codec().decode(request_of(_request(ROWS))).inputs["features"]
    assert not array.flags.writeable  # a view on the message's bytes, not a copy
    assert array.base is not None


@pytest.mark.parametrize("raw", [True, False])
def test_text_columns_decode_to_stripped_str_in_either_form(raw: bool) -> None:
    colors = [b" red ", "gr\u00fcn".encode(), b""]
    decoded = _codec(MIXED).decode(request_of(_mixed(ROWS, colors, raw)))
    color = decoded.inputs["color"]
    assert color.dtype == object and color.shape == (3, 1)
    assert color.ravel().tolist() == ["red", "gr\u00fcn", ""]
    assert decoded.inputs["city"].ravel().tolist() == ["Oslo"] * 3


def test_inputs_may_come_in_any_order() -> None:
    request = _mixed(ROWS, [b"a", b"b", b"c"])
    reordered = pb.ModelInferRequest(model_name="m")
    for i in (2, 0, 1):
        reordered.inputs.append(request.inputs[i])
        reordered.raw_input_contents.append(request.raw_input_contents[i])
    decoded = _codec(MIXED).decode(request_of(reordered))
    assert decoded.inputs["color"].ravel().tolist() == ["a", "b", "c"]
    np.testing.assert_array_equal(decoded.inputs["features"], ROWS)


def _both(rows: np.ndarray) -> pb.ModelInferRequest:
    request = _request(rows)
    request.inputs[0].contents.fp32_contents.extend(rows.ravel().tolist())
    return request


def _raw_with_bytes(rows: np.ndarray, size: int) -> pb.ModelInferRequest:
    request = _request(rows, raw=False)
    request.inputs[0].ClearField("contents")
    request.raw_input_contents.append(b"\0" * size)
    return request


def _with_inf(sign: float, raw: bool) -> pb.ModelInferRequest:
    rows = ROWS.copy()
    rows[2, 1] = sign * np.inf
    return _request(rows, raw)


def _outputs(*names: str) -> pb.ModelInferRequest:
    request = _request(ROWS)
    for name in names:
        request.outputs.add(name=name)
    return request


def _second_raw() -> pb.ModelInferRequest:
    request = _request(ROWS)
    request.raw_input_contents.append(b"")
    return request


def _int_contents() -> pb.ModelInferRequest:
    request = _request(ROWS, raw=False)
    request.inputs[0].contents.int_contents.extend([1] * ROWS.size)
    return request


def _unknown_field_as_data() -> pb.ModelInferRequest:
    """Issue 12.6: 48 bytes under an unknown field 9 inside contents, fp32_contents empty."""
    request = _request(ROWS, raw=False)
    request.inputs[0].contents.Clear()
    request.inputs[0].contents.MergeFromString(b"\x4a\x30" + ROWS.astype("<f4").tobytes())
    return request


def _text_raw(data: bytes) -> pb.ModelInferRequest:
    request = _mixed(ROWS, [b"a", b"b", b"c"])
    request.raw_input_contents[1] = data
    return request


def _text_contents(values: list[bytes]) -> pb.ModelInferRequest:
    request = _mixed(ROWS, [b"a", b"b", b"c"], raw=False)
    del request.inputs[1].contents.bytes_contents[:]
    request.inputs[1].contents.bytes_contents.extend(values)
    return request


def _text_as_fp32() -> pb.ModelInferRequest:
    request = _mixed(ROWS, [b"a", b"b", b"c"])
    request.inputs[1].datatype = "FP32"
    return request


def _missing_column() -> pb.ModelInferRequest:
    request = _mixed(ROWS, [b"a", b"b", b"c"])
    del request.inputs[2]
    del request.raw_input_contents[2]
    return request


LONG = b"x" * (MAX_TEXT_BYTES + 1)
Case = tuple[str, Callable[[], pb.ModelInferRequest], list[str]]
INVALID: list[Case] = [
    ("+inf raw", lambda: _with_inf(1, True), ["'features'", "[2, 1]", "got inf", "finite"]),
    ("-inf contents", lambda: _with_inf(-1, False), ["[2, 1]", "got -inf", "NaN (missing)"]),
    ("name", lambda: _request(ROWS, name="x"), ["inputs[0].name", "got 'x'", "'features'"]),
    ("datatype", lambda: _request(ROWS, datatype="FP64"), ["datatype", "'FP64'", "'FP32'"]),
    ("rank", lambda: _request(ROWS, shape=[3 * F]), ["shape", "rank 1", "rank 2"]),
    ("features", lambda: _request(ROWS[:, :3]), ["shape[1]", "got 3", f"expected {F}"]),
    ("bytes", lambda: _raw_with_bytes(ROWS, 10), ["raw_input_contents", "got 10 bytes", "48"]),
    ("elements", lambda: _request(ROWS, shape=[2, F], raw=False), ["fp32_contents", "12", "8"]),
    ("no data", lambda: _request(ROWS[:0], shape=[1, F], raw=False), ["got 0 elements"]),
    ("both forms", lambda: _both(ROWS), ["both contents.fp32_contents and raw_input_contents"]),
    ("empty batch", lambda: _request(ROWS[:0]), ["batch size", "got 0", f"1..{MAX_BATCH}"]),
    (
        "batch limit",
        lambda: _request(np.zeros((MAX_BATCH + 1, F), np.float32)),
        ["batch size", f"got {MAX_BATCH + 1}", f"expected 1..{MAX_BATCH}"],
    ),
    ("negative dim", lambda: _request(ROWS, shape=[-1, F]), ["batch size", "got -1"]),
    ("wrong contents", _int_contents, ["int_contents", "expected fp32_contents"]),
    ("unknown field", _unknown_field_as_data, ["fp32_contents", "got 0 elements", "expected 12"]),
    ("raw count", _second_raw, ["raw_input_contents", "got 2 entries", "expected 1"]),
    ("no inputs", lambda: pb.ModelInferRequest(model_name="m"), ["inputs", "missing 'features'"]),
    ("output name", lambda: _outputs("prob"), ["outputs[0].name", "got 'prob'", "'label'"]),
    ("output twice", lambda: _outputs("label", "label"), ["outputs[1].name", "twice"]),
]
TEXT_INVALID: list[Case] = [
    ("missing column", _missing_column, ["inputs", "missing 'city'"]),
    ("text as FP32", _text_as_fp32, ["input 'color' datatype", "got 'FP32'", "'BYTES'"]),
    ("prefix past end", lambda: _text_raw(raw_text([b"a", b"b"]) + b"\1"), ["element 2", "past"]),
    ("length past end", lambda: _text_raw(raw_text([b"a", b"b"]) + b"\x09\0\0\0x"), ["runs past"]),
    ("trailing bytes", lambda: _text_raw(raw_text([b"a", b"b", b"c"]) + b"z"), ["after the 3"]),
    ("too long raw", lambda: _text_raw(raw_text([b"a", LONG, b"c"])), ["element 1", "at most"]),
    ("too long", lambda: _text_contents([b"a", LONG, b"c"]), ["'color' row 1", "at most"]),
    ("not UTF-8", lambda: _text_contents([b"a", b"b", b"\xff"]), ["'color' row 2", "UTF-8"]),
    ("count", lambda: _text_contents([b"a"]), ["bytes_contents", "got 1 elements", "3"]),
]


@pytest.mark.parametrize(
    ("case", "build", "fragments"),
    INVALID + TEXT_INVALID,
    ids=[c[0] for c in INVALID + TEXT_INVALID],
)
def test_invalid_requests_name_field_got_and_expected(
    case: str, build: Callable[[], pb.ModelInferRequest], fragments: list[str]
) -> None:
    codec = _codec(MIXED if (case, build, fragments) in TEXT_INVALID else NUMERIC)
    with pytest.raises(InvalidRequestError) as raised:
        codec.decode(request_of(build()))
    for fragment in fragments:
        assert fragment in str(raised.value), (case, str(raised.value))


def test_unknown_fields_are_ignored_as_protobuf_ignores_them() -> None:
    request = _request(ROWS, raw=False)
    request.inputs[0].contents.MergeFromString(b"\x48\x96\x01")  # field 9, a varint: unknown
    np.testing.assert_array_equal(_codec().decode(request_of(request)).inputs["features"], ROWS)


def test_duplicate_input_is_refused() -> None:
    request = _request(ROWS)
    request.inputs.add(name="features", datatype="FP32", shape=ROWS.shape)
    with pytest.raises(InvalidRequestError, match=r"inputs\[1\].name: got 'features'"):
        _codec().decode(request_of(request))


def test_requested_outputs_keep_the_request_order() -> None:
    assert _codec().decode(request_of(_outputs("label", "probability"))).outputs == (
        OUTPUTS[1],
        OUTPUTS[0],
    )
    assert _codec().decode(request_of(_outputs("label"))).outputs == (OUTPUTS[1],)


def _encode(codec: Codec, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    decoded = codec.decode(request_of(request))
    return replies_for(codec).encode(request, RESULTS, decoded.outputs, decoded.rows, decoded.raw)


RESULTS = {
    "probability": np.array([[0.25], [0.75]], dtype=np.float32),
    "label": np.array([[0], [1]], dtype=np.int64),
}


def test_encode_raw_echoes_id_and_writes_little_endian() -> None:
    request = _request(ROWS[:2])
    codec = _codec()
    response = _encode(codec, request)
    assert (response.model_name, response.model_version, response.id) == ("m", "3", "req-1")
    assert [(t.name, t.datatype, list(t.shape)) for t in response.outputs] == [
        ("probability", "FP32", [2, 1]),
        ("label", "INT64", [2, 1]),
    ]
    assert response.raw_output_contents[0] == RESULTS["probability"].astype("<f4").tobytes()
    assert np.frombuffer(response.raw_output_contents[1], "<i8").tolist() == [0, 1]
    assert not response.outputs[0].HasField("contents")


def test_encode_contents_form_fills_typed_fields_of_the_outputs_asked_for() -> None:
    codec = _codec()
    request = _request(ROWS[:2], raw=False)
    request.outputs.add(name="label")
    response = _encode(codec, request)
    assert len(response.raw_output_contents) == 0
    assert [t.name for t in response.outputs] == ["label"]
    assert list(response.outputs[0].contents.int64_contents) == [0, 1]
    request.outputs[0].name = "probability"
    response = _encode(codec, request)
    assert list(response.outputs[0].contents.fp32_contents) == [0.25, 0.75]


@pytest.mark.parametrize("raw", [True, False])
def test_the_reply_template_gives_what_the_general_path_gives(raw: bool) -> None:
    codec = _codec()
    renamed = _request(ROWS[:2], raw)
    renamed.model_name = "other"  # a name the codec was not made for: the general path
    for request in (_request(ROWS[:2], raw), renamed):
        request.id = "abc" if raw else ""
        decoded = codec.decode(request_of(request))
        first, again = _encode(codec, request), _encode(codec, request)
        assert first == again  # templates are not consumed
        assert first.model_name == request.model_name and first.model_version == "3"
        assert [list(t.shape) for t in first.outputs] == [[2, 1], [2, 1]]
        # the same outputs in a tuple of its own take the general path: the same reply
        general = replies_for(codec).encode(request, RESULTS, (*decoded.outputs,), 2, decoded.raw)
        assert general == first


# ---------------------------------------------------------------- fast path and reference


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize("count", [1, 7, MAX_BATCH])
def test_well_formed_requests_take_the_fast_path(raw: bool, count: int) -> None:
    rows = np.resize(ROWS, (count, F))
    rows[0, 0] = np.nan
    codec = _codec(MIXED)
    request = _mixed(rows, [b"x"] * count, raw)
    decoded = codec._recognize(request_of(request))
    assert decoded is not None and decoded.rows == count
    np.testing.assert_array_equal(decoded.inputs["features"], rows)
    rows[-1, -1] = -np.inf
    assert (
        codec._recognize(request_of(_mixed(rows, [b"x"] * count, raw))) is None
    )  # refused elsewhere


ERROR = "error"


def reference(request: pb.ModelInferRequest, inputs: tuple[TensorSpec, ...]) -> Any:
    """A plain decode of the protocol's rules, written without looking at the codec: the arrays
    (as comparable bytes) and the outputs asked for, or ERROR."""
    specs = {s.name: s for s in inputs}
    names = [t.name for t in request.inputs]
    raw = list(request.raw_input_contents)
    if sorted(names) != sorted(specs) or (raw and len(raw) != len(names)):
        return ERROR
    arrays: dict[str, Any] = {}
    for i, tensor in enumerate(request.inputs):
        spec = specs[tensor.name]
        shape = list(tensor.shape)
        if tensor.datatype != spec.datatype or len(shape) != 2 or shape[1] != spec.width:
            return ERROR
        if not 1 <= shape[0] <= MAX_BATCH:
            return ERROR
        count = shape[0] * shape[1]
        set_fields = [f.name for f, _ in tensor.contents.ListFields()]
        text = spec.datatype == "BYTES"
        if raw:
            if set_fields:
                return ERROR
            if text:
                values: list[Any] = []
                data, pos = raw[i], 0
                while pos < len(data):
                    if pos + 4 > len(data):
                        return ERROR
                    n = int.from_bytes(data[pos : pos + 4], "little")
                    values.append(data[pos + 4 : pos + 4 + n])
                    if pos + 4 + n > len(data):
                        return ERROR
                    pos += 4 + n
            elif len(raw[i]) != 4 * count:
                return ERROR
            else:
                values = list(np.frombuffer(raw[i], "<f4"))
        else:
            field = "bytes_contents" if text else "fp32_contents"
            if set_fields not in ([], [field]):
                return ERROR
            values = list(getattr(tensor.contents, field))
        if len(values) != count:
            return ERROR
        if text:
            if any(len(v) > MAX_TEXT_BYTES for v in values):
                return ERROR
            try:
                strings = [v.decode("utf-8").strip() for v in values]
            except UnicodeDecodeError:
                return ERROR
            arrays[spec.name] = ("text", tuple(shape), tuple(strings))
        else:
            array = np.array(values, dtype="<f4").reshape(shape)
            if np.isinf(array).any():
                return ERROR
            arrays[spec.name] = comparable(array)
    if len({a[1][0] for a in arrays.values()}) != 1:
        return ERROR
    wanted = [o.name for o in request.outputs]
    if len(set(wanted)) != len(wanted) or not set(wanted) <= {o.name for o in OUTPUTS}:
        return ERROR
    return arrays, tuple(wanted) or tuple(o.name for o in OUTPUTS), bool(raw)


def comparable(array: np.ndarray) -> tuple[Any, ...]:
    """An array as a comparable value: text as strings; numbers as bytes, any NaN as one NaN."""
    if array.dtype == object:
        return ("text", array.shape, tuple(array.ravel().tolist()))
    return (array.dtype.str, array.shape, np.where(np.isnan(array), np.nan, array).tobytes())


def summary(decoded: Any) -> Any:
    arrays = {name: comparable(a) for name, a in decoded.inputs.items()}
    return arrays, tuple(o.name for o in decoded.outputs), decoded.raw


def outcome(codec: Codec, request: pb.ModelInferRequest) -> Any:
    """What the production decoder gives, in the reference's terms."""
    try:
        decoded = codec.decode(request_of(request))
    except InvalidRequestError as err:
        assert str(err)
        return ERROR
    return summary(decoded)


GOOD_TEXT = st.text(max_size=6).map(lambda s: s.encode("utf-8"))
ANY_TEXT = st.one_of(
    GOOD_TEXT, st.sampled_from([b" pad ", b"\xff\xfe", b"x" * (MAX_TEXT_BYTES + 1), b""])
)
GOOD_FLOATS = st.floats(width=32, allow_nan=True, allow_infinity=False)
ANY_FLOATS = st.floats(width=32, allow_nan=True, allow_infinity=True)


@st.composite
def requests(draw: st.DrawFn) -> tuple[pb.ModelInferRequest, tuple[TensorSpec, ...]]:
    """Mostly well-formed requests, each with a chance of one or several things wrong."""
    inputs = draw(st.sampled_from([NUMERIC, MIXED]))
    rows = draw(st.integers(1, 5))
    raw = draw(st.booleans())
    bad = lambda: draw(st.integers(0, 29)) == 0  # noqa: E731  # each choice goes wrong ~3%
    request = pb.ModelInferRequest(model_name="m")
    order = draw(st.permutations(list(inputs)))
    if bad():
        order = order[:-1] if draw(st.booleans()) else [*order, order[0]]
    for spec in order:
        n = rows + (draw(st.sampled_from([-rows, 1, MAX_BATCH])) if bad() else 0)
        width = spec.width + (1 if bad() else 0)
        shape = [n, width] if not bad() else [n * width]
        tensor = request.inputs.add(
            name=spec.name if not bad() else "nope",
            datatype=spec.datatype if not bad() else draw(st.sampled_from(["FP32", "BYTES"])),
            shape=shape,
        )
        count = max(0, rows * spec.width + (draw(st.integers(-1, 1)) if bad() else 0))
        text = spec.datatype == "BYTES"
        kinds = (ANY_TEXT, ANY_FLOATS) if bad() else (GOOD_TEXT, GOOD_FLOATS)
        values = draw(st.lists(kinds[0] if text else kinds[1], min_size=count, max_size=count))
        if raw:
            data = raw_text(values) if text else np.array(values, "<f4").tobytes()
            request.raw_input_contents.append(data + (b"\0" if bad() else b""))
            if bad():
                tensor.contents.fp32_contents.append(1.0)
        elif text:
            tensor.contents.bytes_contents.extend(values)
        else:
            tensor.contents.fp32_contents.extend(values)
        if not raw and bad():
            tensor.contents.MergeFromString(b"\x48\x01")  # an unknown varint field
    wanted = [[], ["label"], ["label", "probability"], ["probability", "label"]]
    if bad():
        wanted = [["x"], ["label", "label"], ["probability", "x"]]
    for name in draw(st.sampled_from(wanted)):
        request.outputs.add(name=name)
    return request, inputs


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_the_production_decoder_agrees_with_the_reference(
    case: tuple[pb.ModelInferRequest, tuple[TensorSpec, ...]],
) -> None:
    request, inputs = case
    codec = _codec(inputs)
    assert outcome(codec, request) == reference(request, inputs)
    fast = codec._recognize(request_of(request))
    if fast is not None:  # the fast path only ever accepts what the checked path accepts too
        names, entries = [o.name for o in request.outputs], len(request.raw_input_contents)
        slow = codec.decode_tensors(request_of(request).tensors, names, entries)
        assert summary(fast) == summary(slow)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 40), st.just(F)),
        elements=st.floats(allow_infinity=False, width=32),
    ),
    st.booleans(),
)
def test_round_trip_any_finite_or_nan_rows(rows: np.ndarray, raw: bool) -> None:
    np.testing.assert_array_equal(
        _codec().decode(request_of(_request(rows, raw))).inputs["features"], rows
    )
