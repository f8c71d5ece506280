"""`stablemlp diagnose`: verdicts on deep plain vs stabilized nets, dead units, the CLI's files."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from stablemlp.model.diagnose import VariantResult, dead_units, diagnose, main, probe
from stablemlp.model.gradients import (
    EXPLODING_NORM,
    VANISHING_RATIO,
    GradientMonitor,
    NonFiniteGradientError,
    verdict,
)
from stablemlp.model.variants import PLAIN, RELU, STABILIZED, Variant, build_variant

# Depth 20 is where the contrast is unmistakable; width 16 and 30 steps keep the suite fast.
DEPTH, WIDTH, STEPS = 20, 16, 30


@pytest.fixture(scope="module")
def results() -> dict[str, VariantResult]:
    return {r.name: r for r in diagnose(depth=DEPTH, width=WIDTH, steps=STEPS)}


def test_plain_vanishes_and_stabilized_is_healthy(results: dict[str, VariantResult]) -> None:
    plain_state, plain_ratio = results[PLAIN].verdict
    stable_state, stable_ratio = results[STABILIZED].verdict
    # Measured at this seed: plain ~3e-16, stabilized ~4 (first/last layer gradient norm).
    assert plain_state == "vanishing", plain_ratio
    assert plain_ratio < 1e-10, plain_ratio
    assert stable_state == "healthy", stable_ratio
    assert 0.1 < stable_ratio < 10, stable_ratio
    assert results[STABILIZED].training_verdict[0] == "healthy"
    assert results[PLAIN].training_verdict[0] == "vanishing"
    assert results[RELU].verdict[0] == "healthy"


def test_plain_first_layer_gradient_shrinks_geometrically(
    results: dict[str, VariantResult],
) -> None:
    norms = results[PLAIN].init.grad_norms
    assert len(norms) == DEPTH + 1  # every hidden Linear plus the head
    assert norms[-1] > 1e3 * norms[DEPTH // 2] > 1e6 * norms[0]


def test_stabilized_keeps_activations_and_units_alive(results: dict[str, VariantResult]) -> None:
    stable = results[STABILIZED]
    assert stable.init.dead_fraction == 0.0
    assert min(stable.init.act_std) > 0.3  # BatchNorm keeps every layer's spread near 1
    assert all(math.isfinite(loss) for loss in stable.losses) and len(stable.losses) == STEPS


def test_huge_init_scale_is_flagged_exploding() -> None:
    (result,) = diagnose(depth=DEPTH, width=WIDTH, steps=5, init_scale=3.0, variants=(RELU,))
    state, _ = result.verdict
    assert state == "exploding"
    assert result.name == "relu_kaiming_x3"  # labelled as the over-scaled variant it is
    assert max(result.init.grad_norms) > EXPLODING_NORM
    assert result.diverged_at is not None  # the loss overflows within a few SGD steps


def test_dead_units_counts_columns_zero_on_every_row() -> None:
    output = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 2.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert dead_units(output) == 2  # columns 0 and 3; column 2 fires once, so it is alive


def test_probe_counts_dead_relu_units_on_hand_built_net() -> None:
    first = nn.Linear(2, 4)
    with torch.no_grad():
        # Inputs are positive: units 0 and 2 always fire, units 1 and 3 never do.
        first.weight.copy_(torch.tensor([[1.0, 1.0], [-1.0, -1.0], [2.0, 0.0], [0.0, -3.0]]))
        first.bias.zero_()
    relu, head = nn.ReLU(), nn.Linear(4, 1)
    net = nn.Sequential(first, relu, head)
    variant = Variant("hand", net, [("first", first), ("head", head)], [("relu", relu)])
    x = torch.rand(8, 2) + 0.1
    result = probe(variant, x, torch.ones(8, 1))
    assert result.dead_units == [2]
    assert result.units == [4]
    assert result.dead_fraction == 0.5
    assert first.weight.grad is None  # the probe leaves no gradients behind


def test_probe_leaves_batchnorm_statistics_alone() -> None:
    torch.manual_seed(0)
    variant = build_variant(STABILIZED, 5, 8, 3)
    before = {k: v.clone() for k, v in variant.net.state_dict().items()}
    probe(variant, torch.randn(16, 5), torch.ones(16, 1))
    after = variant.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_same_seed_gives_identical_measurements() -> None:
    first = diagnose(depth=4, width=8, steps=5, variants=(STABILIZED,))[0]
    second = diagnose(depth=4, width=8, steps=5, variants=(STABILIZED,))[0]
    assert first.init.grad_norms == second.init.grad_norms
    assert first.losses == second.losses


@pytest.mark.parametrize(
    ("norms", "expected"),
    [
        ([1e-5, 0.5, 0.1], "vanishing"),  # first/last = 1e-4
        ([0.2, 0.3, 0.1], "healthy"),
        ([200.0, 1.0, 0.1], "exploding"),  # first/last = 2000
        ([5e3, 5e3, 5e3], "exploding"),  # ratio 1 but every norm huge
        ([1.0, math.nan, 1.0], "exploding"),
        ([0.0, 0.0], "vanishing"),
    ],
)
def test_verdict_thresholds(norms: list[float], expected: str) -> None:
    state, _ = verdict({f"layer{i}": n for i, n in enumerate(norms)})
    assert state == expected


def test_verdict_ratio_is_first_over_last() -> None:
    # min/max would give 1e-4 here; the rule compares the input side with the head only.
    state, ratio = verdict({"a": 1e-4, "b": 1.0, "c": 0.5})
    assert state == "vanishing" and ratio == pytest.approx(2e-4)
    state, ratio = verdict({"a": 2e-3, "b": 1e-5, "c": 1.0})
    assert state == "healthy" and ratio == pytest.approx(2e-3)
    assert verdict({"a": VANISHING_RATIO / 2, "b": 1.0})[0] == "vanishing"


def test_monitor_warns_once_naming_the_first_layer(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    variant = build_variant(PLAIN, 4, 8, DEPTH)
    monitor = GradientMonitor(variant.linears)
    with caplog.at_level(logging.WARNING, logger="model.gradients"):
        for _ in range(3):
            variant.net.zero_grad()
            variant.net(torch.randn(16, 4)).sum().backward()
            monitor.observe()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "vanishing" in warnings[0] and "'blocks.0'" in warnings[0]


def test_monitor_raises_on_non_finite_gradient() -> None:
    layer = nn.Linear(2, 1)
    layer.weight.grad = torch.tensor([[math.inf, 0.0]])
    with pytest.raises(NonFiniteGradientError, match="'only'"):
        GradientMonitor([("only", layer)]).observe()


def test_cli_writes_report_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "diag"
    args = ["--depth", str(DEPTH), "--width", str(WIDTH), "--steps", "20", "--output", str(out)]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["depth"] == DEPTH
    variants = {v["name"]: v for v in report["variants"]}
    assert list(variants) == [PLAIN, RELU, STABILIZED]
    for entry in variants.values():
        assert len(entry["grad_norms"]) == DEPTH + 1 == len(entry["layers"])
        assert entry["verdict"] in {"healthy", "vanishing", "exploding"}
        assert 0.0 <= entry["dead_fraction"] <= 1.0
        assert len(entry["training"]["loss"]) == 20
    assert variants[PLAIN]["verdict"] == "vanishing" and variants[PLAIN]["ratio"] < 1e-10
    assert variants[STABILIZED]["verdict"] == "healthy"
    for name in report["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(report["plots"]) == 4
    markdown = (out / "report.md").read_text()
    assert "| plain |" in markdown and "![grad_norms_init](grad_norms_init.png)" in markdown
    table = capsys.readouterr().out
    assert "vanishing" in table and STABILIZED in table


def test_cli_reads_a_csv_with_missing_values(tmp_path: Path) -> None:
    path = tmp_path / "tiny.csv"
    generator = torch.Generator().manual_seed(0)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["a", "b", "label"])
        for i in range(60):
            a, b = torch.randn(2, generator=generator).tolist()
            writer.writerow(["" if i % 7 == 0 else f"{a:.3f}", f"{b:.3f}", int(a + b > 0)])
    out = tmp_path / "out"
    args = ["--csv", str(path), "--target", "label", "--depth", "3", "--width", "8"]
    assert main([*args, "--steps", "5", "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["data"] == "tiny.csv"
    assert all(len(v["grad_norms"]) == 4 for v in report["variants"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--depth", "0"], "--depth must be at least 1"),
        (["--csv", "MISSING", "--target", "y"], "cannot read CSV"),
        (["--csv", "MISSING"], "--target COLUMN is required"),
    ],
)
def test_cli_bad_input_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    out = tmp_path / "never"
    extra = [str(tmp_path / "missing.csv") if arg == "MISSING" else arg for arg in extra]
    assert main([*extra, "--steps", "1", "--output", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("stablemlp diagnose: error:") and message in err
    assert len(err.splitlines()) == 1
    assert not out.exists()
