"""The exported repository loads in Triton: `config.pbtxt` parsed against Triton's own schema.

Triton reads `<repository>/<model>/config.pbtxt` as protobuf text of its `inference.ModelConfig`.
The strongest offline check is Triton's generated message classes, as tritonclient ships them
(`tritonclient.grpc.model_config_pb2`). tritonclient carries its own `inference.*` descriptors,
which clash with protos/ in one process, so that parse runs under `.venv-triton`'s python in a
subprocess (made by scripts/setup_triton_venv.sh; the test skips, saying so, without it). Our
copy of the schema (protos/model_config.proto) parses the same file in process, and the config is
compared with the manifest and with the ONNX graph that Triton's ONNX Runtime backend will load.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import json_format, text_format

from stablemlp.protos import model_config_pb2

ROOT = Path(__file__).resolve().parent.parent
TRITON_PYTHON = ROOT / ".venv-triton" / "bin" / "python"
CONFIG = "config.pbtxt"
# Triton's backend name for ONNX models, as export writes it into the manifest too.
PLATFORM = "onnxruntime_onnx"
ORT_TYPES = {"FP32": "tensor(float)", "INT64": "tensor(int64)"}

# Runs under .venv-triton: parse each file with Triton's classes; one JSON line per file.
TRITON_PARSE = """
import json, sys
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2
for path in sys.argv[1:]:
    try:
        config = text_format.Parse(open(path).read(), model_config_pb2.ModelConfig())
    except text_format.ParseError as err:
        print(json.dumps({"path": path, "error": str(err)}))
    else:
        fields = json_format.MessageToDict(config, preserving_proto_field_name=True)
        print(json.dumps({"path": path, "config": fields}))
"""


def model_dirs(repository: Path) -> list[Path]:
    found = sorted(p.parent for p in repository.glob(f"*/{CONFIG}"))
    assert found, f"no {CONFIG} under {repository}"
    return found


def newest_version(model_dir: Path) -> Path:
    versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(versions, key=lambda p: int(p.name))


def triton_parse(*paths: Path) -> list[dict[str, Any]]:
    if not TRITON_PYTHON.is_file():
        pytest.skip(f"{TRITON_PYTHON.relative_to(ROOT)} missing: run scripts/setup_triton_venv.sh")
    probe = subprocess.run(
        [str(TRITON_PYTHON), "-c", "import tritonclient.grpc.model_config_pb2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode != 0:
        pytest.skip(f"tritonclient does not import in .venv-triton: {probe.stderr.strip()[-300:]}")
    result = subprocess.run(
        [str(TRITON_PYTHON), "-c", TRITON_PARSE, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [json.loads(line) for line in result.stdout.splitlines()]


def check_against_manifest(config: dict[str, Any], model_dir: Path) -> None:
    """A config (as MessageToDict gives it) agrees with the manifest and the ONNX graph."""
    version = newest_version(model_dir)
    manifest = json.loads((version / "manifest.json").read_text())
    assert config["name"] == model_dir.name == manifest["model_name"]
    assert config["platform"] == PLATFORM == manifest["platform"]
    max_batch_size = int(config["max_batch_size"])
    assert max_batch_size > 0, "batching on: Triton then prepends the batch dimension itself"
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    graph = {t.name: t for t in [*session.get_inputs(), *session.get_outputs()]}
    for key, tensors in (("input", manifest["inputs"]), ("output", manifest["outputs"])):
        configured = {t["name"]: t for t in config[key]}
        assert set(configured) == {t["name"] for t in tensors}, key
        for tensor in tensors:
            entry = configured[tensor["name"]]
            assert entry["data_type"] == "TYPE_" + tensor["datatype"]
            batch, *dims = tensor["shape"]
            assert batch == -1, "the manifest's first dimension is the dynamic batch"
            # int64 fields come out of MessageToDict as strings.
            assert [int(d) for d in entry["dims"]] == dims
            onnx_tensor = graph[tensor["name"]]
            assert onnx_tensor.type == ORT_TYPES[tensor["datatype"]]
            assert onnx_tensor.shape[1:] == dims
            assert not isinstance(onnx_tensor.shape[0], int), "ONNX batch dimension is dynamic"


def test_config_parses_with_tritons_schema(model_repository: Path, tmp_path: Path) -> None:
    configs = [model_dir / CONFIG for model_dir in model_dirs(model_repository)]
    # Guard: Triton's parser must reject what Triton would reject (an unknown field here).
    broken = tmp_path / CONFIG
    broken.write_text(configs[0].read_text() + "\nmax_batch_sizes: 8\n")
    *parsed, rejected = triton_parse(*configs, broken)
    assert "error" in rejected and "max_batch_sizes" in rejected["error"]
    for config_path, result in zip(configs, parsed, strict=True):
        assert "error" not in result, f"{config_path}: {result.get('error')}"
        check_against_manifest(result["config"], config_path.parent)


def test_config_parses_with_our_copy_of_the_schema(model_repository: Path) -> None:
    for model_dir in model_dirs(model_repository):
        message = text_format.Parse(
            (model_dir / CONFIG).read_text(), model_config_pb2.ModelConfig()
        )
        config = json_format.MessageToDict(message, preserving_proto_field_name=True)
        check_against_manifest(config, model_dir)


def test_config_batch_limit_fits_the_model(model_repository: Path) -> None:
    """The largest batch the config allows runs through the exported graph."""
    for model_dir in model_dirs(model_repository):
        message = text_format.Parse(
            (model_dir / CONFIG).read_text(), model_config_pb2.ModelConfig()
        )
        version = newest_version(model_dir)
        session = ort.InferenceSession(
            str(version / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        (features,) = message.input
        rows = np.zeros((message.max_batch_size, *features.dims), dtype=np.float32)
        probability, label = session.run(None, {features.name: rows})
        assert probability.shape[0] == label.shape[0] == message.max_batch_size


def test_served_config_documents_parse_as_triton_messages() -> None:
    """serving/triton.py writes Triton's config as JSON-shaped data for both fronts; gRPC parses
    it into inference.ModelConfig, so every policy kind and datatype name must be one Triton's
    schema knows (ParseDict refuses unknown names and fields)."""
    from google.protobuf import json_format

    from stablemlp.protos import model_config_pb2 as mc
    from stablemlp.serving.datatypes import DATATYPES
    from stablemlp.serving.repository.policy import VersionPolicy
    from stablemlp.serving.triton import _version_policy

    for datatype in DATATYPES.values():
        assert mc.DataType.Value(datatype.config_name) == datatype.config_type
    policies = {
        "latest:2": lambda c: c.version_policy.latest.num_versions == 2,
        "all": lambda c: c.version_policy.WhichOneof("policy_choice") == "all",
        "specific:1,3": lambda c: list(c.version_policy.specific.versions) == [1, 3],
    }
    for text, holds in policies.items():
        document = {"version_policy": _version_policy(VersionPolicy.parse(text))}
        assert holds(json_format.ParseDict(document, mc.ModelConfig())), text
