"""model/data.py: the built-in data set, CSV loading and its errors, splits, safe statistics."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest

from stablemlp.model.cli import main as train_main
from stablemlp.model.csvdata import load_csv
from stablemlp.model.data import DataError, feature_stats, load_builtin, split_dataset


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "data.csv"
    path.write_text(text)
    return path


def test_builtin_is_the_breast_cancer_data() -> None:
    data = load_builtin()
    assert data.features.shape == (569, 30) and data.features.dtype == np.float32
    assert set(np.unique(data.labels)) == {0, 1}
    assert data.feature_names[0] == "mean radius"


def test_split_is_stratified_and_seeded() -> None:
    data = load_builtin()
    a, b = split_dataset(data, seed=1), split_dataset(data, seed=1)
    assert np.array_equal(a.test.features, b.test.features)
    total = len(a.train) + len(a.val) + len(a.test)
    assert total == len(data)
    rate = data.labels.mean()
    for part in (a.train, a.val, a.test):
        assert part.labels.mean() == pytest.approx(rate, abs=0.03)


def test_csv_missing_cells_become_nan(tmp_path: Path) -> None:
    path = _write(tmp_path, "a,b,y\n1,,0\n2,3,1\nNA,4,1\n")
    data = load_csv(path, "y")
    assert data.feature_names == ["a", "b"]
    assert math.isnan(data.features[0, 1]) and math.isnan(data.features[2, 0])
    assert data.labels.tolist() == [0, 1, 1]


@pytest.mark.parametrize(
    ("text", "target", "message"),
    [
        ("a,a,y\n1,x,0\n2,3,1\n", "y", "column 'a' appears twice in the CSV header"),
        (",b,y\n1,x,0\n2,3,1\n", "y", "column 1 name '': expected 1..128 printable"),
        ("label,y\nx,0\nz,1\n", "y", "text column 'label' would become an input tensor"),
        ("a,b,y\n1,2,0\n2,3,1\n", "label", "target column 'label' not in CSV header"),
        ("a,y\n1,0\n2,1\n3,2\n", "y", "target column 'y' must have exactly 2 classes, found 3"),
        ("a,y\n1,0\n2,0\n", "y", "target column 'y' must have exactly 2 classes, found 1"),
        ("", "y", "is empty"),
        ("a,y\n", "y", "has a header but no data rows"),
        ("a,y\n1,\n2,1\n", "y", "target column 'y' has missing values"),
        ("a,y\ninf,0\n2,1\n", "y", "feature column 'a' contains an infinite value"),
    ],
)
def test_csv_errors_name_the_column(tmp_path: Path, text: str, target: str, message: str) -> None:
    with pytest.raises(DataError, match=None) as exc:
        load_csv(_write(tmp_path, text), target)
    assert message in str(exc.value)


def test_bad_csv_through_cli_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, "a,b,y\n1,x,0\n2,3,1\n")
    out = tmp_path / "run"
    args = ["--csv", str(path), "--target", "y", "--drop", "c", "--output", str(out)]
    assert train_main(args) == 1
    assert not out.exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--drop: no column 'c' in the CSV header" in err


def test_constant_column_is_kept_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = "\n".join(f"{i},5,{i % 2}" for i in range(40))
    # `a` numbers the rows: kept as a feature only when asked to (--keep)
    data = load_csv(_write(tmp_path, "a,const,y\n" + rows + "\n"), "y", keep=["a"])
    with caplog.at_level(logging.WARNING):
        mean, std = feature_stats(data)
    assert std[1] == 1.0 and mean[1] == 5.0  # no division by zero downstream
    assert "'const' is constant" in caplog.text


def test_train_on_user_csv_with_missing_values(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 3))
    y = (x[:, 0] + 0.3 * rng.normal(size=120) > 0).astype(int)
    lines = ["f1,f2,f3,target"]
    for i, (row, label) in enumerate(zip(x, y, strict=False)):
        cells = [f"{v:.4f}" for v in row]
        if i % 10 == 0:
            cells[1] = ""
        lines.append(",".join([*cells, "yes" if label else "no"]))
    path = _write(tmp_path, "\n".join(lines) + "\n")
    out = tmp_path / "run"
    args = ["--csv", str(path), "--target", "target", "--epochs", "5", "--output", str(out)]
    assert train_main(args) == 0
    assert (out / "checkpoint.pt").exists()


def test_csv_column_kinds_are_inferred(tmp_path: Path) -> None:
    text = (
        "id, num , word,zip,target\n"
        "1, 1.5 , red ,10115, yes\n"
        "2, NA , ? ,20095,no\n"
        "3,,blue, 10115 ,yes\n"
        "4,2,  null,80331,no\n"
    )
    data = load_csv(_write(tmp_path, text), "target", categorical=["zip"], drop=["id"])
    assert data.feature_names == ["num"] and data.text_names == ["word", "zip"]
    assert data.columns == ("num", "word", "zip")
    assert data.features[:, 0].tolist()[0] == 1.5 and np.isnan(data.features[1:3, 0]).all()
    assert data.text.tolist() == [
        ["red", "10115"],
        ["?", "20095"],
        ["blue", "10115"],
        ["null", "80331"],
    ]  # stripped, markers kept as read: the codes map them to "missing"
    assert (data.target, data.positive_class) == ("target", "yes")
    assert data.labels.tolist() == [1, 0, 1, 0]
    # Without --categorical the integer zip codes are numbers.
    assert load_csv(_write(tmp_path, text), "target").feature_names == ["id", "num", "zip"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"drop": ["nope"]}, "--drop: no column 'nope' in the CSV header"),
        ({"categorical": ["y"]}, "--categorical: 'y' is the target column"),
    ],
)
def test_csv_option_errors(tmp_path: Path, options: dict[str, list[str]], message: str) -> None:
    with pytest.raises(DataError) as exc:
        load_csv(_write(tmp_path, "a,y\n1,0\n2,1\n"), "y", **options)
    assert message in str(exc.value)
