"""Training: AdamW on BCE-with-logits, early stopping on validation loss; seeded, deterministic."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm import tqdm

from .categories import CategoricalColumn
from .data import Dataset
from .encoding import TabularNet
from .gradients import GradientMonitor
from .network import StabilizedMLP
from .preprocess import Standardize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; stored in the checkpoint's metrics for the record."""

    epochs: int = 200  # upper bound; early stopping usually ends sooner
    batch_size: int = 32
    learning_rate: float = 3e-3
    weight_decay: float = 1e-2  # AdamW's decoupled decay
    patience: int = 20  # epochs without a better validation loss before stopping
    grad_clip: float | None = None  # max global gradient norm; None = no clipping
    seed: int = 0
    progress: bool = True  # tqdm progress bar on stderr


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf: the learning rate or the data needs attention."""


@dataclass
class History:
    """Per-epoch records; grad_norms holds each Linear's mean gradient norm over the epoch."""

    epochs: list[dict[str, float]] = field(default_factory=list)
    grad_norms: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0


def seed_everything(seed: int) -> torch.Generator:
    """Same seed and data -> identical weights: seed torch, use deterministic kernels only."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    return torch.Generator().manual_seed(seed)


Inputs = tuple[torch.Tensor, ...]


def tensors(
    data: Dataset, standardize: Standardize, columns: Sequence[CategoricalColumn] = ()
) -> tuple[Inputs, torch.Tensor]:
    """(network inputs, labels [N, 1]): the standardized numeric block when there are numeric
    columns, then the category codes [N, C] when there are text columns."""
    inputs = []
    if data.feature_names:
        with torch.no_grad():
            inputs.append(standardize(torch.from_numpy(data.features)))
    if columns:
        codes = [column.codes(data.text[:, j]) for j, column in enumerate(columns)]
        inputs.append(torch.from_numpy(np.stack(codes, axis=1)))
    return tuple(inputs), torch.from_numpy(data.labels).float().unsqueeze(1)


def _as_inputs(x: torch.Tensor | Inputs) -> Inputs:
    return (x,) if isinstance(x, torch.Tensor) else x


def train_one_epoch(
    model: StabilizedMLP | TabularNet,
    x: torch.Tensor | Inputs,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    monitor: GradientMonitor,
    config: TrainConfig,
    generator: torch.Generator,
) -> tuple[float, dict[str, float]]:
    """One pass in shuffled mini-batches; returns mean loss and mean per-layer gradient norms."""
    model.train()
    inputs = _as_inputs(x)
    loss_fn = nn.BCEWithLogitsLoss()
    order = torch.randperm(len(y), generator=generator)
    # A one-row batch has no batch statistics for BatchNorm to normalize with: skip it.
    batches = [b for b in torch.split(order, config.batch_size) if len(b) > 1]
    total = 0.0
    norm_sums = dict.fromkeys((name for name, _ in monitor.layers), 0.0)
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(*(t[batch] for t in inputs)), y[batch])
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss became {loss.item()}; lower --lr or check the data"
            )
        loss.backward()
        for name, value in monitor.observe().items():
            norm_sums[name] += value
        if config.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        total += loss.item() * len(batch)
    rows = sum(len(b) for b in batches)
    return total / rows, {name: s / len(batches) for name, s in norm_sums.items()}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor | Inputs, y: torch.Tensor) -> dict[str, float]:
    """Loss, accuracy at 0.5 and ROC AUC in eval mode (BatchNorm uses running statistics)."""
    model.eval()
    logits = model(*_as_inputs(x))
    loss = nn.functional.binary_cross_entropy_with_logits(logits, y).item()
    proba = torch.sigmoid(logits).squeeze(1).numpy()
    truth = y.squeeze(1).numpy()
    accuracy = float(((proba >= 0.5) == (truth == 1)).mean())
    auc = float(roc_auc_score(truth, proba)) if len(np.unique(truth)) == 2 else math.nan
    return {"loss": loss, "accuracy": accuracy, "roc_auc": auc}


def fit(
    model: StabilizedMLP | TabularNet,
    train: Dataset,
    val: Dataset,
    standardize: Standardize,
    config: TrainConfig,
    columns: Sequence[CategoricalColumn] = (),
) -> History:
    """Train with early stopping on validation loss; the model ends with its best weights.

    `columns`: the text columns' vocabularies, when `model` is a TabularNet.
    """
    generator = seed_everything(config.seed)
    x_train, y_train = tensors(train, standardize, columns)
    x_val, y_val = tensors(val, standardize, columns)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    monitor = GradientMonitor(model.linear_layers())
    history, best_loss, best_state = History(), math.inf, copy.deepcopy(model.state_dict())
    bar = tqdm(range(1, config.epochs + 1), desc="train", disable=not config.progress, leave=False)
    for epoch in bar:
        train_loss, norms = train_one_epoch(
            model, x_train, y_train, optimizer, monitor, config, generator
        )
        scores = evaluate(model, x_val, y_val)
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            **{f"val_{k}": v for k, v in scores.items()},
        }
        history.epochs.append(record)
        history.grad_norms.append(norms)
        bar.set_postfix(loss=f"{train_loss:.4f}", val_auc=f"{scores['roc_auc']:.4f}")
        if scores["loss"] < best_loss - 1e-6:
            best_loss, history.best_epoch = scores["loss"], epoch
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - history.best_epoch >= config.patience:
            log.info("early stop at epoch %d (best %d)", epoch, history.best_epoch)
            break
    bar.close()
    model.load_state_dict(best_state)
    return history


def history_to_dict(history: History) -> dict[str, Any]:
    return {
        "epochs": history.epochs,
        "grad_norms": history.grad_norms,
        "best_epoch": history.best_epoch,
    }


__all__ = [
    "History",
    "NonFiniteLossError",
    "TrainConfig",
    "evaluate",
    "fit",
    "history_to_dict",
    "seed_everything",
    "tensors",
    "train_one_epoch",
]
