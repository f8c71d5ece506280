"""Malformed requests: a corpus against a real token-protected server, then properties of decoding.

Every corpus entry must get its status code (and say why), and the server must then answer a
normal call correctly. Property tests throw random shapes, datatypes and bytes at the decoder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import MODEL_NAME, HeldOutSplit, ServerProcess, infer_request, outputs
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tolerances import PROBABILITY

from stablemlp.protos import grpc_service_pb2 as pb
from stablemlp.protos import grpc_service_pb2_grpc as pb_grpc
from stablemlp.serving.codec import Codec
from stablemlp.serving.datatypes import DTYPES
from stablemlp.serving.errors import CLIP_CHARS, InvalidRequestError
from stablemlp.serving.grpc.bounds import check_infer_bytes
from stablemlp.serving.grpc.wire import request_of
from stablemlp.serving.manifest import FileEntry, Manifest, TensorSpec
from stablemlp.serving.protowire import WireError

TOKEN = "corpus-token-0123456789"
CONTROL_TOKEN = "corpus-control-token-42"
GOOD = (("authorization", f"Bearer {TOKEN}"),)
CONTROL = (("authorization", f"Bearer {CONTROL_TOKEN}"),)
MAX_BATCH = 64
MAX_MESSAGE = 64 * 1024
TIMEOUT = 10.0
BAD, MISSING = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
REFUSED = grpc.StatusCode.FAILED_PRECONDITION
DENIED, TOO_BIG = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED
LONG = "x" * 50_000  # a client string far over any cap (and under the message limit)
CLIPPED = f"... ({len(LONG)} chars)"


@pytest.fixture(scope="module")
def server(
    model_repository: Path, start_server: Callable[..., Any], test_split: HeldOutSplit
) -> Iterator[ServerProcess]:
    args = ["--max-batch-size", str(MAX_BATCH), "--max-message-bytes", str(MAX_MESSAGE)]
    args += ["--model-control-mode", "explicit"]  # so load/unload reach the name checks
    env = {"STABLEMLP_AUTH_TOKEN": TOKEN, "STABLEMLP_CONTROL_TOKEN": CONTROL_TOKEN}
    with start_server(model_repository, *args, env=env) as running:
        yield running


@dataclass(frozen=True)
class Case:
    name: str
    rpc: str  # a GRPCInferenceService method
    request: Any  # a message, or bytes sent as they are
    code: grpc.StatusCode
    fragment: str  # in the status details
    metadata: tuple[tuple[str, str], ...] = GOOD


def _edited(rows: np.ndarray, edit: Callable[[pb.ModelInferRequest], object]) -> Any:
    request = infer_request(rows)
    edit(request)
    return request


def _shape(*dims: int) -> Callable[[pb.ModelInferRequest], object]:
    def edit(request: pb.ModelInferRequest) -> None:
        del request.inputs[0].shape[:]
        request.inputs[0].shape.extend(dims)

    return edit


def _set(**fields: Any) -> Callable[[pb.ModelInferRequest], object]:
    def edit(request: pb.ModelInferRequest) -> None:
        for name, value in fields.items():
            setattr(request.inputs[0] if name in ("name", "datatype") else request, name, value)

    return edit


def _raw(data: bytes) -> Callable[[pb.ModelInferRequest], object]:
    def edit(request: pb.ModelInferRequest) -> None:
        request.raw_input_contents[0] = data

    return edit


def _contents(values: list[float], field: str = "fp32_contents") -> Any:
    def edit(request: pb.ModelInferRequest) -> None:
        del request.raw_input_contents[:]
        getattr(request.inputs[0].contents, field).extend(values)

    return edit


def _outputs(*names: str) -> Callable[[pb.ModelInferRequest], object]:
    return lambda request: [request.outputs.add(name=name) for name in names]


def _unknown_contents_field(request: pb.ModelInferRequest) -> None:
    """Issue 12.6: the tensor's bytes under an unknown field 9 of contents, fp32_contents empty."""
    data = request.raw_input_contents[0]
    del request.raw_input_contents[:]
    length = bytes([len(data) & 0x7F | 0x80, len(data) >> 7])  # a 2-byte varint (128..16383)
    request.inputs[0].contents.MergeFromString(b"\x4a" + length + data)


def _length_delimited(data: bytes) -> bytes:
    """Field 5 (inputs of a request, contents of an input), length-delimited, encoded by hand."""
    length, head = len(data), bytearray(b"\x2a")
    while length >= 0x80:
        head.append(length & 0x7F | 0x80)
        length >>= 7
    return bytes([*head, length]) + data


def _contents_in_parts(rows: np.ndarray) -> bytes:
    """Issue 23.2: contents sent as many small fields, which protobuf merges into one."""
    tensor = pb.ModelInferRequest.InferInputTensor(name="features", datatype="FP32",
                                                   shape=rows.shape)  # fmt: skip
    part = _length_delimited(pb.InferTensorContents(int64_contents=[1] * 1000).SerializeToString())
    request = pb.ModelInferRequest(model_name=MODEL_NAME).SerializeToString()
    return request + _length_delimited(tensor.SerializeToString() + part * 20)


def _parameters(
    where: Callable[[pb.ModelInferRequest], Any], count: int, key: str = ""
) -> Callable[[pb.ModelInferRequest], object]:
    def edit(request: pb.ModelInferRequest) -> None:
        parameters = where(request)
        for i in range(count):
            parameters[key or f"p{i}"].bool_param = True

    return edit


def _unknown_varint_field(request: pb.ModelInferRequest) -> None:
    del request.raw_input_contents[:]
    request.inputs[0].contents.MergeFromString(b"\x48\x96\x01")  # field 9, a varint


def corpus(rows: np.ndarray) -> list[Case]:
    """Two valid rows broken in every way the protocol allows, then the other RPCs' mistakes."""
    random = np.random.default_rng(7)
    infinite = rows.copy()
    infinite[1, 3] = np.inf
    negative = rows.copy()
    negative[0, 0] = -np.inf
    size = rows.size * 4
    infer = [
        ("+inf", infer_request(infinite), BAD, "got inf, expected a finite number"),
        ("-inf contents", infer_request(negative, raw=False), BAD, "index [0, 0]: got -inf"),
        ("input name", _edited(rows, _set(name="x")), BAD, "inputs[0].name: got 'x'"),
        ("empty input name", _edited(rows, _set(name="")), BAD, "inputs[0].name: got ''"),
        ("long input name", _edited(rows, _set(name=LONG)), BAD, CLIPPED),
        ("duplicate input", _edited(rows, lambda r: r.inputs.append(r.inputs[0])), BAD,
         "inputs[1]"),
        ("no inputs", pb.ModelInferRequest(model_name=MODEL_NAME), BAD, "missing 'features'"),
        ("FP16", _edited(rows, _set(datatype="FP16")), BAD, "datatype: got 'FP16'"),
        ("BYTES", _edited(rows, _set(datatype="BYTES")), BAD, "expected 'FP32'"),
        ("no datatype", _edited(rows, _set(datatype="")), BAD, "datatype: got ''"),
        ("long datatype", _edited(rows, _set(datatype=LONG)), BAD, CLIPPED),
        ("control chars", _edited(rows, _set(datatype="FP\n32\x00")), BAD, "got 'FP\\n32\\x00'"),
        ("rank 1", _edited(rows, _shape(60)), BAD, "got [60] (rank 1), expected rank 2"),
        ("rank 3", _edited(rows, _shape(2, 30, 1)), BAD, "(rank 3), expected rank 2"),
        ("rank 32", _edited(rows, _shape(*[1] * 32)), BAD, "... (32 items)] (rank 32)"),
        ("rank 10000", _edited(rows, _shape(*[1] * 10_000)), BAD,
         "inputs[0].shape: got more than 32 dimensions, expected at most 32"),
        ("no shape", _edited(rows, _shape()), BAD, "got [] (rank 0)"),
        ("29 features", infer_request(rows[:, :29]), BAD, "shape[1]: got 29, expected 30"),
        ("31 features", _edited(rows, _shape(2, 31)), BAD, "shape[1]: got 31, expected 30"),
        ("negative batch", _edited(rows, _shape(-1, 30)), BAD, "(batch size): got -1"),
        ("negative dim", _edited(rows, _shape(2, -30)), BAD, "shape[1]: got -30"),
        ("zero batch", infer_request(rows[:0]), BAD, "(batch size): got 0"),
        ("batch limit", infer_request(np.zeros((MAX_BATCH + 1, 30), np.float32)), BAD,
         f"got {MAX_BATCH + 1}, expected 1..{MAX_BATCH}"),
        ("huge batch", _edited(rows, _shape(2**62, 30)), BAD, f"got {2**62}, expected 1..64"),
        ("huge dim", _edited(rows, _shape(2, 2**62)), BAD, f"shape[1]: got {2**62}"),
        ("max int64", _edited(rows, _shape(2**63 - 1, 2**63 - 1)), BAD, "shape[1]"),
        ("short raw", _edited(rows, _raw(b"\0" * (size - 4))), BAD, f"expected {size}"),
        ("long raw", _edited(rows, _raw(b"\0" * (size + 4))), BAD, f"got {size + 4} bytes"),
        ("random raw", _edited(rows, _raw(random.bytes(101))), BAD, "got 101 bytes"),
        ("empty raw", _edited(rows, _raw(b"")), BAD, "got 0 bytes"),
        ("two raw", _edited(rows, lambda r: r.raw_input_contents.append(b"")), BAD, "2 entries"),
        ("both forms", _edited(rows, lambda r: r.inputs[0].contents.fp32_contents.append(1)),
         BAD, "got both contents.fp32_contents and raw_input_contents"),
        ("int contents", _edited(rows, _contents([1] * 60, "int_contents")), BAD,
         "got int_contents, expected fp32_contents"),
        ("short contents", _edited(rows, _contents([0.5] * 59)), BAD, "got 59 elements"),
        ("long contents", _edited(rows, _contents([0.5] * 61)), BAD, "got 61 elements"),
        ("no contents", _edited(rows, _contents([])), BAD, "got 0 elements, expected 60"),
        ("output name", _edited(rows, _outputs("score")), BAD, "outputs[0].name: got 'score'"),
        ("output twice", _edited(rows, _outputs("label", "label")), BAD, "twice"),
        ("long output", _edited(rows, _outputs(LONG)), BAD, CLIPPED),
        ("garbage message", random.bytes(64), BAD, "not a valid inference.ModelInferRequest"),
        ("truncated message", infer_request(rows).SerializeToString()[:-7], BAD, "not a valid"),
        ("unknown model", _edited(rows, _set(model_name="nope")), MISSING, "model 'nope'"),
        ("no model", _edited(rows, _set(model_name="")), MISSING, "model '': not found"),
        ("long model", _edited(rows, _set(model_name=LONG)), MISSING, CLIPPED),
        ("forged log line", _edited(rows, _set(model_name="m\nINFO forged")), MISSING, "m\\nINFO"),
        ("version 9", _edited(rows, _set(model_version="9")), MISSING,
         "got '9', expected one of [1]"),
        ("version 0", _edited(rows, _set(model_version="0")), MISSING, "got '0'"),
        ("version -1", _edited(rows, _set(model_version="-1")), MISSING, "got '-1'"),
        ("version 01", _edited(rows, _set(model_version="01")), MISSING, "got '01'"),
        ("version text", _edited(rows, _set(model_version="latest")), MISSING, "got 'latest'"),
        ("version superscript", _edited(rows, _set(model_version="\u00b2")), MISSING,
         "got '\u00b2'"),
        ("version arabic digit", _edited(rows, _set(model_version="\u0661")), MISSING, "got"),
        ("version fullwidth", _edited(rows, _set(model_version="\uff11")), MISSING, "got"),
        ("version 1 superscript", _edited(rows, _set(model_version="1\u00b2")), MISSING, "got"),
        ("version overflow", _edited(rows, _set(model_version="9" * 40)), MISSING, "got '999"),
        ("version long", _edited(rows, _set(model_version=LONG)), MISSING, CLIPPED),
        ("unknown contents field", _edited(rows, _unknown_contents_field), BAD,
         "got 0 elements, expected 60"),
        ("unknown varint field", _edited(rows, _unknown_varint_field), BAD, "got 0 elements"),
        ("over size limit", infer_request(np.zeros((600, 30), np.float32)), TOO_BIG,
         "larger than max"),
        # Issue 23.2: entries bounded on the bytes, before protobuf builds them.
        ("2000 empty inputs", _edited(rows, lambda r: [r.inputs.add() for _ in range(2000)]),
         BAD, "inputs: got more than 1024 entries, expected at most 1024"),
        ("2000 empty outputs", _edited(rows, lambda r: [r.outputs.add() for _ in range(2000)]),
         BAD, "outputs: got more than 1024 entries, expected at most 1024"),
        ("2000 raw entries", _edited(rows, lambda r: r.raw_input_contents.extend([b""] * 2000)),
         BAD, "raw_input_contents: got more than 1024 entries, expected at most 1024"),
        ("65 parameters", _edited(rows, _parameters(lambda r: r.parameters, 65)), BAD,
         "parameters: got more than 64 entries, expected at most 64"),
        ("65 input parameters", _edited(rows, _parameters(lambda r: r.inputs[0].parameters, 65)),
         BAD, "inputs[0].parameters: got more than 64 entries, expected at most 64"),
        ("65 output parameters",
         _edited(rows, _parameters(lambda r: r.outputs.add(name="label").parameters, 65)),
         BAD, "outputs[0].parameters: got more than 64 entries, expected at most 64"),
        ("20000 empty strings", _edited(rows, _contents([b""] * 20_000, "bytes_contents")), BAD,
         "inputs[0].contents: got more than 16384 values, expected at most 16384"),
        ("20000 packed int64", _edited(rows, _contents([1] * 20_000, "int64_contents")), BAD,
         "inputs[0].contents: got more than 16384 values"),
        ("contents sent in parts", _contents_in_parts(rows), BAD,
         "inputs[0].contents: got more than 16384 values"),
        ("long parameter key", _edited(rows, _parameters(lambda r: r.parameters, 1, "k" * 129)),
         BAD, "parameters key: got 129 bytes, expected at most 128"),
        ("long parameter value",
         _edited(rows, lambda r: r.parameters["note"].MergeFrom(pb.InferParameter(
             string_param="v" * 5000))),
         BAD, "parameters['note'] value: got 5003 bytes, expected at most 4096"),
    ]  # fmt: skip
    cases = [Case(name, "ModelInfer", request, code, text) for name, request, code, text in infer]
    valid, model = infer_request(rows), MODEL_NAME
    wrong = {"wrong token": "Bearer nope", "basic scheme": f"Basic {TOKEN}", "bare token": TOKEN,
             "token prefix": f"Bearer {TOKEN[:-1]}"}  # fmt: skip
    for name, value in wrong.items():
        cases.append(Case(name, "ModelInfer", valid, DENIED, "token", (("authorization", value),)))
    cases += [
        Case("no token", "ModelInfer", valid, DENIED, "missing or wrong token", ()),
        Case("two tokens", "ModelInfer", valid, DENIED, "token", (*GOOD, *GOOD)),
        Case("metadata, no token", "ModelMetadata", pb.ModelMetadataRequest(name=model), DENIED,
             "token", ()),
        Case("load, no token", "RepositoryModelLoad", _load(model), DENIED, "control token", ()),
        Case("load, inference token", "RepositoryModelLoad", _load(model), DENIED,
             "control token", GOOD),
        Case("unload, inference token", "RepositoryModelUnload",
             pb.RepositoryModelUnloadRequest(model_name=model), DENIED, "control token", GOOD),
        Case("metadata of nope", "ModelMetadata", pb.ModelMetadataRequest(name="nope"), MISSING,
             "model 'nope'"),
        Case("metadata version", "ModelMetadata", pb.ModelMetadataRequest(name=model, version="7"),
             MISSING, "got '7'"),
        Case("config of nope", "ModelConfig", pb.ModelConfigRequest(name="nope"), MISSING,
             "'nope'"),
        Case("statistics of nope", "ModelStatistics", pb.ModelStatisticsRequest(name="nope"),
             MISSING, "'nope'"),
        Case("statistics version", "ModelStatistics",
             pb.ModelStatisticsRequest(name=model, version="x"), MISSING, "got 'x'"),
        Case("load nope", "RepositoryModelLoad", _load("nope"), MISSING,
             "'nope': not found in the repository", CONTROL),
        Case("load ../", "RepositoryModelLoad", _load("../x"), MISSING, "not found", CONTROL),
        Case("load hidden", "RepositoryModelLoad", _load(".."), MISSING, "not found", CONTROL),
        Case("load long name", "RepositoryModelLoad", _load(LONG), MISSING, CLIPPED, CONTROL),
        Case("load superscript", "RepositoryModelLoad", _load("\u00b2"), MISSING, "not found",
             CONTROL),
        Case("load NUL", "RepositoryModelLoad", _load("a\x00b"), MISSING, "a\\x00b", CONTROL),
        Case("load with files", "RepositoryModelLoad", _load(model, file=b"\x08\x07"), BAD,
             "expected none (models load from the repository folder only)", CONTROL),
        Case("unload nope", "RepositoryModelUnload",
             pb.RepositoryModelUnloadRequest(model_name="nope"), MISSING, "'nope'", CONTROL),
        Case("unload long name", "RepositoryModelUnload",
             pb.RepositoryModelUnloadRequest(model_name=LONG), MISSING, CLIPPED, CONTROL),
        Case("config version superscript", "ModelConfig",
             pb.ModelConfigRequest(name=model, version="\u00b2"), MISSING, "got '\u00b2'"),
        Case("statistics superscript", "ModelStatistics",
             pb.ModelStatisticsRequest(name=model, version="\u00b2"), MISSING, "got"),
        Case("metadata superscript", "ModelMetadata",
             pb.ModelMetadataRequest(name=model, version="\u00b2"), MISSING, "got"),
        Case("garbage metadata", "ModelMetadata", b"\xff" * 9, BAD,
             "not a valid inference.ModelMetadataRequest"),
    ]  # fmt: skip
    return cases


def _load(model: str, file: bytes = b"") -> pb.RepositoryModelLoadRequest:
    request = pb.RepositoryModelLoadRequest(model_name=model)
    if file:  # Triton's way to upload a model file with the load
        request.parameters["file:1/model.onnx"].bytes_param = file
    return request


def test_the_corpus_is_large_and_names_each_case_once(test_split: HeldOutSplit) -> None:
    names = [case.name for case in corpus(test_split.features[:2])]
    assert len(names) >= 40 and len(names) == len(set(names))


def test_every_malformed_request_gets_its_code_and_the_server_serves_on(
    server: ServerProcess, test_split: HeldOutSplit
) -> None:
    rows = test_split.features[:2]
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for case in corpus(rows):
            path = f"/inference.GRPCInferenceService/{case.rpc}"
            call = channel.unary_unary(path, response_deserializer=lambda data: data)
            payload = (
                case.request
                if isinstance(case.request, bytes)
                else case.request.SerializeToString()
            )
            with pytest.raises(grpc.RpcError) as raised:
                call(payload, timeout=TIMEOUT, metadata=case.metadata or None)
            details = raised.value.details() or ""
            assert raised.value.code() == case.code, (case.name, details)
            assert case.fragment in details, (case.name, details)
            assert len(details) < 1000, case.name  # client text is clipped, not echoed whole
            reply = stub.ModelInfer(infer_request(rows), timeout=TIMEOUT, metadata=GOOD)
            np.testing.assert_allclose(
                outputs(reply)["probability"], test_split.probability[:2], rtol=0, atol=PROBABILITY
            )
    log = server.log()
    assert TOKEN not in log
    assert "forged" not in "".join(line for line in log.splitlines() if line.startswith("INFO"))
    assert max(len(line) for line in log.splitlines()) < 1500
    assert "Traceback" not in log


def test_requests_at_the_entry_bounds_are_answered(
    server: ServerProcess, test_split: HeldOutSplit
) -> None:
    """64 parameters (the bound) on the request, its input and each output, keys of 128 bytes,
    a 4,096-byte string value, rank 32 refused only by the contract: served as before."""
    rows = test_split.features[:2]
    request = infer_request(rows)
    for i, parameters in enumerate((request.parameters, request.inputs[0].parameters)):
        for j in range(63):
            parameters[f"{i}-{j}".ljust(128, "k")].int64_param = j
        parameters["note"].string_param = "v" * 4096
    for name in ("probability", "label"):
        wanted = request.outputs.add(name=name)
        for j in range(64):
            wanted.parameters[f"o{j}"].bool_param = False
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        reply = stub.ModelInfer(request, timeout=TIMEOUT, metadata=GOOD)
    np.testing.assert_allclose(
        outputs(reply)["probability"], test_split.probability[:2], rtol=0, atol=PROBABILITY
    )


def test_random_bytes_of_the_right_length_are_a_valid_request(
    server: ServerProcess, test_split: HeldOutSplit
) -> None:
    """Any 4 bytes are a float32: NaN is 'missing', infinities are refused, the rest is scored."""
    rng = np.random.default_rng(3)
    codes = set()
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(20):
            request = infer_request(test_split.features[:2])
            request.raw_input_contents[0] = rng.bytes(2 * 30 * 4)
            try:
                reply = stub.ModelInfer(request, timeout=TIMEOUT, metadata=GOOD)
            except grpc.RpcError as err:
                assert err.code() == BAD and "expected a finite number or NaN" in err.details()
                codes.add(err.code())
                continue
            assert outputs(reply)["label"].shape == (2, 1)
            codes.add(grpc.StatusCode.OK)
    assert grpc.StatusCode.OK in codes


def test_health_needs_no_token_but_reflection_does(server: ServerProcess) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(server.address) as channel:
        check = health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
        assert health_pb2_grpc.HealthStub(channel).Check(check, timeout=TIMEOUT).status == 1
        with pytest.raises(grpc.RpcError) as raised:
            ProtoReflectionDescriptorDatabase(channel).get_services()
        assert raised.value.code() == DENIED


# ---------------------------------------------------------------- properties of decoding

names = st.sampled_from(["features", "color", "x", "", "probability"]) | st.text(max_size=300)
datatypes = st.sampled_from(["FP32", "BYTES", "INT64", "FP16", ""]) | st.text(max_size=300)
dims = st.integers(-3, 6) | st.sampled_from([2**31, 2**62, 2**63 - 1, -(2**63)])
CONTENT_FIELDS = ["fp32_contents", "bytes_contents", "int64_contents", "int_contents"]


@st.composite
def specs(draw: st.DrawFn) -> tuple[TensorSpec, ...]:
    """What the manifest contract allows: an FP32 matrix, text columns, or both."""
    numeric = (TensorSpec("features", "FP32", (-1, draw(st.integers(1, 4)))),)
    text = tuple(TensorSpec(f"t{i}", "BYTES", (-1, 1)) for i in range(draw(st.integers(0, 2))))
    return numeric + text if text and draw(st.booleans()) else text or numeric


@st.composite
def requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(
            name=draw(names | st.sampled_from(["t0", "t1"])),
            datatype=draw(datatypes),
            shape=draw(st.lists(dims, max_size=4)),
        )
        if draw(st.booleans()):
            request.raw_input_contents.append(draw(st.binary(max_size=200)))
        else:
            field = draw(st.sampled_from(CONTENT_FIELDS))
            if field == "bytes_contents":
                values: list[Any] = draw(st.lists(st.binary(max_size=40), max_size=10))
            else:
                values = draw(st.lists(st.integers(0, 1), max_size=40))
            getattr(tensor.contents, field).extend(values)
    for name in draw(st.lists(names, max_size=3)):
        request.outputs.add(name=name)
    return request


OUTPUTS = (TensorSpec("probability", "FP32", (-1, 1)), TensorSpec("label", "INT64", (-1, 1)))


def codec_for(inputs: tuple[TensorSpec, ...]) -> Codec:
    numeric = [spec for spec in inputs if spec.datatype == "FP32"]
    manifest = Manifest(
        model_name="m", version=1, created_utc="2026-01-01T00:00:00Z", opset=18,
        max_batch_size=MAX_BATCH, inputs=inputs, outputs=OUTPUTS,
        feature_names=tuple(f"f{i}" for i in range(numeric[0].width if numeric else 0)),
        threshold=0.5, files={"model.onnx": FileEntry("0" * 64, 1)},
    )  # fmt: skip
    return Codec(manifest, MAX_BATCH, "m", "1")


def _decode_or_refuse(request: pb.ModelInferRequest, inputs: tuple[TensorSpec, ...]) -> None:
    try:
        decoded = codec_for(inputs).decode(request_of(request))
    except InvalidRequestError as err:
        assert len(str(err)) < 4 * CLIP_CHARS + 400  # bounded, whatever the client sent
        assert "\n" not in str(err)
        return
    for spec in inputs:
        array = decoded.inputs[spec.name]
        assert array.dtype == DTYPES[spec.datatype]
        assert array.shape[1:] == spec.shape[1:] and 1 <= array.shape[0] <= MAX_BATCH


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), specs())
def test_decoding_random_requests_only_ever_refuses_with_invalid_request(
    request: pb.ModelInferRequest, inputs: tuple[TensorSpec, ...]
) -> None:
    _decode_or_refuse(request, inputs)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), specs())
def test_decoding_random_bytes_only_ever_refuses(
    data: bytes, inputs: tuple[TensorSpec, ...]
) -> None:
    """The path garbage takes: the bounds on its bytes, parse (DecodeError and WireError are
    turned into INVALID_ARGUMENT), then decode. Bytes protobuf parses are never called garbage by
    the bounds' wire reader."""
    try:
        request = pb.ModelInferRequest.FromString(data)
    except DecodeError:
        request = None
    try:
        check_infer_bytes(data, max_values=64)
    except InvalidRequestError:
        pass
    except WireError:
        assert request is None, data
    if request is not None:
        _decode_or_refuse(request, inputs)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_the_bounds_count_the_values_protobuf_builds(data: st.DataObject) -> None:
    """An input's contents values, in any field and form, counted on the wire as protobuf counts
    them: refused one past the bound, accepted at it."""
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    for field in data.draw(
        st.lists(st.sampled_from(sorted(_CONTENTS_VALUES)), min_size=1, max_size=3)
    ):
        values = _CONTENTS_VALUES[field]
        getattr(tensor.contents, field).extend(values * data.draw(st.integers(1, 40)))
    request.parameters["p"].string_param = "v"
    request.outputs.add(name="y").parameters["q"].int64_param = -1
    encoded = request.SerializeToString()
    total = sum(len(values) for _, values in tensor.contents.ListFields())
    check_infer_bytes(encoded, max_values=total)
    with pytest.raises(InvalidRequestError, match=r"^inputs\[0\]\.contents: got more than"):
        check_infer_bytes(encoded, max_values=total - 1)


_CONTENTS_VALUES: dict[str, list[Any]] = {
    "bool_contents": [True, False], "int_contents": [1, -1], "int64_contents": [2**40, 0],
    "uint_contents": [7], "uint64_contents": [2**63], "fp32_contents": [0.5],
    "fp64_contents": [1e300], "bytes_contents": [b"", b"x" * 300],
}  # fmt: skip


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_well_formed_numeric_requests_decode_exactly(data: st.DataObject) -> None:
    width, rows = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 5))
    spec = TensorSpec("features", "FP32", (-1, width))
    size = 4 * rows * width
    array = np.frombuffer(data.draw(st.binary(min_size=size, max_size=size)), "<f4")
    array = array.reshape((rows, width))
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name=spec.name, datatype=spec.datatype, shape=array.shape)
    request.raw_input_contents.append(array.tobytes())
    try:
        decoded = codec_for((spec,)).decode(request_of(request))
    except InvalidRequestError as err:
        assert np.isinf(array).any(), err  # the only refusal
        return
    assert decoded.inputs[spec.name].tobytes() == array.tobytes()


def test_clipped_text_has_no_line_breaks() -> None:
    from stablemlp.serving.errors import clip

    assert clip("a\nb\r\x00") == "a\\nb\\r\\x00"
    assert clip(LONG) == "x" * CLIP_CHARS + CLIPPED
