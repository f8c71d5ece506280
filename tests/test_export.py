"""export/: BatchNorm folding, ONNX/TorchScript contract, parity, atomic publishing, verify."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import run_isolated
from google.protobuf import text_format
from tolerances import PROBABILITY, logit_tolerance
from torch import nn

from stablemlp.export import cli as export_cli
from stablemlp.export.cli import export_main, export_run, verify_main
from stablemlp.export.documents import MAX_BATCH_SIZE
from stablemlp.export.errors import FoldError
from stablemlp.export.fold import batchnorm_layers, fold_batchnorm
from stablemlp.export.formats import INPUT_NAME, OPSET, OUTPUT_NAMES, op_types
from stablemlp.export.parity import (
    TOLERANCE,
    ParityError,
    check_parity,
    random_batches,
    torch_runner,
)
from stablemlp.export.publish import publish_version, sha256_hex, versions
from stablemlp.export.rows import extreme_batch
from stablemlp.export.verify import DETAIL_KEYS
from stablemlp.model.checkpoint import CHECKPOINT_NAME, Checkpoint, FeatureSchema, save_checkpoint
from stablemlp.model.cli import TEST_SPLIT_NAME
from stablemlp.model.cli import main as train_main
from stablemlp.model.network import MLPConfig, StabilizedMLP
from stablemlp.model.preprocess import build_classifier
from stablemlp.protos import model_config_pb2
from stablemlp.serving.manifest import Manifest

N_FEATURES = 6
MODEL = "tiny"


def _tiny_net(seed: int = 0) -> StabilizedMLP:
    """A seeded eval-mode net whose BatchNorms are far from identity (stats and affine params)."""
    torch.manual_seed(seed)
    net = StabilizedMLP(MLPConfig(in_features=N_FEATURES, hidden=(8, 4)))
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.running_mean.normal_(0.0, 2.0)
                module.running_var.uniform_(0.2, 3.0)
                module.weight.normal_(1.0, 0.5)
                module.bias.normal_(0.0, 0.5)
    return net.eval()


def _stats() -> tuple[tuple[float, ...], tuple[float, ...]]:
    return (10.0, -3.0, 0.5, 100.0, 0.0, 2.0), (2.0, 1.0, 0.1, 25.0, 1.0, 0.5)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as `stablemlp train` leaves it, for the tiny net (no training needed)."""
    run = tmp_path_factory.mktemp("run")
    net = _tiny_net()
    means, stds = _stats()
    checkpoint = Checkpoint(
        config=net.config,
        state_dict=net.state_dict(),
        schema=FeatureSchema(tuple(f"f{i}" for i in range(N_FEATURES)), means, stds),
        threshold=0.5,
        metrics={"test": {"roc_auc": 0.9, "accuracy": 0.8, "loss": 0.4}, "rows": {"test": 40}},
        model_name=MODEL,
        seed=3,
    )
    save_checkpoint(checkpoint, run / CHECKPOINT_NAME)
    test = random_batches(means, stds, seed=5, sizes=(40,))["random_40"]
    np.savez(run / TEST_SPLIT_NAME, features=test, labels=np.zeros(40, dtype=np.int64))
    return run


@pytest.fixture(scope="module")
def tiny_repository(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export per module: the repository root holding MODEL/1."""
    repository = tmp_path_factory.mktemp("repo")
    version_dir, report = export_run(tiny_run, repository)
    assert version_dir == repository / MODEL / "1"
    assert report.passed
    return repository


# ---------------------------------------------------------------- folding


def test_fold_matches_eval_model_and_leaves_input_alone() -> None:
    net = _tiny_net().train()  # the mode must survive too
    before = copy.deepcopy(net.state_dict())
    folded = fold_batchnorm(net)

    assert batchnorm_layers(folded) == []
    assert not folded.training
    assert net.training and len(batchnorm_layers(net)) == 2
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    # Our Linears before BatchNorm have bias=False; the fused ones carry the BatchNorm shift.
    assert all(layer.bias is not None for layer in folded.modules() if isinstance(layer, nn.Linear))

    x = torch.randn(256, N_FEATURES) * 3
    with torch.no_grad():
        expected, actual = net.eval()(x), folded(x)
    assert float((expected - actual).abs().max()) <= logit_tolerance(expected)
    # The statistics really are non-trivial: ignoring BatchNorm would change the output a lot.
    unfolded = copy.deepcopy(net)
    for block in unfolded.blocks:
        block[1] = nn.Identity()
    with torch.no_grad():
        assert float((unfolded(x) - expected).abs().max()) > 0.1


def test_fold_refuses_batchnorm_without_linear_before_it() -> None:
    with pytest.raises(FoldError, match="not preceded by a Linear"):
        fold_batchnorm(nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 1)).eval())


# ---------------------------------------------------------------- artifacts


def test_onnx_graph_contract(tiny_repository: Path) -> None:
    version_dir = tiny_repository / MODEL / "1"
    model = onnx.load(str(version_dir / "model.onnx"), load_external_data=False)
    onnx.checker.check_model(model, full_check=True)

    assert "BatchNormalization" not in op_types(model)
    assert {"IsNaN", "Where"} <= op_types(model)  # the imputation survived export
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in model.graph.initializer)
    (features,) = model.graph.input
    assert features.name == INPUT_NAME
    batch_dim, width = features.type.tensor_type.shape.dim
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")
    assert width.dim_value == N_FEATURES
    assert [o.name for o in model.graph.output] == list(OUTPUT_NAMES)

    # The exporter's per-node debug metadata (stack traces with local paths) is stripped.
    assert not [n.name for n in model.graph.node if n.metadata_props]
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["feature_names"]) == [f"f{i}" for i in range(N_FEATURES)]
    assert float(meta["threshold"]) == 0.5
    assert (meta["model_name"], meta["model_version"]) == (MODEL, "1")
    assert json.loads(meta["metrics"])["test"]["roc_auc"] == 0.9
    assert meta["torch_version"] == torch.__version__


@pytest.mark.parametrize("rows", [1, MAX_BATCH_SIZE])
def test_onnxruntime_runs_any_batch_with_missing_values(tiny_repository: Path, rows: int) -> None:
    session = ort.InferenceSession(
        str(tiny_repository / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(rows).normal(size=(rows, N_FEATURES)).astype(np.float32)
    x[0, :] = np.nan
    probability, label = session.run(None, {INPUT_NAME: x})
    assert probability.shape == label.shape == (rows, 1)
    assert probability.dtype == np.float32 and label.dtype == np.int64
    assert np.isfinite(probability).all()
    np.testing.assert_array_equal(label, (probability >= 0.5).astype(np.int64))


def test_onnxruntime_bounds_extreme_finite_inputs(tiny_repository: Path) -> None:
    session = ort.InferenceSession(
        str(tiny_repository / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    rows = extreme_batch(*_stats(), seed=0, rows=64)
    rows[-1, ::2] = np.nan
    assert np.isin(rows, np.float32([3.4e38, -3.4e38, 1e30, -1e30])).sum() > N_FEATURES * 16
    probability, _ = session.run(None, {INPUT_NAME: rows})
    assert np.isfinite(probability).all()  # (x - mean) / std is clamped before the network


def test_torchscript_loads_in_fresh_process_without_project(
    tiny_repository: Path, tmp_path: Path
) -> None:
    path = tiny_repository / MODEL / "1" / "model.pt"
    code = (
        "import json, sys, torch\n"
        f"m = torch.jit.load({str(path)!r})\n"
        f"p, l = m(torch.linspace(-1, 1, {3 * N_FEATURES}).reshape(3, {N_FEATURES}))\n"
        "assert not any(n.split('.')[0] in ('model', 'export') for n in sys.modules), 'project'\n"
        "print(json.dumps([p.flatten().tolist(), l.flatten().tolist(), str(l.dtype)]))\n"
    )
    probability, label, dtype = json.loads(run_isolated(code, tmp_path))
    means, stds = _stats()
    folded = build_classifier(
        fold_batchnorm(_tiny_net()), torch.tensor(means), torch.tensor(stds), 0.5
    )
    with torch.no_grad():
        expected, _ = folded(torch.linspace(-1, 1, 3 * N_FEATURES).reshape(3, N_FEATURES))
    np.testing.assert_allclose(probability, expected.flatten().numpy(), atol=PROBABILITY)
    assert dtype == "torch.int64" and len(label) == 3
    # No path of the exporting machine inside (TorchScript's debug records are stripped).
    assert str(Path(export_cli.__file__).parent.parent).encode() not in path.read_bytes()


def test_manifest_parity_and_config(tiny_repository: Path) -> None:
    model_dir = tiny_repository / MODEL
    version_dir = model_dir / "1"
    manifest = json.loads((version_dir / "manifest.json").read_text())
    # serving reads what export writes, through the one manifest module
    read = Manifest.read(version_dir / "manifest.json")
    assert read.to_dict() == manifest and set(DETAIL_KEYS) <= set(read.details)
    assert manifest["version"] == 1 and manifest["opset"] == OPSET
    assert manifest["inputs"] == [
        {"name": "features", "datatype": "FP32", "shape": [-1, N_FEATURES]}
    ]
    assert [o["datatype"] for o in manifest["outputs"]] == ["FP32", "INT64"]
    assert manifest["max_batch_size"] == MAX_BATCH_SIZE
    assert set(manifest["files"]) == {"model.onnx", "model.pt", "MODEL_CARD.md", "parity.json"}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_hex((version_dir / name).read_bytes())
    parity = manifest["parity"]
    assert parity["labels_identical"] and parity["tolerance"] == TOLERANCE
    assert set(parity["max_abs_diff"]) == {"folded", "torchscript", "onnxruntime"}
    assert max(parity["max_abs_diff"].values()) <= TOLERANCE
    assert parity["batches"] == {
        "test": 40,
        "random_1": 1,
        "random_7": 7,
        "random_1024": 1024,
        "extreme_16": 16,  # finite extremes (3.4e38, 1e30) with NaNs
    }
    assert json.loads((version_dir / "parity.json").read_text())["rows"]
    assert "## Limitations" in (version_dir / "MODEL_CARD.md").read_text()

    # config.pbtxt parses as Triton's ModelConfig and agrees with the manifest.
    config = text_format.Parse(
        (model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert (config.name, config.platform) == (MODEL, "onnxruntime_onnx")
    assert config.max_batch_size == manifest["max_batch_size"]
    assert [(i.name, list(i.dims)) for i in config.input] == [("features", [N_FEATURES])]
    assert [(o.name, o.data_type) for o in config.output] == [
        ("probability", model_config_pb2.TYPE_FP32),
        ("label", model_config_pb2.TYPE_INT64),
    ]
    assert not [p.name for p in model_dir.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------- parity failures


def test_parity_with_zero_tolerance_raises_with_numbers() -> None:
    means, stds = _stats()
    net = _tiny_net()
    reference = build_classifier(net, torch.tensor(means), torch.tensor(stds), 0.5)
    perturbed = copy.deepcopy(reference)
    with torch.no_grad():
        perturbed.net.head.bias += 1e-3
    batches = random_batches(means, stds, seed=1)
    with pytest.raises(ParityError, match=r"perturbed on random_1: max abs diff \d") as caught:
        check_parity(
            ("eval", torch_runner(reference)),
            {"perturbed": torch_runner(perturbed)},
            batches,
            tolerance=0.0,
        )
    assert not caught.value.report.passed
    assert "FAIL" in caught.value.report.table()


def test_corrupted_onnx_fails_export_and_publishes_nothing(
    tiny_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    real_to_onnx = export_cli.to_onnx

    def corrupted(classifier: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
        model = real_to_onnx(classifier, example)
        weight = next(t for t in model.graph.initializer if t.name.endswith("weight"))
        values = onnx.numpy_helper.to_array(weight) + np.float32(0.05)
        weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
        return model

    monkeypatch.setattr(export_cli, "to_onnx", corrupted)
    repository = tmp_path / "repo"
    assert export_main([str(tiny_run), "--repository", str(repository)]) == 1
    out, err = capsys.readouterr()
    assert "onnxruntime" in out and "FAIL" in out
    assert err.count("\n") == 1 and "parity failed" in err and "onnxruntime on test" in err
    assert not repository.exists()


# ---------------------------------------------------------------- publishing


def test_versions_count_up_and_never_overwrite(tiny_run: Path, tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    first, _ = export_run(tiny_run, repository)
    first_hashes = {p.name: sha256_hex(p.read_bytes()) for p in first.iterdir()}
    second, _ = export_run(tiny_run, repository, model_name="other")
    third, _ = export_run(tiny_run, repository)
    assert (first.name, second.parent.name, third.name) == ("1", "other", "2")
    assert first_hashes == {p.name: sha256_hex(p.read_bytes()) for p in first.iterdir()}
    manifest = json.loads((third / "manifest.json").read_text())
    assert manifest["version"] == 2


def test_publish_takes_next_number_when_a_racer_wins(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    for name in ("1", "latest", "0", "007"):
        (model_dir / name).mkdir(parents=True)
    assert versions(model_dir) == [1]
    built: list[int] = []

    def build(version: int) -> dict[str, bytes]:
        built.append(version)
        if version == 2:  # another exporter publishes 2 between our choice and our rename
            (model_dir / "2").mkdir()
            (model_dir / "2" / "theirs.txt").write_text("racer")
        return {"payload.txt": f"version {version}".encode()}

    target = publish_version(model_dir, build)
    assert target == model_dir / "3" and built == [2, 3]
    assert (model_dir / "2" / "theirs.txt").read_text() == "racer"
    assert not (model_dir / "2" / "payload.txt").exists()
    assert (target / "payload.txt").read_text() == "version 3"
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".tmp-")]


# ---------------------------------------------------------------- verify


def test_verify_passes_on_published_version(
    tiny_repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert verify_main([str(tiny_repository)]) == 0
    assert f"OK {MODEL}/1" in capsys.readouterr().out


@pytest.mark.parametrize("victim", ["model.onnx", "model.pt", "MODEL_CARD.md", "parity.json"])
def test_verify_detects_tampered_file(
    tiny_repository: Path, tmp_path: Path, victim: str, capsys: pytest.CaptureFixture[str]
) -> None:
    repository = tmp_path / "repo"
    shutil.copytree(tiny_repository, repository)
    path = repository / MODEL / "1" / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert verify_main([str(repository), "--model", MODEL, "--version", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{victim}: sha256 mismatch" in err


def test_verify_cross_checks_manifest_against_onnx(
    tiny_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repository = tmp_path / "repo"
    shutil.copytree(tiny_repository, repository)
    path = repository / MODEL / "1" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["threshold"] = 0.9  # the manifest is not hashed; it must still agree with the graph
    path.write_text(json.dumps(manifest))
    assert verify_main([str(repository)]) == 1
    assert "threshold is 0.9, expected 0.5" in capsys.readouterr().err


def test_verify_reports_missing_things(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert verify_main([str(tmp_path / "nowhere")]) == 1
    assert verify_main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "no such repository" in err and "no published model" in err


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    for main in (export_main, verify_main):
        with pytest.raises(SystemExit) as exited:
            main(["--help"])
        assert exited.value.code == 0
    assert "--repository" in capsys.readouterr().out


def test_export_reports_bad_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert export_main([str(tmp_path), "--repository", str(tmp_path / "repo")]) == 1
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    assert export_main([str(tmp_path), "--repository", str(tmp_path / "repo")]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert [line.startswith("stablemlp export: error:") for line in lines] == [True, True]
    assert "no checkpoint" in lines[0] and "not a readable stablemlp checkpoint" in lines[1]
    assert not (tmp_path / "repo").exists()


# ---------------------------------------------------------------- integration


@pytest.mark.slow
def test_train_export_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, repository = tmp_path / "run", tmp_path / "repo"
    assert train_main(["--epochs", "2", "--no-progress", "--output", str(run)]) == 0
    assert export_main([str(run), "--repository", str(repository)]) == 0
    assert verify_main([str(repository)]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "OK breast_cancer/1" in out
    manifest = json.loads((repository / "breast_cancer" / "1" / "manifest.json").read_text())
    assert manifest["parity"]["batches"]["test"] > 50
    with open(repository / "breast_cancer" / "config.pbtxt") as handle:
        assert "dims: [ 30 ]" in handle.read()


def test_an_export_killed_mid_way_leaves_nothing_that_the_next_one_keeps(
    tiny_run: Path, tmp_path: Path
) -> None:
    """kill -9 during export leaves a staging folder (and temp files); the next export removes
    those over an hour old and leaves a concurrent export's fresh ones alone."""
    model_dir = tmp_path / "repo" / "tiny"
    model_dir.mkdir(parents=True)
    old_folder, old_file, fresh = (
        model_dir / ".tmp-dead",
        model_dir / ".config.pbtxt.x.tmp",
        model_dir / ".tmp-live",
    )
    for folder in (old_folder, fresh):
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"half")
    old_file.write_bytes(b"half")
    hours_ago = os.path.getmtime(fresh) - 7200
    for stale in (old_folder, old_file):
        os.utime(stale, (hours_ago, hours_ago))
    assert (
        export_main([str(tiny_run), "--repository", str(tmp_path / "repo"), "--model", "tiny"]) == 0
    )
    left = sorted(p.name for p in model_dir.iterdir())
    assert left == [".tmp-live", "1", "config.pbtxt"]
