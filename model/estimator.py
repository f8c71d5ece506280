"""`StableMLPClassifier`: the stabilized MLP as a scikit-learn estimator; the CLI wraps it.

fit: a stratified validation split picks the number of epochs by ROC AUC (early stopping), then,
on tables of up to REFIT_MAX_ROWS rows, the network is trained again on every row for that many
epochs (`refit`), so no row the user gives is left out of the final model where it counts most.
Everything learned from data (means, bins, vocabularies) travels in the checkpoint and, at
export, inside the graph.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from sklearn.utils.validation import check_is_fitted

from .categories import MAX_CATEGORIES, MIN_CATEGORY_COUNT, CategoricalColumn
from .checkpoint import Checkpoint, FeatureSchema
from .data import DataError, Dataset, category_stats, feature_stats
from .encoding import (
    DEFAULT_ENCODING,
    CategoryEncoder,
    EncoderConfig,
    TabularNet,
    fill_unseen_codes,
)
from .frames import read_table, to_dataset
from .network import MLPConfig, StabilizedMLP, count_parameters
from .preprocess import DEFAULT_BINS, NumericEncoding, numeric_block
from .train import History, TrainConfig, evaluate, fit, tensors, torch_threads

# Every default below was chosen on the quality suite (bench/quality.py, README "Model quality").
# 8 members of 32-32: suite mean ROC AUC 0.8569 (seeds 0-1, 8 tables) against 0.8563 for 8 of
# 64-64 (twice the time), 0.8554 for 16 of 32-32, 0.8521 for 4 of 64-64 and 0.8541 for 8 of
# 32-32-32; one member of 256-256 fell 0.046 behind HistGradientBoosting on Caravan.
DEFAULT_HIDDEN = (32, 32)  # per member
DEFAULT_MEMBERS = 8
# Dropout after each block: without it Caravan fell 0.028 and Default 0.003 (8 of 32-32).
DEFAULT_DROPOUT = 0.1
VALIDATION_FRACTION = 0.2
# The refit on every row pays on small tables and costs as much time as the first run: on the
# suite (cosine schedule, 3 seeds) it gained 0.017 ROC AUC on attrition (1.2k rows), 0.005 on
# credit_data (3.6k) and 0.003 on Caravan (4.7k), lost 0.004 on Default (8k) and gained 0.001 on
# nassCDS (21k) for twice the time. "auto" refits up to this many rows.
REFIT_MAX_ROWS = 10_000
REFIT_MODES = ("auto", "always", "never")
SCHEDULES = ("cosine", "constant")


class StableMLPClassifier(ClassifierMixin, BaseEstimator):  # type: ignore[misc]
    """Kaiming-initialised Linear -> BatchNorm1d -> ELU blocks, a sigmoid output; numeric columns
    piecewise-linear encoded, text columns one-hot, missing values handled in both."""

    def __init__(
        self,
        hidden: Sequence[int] = DEFAULT_HIDDEN,
        members: int = DEFAULT_MEMBERS,
        dropout: float = DEFAULT_DROPOUT,
        epochs: int = TrainConfig.epochs,
        batch_size: int = TrainConfig.batch_size,
        learning_rate: float = TrainConfig.learning_rate,
        weight_decay: float = TrainConfig.weight_decay,
        patience: int = TrainConfig.patience,
        grad_clip: float | None = None,
        schedule: str = TrainConfig.schedule,
        bins: int = DEFAULT_BINS,
        encoding: str = DEFAULT_ENCODING,
        min_category_count: int = MIN_CATEGORY_COUNT,
        max_categories: int = MAX_CATEGORIES,
        categorical: Sequence[str] = (),
        validation_fraction: float = VALIDATION_FRACTION,
        refit: str | bool = "auto",
        threshold: float = 0.5,
        random_state: int = 0,
        threads: int = 1,
        progress: bool = False,
    ):
        self.hidden = hidden
        self.members = members
        self.dropout = dropout
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.patience = patience
        self.grad_clip = grad_clip
        self.schedule = schedule
        self.bins = bins
        self.encoding = encoding
        self.min_category_count = min_category_count
        self.max_categories = max_categories
        self.categorical = categorical
        self.validation_fraction = validation_fraction
        self.refit = refit
        self.threshold = threshold
        self.random_state = random_state
        self.threads = threads
        self.progress = progress

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False  # binary: the served graph has one probability
        tags.input_tags.allow_nan = True  # missing values are imputed (and flagged) in the graph
        tags.input_tags.categorical = True
        tags.input_tags.string = True
        return tags

    # ------------------------------------------------------------------ fitting

    def fit(self, X: Any, y: Any) -> StableMLPClassifier:
        """X: a DataFrame (numbers, text, NaN/None) or a 2-D array; y: two classes."""
        data, classes = to_dataset(X, y, tuple(self.categorical))
        self.fit_dataset(data)
        self.classes_ = classes
        return self

    def fit_dataset(self, data: Dataset) -> StableMLPClassifier:
        """Fit on a Dataset as `stablemlp train` reads it from a CSV file."""
        self.check_params()
        with torch_threads(self.threads):
            return self._fit_dataset(data)

    def _fit_dataset(self, data: Dataset) -> StableMLPClassifier:
        started = time.perf_counter()
        train, val = self._split(data)
        model, schema, encoding, encoder, prep = self._build(train)
        history = fit(model, train, val, prep, self._train_config(self.epochs), schema.categorical)
        numbers = prep if train.feature_names else None
        scores = {
            "train": evaluate(model, *tensors(train, schema.categorical), numbers),
            "val": evaluate(model, *tensors(val, schema.categorical), numbers),
        }
        best = max(history.best_epoch, 1)
        refit = self._refits(len(data))
        if refit:
            model, schema, encoding, encoder, prep = self._build(data)
            fit(model, data, None, prep, self._train_config(best), schema.categorical)
        if isinstance(model, TabularNet):
            fill_unseen_codes(model, schema.categorical)
        self.history_: History = history
        self.heldout_: Dataset = val
        self.checkpoint_ = Checkpoint(
            config=model.mlp.config if isinstance(model, TabularNet) else model.config,
            state_dict=model.state_dict(),
            schema=schema,
            threshold=float(self.threshold),
            metrics={
                **scores,
                "best_epoch": history.best_epoch,
                "epochs_run": len(history.epochs),
                "refit_epochs": best if refit else 0,
                "train_seconds": round(time.perf_counter() - started, 2),
                "rows": {"train": len(train), "val": len(val), "final": len(data)},
                "parameters": count_parameters(model),
                "data": data.name,
                "train_config": self.get_params(),
            },
            model_name=data.name,
            seed=int(self.random_state),
            encoder=encoder,
            numeric=encoding,
        )
        self.classes_ = np.array([0, 1])  # fit() puts the caller's labels here
        self.n_features_in_ = len(data.columns)
        if not all(c.startswith("x") and c[1:].isdigit() for c in data.columns):
            self.feature_names_in_ = np.array(data.columns, dtype=object)
        return self

    def check_params(self) -> None:
        """ValueError naming the first parameter out of range and what it expects."""
        checks = {
            "hidden": bool(self.hidden) and all(int(h) >= 1 for h in self.hidden),
            "members": self.members >= 1,
            "dropout": 0.0 <= self.dropout < 1.0,
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size == 0 or self.batch_size >= 2,
            "learning_rate": math.isfinite(self.learning_rate) and self.learning_rate > 0,
            "weight_decay": math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            "patience": self.patience >= 1,
            "bins": self.bins >= 0,
            "validation_fraction": 0.0 < self.validation_fraction < 1.0,
            "threshold": 0.0 <= self.threshold <= 1.0,
            "refit": self.refit in (*REFIT_MODES, True, False),
            "schedule": self.schedule in SCHEDULES,
        }
        expected = {
            "hidden": "positive widths",
            "members": ">= 1",
            "dropout": "in [0, 1)",
            "epochs": ">= 1",
            "batch_size": "0 (auto) or >= 2",
            "learning_rate": "a finite number > 0",
            "weight_decay": "a finite number >= 0",
            "patience": ">= 1",
            "bins": ">= 0",
            "validation_fraction": "in (0, 1)",
            "threshold": "in [0, 1]",
            "refit": f"one of {', '.join(REFIT_MODES)} (or True, False)",
            "schedule": f"one of {', '.join(SCHEDULES)}",
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected {expected[name]}")

    def _split(self, data: Dataset) -> tuple[Dataset, Dataset]:
        counts = np.bincount(data.labels, minlength=2)
        if counts.min() < 2 or len(data) < 10:
            raise DataError(
                f"need at least 10 rows and 2 of each class to validate, got {len(data)} rows "
                f"with class counts {counts.tolist()}"
            )
        train, val = train_test_split(
            np.arange(len(data)),
            test_size=self.validation_fraction,
            stratify=data.labels,
            random_state=self.random_state,
        )
        return data.subset(np.sort(train)), data.subset(np.sort(val))

    def _refits(self, rows: int) -> bool:
        """Whether the network is trained again on every row (`refit`; "auto": up to
        REFIT_MAX_ROWS rows)."""
        if self.refit == "auto":
            return rows <= REFIT_MAX_ROWS
        return self.refit in (True, "always")

    def _train_config(self, epochs: int) -> TrainConfig:
        return TrainConfig(
            epochs=epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            patience=self.patience,
            grad_clip=self.grad_clip,
            schedule=self.schedule,
            schedule_epochs=self.epochs,
            seed=self.random_state,
            progress=self.progress,
        )

    def _build(
        self, rows: Dataset
    ) -> tuple[
        StabilizedMLP | TabularNet,
        FeatureSchema,
        NumericEncoding | None,
        EncoderConfig | None,
        torch.nn.Module,
    ]:
        """Statistics of `rows` (means, bins, vocabularies) and a freshly initialised network."""
        mean, std = feature_stats(rows)
        encoding = NumericEncoding.learn(rows.features, mean, std, self.bins)
        columns: tuple[CategoricalColumn, ...] = category_stats(
            rows, self.min_category_count, self.max_categories
        )
        schema = FeatureSchema(
            tuple(rows.feature_names),
            tuple(map(float, mean)),
            tuple(map(float, std)),
            columns,
            rows.columns,
            rows.target,
            rows.positive_class,
        )
        prep = numeric_block(torch.from_numpy(mean), torch.from_numpy(std), encoding)
        torch.manual_seed(self.random_state)  # the initial weights depend on the seed too
        width = encoding.width if rows.feature_names else 0
        hidden = tuple(int(h) for h in self.hidden)
        shape = {"hidden": hidden, "dropout": self.dropout, "members": self.members}
        if not columns:
            mlp = StabilizedMLP(MLPConfig(width, **shape))  # type: ignore[arg-type]
            return mlp, schema, encoding, None, prep or torch.nn.Identity()
        encoder = CategoryEncoder(EncoderConfig.build(self.encoding, columns))
        config = MLPConfig(width + encoder.config.width, **shape)  # type: ignore[arg-type]
        net = TabularNet(encoder, StabilizedMLP(config), width)
        return net, schema, encoding, encoder.config, prep or torch.nn.Identity()

    # ------------------------------------------------------------------ predicting

    def predict_proba(self, X: Any) -> np.ndarray:
        """[N, 2]: the probabilities of classes_[0] and classes_[1] (the positive class)."""
        check_is_fitted(self, "checkpoint_")
        schema = self.checkpoint_.schema
        # Text columns are read as text; every other column must be numbers, as in training.
        # Both come out in the training order (the schema's columns are in file order).
        features, numeric, strings, _, _ = read_table(X, schema.text_names, schema.columns)
        if numeric != list(schema.names):
            lost = [name for name in schema.names if name not in numeric]
            raise DataError(f"X columns {lost}: expected numbers (or NaN), as in training")
        inputs: list[torch.Tensor] = []
        if schema.names:
            inputs.append(torch.from_numpy(features))
        if schema.categorical:
            codes = [c.codes(strings[:, j]) for j, c in enumerate(schema.categorical)]
            inputs.append(torch.from_numpy(np.stack(codes, axis=1)))
        # In float64: then a row's probability does not depend, even in its last bits, on which
        # rows share its batch or their order (scikit-learn checks it); the float32 graph that
        # export publishes agrees within the parity tolerance.
        inputs = [t.double() if t.is_floating_point() else t for t in inputs]
        with torch.no_grad():
            probability, _ = self.checkpoint_.build_classifier().double()(*inputs)
        p = probability[:, 0].double().numpy()
        return np.stack([1.0 - p, p], axis=1)

    def predict(self, X: Any) -> np.ndarray:
        """classes_[1] where the positive probability reaches `threshold`, else classes_[0]."""
        positive = self.predict_proba(X)[:, 1] >= self.threshold
        labels: np.ndarray = np.where(positive, self.classes_[1], self.classes_[0])
        return labels

    # ------------------------------------------------------------------ shipping

    def save(self, path: Path) -> None:
        """The checkpoint `stablemlp export` reads (written atomically)."""
        from .checkpoint import save_checkpoint

        check_is_fitted(self, "checkpoint_")
        save_checkpoint(self.checkpoint_, path)

    def export(self, repository: Path | str, model: str | None = None) -> Path:
        """Publish a new version of REPOSITORY/<model> exactly as `stablemlp export` does (fold,
        TorchScript + ONNX, parity proof on the validation rows); returns the version folder."""
        from ..export.cli import export_checkpoint

        check_is_fitted(self, "checkpoint_")
        rows = self.heldout_
        heldout = (rows.features, rows.text, list(rows.text_names))
        version, _ = export_checkpoint(self.checkpoint_, heldout, Path(repository), model)
        return version


__all__ = [
    "DEFAULT_DROPOUT",
    "DEFAULT_HIDDEN",
    "DEFAULT_MEMBERS",
    "REFIT_MAX_ROWS",
    "REFIT_MODES",
    "SCHEDULES",
    "VALIDATION_FRACTION",
    "StableMLPClassifier",
]
