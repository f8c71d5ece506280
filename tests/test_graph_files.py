"""A model.onnx cannot make the server read a file (ONNX external data, file-path attributes):
the attack first (ONNX Runtime alone serves a file's bytes as weights), then every place a tensor
or a file-naming node can hide, at load (no torch, no onnx: serving/runtime/graph_files.py) and in
`stablemlp verify`."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import MODEL_NAME, cpu_repository, publish_onnx
from onnx import TensorProto, helper

from stablemlp.export.cli import verify_main
from stablemlp.serving.errors import ContractError, ModelLoadError
from stablemlp.serving.runtime.graph_files import refuse_file_references

SECRET = b"\x01\x02\x03\x04\x05\x06\x07\x08 and the rest of the file"


def _external(name: str, location: str, length: int = 8) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.UINT8, dims=[length])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def _leaking_model(secret: TensorProto | None = None) -> onnx.ModelProto:
    """features [N,30] -> probability [N,1] = the sum of the 8 bytes of `secret`, label its int.
    It honours the serving contract, so only the file reference can refuse it."""
    nodes = [
        helper.make_node("Cast", ["secret"], ["s"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["s"], ["total"], keepdims=1),
        helper.make_node("Shape", ["features"], ["rows"], start=0, end=1),
        helper.make_node("Concat", ["rows", "one"], ["shape"], axis=0),
        helper.make_node("Expand", ["total", "shape"], ["probability"]),
        helper.make_node("Cast", ["probability"], ["label"], to=TensorProto.INT64),
    ]
    graph = helper.make_graph(
        nodes,
        "leak",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 30])],
        [
            helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N", 1]),
        ],
        [
            secret if secret is not None else _external("secret", "secret.txt"),
            helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def test_a_relative_external_data_location_is_refused_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "secret.txt").write_bytes(SECRET)
    model = _leaking_model()
    monkeypatch.chdir(tmp_path)  # the server's working directory: `/` in an image without one
    # The attack: a session made from the bytes reads the file relative to the working directory.
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (leaked,) = session.run(["probability"], {"features": np.zeros((1, 30), np.float32)})
    assert leaked[0, 0] == sum(SECRET[:8])

    publish_onnx(tmp_path / "repo", "leak", model)
    repository = cpu_repository(tmp_path / "repo")
    with pytest.raises(ContractError, match="initializer 'secret': its data is in an external"):
        repository.load_all()
    ((name, version, state, reason),) = repository.index()
    assert (name, version, state) == ("leak", "1", "UNAVAILABLE")
    assert "external file" in reason


def _subgraph(tensor: TensorProto) -> onnx.GraphProto:
    out = helper.make_tensor_value_info("y", TensorProto.UINT8, [8])
    return helper.make_graph([helper.make_node("Identity", [tensor.name], ["y"])], "b", [], [out],
                             [tensor])  # fmt: skip


def _with_node(node: onnx.NodeProto) -> onnx.ModelProto:
    model = _leaking_model(helper.make_tensor("secret", TensorProto.UINT8, [8], list(range(8))))
    model.graph.node.append(node)
    return model


def _sparse_initializer() -> onnx.ModelProto:
    model = _leaking_model(helper.make_tensor("secret", TensorProto.UINT8, [8], list(range(8))))
    indices = helper.make_tensor("i", TensorProto.INT64, [1], [0])
    model.graph.sparse_initializer.append(
        helper.make_sparse_tensor(_external("sparse", "secret.txt", 1), indices, [8])
    )
    return model


def _in_function() -> onnx.ModelProto:
    model = _leaking_model(helper.make_tensor("secret", TensorProto.UINT8, [8], list(range(8))))
    constant = helper.make_node("Constant", [], ["c"], value=_external("c", "secret.txt"))
    model.functions.append(
        helper.make_function("local", "f", [], ["c"], [constant], [helper.make_opsetid("", 18)])
    )
    return model


def _if_node() -> onnx.ModelProto:
    inline = helper.make_tensor("e", TensorProto.UINT8, [8], [0] * 8)
    return _with_node(helper.make_node("If", ["cond"], ["y"], else_branch=_subgraph(inline),
                                       then_branch=_subgraph(_external("t", "s.txt"))))  # fmt: skip


def _ep_context() -> onnx.ModelProto:
    """ONNX Runtime's EPContext node reads `ep_cache_context` as a file path (embed_mode 0)."""
    return _with_node(helper.make_node("EPContext", [], ["c"], domain="com.microsoft",
                                       embed_mode=0, ep_cache_context="secret.txt"))  # fmt: skip


def _memory_address() -> onnx.ModelProto:
    return _leaking_model(_external("secret", "*/_ORT_MEM_ADDR_/*"))


def _without_data_location() -> onnx.ModelProto:
    secret = _external("secret", "secret.txt")
    secret.ClearField("data_location")  # external_data entries alone still name the file
    return _leaking_model(secret)


HIDING_PLACES: dict[str, tuple[Callable[[], onnx.ModelProto], str]] = {
    "initializer": (_leaking_model, "graph initializer 'secret'"),
    "external_data without data_location": (_without_data_location, "initializer 'secret'"),
    "memory address": (_memory_address, "initializer 'secret'"),
    "sparse initializer": (_sparse_initializer, "sparse_initializer 'sparse'"),
    "Constant attribute": (
        lambda: _with_node(helper.make_node("Constant", [], ["c"], value=_external("c", "s.txt"))),
        "node Constant attribute 'c'",
    ),
    "If subgraph": (_if_node, "node If subgraph initializer 't'"),
    "local function": (_in_function, "functions node Constant attribute 'c'"),
    "EPContext node": (_ep_context, "operator 'com.microsoft:EPContext' is not allowed"),
    "custom operator": (
        lambda: _with_node(helper.make_node("ReadFile", [], ["c"], domain="ai.example")),
        "operator 'ai.example:ReadFile' is not allowed",
    ),
}


@pytest.mark.parametrize("place", sorted(HIDING_PLACES))
def test_every_place_a_file_reference_can_hide_is_refused(place: str) -> None:
    build, where = HIDING_PLACES[place]
    with pytest.raises(ContractError, match=where):
        refuse_file_references(build().SerializeToString())


def test_graphs_that_name_no_file_pass(model_repository: Path) -> None:
    refuse_file_references((model_repository / MODEL_NAME / "1" / "model.onnx").read_bytes())
    inline = _leaking_model(helper.make_tensor("secret", TensorProto.UINT8, [8], list(range(8))))
    inline.functions.append(  # a node may call the model's own functions
        helper.make_function("local", "f", [], ["c"], [], [helper.make_opsetid("", 18)])
    )
    inline.graph.node.append(helper.make_node("f", [], ["c"], domain="local"))
    refuse_file_references(inline.SerializeToString())
    with pytest.raises(ContractError, match="not an ONNX protobuf"):
        refuse_file_references(b"\x0a\xff")  # a length past the end


def test_verify_refuses_external_data_that_the_onnx_checker_accepts(
    model_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repository = Path(shutil.copytree(model_repository, tmp_path / "repo"))
    version = repository / MODEL_NAME / "1"
    graph = onnx.load(str(version / "model.onnx"))
    onnx.save_model(graph, str(version / "model.onnx"), save_as_external_data=True,
                    location="weights.bin", size_threshold=0)  # fmt: skip
    onnx.checker.check_model(str(version / "model.onnx"))  # the checker has no objection
    manifest = json.loads((version / "manifest.json").read_text())
    data = (version / "model.onnx").read_bytes()
    manifest["files"]["model.onnx"] = {"sha256": hashlib.sha256(data).hexdigest(),
                                       "bytes": len(data)}  # fmt: skip
    (version / "manifest.json").write_text(json.dumps(manifest))
    assert verify_main([str(repository)]) == 1
    assert "its data is in an external file" in capsys.readouterr().err
    with pytest.raises(ModelLoadError, match="its data is in an external file"):
        cpu_repository(repository).load_all()
