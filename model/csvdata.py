"""The user's CSV: a header row, feature columns typed numeric or categorical, a binary target.

The file is read by `csvfile` (delimiter, encoding, BOM, line ends) in batches, each parsed into
numpy at once: numbers as float32, text as codes into a per-column vocabulary, so memory follows
the arrays, not the file's strings. A column is numeric when every cell is a number or a missing
marker, categorical (text) otherwise or when named in `categorical`; columns named in `drop` are
left out, and so are identifiers (a text column unique in (nearly) every row, an integer row
index) unless named in `keep`. Cells are stripped of surrounding whitespace; MISSING_MARKERS and
the caller's `na_values` mean "missing" in both kinds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..csvfile import CsvError, CsvFile, open_csv
from .categories import MISSING_MARKERS
from .data import DataError, Dataset, load_builtin

log = logging.getLogger(__name__)

# Tensor names of the served graph: a text column becomes an input named after it.
RESERVED_NAMES = ("features", "probability", "label")
OUTPUT_NAMES = ("probability", "label")
# The manifest's limit on tensor and feature names (serving.manifest.MAX_NAME_CHARS).
MAX_NAME_CHARS = 128
# Identifier columns: a text column whose distinct values cover at least this share of its
# non-missing rows can only memorise rows (a category needs MIN_CATEGORY_COUNT rows to be kept,
# so nearly all of it would be "other"). Judged only from this many rows on: in a 10-row file a
# column of names is unique by chance.
ID_UNIQUE_SHARE = 0.9
ID_MIN_ROWS = 20
# Target pairs whose positive side is plain (compared lower-cased); 1/0 are compared as numbers.
OBVIOUS_PAIRS = {
    frozenset(("yes", "no")): "yes",
    frozenset(("y", "n")): "y",
    frozenset(("true", "false")): "true",
    frozenset(("t", "f")): "t",
    frozenset(("positive", "negative")): "positive",
    frozenset(("pos", "neg")): "pos",
}


def _number(cell: str, missing: frozenset[str]) -> float | None:
    """A float, NaN for a missing marker, or None if the (stripped) cell is not a number."""
    if cell in missing:
        return math.nan
    try:
        return float(cell)
    except ValueError:
        return None


@dataclass(frozen=True)
class _Markers:
    """Which cells are missing: `all` of them (built-in and the caller's), the caller's own
    (`blank`, stored as "" in text), and those of the caller's that are numbers (-999)."""

    all: frozenset[str]
    blank: frozenset[str]
    numbers: tuple[float, ...]

    @classmethod
    def build(cls, na_values: Sequence[str]) -> _Markers:
        blank = frozenset(v.strip() for v in na_values) - {""}
        numbers = tuple(n for n in (_number(v, frozenset()) for v in blank) if n is not None)
        return cls(frozenset(MISSING_MARKERS) | blank, blank, numbers)


@dataclass
class _Column:
    """One column as it is read: float32 batches while every cell is a number, else codes into
    `vocabulary` (stripped text -> code)."""

    name: str
    position: int  # in the file's rows
    text: bool  # typed text: forced, or a non-number seen
    numbers: list[np.ndarray] = field(default_factory=list)
    codes: list[np.ndarray] = field(default_factory=list)
    vocabulary: dict[str, int] = field(default_factory=dict)

    def add(self, cells: np.ndarray, markers: _Markers) -> bool:
        """Parse one batch; False if this numeric column just met text after earlier batches
        (the caller reads the file again with the column typed text from the start). The
        caller's markers are stored as "" in text, which every reader of the data knows as
        missing; the built-in markers are kept as written."""
        if not self.text:
            values = _numbers(cells, markers)
            if values is not None:
                self.numbers.append(values)
                return True
            if self.numbers:
                return False
            self.text = True
        index, blank = self.vocabulary, markers.blank
        words = list(map(str.strip, cells))
        if blank:
            words = ["" if word in blank else word for word in words]
        for word in dict.fromkeys(words):  # the batch's distinct words, new ones coded next
            if word not in index:
                index[word] = len(index)
        self.codes.append(np.fromiter(map(index.__getitem__, words), np.int32, len(words)))
        return True

    def values(self) -> np.ndarray:
        """float32 [N] of a numeric column; the text of a text column as fixed-width str [N]."""
        if not self.text:
            return np.concatenate(self.numbers) if self.numbers else np.empty(0, np.float32)
        words = np.array(list(self.vocabulary), dtype=str) if self.vocabulary else np.array([""])
        return words[np.concatenate(self.codes) if self.codes else np.empty(0, np.int32)]

    def missing_rows(self, missing: frozenset[str]) -> int:
        if not self.text:
            return sum(int(np.isnan(batch).sum()) for batch in self.numbers)
        counts = np.bincount(np.concatenate(self.codes), minlength=len(self.vocabulary))
        return sum(int(counts[code]) for word, code in self.vocabulary.items() if word in missing)

    def release(self) -> None:
        """Drop the batches once the column's values are copied out (or it is left out)."""
        self.numbers, self.codes, self.vocabulary = [], [], {}


def _numbers(cells: np.ndarray, markers: _Markers) -> np.ndarray | None:
    """float32 of a batch of cells, or None if one is text. The fast path is numpy's own
    conversion (float() per cell, spaces allowed) with empty cells as "nan"; other markers
    take the slow path."""
    try:
        values = _empty_as_nan(cells).astype(np.float64)
    except ValueError:
        parsed = [_number(cell.strip(), markers.all) for cell in cells]
        if any(value is None for value in parsed):
            return None
        values = np.array(parsed, dtype=np.float64)
    if markers.numbers:
        values[np.isin(values, markers.numbers)] = np.nan
    return values.astype(np.float32)


def _empty_as_nan(cells: np.ndarray) -> np.ndarray:
    """The cells with "" (the usual missing cell) written "nan", which float() reads as NaN."""
    empty = cells == ""
    if not empty.any():
        return cells
    cells = cells.copy()
    cells[empty] = "nan"
    return cells


def _check_header(
    header: Sequence[str],
    target: str,
    categorical: Sequence[str],
    drop: Sequence[str],
    keep: Sequence[str],
) -> None:
    seen: set[str] = set()
    for number, name in enumerate(header, start=1):
        if name in seen:
            raise DataError(f"column {name!r} appears twice in the CSV header")
        seen.add(name)
        if name == target or name in drop or not name:
            continue  # an unnamed column may be a written-out row index: judged once read
        if not 0 < len(name) <= MAX_NAME_CHARS or not name.isprintable():
            raise DataError(
                f"column {number} name {name[:40]!r}: expected 1..{MAX_NAME_CHARS} printable "
                "characters (rename it or --drop it)"
            )
    if target not in seen:
        raise DataError(f"target column {target!r} not in CSV header {list(header)}")
    for option, names in (("--categorical", categorical), ("--drop", drop), ("--keep", keep)):
        for name in names:
            if name not in seen:
                raise DataError(f"{option}: no column {name!r} in the CSV header")
            if name == target:
                raise DataError(f"{option}: {name!r} is the target column")


def _positive(values: Sequence[str], target: str, chosen: str | None) -> tuple[str, str, bool]:
    """(the positive class, the rule that chose it, whether the choice deserves a warning)."""
    if chosen is not None:
        if chosen not in values:
            shown = " and ".join(repr(v) for v in values)
            raise DataError(f"--positive-class {chosen!r}: target {target!r} holds {shown}")
        return chosen, "--positive-class", False
    plain = OBVIOUS_PAIRS.get(frozenset(v.lower() for v in values))
    if plain is not None:
        positive = next(v for v in values if v.lower() == plain)
        return positive, f"{positive!r} of the pair {values[0]!r}/{values[1]!r}", False
    numbers = [_number(v, frozenset()) for v in values]
    if all(n is not None for n in numbers):
        low, high = sorted(values, key=lambda v: float(v))
        if {float(low), float(high)} == {0.0, 1.0}:
            return high, "1 of 1/0", False
        return high, f"the larger number of {low!r} and {high!r}", True
    low, high = sorted(values)
    return high, f"the later of {low!r} and {high!r} in sorted order", True


def _labels(
    column: _Column, target: str, chosen: str | None, missing: frozenset[str]
) -> tuple[np.ndarray, str, str]:
    """int64 0/1 labels, the positive class and the printed rule (the target is read as text)."""
    classes = list(column.vocabulary)
    if any(value in missing for value in classes):
        raise DataError(f"target column {target!r} has missing values; every row needs a label")
    if len(classes) != 2:
        shown = ", ".join(repr(v) for v in sorted(classes)[:5])
        raise DataError(
            f"target column {target!r} must have exactly 2 classes, found {len(classes)}: {shown}"
        )
    positive, rule, doubtful = _positive(sorted(classes), target, chosen)
    if doubtful:
        log.warning(
            "target %r: positive class %r, %s (not an obvious yes/no, true/false or 1/0 pair); "
            "--positive-class chooses",
            target,
            positive,
            rule,
        )
    code = column.vocabulary[positive]
    labels = (np.concatenate(column.codes) == code).astype(np.int64)
    return labels, positive, f"positive class {positive!r}: {rule}"


def _is_row_index(values: np.ndarray) -> bool:
    """Integers k, k+1, ..., k+N-1, each once, in any order: a row number, not a measurement.
    (float32 holds integers exactly up to 2**24, the limit of this test.)"""
    if len(values) < ID_MIN_ROWS or np.isnan(values).any():
        return False
    if (values != np.round(values)).any():
        return False
    low, high = float(values.min()), float(values.max())
    return high - low == len(values) - 1 and len(np.unique(values)) == len(values)


def _why_left_out(column: _Column, rows: int, missing: frozenset[str]) -> str | None:
    """Why an identifier column is left out, or None to keep it."""
    if not column.text:
        if _is_row_index(column.values()):
            return "integers numbering the rows (a row index)"
        return None
    filled = rows - column.missing_rows(missing)
    distinct = sum(1 for word in column.vocabulary if word not in missing)
    if filled >= ID_MIN_ROWS and distinct >= ID_UNIQUE_SHARE * filled:
        return f"text unique in {distinct / filled:.0%} of its rows (an identifier)"
    return None


def _read(
    found: CsvFile,
    columns: list[_Column],
    markers: _Markers,
    progress: Callable[[int], None] | None,
) -> tuple[int, list[str]]:
    """(rows read, columns that met text after numbers): every batch into the columns."""
    rows, retype = 0, []
    for batch in found.batches(progress=progress):
        cells = np.array(batch, dtype=object).reshape(len(batch), len(found.header))
        for column in columns:
            if not column.add(cells[:, column.position], markers):
                retype.append(column.name)
        if retype:
            return rows, retype
        rows += len(batch)
    return rows, retype


def load_csv(
    path: Path,
    target: str,
    categorical: Sequence[str] = (),
    drop: Sequence[str] = (),
    *,
    keep: Sequence[str] = (),
    na_values: Sequence[str] = (),
    positive_class: str | None = None,
    sep: str | None = None,
    file_encoding: str | None = None,
    progress: bool = False,
) -> Dataset:
    """A header row, feature columns (numeric or text; missing markers allowed), a binary target."""
    try:
        found = open_csv(path, sep, file_encoding)
    except CsvError as err:
        raise DataError(str(err)) from None
    header = found.header
    _check_header(header, target, categorical, drop, keep)
    markers = _Markers.build(na_values)
    missing = markers.all
    columns, rows = _read_all(found, target, categorical, drop, markers, progress)
    if rows == 0:
        raise DataError(f"CSV {str(path)!r} has a header but no data rows")
    by_name = {column.name: column for column in columns}
    labels, positive, rule = _labels(by_name.pop(target), target, positive_class, missing)
    notes = [f"read {path.name}: {found.format.describe()}, {rows:,} rows", rule]
    features = [c for c in by_name.values() if _usable(c, rows, keep, categorical, missing, notes)]
    if not features:
        raise DataError(f"CSV {str(path)!r} has no feature columns besides {target!r}")
    return _dataset(path, features, labels, target, positive, tuple(notes))


def _read_all(
    found: CsvFile,
    target: str,
    categorical: Sequence[str],
    drop: Sequence[str],
    markers: _Markers,
    progress: bool,
) -> tuple[list[_Column], int]:
    """Every column but the dropped ones, and the row count: one pass over the file, or two when
    a column turns out to hold text after batches of numbers."""
    text = {target, *categorical}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=found.size, unit="B", unit_scale=True, desc=f"read {found.path.name}")
    try:
        while True:
            columns = [
                _Column(name, i, name in text)
                for i, name in enumerate(found.header)
                if name not in drop
            ]
            rows, retype = _read(found, columns, markers, bar.update if bar else None)
            if not retype:
                return columns, rows
            log.info("columns %s hold text after numbers: reading the file again", retype)
            text.update(retype)
            if bar is not None:
                bar.reset()
    except CsvError as err:
        raise DataError(str(err)) from None
    finally:
        if bar is not None:
            bar.close()


def _usable(
    column: _Column,
    rows: int,
    keep: Sequence[str],
    categorical: Sequence[str],
    missing: frozenset[str],
    notes: list[str],
) -> bool:
    """Checks a feature column; False (with a note) for an identifier to leave out."""
    name = column.name
    if column.missing_rows(missing) == rows:
        raise DataError(f"column {name!r} is empty (missing in every row): --drop it")
    if column.text and name in RESERVED_NAMES:
        raise DataError(
            f"text column {name!r} would become an input tensor of that name, which the "
            f"served model uses itself ({', '.join(RESERVED_NAMES)}); rename it"
        )
    if name in OUTPUT_NAMES:
        raise DataError(
            f"column {name!r} is named like an output of the served model "
            f"({', '.join(OUTPUT_NAMES)}): a prediction written back? rename it or --drop it"
        )
    if not column.text and np.isinf(column.values()).any():
        raise DataError(f"feature column {name!r} contains an infinite value")
    why = None if name in keep or name in categorical else _why_left_out(column, rows, missing)
    if not name:  # pandas' to_csv writes its index so, under an empty name
        if why is None:
            raise DataError(
                f"column {column.position + 1} name '': expected 1..{MAX_NAME_CHARS} printable "
                "characters (rename it)"
            )
        notes.append(f"left out column {column.position + 1} (no name): {why}")
    elif why is not None:
        notes.append(f"left out {name!r}: {why}; --keep {name} uses it")
    if why is not None:
        column.release()
    return why is None


def _dataset(
    path: Path,
    columns: list[_Column],
    labels: np.ndarray,
    target: str,
    positive: str,
    notes: tuple[str, ...],
) -> Dataset:
    numeric = [c for c in columns if not c.text]
    text = [c for c in columns if c.text]
    rows = len(labels)
    features = np.empty((rows, len(numeric)), dtype=np.float32)
    for j, column in enumerate(numeric):
        features[:, j] = column.values()
        column.release()
    width = max((len(word) for c in text for word in c.vocabulary), default=1)
    strings = np.empty((rows, len(text)), dtype=f"<U{max(width, 1)}")
    for j, column in enumerate(text):
        strings[:, j] = column.values()
        column.release()
    return Dataset(
        features,
        labels,
        [c.name for c in numeric],
        path.stem,
        strings,
        [c.name for c in text],
        tuple(c.name for c in columns),
        target,
        positive,
        notes,
    )


def load_dataset(
    csv_path: Path | None = None,
    target: str | None = None,
    categorical: Sequence[str] = (),
    drop: Sequence[str] = (),
    *,
    keep: Sequence[str] = (),
    na_values: Sequence[str] = (),
    positive_class: str | None = None,
    sep: str | None = None,
    file_encoding: str | None = None,
    progress: bool = False,
) -> Dataset:
    """The built-in data set, or the CSV (which then needs `target`)."""
    if csv_path is None:
        given = categorical or drop or keep or na_values or positive_class or sep or file_encoding
        if given:
            raise DataError(
                "--categorical, --drop, --keep, --na-values, --positive-class, --sep and "
                "--file-encoding apply to a --csv file"
            )
        return load_builtin()
    if not target:
        raise DataError("--target COLUMN is required with --csv")
    return load_csv(
        csv_path,
        target,
        categorical,
        drop,
        keep=keep,
        na_values=na_values,
        positive_class=positive_class,
        sep=sep,
        file_encoding=file_encoding,
        progress=progress,
    )


__all__ = ["MAX_NAME_CHARS", "RESERVED_NAMES", "load_csv", "load_dataset"]
