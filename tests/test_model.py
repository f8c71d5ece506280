"""model/: initialization, determinism, training safeguards, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from stablemlp.model.checkpoint import Checkpoint, FeatureSchema, load_checkpoint, save_checkpoint
from stablemlp.model.cli import main as train_main
from stablemlp.model.data import load_builtin, split_dataset
from stablemlp.model.network import MLPConfig, StabilizedMLP
from stablemlp.model.preprocess import Standardize, build_classifier
from stablemlp.model.train import NonFiniteLossError, TrainConfig, fit


def test_block_structure_is_linear_batchnorm_elu() -> None:
    model = StabilizedMLP(MLPConfig(in_features=5, hidden=(8, 4)))
    for block in model.blocks:
        kinds = [type(layer) for layer in block]
        assert kinds == [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ELU]
        assert block[0].bias is None  # BatchNorm's shift makes a bias redundant
    assert model(torch.randn(3, 5)).shape == (3, 1)


def test_kaiming_variance_relu_gain_hidden_sigmoid_gain_head() -> None:
    torch.manual_seed(0)
    fan_in = 512
    model = StabilizedMLP(MLPConfig(in_features=fan_in, hidden=(fan_in,)))
    hidden = model.blocks[0][0].weight.detach()
    head = model.head.weight.detach()
    # He et al. 2015: Var[W] = gain^2 / fan_in; gain sqrt(2) for rectifiers, 1 for sigmoid.
    assert hidden.var().item() == pytest.approx(2.0 / fan_in, rel=0.02)
    assert head.var().item() == pytest.approx(1.0 / fan_in, rel=0.15)
    # Uniform bounds: gain * sqrt(3 / fan_in).
    assert hidden.abs().max().item() <= math.sqrt(2.0) * math.sqrt(3.0 / fan_in)
    assert head.abs().max().item() <= math.sqrt(3.0 / fan_in)
    assert torch.count_nonzero(model.head.bias) == 0


def _train_small(seed: int, epochs: int = 3) -> StabilizedMLP:
    data = load_builtin()
    splits = split_dataset(data, seed=seed)
    mean = torch.from_numpy(splits.train.features).nanmean(0)
    std = torch.from_numpy(splits.train.features).std(0)
    torch.manual_seed(seed)
    model = StabilizedMLP(MLPConfig(len(data.feature_names), hidden=(16, 8)))
    config = TrainConfig(epochs=epochs, seed=seed, progress=False)
    fit(model, splits.train, splits.val, Standardize(mean, std), config)
    return model


def test_same_seed_same_data_gives_identical_weights() -> None:
    first, second = _train_small(seed=7), _train_small(seed=7)
    for (name, a), (_, b) in zip(
        first.state_dict().items(), second.state_dict().items(), strict=False
    ):
        assert torch.equal(a, b), name
    third = _train_small(seed=8)
    assert not torch.equal(first.head.weight, third.head.weight)


def test_non_finite_loss_stops_training_with_clear_error() -> None:
    data = load_builtin()
    splits = split_dataset(data, seed=0)
    n = len(data.feature_names)
    model = StabilizedMLP(MLPConfig(n, hidden=(4,)))
    with torch.no_grad():
        model.head.bias.fill_(math.inf)
    standardize = Standardize(torch.zeros(n), torch.ones(n))
    with pytest.raises(NonFiniteLossError, match="loss became"):
        fit(model, splits.train, splits.val, standardize, TrainConfig(epochs=2, progress=False))


def test_checkpoint_round_trip_loads_weights_only(tmp_path: Path) -> None:
    model = StabilizedMLP(MLPConfig(in_features=3, hidden=(4,)))
    checkpoint = Checkpoint(
        config=model.config,
        state_dict=model.state_dict(),
        schema=FeatureSchema(("a", "b", "c"), (0.0, 1.0, 2.0), (1.0, 1.0, 3.0)),
        threshold=0.4,
        metrics={"test": {"roc_auc": 0.9}},
        model_name="demo",
        seed=3,
    )
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(checkpoint, path)
    assert list(tmp_path.iterdir()) == [path]  # no temp files left behind
    payload = torch.load(path, weights_only=True)  # raises if anything needs pickle code
    assert payload["format"] == "stablemlp.checkpoint/3"
    loaded = load_checkpoint(path)
    assert loaded.config == model.config and loaded.threshold == 0.4
    assert loaded.schema.names == ("a", "b", "c")
    rows = torch.tensor([[0.5, math.nan, 2.0]])
    probability, label = loaded.build_classifier()(rows)
    assert probability.shape == (1, 1) and label.dtype == torch.int64
    assert torch.isfinite(probability).all()  # NaN was imputed, not propagated


def test_format_1_checkpoint_of_an_all_numeric_model_still_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = StabilizedMLP(MLPConfig(in_features=2, hidden=(4,))).eval()
    payload = {  # exactly what format /1 wrote: no text columns, target or encoder
        "format": "stablemlp.checkpoint/1",
        "config": model.config.to_dict(),
        "state_dict": model.state_dict(),
        "schema": {"names": ["a", "b"], "means": [1.0, 2.0], "stds": [1.0, 4.0]},
        "threshold": 0.5,
        "metrics": {},
        "model_name": "old",
        "seed": 0,
        "torch_version": "2.4.0",
    }
    torch.save(payload, tmp_path / "checkpoint.pt")
    loaded = load_checkpoint(tmp_path / "checkpoint.pt")
    assert loaded.encoder is None and loaded.schema.categorical == ()
    assert loaded.schema.columns == ("a", "b")
    probability, _ = loaded.build_classifier()(torch.tensor([[1.0, 2.0]]))
    with torch.no_grad():
        assert torch.equal(probability, torch.sigmoid(model(torch.zeros(1, 2))))


def test_huge_finite_inputs_give_finite_probabilities() -> None:
    torch.manual_seed(0)
    net = StabilizedMLP(MLPConfig(in_features=3, hidden=(8,))).eval()
    classifier = build_classifier(net, torch.zeros(3), torch.tensor([1.0, 1e-3, 2.0]), 0.5)
    rows = torch.tensor([[3.4e38, -3.4e38, 1e30], [math.nan, 3.4e38, -1e30], [0.0, 1.0, 2.0]])
    probability, _ = classifier(rows)
    assert torch.isfinite(probability).all()
    # Beyond STANDARDIZED_LIMIT every value counts the same: the clamp, not the magnitude.
    assert torch.equal(classifier(rows[:1] / 2)[0], probability[:1])


def test_train_cli_writes_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert train_main(["--epochs", "4", "--hidden", "16,8", "--output", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"checkpoint.pt", "metrics.json", "test_split.npz"} <= names
    assert {"training_curves.png", "gradient_norms.png"} <= names
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert checkpoint.model_name == "breast_cancer"
    assert len(checkpoint.schema.names) == 30
    assert 0.5 < checkpoint.metrics["val"]["roc_auc"] <= 1.0
    assert "validation ROC AUC" in capsys.readouterr().out


def test_train_cli_rejects_bad_hidden_sizes(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        train_main(["--hidden", "16,x", "--output", str(tmp_path / "run")])
    assert exc.value.code == 2
    assert not (tmp_path / "run").exists()
