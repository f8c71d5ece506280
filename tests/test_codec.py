"""serving/codec.py: wire <-> numpy in both content forms, and every request check's message."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from stablemlp.protos import grpc_service_pb2 as pb
from stablemlp.serving.codec import TensorSpec, decode_request, encode_response
from stablemlp.serving.errors import InvalidRequestError

F = 4
MAX_BATCH = 1024
INPUTS = (TensorSpec("features", "FP32", (-1, F)),)
OUTPUTS = (TensorSpec("probability", "FP32", (-1, 1)), TensorSpec("label", "INT64", (-1, 1)))


def _request(rows: np.ndarray, raw: bool = True, **tensor: object) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m", id="req-1")
    fields = {"name": "features", "datatype": "FP32", "shape": rows.shape, **tensor}
    added = request.inputs.add(**fields)
    if raw:
        request.raw_input_contents.append(rows.astype("<f4").tobytes())
    else:
        added.contents.fp32_contents.extend(rows.ravel().tolist())
    return request


def _decode(request: pb.ModelInferRequest) -> np.ndarray:
    decoded = decode_request(request, INPUTS, OUTPUTS, MAX_BATCH)
    return decoded.inputs["features"]


ROWS = np.arange(3 * F, dtype=np.float32).reshape(3, F) / 7


@pytest.mark.parametrize("raw", [True, False])
def test_decodes_both_forms_and_keeps_nan(raw: bool) -> None:
    rows = ROWS.copy()
    rows[1, 2] = np.nan
    decoded = decode_request(_request(rows, raw), INPUTS, OUTPUTS, MAX_BATCH)
    np.testing.assert_array_equal(decoded.inputs["features"], rows)
    assert decoded.inputs["features"].dtype == np.float32
    assert decoded.raw is raw and decoded.rows == 3
    assert decoded.outputs == OUTPUTS


def test_raw_input_is_read_without_a_copy() -> None:
    request = _request(ROWS)
    array = _decode(request)
    assert not array.flags.writeable  # a view on the message's bytes, not a copy
    assert array.base is not None


def test_large_batch_in_contents_form_decodes_exactly() -> None:
    rows = np.random.default_rng(0).normal(size=(MAX_BATCH, F)).astype(np.float32)
    np.testing.assert_array_equal(_decode(_request(rows, raw=False)), rows)


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
    np.testing.assert_array_equal(_decode(_request(rows, raw)), rows)


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


INVALID: list[tuple[str, Callable[[], pb.ModelInferRequest], list[str]]] = [
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
    ("raw count", _second_raw, ["raw_input_contents", "got 2 entries", "expected 1"]),
    ("no inputs", lambda: pb.ModelInferRequest(model_name="m"), ["inputs", "missing 'features'"]),
    ("output name", lambda: _outputs("prob"), ["outputs[0].name", "got 'prob'", "'label'"]),
    ("output twice", lambda: _outputs("label", "label"), ["outputs[1].name", "twice"]),
]


@pytest.mark.parametrize(("case", "build", "fragments"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_requests_name_field_got_and_expected(
    case: str, build: Callable[[], pb.ModelInferRequest], fragments: list[str]
) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        decode_request(build(), INPUTS, OUTPUTS, MAX_BATCH)
    for fragment in fragments:
        assert fragment in str(raised.value), (case, str(raised.value))


def test_duplicate_input_is_refused() -> None:
    request = _request(ROWS)
    request.inputs.add(name="features", datatype="FP32", shape=ROWS.shape)
    with pytest.raises(InvalidRequestError, match=r"inputs\[1\].name: got 'features'"):
        decode_request(request, INPUTS, OUTPUTS, MAX_BATCH)


def test_requested_outputs_keep_the_request_order() -> None:
    decoded = decode_request(_outputs("label", "probability"), INPUTS, OUTPUTS, MAX_BATCH)
    assert decoded.outputs == (OUTPUTS[1], OUTPUTS[0])
    assert decode_request(_outputs("label"), INPUTS, OUTPUTS, MAX_BATCH).outputs == (OUTPUTS[1],)


RESULTS = {
    "probability": np.array([[0.25], [0.75]], dtype=np.float32),
    "label": np.array([[0], [1]], dtype=np.int64),
}


def test_encode_raw_echoes_id_and_writes_little_endian() -> None:
    request = _request(ROWS[:2])
    response = encode_response(request, "3", RESULTS, OUTPUTS, raw=True)
    assert (response.model_name, response.model_version, response.id) == ("m", "3", "req-1")
    assert [(t.name, t.datatype, list(t.shape)) for t in response.outputs] == [
        ("probability", "FP32", [2, 1]),
        ("label", "INT64", [2, 1]),
    ]
    assert response.raw_output_contents[0] == RESULTS["probability"].astype("<f4").tobytes()
    assert np.frombuffer(response.raw_output_contents[1], "<i8").tolist() == [0, 1]
    assert not response.outputs[0].HasField("contents")


def test_encode_contents_form_fills_typed_fields() -> None:
    response = encode_response(_request(ROWS[:2], raw=False), "1", RESULTS, OUTPUTS[1:], raw=False)
    assert len(response.raw_output_contents) == 0
    assert [t.name for t in response.outputs] == ["label"]
    assert list(response.outputs[0].contents.int64_contents) == [0, 1]
    response = encode_response(_request(ROWS[:2], raw=False), "1", RESULTS, OUTPUTS[:1], raw=False)
    assert list(response.outputs[0].contents.fp32_contents) == [0.25, 0.75]


# ---------------------------------------------------------------- the per-version wire plan


def _outcome(
    decode: Callable[[pb.ModelInferRequest], object], request: pb.ModelInferRequest
) -> object:
    """What decoding gives, comparable: the arrays' bytes (NaN-safe), or the refusal's message."""
    try:
        decoded = decode(request)
    except InvalidRequestError as err:
        return str(err)
    assert isinstance(decoded, tuple)
    arrays = {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in decoded.inputs.items()}
    return arrays, decoded.outputs, decoded.raw, decoded.rows


def _plan_cases() -> list[pb.ModelInferRequest]:
    rows = ROWS.copy()
    rows[0, 1] = np.nan
    # An infinity's 4 bytes straddling two finite elements: a false alarm for the fast path.
    shifted = (b"\0\0" + np.array([np.inf], "<f4").tobytes()).ljust(ROWS.nbytes, b"\0")
    cases = [_request(rows, raw) for raw in (True, False)]
    cases += [_outputs("label"), _outputs("label", "probability"), _outputs("probability", "x")]
    infinite = ROWS.copy()
    infinite[2, 1] = -np.inf
    cases += [_request(rows[:1], raw=False), _request(infinite), _request(infinite, False)]
    cases += [_request(ROWS, shape=[3, F + 1]), _request(ROWS, datatype="FP64")]
    odd = _request(ROWS)
    odd.raw_input_contents[0] = shifted  # infinity's bytes across an element boundary
    both = _request(ROWS)
    both.inputs[0].contents.fp32_contents.append(1.0)
    extra = _request(ROWS, raw=False)
    extra.inputs[0].contents.int_contents.append(1)
    # Past BYTE_SEARCH_MAX the fast path checks with np.isinf instead of searching bytes.
    large = np.tile(rows, (64, 1))
    large_infinite = large.copy()
    large_infinite[100, 3] = np.inf
    cases += [_request(big, raw) for big in (large, large_infinite) for raw in (True, False)]
    return [*cases, odd, both, extra, pb.ModelInferRequest()]


@pytest.mark.parametrize("index", range(len(_plan_cases())))
def test_the_wire_plan_decodes_exactly_as_the_codec(index: int) -> None:
    """The plan's fast path decides nothing: the same arrays, or the same refusal."""
    from stablemlp.serving.plan import WirePlan

    request = _plan_cases()[index]
    plan = WirePlan(INPUTS, OUTPUTS, MAX_BATCH)
    codec = _outcome(lambda r: decode_request(r, INPUTS, OUTPUTS, MAX_BATCH), request)
    assert _outcome(plan.decode, request) == codec


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize("count", [1, 64, 1024])
def test_the_wire_plan_takes_its_fast_path_at_every_size(raw: bool, count: int) -> None:
    """Well-formed requests of any size skip codec.py's general path (NaN included)."""
    from stablemlp.serving.plan import WirePlan

    rows = np.resize(ROWS, (count, F))
    rows[0, 0] = np.nan
    plan = WirePlan(INPUTS, OUTPUTS, MAX_BATCH)
    decoded = plan._decode_common(_request(rows, raw))
    assert decoded is not None and decoded.rows == count
    np.testing.assert_array_equal(decoded.inputs["features"], rows)
    rows[-1, -1] = -np.inf
    assert plan._decode_common(_request(rows, raw)) is None  # left to the codec, which refuses


@pytest.mark.parametrize("raw", [True, False])
def test_the_wire_plan_encodes_exactly_as_the_codec(raw: bool) -> None:
    from stablemlp.serving.plan import WirePlan

    plan = WirePlan(INPUTS, OUTPUTS, MAX_BATCH, model_name="m", model_version="3")
    renamed = _request(ROWS[:2], raw)
    renamed.model_name = "other"  # a name the plan was not made for: the general path
    for request in (_request(ROWS[:2], raw), _outputs("label"), renamed):
        request.id = "abc" if raw else ""
        decoded = decode_request(request, INPUTS, OUTPUTS, MAX_BATCH)
        want = encode_response(request, "3", RESULTS, decoded.outputs, decoded.raw)
        assert plan.encode(request, RESULTS, decoded) == want
        assert plan.encode(request, RESULTS, decoded) == want  # templates are not consumed
