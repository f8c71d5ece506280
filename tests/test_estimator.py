"""StableMLPClassifier, the numeric encoding and packed ensemble members; `train` on top of them."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.metrics import roc_auc_score
from tolerances import PROBABILITY, logit_tolerance

from stablemlp import StableMLPClassifier
from stablemlp.export.cli import verify_main
from stablemlp.export.errors import ExportError
from stablemlp.model import estimator as estimator_module
from stablemlp.model.cli import main as train_main
from stablemlp.model.data import DataError
from stablemlp.model.network import Dropout, MLPConfig, StabilizedMLP
from stablemlp.model.preprocess import NumericEncoder, NumericEncoding
from stablemlp.model.train import FusedAdamW, TrainConfig, auto_batch_size, schedule_steps

FAST = {"epochs": 8, "hidden": (16, 16), "members": 2, "patience": 4}


def _frame(rows: int = 400, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Numbers with a bent effect and missing cells, a text column that matters, labels as text."""
    rng = np.random.default_rng(seed)
    income = rng.lognormal(10, 1, rows)
    age = rng.uniform(18, 80, rows)
    region = rng.choice(["north", "south", "east", "west"], rows)
    logit = 2.0 * np.tanh((age - 45) / 10) + (region == "south") * 1.5 - np.log(income) / 10
    y = np.where(rng.uniform(size=rows) < 1 / (1 + np.exp(-logit)), "bad", "good")
    frame = pd.DataFrame({"age": age, "region": region, "income": income})
    frame.loc[frame.index % 7 == 0, "income"] = np.nan
    frame.loc[frame.index % 11 == 0, "region"] = None
    return frame, y


# ---------------------------------------------------------------- the numeric encoding


def test_piecewise_linear_bins_missing_indicator_and_width() -> None:
    features = np.array([[0.0, 1.0], [1.0, np.nan], [2.0, 3.0], [3.0, 1.0]], dtype=np.float32)
    mean, std = np.array([1.5, 5 / 3], np.float32), np.array([1.0, 1.0], np.float32)
    encoding = NumericEncoding.learn(features, mean, std, bins=3)
    assert len(encoding.edges[0]) == 4 and encoding.edges[1] == ()  # 2 distinct values: no bins
    assert encoding.missing == (1,) and encoding.width == 2 + 3 + 1
    encoder = NumericEncoder(torch.from_numpy(mean), torch.from_numpy(std), encoding)
    out = encoder(torch.tensor([[1.5, math.nan], [100.0, 2.0]]))
    z = 0.0  # 1.5 standardizes to 0; the soft clip leaves 0 alone
    assert out[0, 0].item() == z and out[0, 1].item() == 0.0  # missing -> the mean -> 0
    # Edges of the first column in standardized units: -1.5, -0.5, 0.5, 1.5; 0 is half the middle.
    assert out[0, 2:5].tolist() == [1.0, 0.5, 0.0]
    assert out[0, 5].item() == 1.0 and out[1, 5].item() == 0.0  # the missing indicator
    assert out[1, 2:5].tolist() == [1.0, 1.0, 1.0]  # beyond the last edge: every bin full
    assert 2.9 < out[1, 0].item() < 3.0  # 98.5 standard deviations, softly clipped to < 3


def test_packed_members_stay_separate_through_training() -> None:
    torch.manual_seed(0)
    net = StabilizedMLP(MLPConfig(in_features=5, hidden=(4, 3), members=3))
    assert net(torch.randn(8, 5)).shape == (8, 3)
    layer, units = net.blocks[1][0], torch.randn(8, 12)
    with torch.no_grad():
        by_blocks, dense = layer(units), torch.nn.functional.linear(units, layer.weight)
    # The same products (the zero blocks add exact zeros) summed in another order: a few ulp.
    assert torch.allclose(by_blocks, dense, rtol=0, atol=logit_tolerance(dense))
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(5):
        optimizer.zero_grad()
        net(torch.randn(16, 5)).sum().backward()
        optimizer.step()
    second, head = net.blocks[1][0].weight, net.head.weight  # [9, 12], [3, 9]
    mask = torch.block_diag(*[torch.ones(3, 4)] * 3)
    assert torch.count_nonzero(second * (1 - mask)) == 0 and torch.count_nonzero(second * mask) > 0
    assert torch.count_nonzero(head * (1 - torch.block_diag(*[torch.ones(1, 3)] * 3))) == 0
    # Each member's block has its own Kaiming draw (fan-in 4, ReLU gain): bound sqrt(2)*sqrt(3/4).
    fresh = StabilizedMLP(MLPConfig(in_features=5, hidden=(4, 3), members=3))
    assert fresh.blocks[1][0].weight.abs().max() <= math.sqrt(2) * math.sqrt(3 / 4)


def test_dropout_keeps_units_scaled_drops_about_p_and_is_identity_in_eval() -> None:
    torch.manual_seed(0)
    dropout, x = Dropout(0.1), torch.randn(512, 256, requires_grad=True)
    y = dropout(x)
    scale = 256 / (256 - 26)  # p = 0.1 is used as 26/256
    kept = y != 0
    assert torch.equal(y[kept], x[kept] * scale)  # kept units scaled by the same float product
    # 131,072 draws of p = 26/256: the dropped share's standard deviation is 0.0008, so 0.005 is
    # over six of them.
    assert abs(1 - kept.float().mean().item() - 26 / 256) < 0.005
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() * scale)  # type: ignore[arg-type]
    dropout.eval()
    assert dropout(x) is x


def test_fused_adamw_is_torchs_adamw_and_cosine_schedule_to_the_bit() -> None:
    """FusedAdamW skips torch.optim.Optimizer (its first construction imports torch._dynamo,
    ~2 s), not its arithmetic: the same weights as AdamW(fused=True) + CosineAnnealingLR."""
    torch.manual_seed(0)
    ours = StabilizedMLP(MLPConfig(in_features=5, hidden=(4, 3), members=2))
    theirs = copy.deepcopy(ours)
    optimizer = FusedAdamW(ours.parameters(), lr=2e-3, weight_decay=1e-4, steps=12)
    reference = torch.optim.AdamW(theirs.parameters(), lr=2e-3, weight_decay=1e-4, fused=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=12)
    for _ in range(10):
        x = torch.randn(16, 5)
        for net, step in ((ours, optimizer.step), (theirs, reference.step)):
            net.zero_grad()
            net(x).square().mean().backward()
            step()
        schedule.step()
        assert optimizer.lr == reference.param_groups[0]["lr"]
    for mine, torchs in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True):
        assert torch.equal(mine, torchs)


def test_the_cosine_spans_the_first_runs_epochs_in_steps() -> None:
    # 101 rows in batches of 10: the one-row batch is skipped, so 10 steps an epoch.
    assert schedule_steps(TrainConfig(epochs=6, batch_size=10), rows=101) == 60
    # The refit runs the first run's best epoch count on the first run's schedule.
    assert schedule_steps(TrainConfig(epochs=3, batch_size=10, schedule_epochs=6), 101) == 60
    assert schedule_steps(TrainConfig(schedule="constant"), rows=101) == 0


def test_training_does_not_import_torch_dynamo(tmp_path: Path) -> None:
    code = (
        "import sys, numpy as np\n"
        "from stablemlp import StableMLPClassifier\n"
        "x = np.random.default_rng(0).normal(size=(60, 3))\n"
        "StableMLPClassifier(epochs=2, members=2, hidden=(4,)).fit(x, x[:, 0] > 0)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "False", done.stderr


def test_refit_auto_trains_again_on_small_tables_only(monkeypatch: pytest.MonkeyPatch) -> None:
    X, y = _frame(rows=200)
    small = StableMLPClassifier(**FAST).fit(X, y)
    assert small.checkpoint_.metrics["refit_epochs"] == small.history_.best_epoch
    assert small.checkpoint_.metrics["rows"]["final"] == 200
    monkeypatch.setattr(estimator_module, "REFIT_MAX_ROWS", 199)
    large = StableMLPClassifier(**FAST).fit(X, y)
    assert large.checkpoint_.metrics["refit_epochs"] == 0
    forced = StableMLPClassifier(**FAST, refit="always").fit(X, y)
    assert forced.checkpoint_.metrics["refit_epochs"] == forced.history_.best_epoch


def test_auto_batch_size_scales_with_rows() -> None:
    assert [auto_batch_size(n) for n in (100, 5_000, 20_000, 250_000)] == [32, 128, 512, 512]


# ---------------------------------------------------------------- the estimator


def test_fit_predict_on_a_dataframe_with_text_and_missing_values() -> None:
    X, y = _frame()
    model = StableMLPClassifier(**FAST).fit(X.iloc[:300], y[:300])
    proba = model.predict_proba(X.iloc[300:])
    assert proba.shape == (100, 2) and np.allclose(proba.sum(1), 1.0)
    assert list(model.classes_) == ["bad", "good"]  # sorted; classes_[1] is the positive class
    assert set(model.predict(X.iloc[300:])) <= {"bad", "good"}
    assert roc_auc_score(y[300:] == "good", proba[:, 1]) > 0.65
    assert list(model.feature_names_in_) == ["age", "region", "income"]
    # Columns by name in any order, extra columns ignored; a lacking column is named.
    shuffled = X.iloc[300:][["income", "region", "age"]].assign(note="x")
    np.testing.assert_allclose(model.predict_proba(shuffled), proba, atol=1e-6)
    with pytest.raises(DataError, match="lacks the model's columns \\['income'\\]"):
        model.predict_proba(X.iloc[300:].drop(columns="income"))
    with pytest.raises(DataError, match="X columns \\['age'\\]: expected numbers"):
        model.predict_proba(X.iloc[300:].assign(age="old"))


def test_arrays_params_clone_and_bad_params() -> None:
    X, y = _frame()
    numbers = X[["age", "income"]].to_numpy()
    model = StableMLPClassifier(**FAST).fit(numbers, y == "good")
    assert model.n_features_in_ == 2 and not hasattr(model, "feature_names_in_")
    assert model.predict(numbers).dtype == bool
    copy = clone(model)
    assert copy.get_params() == model.get_params() and not hasattr(copy, "checkpoint_")
    assert copy.set_params(members=3).members == 3
    for name, value, expected in [
        ("dropout", 2.0, "in \\[0, 1\\)"),
        ("learning_rate", math.nan, "a finite number > 0"),
        ("epochs", 0, ">= 1"),
        ("batch_size", 1, "0 \\(auto\\) or >= 2"),
        ("refit", "sometimes", "one of auto, always, never"),
        ("schedule", "linear", "one of cosine, constant"),
    ]:
        with pytest.raises(ValueError, match=f"{name}={value!r}: expected {expected}"):
            StableMLPClassifier(**{name: value}).fit(numbers, y)
    with pytest.raises(ValueError, match=r"binary classification.*got 3 classes"):
        StableMLPClassifier(**FAST).fit(numbers, np.arange(len(y)) % 3)


@pytest.mark.slow
def test_scikit_learn_estimator_checks() -> None:
    """scikit-learn's own checks (binary-only, NaN-tolerant tags): every one that runs passes."""
    from sklearn.utils.estimator_checks import check_estimator

    results = check_estimator(
        StableMLPClassifier(epochs=3, hidden=(8,), members=2),
        on_fail=None,
    )
    failed = [r["check_name"] for r in results if r["status"] == "failed"]
    passed = [r["check_name"] for r in results if r["status"] == "passed"]
    assert not failed, failed
    assert {
        "check_get_params_invariance",
        "check_set_params",
        "check_no_attributes_set_in_init",
        "check_parameters_default_constructible",
    } <= set(passed)


def test_export_publishes_what_predict_proba_computes(tmp_path: Path) -> None:
    X, y = _frame()
    model = StableMLPClassifier(**FAST).fit(X.iloc[:300], y[:300])
    version = model.export(tmp_path / "repo", model="demo")
    assert version == tmp_path / "repo" / "demo" / "1"
    assert verify_main([str(tmp_path / "repo")]) == 0
    rows = X.iloc[300:].reset_index(drop=True)
    session = ort.InferenceSession(str(version / "model.onnx"))
    feeds = {
        "features": rows[["age", "income"]].to_numpy(np.float32),
        "region": rows["region"].fillna("").to_numpy(object).reshape(-1, 1),
    }
    probability, _ = session.run(None, feeds)
    np.testing.assert_allclose(probability[:, 0], model.predict_proba(rows)[:, 1], atol=PROBABILITY)
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["parity"]["passed"]
    # A threshold serving would refuse is refused here, before anything is written.
    model.checkpoint_.threshold = 2.0
    with pytest.raises(ExportError, match=r"threshold 2.0: expected a probability in \[0, 1\]"):
        model.export(tmp_path / "repo", model="demo")
    assert not (tmp_path / "repo" / "demo" / "2").exists()


# ---------------------------------------------------------------- `stablemlp train` on top


def test_train_cli_refuses_bad_flags_before_reading_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    cases = [
        (["--epochs", "0"], "epochs=0: expected >= 1"),
        (["--dropout", "2"], "dropout=2.0: expected in [0, 1)"),
        (["--lr", "nan"], "learning_rate=nan: expected a finite number > 0"),
        (["--batch-size", "1"], "batch_size=1: expected 0 (auto) or >= 2"),
        (["--threshold", "2"], "threshold=2.0: expected in [0, 1]"),
    ]
    for flags, message in cases:
        assert train_main([*flags, "--output", str(tmp_path / "run")]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert train_main(["--epochs", "2", "--output", str(target)]) == 1
    assert "exists and is not a folder" in capsys.readouterr().err
    tiny = tmp_path / "tiny.csv"
    tiny.write_text("a,y\n" + "".join(f"{i},{i % 2}\n" for i in range(6)))
    assert train_main(["--csv", str(tiny), "--target", "y", "--output", str(tmp_path / "t")]) == 1
    assert "need at least 10 rows" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "t").exists()


def test_evaluation_in_chunks_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """evaluate() runs EVAL_CHUNK rows at a time (bounded memory on large tables)."""
    from stablemlp.model import train

    torch.manual_seed(0)
    net = StabilizedMLP(MLPConfig(in_features=4, hidden=(8,), members=2)).eval()
    x, y = torch.randn(1000, 4), (torch.rand(1000, 1) > 0.5).float()
    monkeypatch.setattr(train, "EVAL_CHUNK", 64)  # 16 chunks, the last one short
    chunked = train.evaluate(net, x, y)
    monkeypatch.setattr(train, "EVAL_CHUNK", 10_000)
    whole = train.evaluate(net, x, y)
    # Rows are independent in eval mode, but a chunk's shape may pick another kernel: last-bit
    # differences could swap two near-equal rows (AUC moves by 1/(positives x negatives) = 4e-6
    # a swap) or flip one row at 0.5 (accuracy moves by 1e-3); a wrong chunking moves far more.
    assert chunked["roc_auc"] == pytest.approx(whole["roc_auc"], abs=1e-4)
    assert chunked["accuracy"] == pytest.approx(whole["accuracy"], abs=1e-3)
    assert chunked["loss"] == pytest.approx(whole["loss"], rel=1e-5)


def test_numbers_are_encoded_up_front_only_within_the_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Small tables: the encoding once, for speed; large ones: raw, encoded batch by batch."""
    from stablemlp.model import train

    features = np.random.default_rng(0).normal(size=(3000, 3)).astype(np.float32)
    features[::7, 1] = np.nan
    mean, std = np.nanmean(features, 0), np.nanstd(features, 0)
    encoding = NumericEncoding.learn(features, mean, std, bins=8)
    prep = NumericEncoder(torch.from_numpy(mean), torch.from_numpy(std), encoding)
    raw = (torch.from_numpy(features), torch.zeros(3000, 1, dtype=torch.int64))
    (encoded, codes), left = train.encode_up_front(raw, prep)
    assert left is None and codes is raw[1] and encoded.shape == (3000, encoding.width)
    # Elementwise arithmetic only (no sums to reorder), so bit-equal whatever the chunking.
    assert torch.equal(encoded[:100], prep(raw[0][:100]))
    monkeypatch.setattr(train, "ENCODED_BYTES", 3000 * encoding.width * 4 - 1)
    kept, left = train.encode_up_front(raw, prep)
    assert left is prep and kept[0] is raw[0]
