"""Client-side rows to a model's columns: numbers as one FP32 matrix, text columns as strings.

A model's columns (`Schema`, read from its ModelConfig) are matched by name, whatever the order the
caller's records, DataFrame or CSV has them in; extra columns are ignored, missing ones named in the
error. Missing values: an empty cell, NA, NaN, null, None, ? (any case, surrounding spaces too)
become NaN in a numeric column and "" (the missing category) in a text one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...csvfile import BATCH_ROWS, open_csv
from ..datatypes import BYTES

MISSING = {"", "na", "nan", "null", "none", "?", "n/a"}


class ClientError(ValueError):
    """Rows that do not fit the model, or no model to choose."""


@dataclass(frozen=True)
class Schema:
    """What a model takes: its FP32 input's columns, its text inputs, its batch size."""

    model: str
    numeric_input: str  # "" when the model has only text columns
    feature_names: tuple[str, ...]  # the FP32 input's columns, in order
    text_columns: tuple[str, ...]  # one BYTES input each, named after the column
    max_batch_size: int

    @classmethod
    def from_config(cls, config: Any) -> Schema:
        """From a ModelConfig message (the server's facts: parameters feature_names etc.)."""
        numeric = [i.name for i in config.input if i.data_type != _TYPE_STRING]
        text = [i.name for i in config.input if i.data_type == _TYPE_STRING]
        names = json.loads(config.parameters["feature_names"].string_value or "[]")
        return cls(config.name, numeric[0] if numeric else "", tuple(names), tuple(text),
                   max(1, config.max_batch_size))  # fmt: skip

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.feature_names, *self.text_columns)


_TYPE_STRING = BYTES.config_type  # text inputs


@dataclass(frozen=True)
class Columns:
    numeric: np.ndarray  # float32 [rows, len(feature_names)], NaN = missing
    text: dict[str, list[str]]  # column -> one value per row ("" = missing)

    @property
    def rows(self) -> int:
        return len(self.numeric)

    def slice(self, start: int, stop: int) -> Columns:
        return Columns(self.numeric[start:stop], {k: v[start:stop] for k, v in self.text.items()})


def number(value: Any, column: str, row: int) -> float:
    """A cell of a numeric column as a float; missing markers are NaN."""
    if value is None:
        return math.nan
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    if text.lower() in MISSING:
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise ClientError(
            f"row {row} column '{column}': got {text[:40]!r}, expected a number (or empty)"
        ) from None


def label(value: Any) -> str:
    """A cell of a text column; missing values are the missing category ("")."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = str(value).strip()
    return "" if text.lower() in MISSING else text


def from_records(records: Iterable[Mapping[str, Any]], schema: Schema) -> Columns:
    """Records (dicts keyed by column name) to columns; missing keys are an error."""
    numeric: list[list[float]] = []
    text: dict[str, list[str]] = {name: [] for name in schema.text_columns}
    for row, record in enumerate(records):
        absent = [name for name in schema.columns if name not in record]
        if absent:
            raise ClientError(f"row {row}: missing columns {absent} (model '{schema.model}')")
        numeric.append([number(record[name], name, row) for name in schema.feature_names])
        for name in schema.text_columns:
            text[name].append(label(record[name]))
    matrix = np.asarray(numeric, dtype=np.float32).reshape(len(numeric), len(schema.feature_names))
    return Columns(matrix, text)


def from_rows(rows: Any, schema: Schema) -> Columns:
    """Whatever `predict` was given: a numeric matrix (numbers-only models), records, or a
    DataFrame (anything with `to_dict("records")`)."""
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):
        return from_records(rows.to_dict("records"), schema)
    if isinstance(rows, Sequence) and rows and isinstance(rows[0], Mapping):
        return from_records(rows, schema)
    if schema.text_columns:
        raise ClientError(
            f"model '{schema.model}' has text columns {list(schema.text_columns)}: send records "
            "(dicts by column name) or a DataFrame"
        )
    width = len(schema.feature_names)
    array = np.asarray(rows, dtype=np.float32) if len(rows) else np.empty((0, width), np.float32)
    if array.ndim != 2 or array.shape[1] != width:
        raise ClientError(
            f"rows: got shape {list(array.shape)}, expected [N, {width}] for model '{schema.model}'"
        )
    return Columns(array, {})


def read_csv(
    path: Path,
    schema: Schema,
    sep: str | None = None,
    encoding: str | None = None,
    na_values: Collection[str] = (),
) -> Columns:
    """A CSV with a header row: the model's columns by name, in any order, others ignored."""
    batches = list(csv_batches(path, schema, BATCH_ROWS, sep, encoding, na_values))
    if not batches:
        return from_records([], schema)
    numeric = np.concatenate([batch.numeric for batch in batches])
    text = {name: [v for batch in batches for v in batch.text[name]] for name in batches[0].text}
    return Columns(numeric, text)


def csv_batches(
    path: Path,
    schema: Schema,
    rows: int,
    sep: str | None = None,
    encoding: str | None = None,
    na_values: Collection[str] = (),
) -> Iterator[Columns]:
    """The file's rows as the model's columns, `rows` at a time, read as `train` reads a CSV
    (csvfile: detected delimiter, BOM, `encoding`); `na_values` are more missing markers."""
    found = open_csv(path, sep, encoding)
    missing = [name for name in schema.columns if name not in found.header]
    if missing:
        raise ClientError(f"{path}: header lacks the model's columns {missing}")
    where = [found.header.index(name) for name in schema.feature_names]
    blank = [value.strip() for value in na_values]  # exact spellings, as `train` reads them
    done = 0
    for batch in found.batches(rows):
        cells = np.array(batch, dtype=object).reshape(len(batch), len(found.header))
        if blank:
            cells[np.isin(np.char.strip(cells.astype(str)), blank)] = ""
        numeric = _numbers(cells[:, where], schema.feature_names, done)
        text = {
            name: [label(v) for v in cells[:, found.header.index(name)]]
            for name in schema.text_columns
        }
        done += len(batch)
        yield Columns(numeric, text)


def _numbers(cells: np.ndarray, names: Sequence[str], first_row: int) -> np.ndarray:
    """float32 [rows, columns]: numpy's conversion at once (empty cells as NaN), else cell by
    cell (other markers, errors naming the row)."""
    empty = cells == ""  # the usual missing cell: "nan" for numpy's conversion
    if empty.any():
        cells = cells.copy()
        cells[empty] = "nan"
    try:
        return cells.astype(np.float32)
    except ValueError:
        rows = [
            [number(v, names[j], first_row + i) for j, v in enumerate(row)]
            for i, row in enumerate(cells)
        ]
        return np.asarray(rows, dtype=np.float32).reshape(cells.shape)


__all__ = [
    "MISSING",
    "ClientError",
    "Columns",
    "Schema",
    "csv_batches",
    "from_records",
    "from_rows",
    "label",
    "number",
    "read_csv",
]
