"""Categorical columns: which cells mean "missing", the vocabulary learned on training rows, codes.

Codes of a column with K categories: 0..K-1 the categories (most frequent first), K "other" (rare
in training, beyond the K most frequent, or never seen), K+1 "missing". Torch-free: the CSV reader,
training, the exported graph's lookup and `stablemlp verify` all build on `CategoricalColumn.table`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Cells that mean "missing", compared after stripping surrounding whitespace, in exactly these
# spellings: lower, UPPER, Title and Capitalized case of the usual pandas/R markers, plus "NaN"
# and "?" (UCI files). An exact list, not a case-insensitive test, because the exported graph
# (an ONNX LabelEncoder) can only match exact strings, and training must code text as it does.
_MARKER_WORDS = ("na", "nan", "null", "none", "n/a")
MISSING_MARKERS: tuple[str, ...] = tuple(
    sorted(
        {"", "?", "NaN"}
        | {case(word) for word in _MARKER_WORDS for case in (str.lower, str.upper, str.title)}
        | {word.capitalize() for word in _MARKER_WORDS}
    )
)
_MISSING = frozenset(MISSING_MARKERS)
# Categories seen in fewer training rows than this share the "other" code: a handful of rows
# teaches a category nothing reliable, and "other" then also learns what a rare value looks like.
MIN_CATEGORY_COUNT = 5
# At most this many categories per column (the most frequent); the rest are "other", with a
# warning. Bounds the encoding's width (one-hot) and the LabelEncoder's table.
MAX_CATEGORIES = 64


def is_missing(cell: str) -> bool:
    """True if the (stripped) cell is a missing-value marker."""
    return cell in _MISSING


@dataclass(frozen=True)
class CategoricalColumn:
    """One text column: its vocabulary in code order, and how many training rows had each code."""

    name: str
    categories: tuple[str, ...]
    counts: tuple[int, ...]  # training rows per code: each category, then other, then missing

    @property
    def other(self) -> int:
        """The code of rare, excess and unseen categories."""
        return len(self.categories)

    @property
    def missing(self) -> int:
        """The code of a missing cell (a marker of MISSING_MARKERS)."""
        return len(self.categories) + 1

    @property
    def slots(self) -> int:
        """How many codes there are."""
        return len(self.categories) + 2

    def table(self) -> dict[str, int]:
        """Text -> code for every spelling with a code of its own; any other text is `other`."""
        table = dict.fromkeys(MISSING_MARKERS, self.missing)
        table.update((category, code) for code, category in enumerate(self.categories))
        return table

    def codes(self, values: Sequence[str] | np.ndarray) -> np.ndarray:
        """int64 codes of stripped cells."""
        table, other = self.table(), self.other
        return np.array([table.get(str(v), other) for v in values], dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": "categorical",
            "categories": list(self.categories),
            "other": self.other,
            "missing": self.missing,
            "counts": list(self.counts),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CategoricalColumn:
        categories = tuple(str(c) for c in data["categories"])
        counts = tuple(int(c) for c in data.get("counts", [1] * (len(categories) + 2)))
        if len(counts) != len(categories) + 2 or len(set(categories)) != len(categories):
            raise ValueError(f"column {data.get('name')!r}: inconsistent categories or counts")
        return cls(str(data["name"]), categories, counts)


def learn_column(
    name: str,
    values: Sequence[str] | np.ndarray,
    min_count: int = MIN_CATEGORY_COUNT,
    max_categories: int = MAX_CATEGORIES,
) -> CategoricalColumn:
    """The vocabulary of one column from its training cells (stripped text)."""
    seen = Counter(str(v) for v in values)
    missing = sum(count for value, count in seen.items() if is_missing(value))
    frequent = sorted(
        ((count, value) for value, count in seen.items() if not is_missing(value)),
        key=lambda pair: (-pair[0], pair[1]),
    )
    kept = [(count, value) for count, value in frequent if count >= min_count]
    if len(kept) > max_categories:
        log.warning(
            "column %r has %d categories seen at least %d times; keeping the %d most frequent, "
            "the rest count as 'other'",
            name,
            len(kept),
            min_count,
            max_categories,
        )
        kept = kept[:max_categories]
    other = sum(count for count, _ in frequent) - sum(count for count, _ in kept)
    return CategoricalColumn(
        name, tuple(value for _, value in kept), (*(c for c, _ in kept), other, missing)
    )


__all__ = [
    "MAX_CATEGORIES",
    "MIN_CATEGORY_COUNT",
    "MISSING_MARKERS",
    "CategoricalColumn",
    "is_missing",
    "learn_column",
]
