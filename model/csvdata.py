"""The user's CSV: a header row, feature columns typed numeric or categorical, a binary target.

A column is numeric when every cell is a number or a missing marker, categorical (text) otherwise
or when named in `categorical` (integer codes such as zip codes); columns named in `drop` are left
out. Cells are stripped of surrounding whitespace; MISSING_MARKERS mean "missing" in both kinds.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .categories import is_missing
from .data import DataError, Dataset, load_builtin

log = logging.getLogger(__name__)

# Tensor names of the served graph: a text column becomes an input named after it.
RESERVED_NAMES = ("features", "probability", "label")
# The manifest's limit on tensor and feature names (serving.manifest.MAX_NAME_CHARS).
MAX_NAME_CHARS = 128


def _number(cell: str) -> float | None:
    """A float, NaN for a missing marker, or None if the (stripped) cell is not a number."""
    if is_missing(cell):
        return math.nan
    try:
        return float(cell)
    except ValueError:
        return None


def _read(path: Path) -> tuple[list[str], list[list[str]]]:
    """(header, rows) with every cell stripped; blank lines skipped."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = [[cell.strip() for cell in row] for row in csv.reader(handle)]
    except OSError as err:
        raise DataError(f"cannot read CSV {str(path)!r}: {err.strerror}") from err
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"CSV {str(path)!r} is not UTF-8 CSV text: {err}") from err
    rows = [r for r in rows if any(r)]
    if not rows:
        raise DataError(f"CSV {str(path)!r} is empty")
    header, body = rows[0], rows[1:]
    if not body:
        raise DataError(f"CSV {str(path)!r} has a header but no data rows")
    for number, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DataError(f"CSV line {number}: {len(row)} cells, header has {len(header)}")
    return header, body


def _check_header(
    header: list[str], target: str, categorical: Sequence[str], drop: Sequence[str]
) -> None:
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise DataError(f"column {name!r} appears twice in the CSV header")
        seen.add(name)
    if target not in seen:
        raise DataError(f"target column {target!r} not in CSV header {header}")
    for option, names in (("--categorical", categorical), ("--drop", drop)):
        for name in names:
            if name not in seen:
                raise DataError(f"{option}: no column {name!r} in the CSV header")
            if name == target:
                raise DataError(f"{option}: {name!r} is the target column")
    for number, name in enumerate(header, start=1):
        if name == target or name in drop:
            continue
        if not 0 < len(name) <= MAX_NAME_CHARS or not name.isprintable():
            raise DataError(
                f"column {number} name {name[:40]!r}: expected 1..{MAX_NAME_CHARS} printable "
                "characters (rename it or --drop it)"
            )


def _binary_labels(values: list[str], target: str) -> tuple[np.ndarray, str]:
    """0/1 labels and the positive class: the larger number, or the later text in sorted order."""
    distinct = sorted(set(values))
    if any(is_missing(v) for v in distinct):
        raise DataError(f"target column {target!r} has missing values; every row needs a label")
    if len(distinct) != 2:
        shown = ", ".join(repr(v) for v in distinct[:5])
        raise DataError(
            f"target column {target!r} must have exactly 2 classes, found {len(distinct)}: {shown}"
        )
    numeric = [_number(v) for v in distinct]
    if all(n is not None for n in numeric):
        # Numeric labels: the larger value is the positive class (0/1, -1/1, 1/2 all work).
        positive = distinct[int(np.argmax([n for n in numeric if n is not None]))]
    else:
        positive = distinct[1]
    return np.array([v == positive for v in values], dtype=np.int64), positive


def load_csv(
    path: Path, target: str, categorical: Sequence[str] = (), drop: Sequence[str] = ()
) -> Dataset:
    """A header row, feature columns (numeric or text; missing markers allowed), a binary target."""
    header, body = _read(path)
    _check_header(header, target, categorical, drop)
    numeric: dict[str, list[float]] = {}
    text: dict[str, list[str]] = {}
    for i, name in enumerate(header):
        if name == target or name in drop:
            continue
        cells = [row[i] for row in body]
        parsed = [] if name in categorical else [_number(cell) for cell in cells]
        if name not in categorical and all(p is not None for p in parsed):
            numeric[name] = [p for p in parsed if p is not None]
            continue
        if name in RESERVED_NAMES:
            raise DataError(
                f"text column {name!r} would become an input tensor of that name, which the "
                f"served model uses itself ({', '.join(RESERVED_NAMES)}); rename it"
            )
        text[name] = cells
    if not numeric and not text:
        raise DataError(f"CSV {str(path)!r} has no feature columns besides {target!r}")
    features = np.array(list(numeric.values()), dtype=np.float32).T.reshape(len(body), len(numeric))
    if np.isinf(features).any():
        column = list(numeric)[int(np.argwhere(np.isinf(features))[0][1])]
        raise DataError(f"feature column {column!r} contains an infinite value")
    labels, positive = _binary_labels([row[header.index(target)] for row in body], target)
    strings = np.array(list(text.values()), dtype=str).T.reshape(len(body), len(text))
    columns = tuple(name for name in header if name in numeric or name in text)
    return Dataset(
        features, labels, list(numeric), path.stem, strings, list(text), columns, target, positive
    )


def load_dataset(
    csv_path: Path | None = None,
    target: str | None = None,
    categorical: Sequence[str] = (),
    drop: Sequence[str] = (),
) -> Dataset:
    """The built-in data set, or the CSV (which then needs `target`)."""
    if csv_path is None:
        if categorical or drop:
            raise DataError("--categorical and --drop apply to a --csv file")
        return load_builtin()
    if not target:
        raise DataError("--target COLUMN is required with --csv")
    return load_csv(csv_path, target, categorical, drop)


__all__ = ["MAX_NAME_CHARS", "RESERVED_NAMES", "load_csv", "load_dataset"]
