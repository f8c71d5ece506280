"""A pandas DataFrame or an array (X) and labels (y) -> the Dataset training reads.

The same rules as a CSV file: a column of numbers (NaN or None = missing) is numeric, a column of
anything else is text (categories), with NaN/None as the missing marker "". pandas is not needed:
a DataFrame is recognised by its `columns` and read column by column.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.utils import check_array, column_or_1d
from sklearn.utils.multiclass import check_classification_targets

from .categories import is_missing
from .data import DataError, Dataset

MISSING_TEXT = ""  # how a missing text cell (NaN, None) is written for the vocabulary


def column_names(X: Any) -> list[str] | None:
    """A DataFrame's column names (as str), or None for an array."""
    columns = getattr(X, "columns", None)
    return None if columns is None else [str(c) for c in columns]


def _columns(X: Any) -> tuple[list[str], list[np.ndarray], bool]:
    """(names, one 1-D array per column, whether the names came from the data)."""
    names = column_names(X)
    if names is not None:
        return names, [np.asarray(X.iloc[:, j]) for j in range(len(names))], True
    # scikit-learn's own checks and messages: 2-D, not sparse, not complex, no inf, >= 1 row.
    array = check_array(X, dtype=None, ensure_all_finite="allow-nan", accept_sparse=False)
    return [f"x{j}" for j in range(array.shape[1])], list(array.T), False


def _as_numbers(values: np.ndarray) -> np.ndarray | None:
    """float32 values (NaN = missing), or None when some cell is not a number."""
    if values.dtype.kind in "biuf":
        return values.astype(np.float32)
    out = np.empty(len(values), dtype=np.float32)
    for i, value in enumerate(values):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            out[i] = np.nan
            continue
        if isinstance(value, bool | np.bool_):
            return None
        if isinstance(value, str):
            text = value.strip()
            if is_missing(text):
                out[i] = np.nan
                continue
            value = text
        try:
            out[i] = float(value)
        except (TypeError, ValueError):
            return None
    return out


def _as_text(values: np.ndarray) -> np.ndarray:
    """Stripped str cells; NaN and None become the missing marker."""
    cells = [
        MISSING_TEXT
        if value is None or (isinstance(value, float) and math.isnan(value))
        else str(value).strip()
        for value in values
    ]
    return np.array(cells, dtype=str)


def read_table(
    X: Any, categorical: Sequence[str] = (), expected: Sequence[str] | None = None
) -> tuple[np.ndarray, list[str], np.ndarray, list[str], tuple[str, ...]]:
    """(numeric float32 [N, F], their names, text str [N, C], their names, all names in order).

    `expected`: the training columns; a DataFrame must hold them (by name, any order, extra
    columns ignored), an array must have exactly that many columns.
    """
    names, values, named = _columns(X)
    if expected is not None:
        if named:
            lacking = [c for c in expected if c not in names]
            if lacking:
                raise DataError(f"X lacks the model's columns {lacking}")
            values = [values[names.index(c)] for c in expected]
        elif len(names) != len(expected):
            raise DataError(
                f"X has {len(names)} features, but StableMLPClassifier is expecting "
                f"{len(expected)} features as input"
            )
        names = list(expected)
    numeric: dict[str, np.ndarray] = {}
    text: dict[str, np.ndarray] = {}
    for name, column in zip(names, values, strict=True):
        parsed = None if name in categorical else _as_numbers(column)
        if parsed is not None and np.isinf(parsed).any():
            raise DataError(f"column {name!r} contains an infinite value")
        if parsed is None:
            text[name] = _as_text(column)
        else:
            numeric[name] = parsed
    rows = len(values[0]) if values else 0
    features = np.stack(list(numeric.values()), 1) if numeric else np.empty((rows, 0), np.float32)
    strings = np.stack(list(text.values()), 1) if text else np.empty((rows, 0), dtype="<U1")
    return features, list(numeric), strings, list(text), tuple(names)


def binary_target(y: Any) -> tuple[np.ndarray, np.ndarray]:
    """(labels int64 0/1, classes_ sorted as scikit-learn sorts them; classes_[1] is positive)."""
    if y is None:
        raise DataError("StableMLPClassifier requires y to be passed, but the target y is None")
    values = column_or_1d(y, warn=True)  # a column vector is fine, with scikit-learn's warning
    check_classification_targets(values)  # "Unknown label type" for continuous targets
    if values.dtype.kind == "f" and np.isnan(values).any():
        raise DataError("y has missing values; every row needs a label")
    if values.dtype == object and any(v is None for v in values):
        raise DataError("y has missing values; every row needs a label")
    classes = np.unique(values)
    if len(classes) != 2:
        found = f"{len(classes)} class" + ("es" if len(classes) != 1 else "")
        raise DataError(
            f"Only binary classification is supported: y must have exactly 2 classes, got "
            f"{found}: {classes[:5]}"
        )
    return (values == classes[1]).astype(np.int64), classes


def to_dataset(
    X: Any, y: Any, categorical: Sequence[str] = (), name: str = "data", target: str = "target"
) -> tuple[Dataset, np.ndarray]:
    """(the Dataset, classes_) for `fit`."""
    features, numeric, strings, text, columns = read_table(X, categorical)
    labels, classes = binary_target(y)
    if len(labels) != len(features):
        raise DataError(f"X has {len(features)} rows, y has {len(labels)}")
    if not columns:
        raise DataError("X has no columns")
    data = Dataset(features, labels, numeric, name, strings, text, columns, target, str(classes[1]))
    return data, classes


__all__ = ["MISSING_TEXT", "binary_target", "column_names", "read_table", "to_dataset"]
