"""Malformed REST requests: a corpus against a real token-protected server (as test_bad_inputs.py
does for gRPC), the same messages as gRPC for the same mistakes, then properties of parsing.

Every corpus entry must get its HTTP status and `{"error": ...}` saying why, and the server must
then answer a normal call correctly.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import MODEL_NAME, HeldOutSplit, ServerProcess, infer_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_client import binary_body, call, infer_body, reply_outputs
from test_bad_inputs import codec_for

from stablemlp.protos import grpc_service_pb2_grpc as pb_grpc
from stablemlp.serving.errors import InvalidRequestError
from stablemlp.serving.manifest import TensorSpec
from stablemlp.serving.rest.wire import MAX_DATA_DEPTH, parse_infer, request_of

TOKEN = "rest-corpus-token-0123"
GOOD = (("authorization", f"Bearer {TOKEN}"),)
MAX_BATCH = 64
INFER = f"/v2/models/{MODEL_NAME}/infer"
LONG = "x" * 50_000
CLIPPED = f"... ({len(LONG)} chars)"


@pytest.fixture(scope="module")
def server(model_repository: Path, start_server: Callable[..., Any]) -> Iterator[ServerProcess]:
    args = ["--max-batch-size", str(MAX_BATCH)]
    with start_server(model_repository, *args, env={"STABLEMLP_AUTH_TOKEN": TOKEN},
                      metadata=GOOD) as running:  # fmt: skip
        yield running


@dataclass(frozen=True)
class Case:
    name: str
    body: bytes
    status: int
    fragment: str
    path: str = INFER
    headers: tuple[tuple[str, str | bytes], ...] = (("Content-Type", "application/json"),)


def _edit(rows: np.ndarray, edit: Callable[[dict[str, Any]], object]) -> bytes:
    body = infer_body(rows)
    edit(body)
    return json.dumps(body).encode()


def _tensor(**fields: Any) -> Callable[[dict[str, Any]], object]:
    return lambda body: body["inputs"][0].update(fields)


def corpus(rows: np.ndarray) -> list[Case]:
    infinite = rows.tolist()
    infinite[1][3] = float("inf")  # Python's json writes Infinity
    nested_deep: Any = [0.5]
    for _ in range(MAX_DATA_DEPTH + 2):
        nested_deep = [nested_deep]
    raw, headers = binary_body(rows)
    length = int(headers["Inference-Header-Content-Length"])
    binary = tuple(headers.items())
    bad = [
        ("not JSON", b"{nope", 400, "request: not valid JSON"),
        ("empty body", b"", 400, "not valid JSON"),
        ("JSON list", b"[]", 400, "request: got a list, expected a JSON object"),
        ("deep JSON", b"[" * 5000 + b"]" * 5000, 400, "not valid JSON"),
        ("no inputs", b"{}", 400, "inputs: got null, expected a list of tensors"),
        ("inputs object", b'{"inputs": {}}', 400, "inputs: got an object, expected a list"),
        ("input not object", b'{"inputs": [1]}', 400, "inputs[0]: got the number 1"),
        ("name number", _edit(rows, _tensor(name=3)), 400, "inputs[0].name: got the number 3"),
        ("unknown name", _edit(rows, _tensor(name="x")), 400, "inputs[0].name: got 'x'"),
        ("long name", _edit(rows, _tensor(name=LONG)), 400, CLIPPED),
        ("datatype", _edit(rows, _tensor(datatype="FP16")), 400, "datatype: got 'FP16'"),
        ("control chars", _edit(rows, _tensor(datatype="FP\n32")), 400, "got 'FP\\n32'"),
        ("shape text", _edit(rows, _tensor(shape="2,30")), 400, "shape: got a string"),
        ("shape float", _edit(rows, _tensor(shape=[2.0, 30])), 400, "got the number 2.0"),
        ("shape bool", _edit(rows, _tensor(shape=[True, 30])), 400, "got a boolean in it"),
        ("rank 1", _edit(rows, _tensor(shape=[60])), 400, "got [60] (rank 1), expected rank 2"),
        ("29 features", _edit(rows, _tensor(shape=[2, 29])), 400, "shape[1]: got 29"),
        ("batch 0", _edit(rows, _tensor(shape=[0, 30])), 400, "(batch size): got 0"),
        ("over max batch", _edit(rows, _tensor(shape=[65, 30])), 400, "expected 1..64"),
        ("short data", _edit(rows, _tensor(data=[0.5] * 59)), 400, "got 59 elements"),
        ("no data", _edit(rows, lambda b: b["inputs"][0].pop("data")), 400,
         "got neither data nor parameters.binary_data_size"),
        ("data object", _edit(rows, _tensor(data={"a": 1})), 400, "data: got an object"),
        ("text values", _edit(rows, _tensor(data=["a"] * 60)), 400, "not a number"),
        ("ragged nesting", _edit(rows, _tensor(data=[[0.5] * 30, 0.5])), 400,
         "got lists mixed with values"),
        ("too deep data", _edit(rows, _tensor(data=nested_deep)), 400,
         f"nested deeper than {MAX_DATA_DEPTH} levels"),
        ("infinity", json.dumps(infer_body(np.asarray(infinite))).encode(), 400,
         "got inf, expected a finite number"),
        ("id number", _edit(rows, lambda b: b.update(id=7)), 400, "id: got the number 7"),
        ("outputs object", _edit(rows, lambda b: b.update(outputs={})), 400,
         "outputs: got an object"),
        ("output name", _edit(rows, lambda b: b.update(outputs=[{"name": "score"}])), 400,
         "outputs[0].name: got 'score'"),
        ("output twice", _edit(rows, lambda b: b.update(outputs=[{"name": "label"}] * 2)), 400,
         "twice"),
        ("binary flag text", _edit(rows, lambda b: b.update(outputs=[
            {"name": "label", "parameters": {"binary_data": "yes"}}])), 400,
         "binary_data: got a string, expected true or false"),
        ("parameters list", _edit(rows, lambda b: b.update(parameters=[])), 400,
         "request.parameters: got a list"),
        # Issue 23.2: the gRPC front's entry bounds (grpc/bounds.py), before tensors are built.
        ("2000 inputs", _edit(rows, lambda b: b.update(inputs=[{}] * 2000)), 400,
         "inputs: got 2000 entries, expected at most 1024"),
        ("2000 outputs", _edit(rows, lambda b: b.update(outputs=[{}] * 2000)), 400,
         "outputs: got 2000 entries, expected at most 1024"),
        ("65 parameters", _edit(rows, lambda b: b.update(
            parameters={f"p{i}": 1 for i in range(65)})), 400,
         "request.parameters: got 65 entries, expected at most 64"),
        ("65 input parameters", _edit(rows, _tensor(parameters={f"p{i}": 1 for i in range(65)})),
         400, "inputs[0].parameters: got 65 entries, expected at most 64"),
        ("nested parameter", _edit(rows, lambda b: b.update(parameters={"p": [[], []]})), 400,
         "request.parameters['p']: got a list, expected a string, number or boolean"),
        ("long parameter", _edit(rows, lambda b: b.update(parameters={"p": "v" * 5000})), 400,
         "got a string of 5000 characters, expected at most 4096"),
        ("long parameter key", _edit(rows, lambda b: b.update(parameters={"k" * 129: 1})), 400,
         "got 129 characters, expected at most 128"),
        ("rank 10000", _edit(rows, _tensor(shape=[1] * 10_000)), 400,
         "inputs[0].shape: got 10000 entries, expected at most 32"),
        # Issue 23.6: what only the NaN-tolerant fallback parser read used to end in a 500.
        ("huge integer and NaN", _edit(rows, _tensor(data=[10**400, float("nan"), *[0.5] * 58])),
         400, "value at index [0, 0]: got inf, expected a finite number"),
        ("lone surrogate id and NaN", _edit(rows, lambda b: b.update(id="\ud800", parameters={
            "x": float("nan")})), 400, "not valid JSON (str is not valid UTF-8: surrogates"),
        # Issue 23.11: FP32 data is numbers and null; numpy alone read these as numbers.
        ("numeric text", _edit(rows, _tensor(data=["1.5", *[0.5] * 59])), 400,
         "got a value that is not a number ('1.5')"),
        ("nan text", _edit(rows, _tensor(data=[*[0.5] * 59, "nan"])), 400, "('nan')"),
        ("boolean", _edit(rows, _tensor(data=[True, *[0.5] * 59])), 400, "(True)"),
        ("unknown model", _edit(rows, lambda b: None), 404, "model 'nope'"),
        ("version 9", _edit(rows, lambda b: None), 404, "got '9', expected one of [1]"),
    ]  # fmt: skip
    paths = {"unknown model": "/v2/models/nope/infer",
             "version 9": f"/v2/models/{MODEL_NAME}/versions/9/infer"}  # fmt: skip
    cases = [Case(n, b, s, f, paths.get(n, INFER)) for n, b, s, f in bad]
    for text in ("1_1_3", "+113", "\u0661\u0661".encode()):  # int() reads each as 113 or 11
        length_header = (("Inference-Header-Content-Length", text),)
        name = f"header length {text!r}"
        cases.append(Case(name, raw, 400, "expected a byte count (ASCII digits)", INFER,
                          length_header))  # fmt: skip
    cases += [
        Case("header length text", raw, 400, "Inference-Header-Content-Length: got 'x'",
             headers=(("Inference-Header-Content-Length", "x"),)),
        Case("header length past body", raw, 400, "expected 0..",
             headers=(("Inference-Header-Content-Length", str(len(raw) + 1)),)),
        Case("binary short", raw[:-4], 400, "binary_data_size: got 240, expected at most the 236",
             headers=binary),
        Case("binary extra", raw + b"\0" * 8, 400, "got 8 bytes past the inputs'",
             headers=binary),
        Case("binary and data", raw[:length].replace(b'"parameters"', b'"data": [1], '
             b'"parameters"') + raw[length:], 400, "got both contents.fp32_contents and raw",
             headers=(("Inference-Header-Content-Length", str(length + 13)),)),
        Case("no such route", b"", 404, "no such endpoint: POST '/v2/nothing'", "/v2/nothing"),
        Case("GET on infer", b"", 405, "method GET not allowed", INFER),
    ]  # fmt: skip
    return cases


def test_the_corpus_is_large_and_names_each_case_once(test_split: HeldOutSplit) -> None:
    names = [case.name for case in corpus(test_split.features[:2])]
    assert len(names) >= 40 and len(names) == len(set(names))


def test_every_malformed_request_gets_its_status_and_the_server_serves_on(
    server: ServerProcess, test_split: HeldOutSplit
) -> None:
    rows = test_split.features[:2]
    for case in corpus(rows):
        method = "GET" if case.name == "GET on infer" else "POST"
        reply = call(server.rest_url, method, case.path, case.body, dict(case.headers), TOKEN)
        assert reply.status == case.status, (case.name, reply)
        message = reply.json()["error"]
        assert case.fragment in message, (case.name, message)
        assert len(message) < 1000 and "\n" not in message, case.name
        good = call(server.rest_url, "POST", INFER, infer_body(rows), token=TOKEN)
        np.testing.assert_array_equal(reply_outputs(good)["label"], test_split.label[:2])
    log = server.log()
    assert TOKEN not in log and "Traceback" not in log
    assert max(len(line) for line in log.splitlines()) < 1500


def test_rest_and_grpc_say_the_same_about_the_same_mistake(
    server: ServerProcess, test_split: HeldOutSplit
) -> None:
    rows = test_split.features[:2]
    mistakes = {  # a JSON edit, and the same mistake in a ModelInfer request
        "width": ({"shape": [2, 29], "data": rows[:, :29].ravel().tolist()},
                  lambda r: (r.inputs[0].shape.__setitem__(1, 29),
                             r.raw_input_contents.__setitem__(0, rows[:, :29].tobytes()))),
        "datatype": ({"datatype": "INT64"}, lambda r: setattr(r.inputs[0], "datatype", "INT64")),
        "name": ({"name": "x"}, lambda r: setattr(r.inputs[0], "name", "x")),
        "batch": ({"shape": [65, 30]}, lambda r: r.inputs[0].shape.__setitem__(0, 65)),
    }  # fmt: skip
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for name, (fields, edit) in mistakes.items():
            body = infer_body(rows)
            body["inputs"][0].update(fields)
            rest = call(server.rest_url, "POST", INFER, body, token=TOKEN).json()["error"]
            request = infer_request(rows)
            edit(request)
            with pytest.raises(grpc.RpcError) as raised:
                stub.ModelInfer(request, timeout=10, metadata=GOOD)
            assert rest == raised.value.details(), name


# ---------------------------------------------------------------- properties of parsing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=5),
    max_leaves=40,
)  # fmt: skip
tensors = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["features", "t0", "x"]) | json_values,
        "datatype": st.sampled_from(["FP32", "BYTES", "INT64", "BOOL"]) | json_values,
        "shape": st.lists(st.integers(-2, 4), max_size=3) | json_values,
        "data": st.lists(st.floats() | st.text(max_size=5) | st.none(), max_size=12) | json_values,
        "parameters": st.fixed_dictionaries({"binary_data_size": st.integers(-1, 20)})
        | json_values,
    },
)
documents = st.fixed_dictionaries(
    {},
    optional={
        "inputs": st.lists(tensors, max_size=3) | json_values,
        "outputs": st.lists(st.fixed_dictionaries({"name": json_values}), max_size=2) | json_values,
        "id": json_values,
        "parameters": json_values,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents, st.binary(max_size=40), st.booleans())
def test_parsing_random_documents_only_ever_refuses_with_invalid_request(
    document: dict[str, Any], binary: bytes, with_binary: bool
) -> None:
    header = json.dumps(document).encode()
    body = header + binary if with_binary else header
    specs = (TensorSpec("features", "FP32", (-1, 2)), TensorSpec("t0", "BYTES", (-1, 1)))
    try:
        request = parse_infer(body, len(header) if with_binary else None)
        decoded = codec_for(specs).decode(request_of(request))
    except InvalidRequestError as err:
        assert len(str(err)) < 1000 and "\n" not in str(err)
        return
    assert decoded.inputs["features"].shape[1:] == (2,)


def test_json_text_and_typed_values_reach_the_codec_by_field() -> None:
    specs = (TensorSpec("features", "FP32", (-1, 2)), TensorSpec("t0", "BYTES", (-1, 1)))
    body = {"inputs": [
        {"name": "features", "datatype": "FP32", "shape": [2, 2], "data": [[1, None], [3, 4.5]]},
        {"name": "t0", "datatype": "BYTES", "shape": [2, 1], "data": [" red ", "blue"]},
    ]}  # fmt: skip
    decoded = codec_for(specs).decode(request_of(parse_infer(json.dumps(body).encode(), None)))
    assert np.isnan(decoded.inputs["features"][0, 1]) and decoded.inputs["features"][1, 1] == 4.5
    assert decoded.inputs["t0"].tolist() == [["red"], ["blue"]]
    for datatype, field in (("INT64", "int64_contents"), ("BOOL", "bool_contents")):
        tensor = {"name": "n", "datatype": datatype, "shape": [1, 1], "data": [1]}
        parsed = parse_infer(json.dumps({"inputs": [tensor]}).encode(), None)
        assert dict(parsed.tensors[0].values) == {field: [1]}
    python_nan = b'{"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 2], ' \
                 b'"data": [NaN, 1]}]}'  # fmt: skip
    decoded = codec_for(specs[:1]).decode(request_of(parse_infer(python_nan, None)))
    assert np.isnan(decoded.inputs["features"][0, 0])
