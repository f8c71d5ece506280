"""Data sets as the model sees them: numeric columns float32 (NaN = missing), text columns str.

The built-in set is scikit-learn's bundled breast-cancer data; a CSV is read by `csvdata`.
Statistics (means, standard deviations, vocabularies) come from the training split only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
from sklearn.model_selection import train_test_split

from .categories import MAX_CATEGORIES, MIN_CATEGORY_COUNT, CategoricalColumn, learn_column

log = logging.getLogger(__name__)

BUILTIN_NAME = "breast_cancer"
_NO_TEXT = np.empty((0, 0), dtype="<U1")


class DataError(ValueError):
    """The data cannot be used as given; the message names the column or file at fault."""


@dataclass(frozen=True)
class Dataset:
    features: np.ndarray  # float32 [N, F]: the numeric columns, NaN where missing
    labels: np.ndarray  # int64 [N], values in {0, 1}
    feature_names: list[str]  # the numeric columns, in file order
    name: str
    # str [N, C]: the text columns, cells stripped of surrounding whitespace
    text: np.ndarray = field(default_factory=lambda: _NO_TEXT)
    text_names: list[str] = field(default_factory=list)  # the text columns, in file order
    columns: tuple[str, ...] = ()  # every feature column in file order (default: numeric, text)
    target: str = "target"
    positive_class: str = "1"  # the target value coded 1
    # What reading decided, one line each, for the schema printout: the file's format, the
    # positive-class rule, columns left out and why.
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.text.shape != (len(self.labels), len(self.text_names)):
            if self.text_names or self.text.size:
                shape, names = self.text.shape, len(self.text_names)
                raise ValueError(f"text {shape} does not match {names} names")
            object.__setattr__(self, "text", np.empty((len(self.labels), 0), dtype="<U1"))
        if not self.columns:
            object.__setattr__(self, "columns", (*self.feature_names, *self.text_names))

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> Dataset:
        return replace(
            self, features=self.features[index], labels=self.labels[index], text=self.text[index]
        )


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
    features = bunch.data.astype(np.float32)
    return Dataset(
        features, labels, names, BUILTIN_NAME, target="diagnosis", positive_class="malignant"
    )


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


def category_stats(
    train: Dataset, min_count: int = MIN_CATEGORY_COUNT, max_categories: int = MAX_CATEGORIES
) -> tuple[CategoricalColumn, ...]:
    """Each text column's vocabulary, learned from the training split only."""
    return tuple(
        learn_column(name, train.text[:, j], min_count, max_categories)
        for j, name in enumerate(train.text_names)
    )


__all__ = [
    "BUILTIN_NAME",
    "DataError",
    "Dataset",
    "Splits",
    "category_stats",
    "feature_stats",
    "load_builtin",
    "split_dataset",
]
