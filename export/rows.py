"""Rows the parity proofs run on, besides the held-out test split.

Random numbers drawn from the feature statistics with NaNs, a batch of extreme finite numbers, and
for each text column values drawn from its vocabulary, unseen values and every missing marker.
A batch is a dict of input name -> array, the way ONNX Runtime takes it: `features` float32
[N, F], one object array of str [N, 1] per text column.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..model.categories import MISSING_MARKERS, CategoricalColumn
from .formats import INPUT_NAME

Batch = NDArray[np.float32]
Feeds = Mapping[str, NDArray[Any]]
# Batch sizes probed beyond the test split: a single row, an odd size, a large one.
BATCH_SIZES = (1, 7, 1024)
# Finite float32 values no real feature reaches (float32's largest is 3.40282e38): standardized
# they overflow to +-inf, which preprocess.STANDARDIZED_LIMIT must bound, never a NaN output.
EXTREMES = (3.4e38, -3.4e38, 1e30, -1e30)
EXTREME_ROWS = 16
# Text no vocabulary holds, as a client might send: unknown words, non-ASCII, a missing marker
# with the spaces the server would have stripped (so not missing: "other").
UNSEEN = ("unseen value", "Zürich", "東京", " NA", "other")


def random_batches(
    means: Sequence[float],
    stds: Sequence[float],
    seed: int,
    sizes: Sequence[int] = BATCH_SIZES,
) -> dict[str, Batch]:
    """Rows drawn from N(mean, std) per feature, with NaNs (missing values) in some rows.

    Even-indexed rows lose about a fifth of their features (at least one); the last row of any
    batch larger than 2 is entirely missing, which exercises the imputation of every column.
    """
    rng = np.random.default_rng(seed)
    mean = np.asarray(means, dtype=np.float64)
    std = np.asarray(stds, dtype=np.float64)
    batches: dict[str, Batch] = {}
    for size in sizes:
        rows = mean + std * rng.standard_normal((size, mean.size))
        for index in range(0, size, 2):
            if not mean.size:
                break
            missing = rng.random(mean.size) < 0.2
            missing[rng.integers(mean.size)] = True
            rows[index, missing] = np.nan
        if size > 2:
            rows[-1, :] = np.nan
        batches[f"random_{size}"] = rows.astype(np.float32)
    return batches


def extreme_batch(
    means: Sequence[float], stds: Sequence[float], seed: int, rows: int = EXTREME_ROWS
) -> Batch:
    """Rows mixing EXTREMES, NaN and ordinary values; the first four rows are one extreme each."""
    rng = np.random.default_rng(seed)
    mean = np.asarray(means, dtype=np.float64)
    batch = mean + np.asarray(stds, dtype=np.float64) * rng.standard_normal((rows, mean.size))
    draw = rng.random((rows, mean.size))
    batch[draw < 0.5] = rng.choice(EXTREMES, size=int((draw < 0.5).sum()))
    batch[(draw >= 0.5) & (draw < 0.65)] = np.nan
    for index, value in enumerate(EXTREMES[:rows]):
        batch[index, :] = value
    return batch.astype(np.float32)


def random_text(
    columns: Sequence[CategoricalColumn], rows: int, rng: np.random.Generator
) -> dict[str, NDArray[Any]]:
    """Per column: about 60% known categories, 20% unseen text, 20% missing markers; with more
    than 2 rows, the last is missing and the one before unseen."""
    text = {}
    for column in columns:
        known = list(column.categories) or list(UNSEEN)
        unseen = [*UNSEEN, *(c.swapcase() for c in column.categories[:3])]
        pools = (known, unseen, list(MISSING_MARKERS))
        kinds = rng.choice(3, size=rows, p=(0.6, 0.2, 0.2))
        if rows > 2:
            kinds[-2:] = (1, 2)
        values = np.empty((rows, 1), dtype=object)
        for index, kind in enumerate(kinds):
            pool = pools[int(kind)]
            values[index, 0] = pool[int(rng.integers(len(pool)))]
        text[column.name] = values
    return text


def parity_feeds(
    means: Sequence[float],
    stds: Sequence[float],
    columns: Sequence[CategoricalColumn],
    seed: int,
    sizes: Sequence[int] = BATCH_SIZES,
    extremes: bool = True,
) -> dict[str, dict[str, NDArray[Any]]]:
    """random_<size> for each size and extreme_<rows>, with text columns when there are any."""
    numeric = random_batches(means, stds, seed, sizes)
    if extremes:
        numeric[f"extreme_{EXTREME_ROWS}"] = extreme_batch(means, stds, seed)
    rng = np.random.default_rng(seed + 1)
    feeds: dict[str, dict[str, NDArray[Any]]] = {}
    for name, batch in numeric.items():
        feeds[name] = {INPUT_NAME: batch} if len(means) else {}
        feeds[name].update(random_text(columns, len(batch), rng))
    return feeds


def split_feeds(
    features: NDArray[Any], text: NDArray[Any], text_names: Sequence[str]
) -> dict[str, NDArray[Any]]:
    """Held-out rows as feeds: features [N, F] float32 (when F > 0), text [N, C] split by column."""
    feeds: dict[str, NDArray[Any]] = {}
    if features.shape[1]:
        feeds[INPUT_NAME] = np.ascontiguousarray(features, dtype=np.float32)
    for j, name in enumerate(text_names):
        feeds[name] = text[:, j].astype(object).reshape(-1, 1)
    return feeds


def rows_of(feeds: Feeds) -> int:
    return len(next(iter(feeds.values())))


__all__ = [
    "BATCH_SIZES",
    "EXTREMES",
    "EXTREME_ROWS",
    "UNSEEN",
    "Batch",
    "Feeds",
    "extreme_batch",
    "parity_feeds",
    "random_batches",
    "random_text",
    "rows_of",
    "split_feeds",
]
