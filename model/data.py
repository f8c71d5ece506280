"""Data sets, offline only: scikit-learn's bundled breast-cancer data, or the user's CSV.

Features come back as float32 with NaN for missing values; the imputation and standardization
statistics are computed on the training split only (see `feature_stats`).
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

log = logging.getLogger(__name__)

BUILTIN_NAME = "breast_cancer"
# Empty cells and these spellings mean "missing" (the usual pandas/R defaults).
_MISSING = {"", "na", "nan", "null", "none", "?"}


class DataError(ValueError):
    """The data cannot be used as given; the message names the column or file at fault."""


@dataclass(frozen=True)
class Dataset:
    features: np.ndarray  # float32 [N, F], NaN where missing
    labels: np.ndarray  # int64 [N], values in {0, 1}
    feature_names: list[str]
    name: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> Dataset:
        return Dataset(self.features[index], self.labels[index], self.feature_names, self.name)


@dataclass(frozen=True)
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset


def load_builtin() -> Dataset:
    """Wisconsin diagnostic breast cancer (569 rows, 30 features), shipped inside scikit-learn."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    # sklearn codes malignant as 0; predict "malignant" as the positive class, the usual framing.
    labels = (bunch.target == 0).astype(np.int64)
    names = [str(n) for n in bunch.feature_names]
    return Dataset(bunch.data.astype(np.float32), labels, names, BUILTIN_NAME)


def _parse_cell(cell: str) -> float | None:
    """A float, NaN for a missing marker, or None if the cell is not numeric."""
    text = cell.strip()
    if text.lower() in _MISSING:
        return math.nan
    try:
        return float(text)
    except ValueError:
        return None


def _binary_labels(values: list[str], target: str) -> np.ndarray:
    distinct = sorted({v.strip() for v in values})
    if any(v.lower() in _MISSING for v in distinct):
        raise DataError(f"target column {target!r} has missing values; every row needs a label")
    if len(distinct) != 2:
        shown = ", ".join(repr(v) for v in distinct[:5])
        raise DataError(
            f"target column {target!r} must have exactly 2 classes, found {len(distinct)}: {shown}"
        )
    numeric = [_parse_cell(v) for v in distinct]
    if all(n is not None for n in numeric):
        # Numeric labels: the larger value is the positive class (0/1, -1/1, 1/2 all work).
        positive = distinct[int(np.argmax([n for n in numeric if n is not None]))]
    else:
        positive = distinct[1]
    log.info("target %r: positive class is %r", target, positive)
    return np.array([v.strip() == positive for v in values], dtype=np.int64)


def load_csv(path: Path, target: str) -> Dataset:
    """A header row, numeric feature columns (empty cell = missing), one binary target column."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except OSError as err:
        raise DataError(f"cannot read CSV {str(path)!r}: {err.strerror}") from err
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"CSV {str(path)!r} is empty")
    header, body = [h.strip() for h in rows[0]], rows[1:]
    if target not in header:
        raise DataError(f"target column {target!r} not in CSV header {header}")
    if not body:
        raise DataError(f"CSV {str(path)!r} has a header but no data rows")
    for number, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DataError(f"CSV line {number}: {len(row)} cells, header has {len(header)}")
    target_index = header.index(target)
    feature_names = [h for i, h in enumerate(header) if i != target_index]
    if not feature_names:
        raise DataError(f"CSV {str(path)!r} has no feature columns besides {target!r}")
    columns = []
    for i, name in enumerate(header):
        if i == target_index:
            continue
        parsed = [_parse_cell(row[i]) for row in body]
        bad = next((row[i] for row, p in zip(body, parsed, strict=False) if p is None), None)
        if bad is not None:
            raise DataError(f"feature column {name!r} is not numeric (value {bad.strip()!r})")
        columns.append(parsed)
    features = np.array(columns, dtype=np.float32).T
    if np.isinf(features).any():
        column = feature_names[int(np.argwhere(np.isinf(features))[0][1])]
        raise DataError(f"feature column {column!r} contains an infinite value")
    labels = _binary_labels([row[target_index] for row in body], target)
    return Dataset(features, labels, feature_names, path.stem)


def load_dataset(csv_path: Path | None = None, target: str | None = None) -> Dataset:
    if csv_path is None:
        return load_builtin()
    if not target:
        raise DataError("--target COLUMN is required with --csv")
    return load_csv(csv_path, target)


def split_dataset(
    data: Dataset, seed: int, val_fraction: float = 0.15, test_fraction: float = 0.15
) -> Splits:
    """Stratified, seeded train / validation / test split."""
    index = np.arange(len(data))
    counts = np.bincount(data.labels, minlength=2)
    if counts.min() < 3:
        raise DataError(f"each class needs at least 3 rows to split, got counts {counts.tolist()}")
    rest, test = train_test_split(
        index, test_size=test_fraction, stratify=data.labels, random_state=seed
    )
    train, val = train_test_split(
        rest,
        test_size=val_fraction / (1 - test_fraction),
        stratify=data.labels[rest],
        random_state=seed,
    )
    return Splits(data.subset(train), data.subset(val), data.subset(test))


def feature_stats(train: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and safe std of the training split, ignoring NaN.

    A constant column (std 0) or an all-missing one would divide by zero: it is kept with std 1
    (it then standardizes to 0 and carries no signal) and a warning names it.
    """
    with np.errstate(all="ignore"):
        mean = np.nanmean(train.features.astype(np.float64), axis=0)
        std = np.nanstd(train.features.astype(np.float64), axis=0)
    for i, name in enumerate(train.feature_names):
        if not np.isfinite(mean[i]):
            log.warning("feature %r is missing in every training row; imputed as 0", name)
            mean[i] = 0.0
        if not np.isfinite(std[i]) or std[i] < 1e-12:
            log.warning("feature %r is constant in the training split; it carries no signal", name)
            std[i] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


__all__ = [
    "BUILTIN_NAME",
    "DataError",
    "Dataset",
    "Splits",
    "feature_stats",
    "load_builtin",
    "load_csv",
    "load_dataset",
    "split_dataset",
]
