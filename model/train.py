"""Training: AdamW on BCE-with-logits, early stopping on validation ROC AUC; seeded."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.optim.adamw import adamw
from tqdm import tqdm

from .categories import CategoricalColumn
from .data import Dataset
from .encoding import TabularNet
from .gradients import GradientMonitor
from .network import StabilizedMLP, mean_probability

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; stored in the checkpoint's metrics for the record.

    Defaults chosen on the quality suite (bench/quality.py; README "Model quality").
    """

    # A cosine decay over 20 epochs from 2e-3 matched the constant 1e-3 for up to 100 epochs on
    # the suite (mean ROC AUC 0.8324 against 0.8326, 3 seeds) in about half the epochs; from 1e-3
    # mlc_churn fell 0.012 behind HistGradientBoosting (0.006 from 2e-3).
    epochs: int = 20  # the schedule's length; early stopping may end sooner
    batch_size: int = 0  # 0: auto_batch_size(rows)
    learning_rate: float = 2e-3  # the schedule's peak
    weight_decay: float = 1e-4  # AdamW's decoupled decay; 1e-2 made no difference
    # Epochs without a better validation ROC AUC. Under the cosine schedule 6 and 8 gave the same
    # suite AUCs (credit_data 0.0004 lower) and 6 ran 7 % fewer epochs on nassCDS.
    patience: int = 6
    grad_clip: float | None = None  # max global gradient norm; None = no clipping
    schedule: str = "cosine"  # or "constant"
    schedule_epochs: int = 0  # the cosine's length (0: `epochs`); a refit keeps the first run's
    seed: int = 0
    progress: bool = True  # tqdm progress bar on stderr


def auto_batch_size(rows: int) -> int:
    """A power of two near rows / 40, within 32..512: small tables still get ~40 steps an epoch,
    large ones batches big enough to keep both cores busy."""
    target = min(512.0, max(32.0, rows / 40))
    return int(2 ** round(math.log2(target)))


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf: the learning rate or the data needs attention."""


@dataclass
class History:
    """Per-epoch records; grad_norms holds each Linear's mean gradient norm over the epoch."""

    epochs: list[dict[str, float]] = field(default_factory=list)
    grad_norms: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0


def seed_everything(seed: int) -> torch.Generator:
    """Same seed and data -> identical weights on one machine: training runs on the CPU, whose
    kernels for these layers are deterministic (tests/test_model.py checks it), so no
    `torch.use_deterministic_algorithms`, whose first call imports torch's compiler (~3 s)."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to `threads` (0: leave as is) for the block, then restored.

    One thread by default: steps of these small layers are a few ms, too short for two threads
    to pay, and when the cores are shared (a busy server, a CI job) OpenMP's waiting threads made
    a step of 256 rows 50x slower (294 vs 5.7 ms measured on 2 shared cores).
    """
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


Inputs = tuple[torch.Tensor, ...]
EVAL_CHUNK = 8192  # rows per forward pass when evaluating
ENCODED_BYTES = 256 * 2**20  # largest numeric block encoded for every row at once


def tensors(
    data: Dataset, columns: Sequence[CategoricalColumn] = ()
) -> tuple[Inputs, torch.Tensor]:
    """(network inputs, labels [N, 1]): the raw numeric block (NaN = missing) when there are
    numeric columns, then the category codes [N, C] when there are text columns.

    The numbers stay raw here; `encode_up_front` or a `prep` applied batch by batch in
    train_one_epoch and evaluate turn them into the network's numbers."""
    inputs = []
    if data.feature_names:
        inputs.append(torch.from_numpy(data.features))
    if columns:
        codes = [column.codes(data.text[:, j]) for j, column in enumerate(columns)]
        inputs.append(torch.from_numpy(np.stack(codes, axis=1)))
    return tuple(inputs), torch.from_numpy(data.labels).float().unsqueeze(1)


def encode_up_front(inputs: Inputs, prep: nn.Module | None) -> tuple[Inputs, nn.Module | None]:
    """(inputs, the prep still to apply per batch). The encoded numeric block (~20 floats a
    column) is computed once when it fits ENCODED_BYTES, chunk by chunk into one tensor: the
    fastest way for most tables. Larger, the numbers stay raw and `prep` is returned, to run a
    batch at a time: a million rows of 23 numeric columns, encoded at once, peaked at 5.8 GB."""
    if prep is None or not inputs:
        return inputs, prep
    raw = inputs[0]
    with torch.no_grad():
        width = prep(raw[:1]).shape[1]
        if len(raw) * width * 4 > ENCODED_BYTES:
            return inputs, prep
        encoded = torch.empty(len(raw), width)
        for start in range(0, len(raw), EVAL_CHUNK):
            encoded[start : start + EVAL_CHUNK] = prep(raw[start : start + EVAL_CHUNK])
    return (encoded, *inputs[1:]), None


def _rows(inputs: Inputs, index: torch.Tensor | slice, prep: nn.Module | None) -> Inputs:
    """The inputs of some rows, the numeric block preprocessed (prep is None without one)."""
    parts = [t[index] for t in inputs]
    if prep is not None:
        with torch.no_grad():
            parts[0] = prep(parts[0])
    return tuple(parts)


def _as_inputs(x: torch.Tensor | Inputs) -> Inputs:
    return (x,) if isinstance(x, torch.Tensor) else x


def train_one_epoch(
    model: StabilizedMLP | TabularNet,
    x: torch.Tensor | Inputs,
    y: torch.Tensor,
    optimizer: FusedAdamW,
    monitor: GradientMonitor,
    config: TrainConfig,
    generator: torch.Generator,
    prep: nn.Module | None = None,
) -> tuple[float, dict[str, float]]:
    """One pass in shuffled mini-batches; returns mean loss and mean per-layer gradient norms.
    `prep`: what turns the raw numeric block (the first input) into the network's numbers."""
    model.train()
    inputs = _as_inputs(x)
    loss_fn = nn.BCEWithLogitsLoss()
    order = torch.randperm(len(y), generator=generator)
    size = config.batch_size or auto_batch_size(len(y))
    # A one-row batch has no batch statistics for BatchNorm to normalize with: skip it.
    batches = [b for b in torch.split(order, size) if len(b) > 1]
    total = 0.0
    norm_sums = dict.fromkeys((name for name, _ in monitor.layers), 0.0)
    for batch in batches:
        optimizer.zero_grad()
        logits = model(*_rows(inputs, batch, prep))  # [B, members]: each member its own loss
        loss = loss_fn(logits, y[batch].expand_as(logits))
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
def evaluate(
    model: nn.Module, x: torch.Tensor | Inputs, y: torch.Tensor, prep: nn.Module | None = None
) -> dict[str, float]:
    """Loss, accuracy at 0.5 and ROC AUC in eval mode (BatchNorm uses running statistics);
    `prep` as in train_one_epoch."""
    model.eval()
    inputs = _as_inputs(x)
    # In chunks: the activations of 200k rows at once held ~1 GB (each block's output, 256 floats
    # a row, several times over); a chunk's are a few MB, and the result is the same.
    chunks = [
        mean_probability(model(*_rows(inputs, slice(start, start + EVAL_CHUNK), prep)))
        for start in range(0, len(y), EVAL_CHUNK)
    ]
    probability = torch.cat(chunks) if chunks else torch.empty(0, 1)
    # Clamped as BCE-with-logits would be stable: a member-averaged probability has no logit.
    loss = nn.functional.binary_cross_entropy(probability.clamp(1e-7, 1 - 1e-7), y).item()
    proba = probability.squeeze(1).numpy()
    truth = y.squeeze(1).numpy()
    accuracy = float(((proba >= 0.5) == (truth == 1)).mean())
    auc = float(roc_auc_score(truth, proba)) if len(np.unique(truth)) == 2 else math.nan
    return {"loss": loss, "accuracy": accuracy, "roc_auc": auc}


def _score(scores: dict[str, float]) -> float:
    """Higher is better: ROC AUC (what the model is judged on), or minus the loss when the
    validation rows hold one class only and AUC is undefined."""
    return scores["roc_auc"] if math.isfinite(scores["roc_auc"]) else -scores["loss"]


def fit(
    model: StabilizedMLP | TabularNet,
    train: Dataset,
    val: Dataset | None,
    standardize: nn.Module,
    config: TrainConfig,
    columns: Sequence[CategoricalColumn] = (),
) -> History:
    """Train with early stopping on validation ROC AUC; the model ends with its best weights.

    With `val` None it trains exactly `config.epochs` epochs (the refit on every row, once the
    validation run found how many epochs pay). `columns`: the text columns' vocabularies, when
    `model` is a TabularNet.
    """
    generator = seed_everything(config.seed)
    numbers = standardize if train.feature_names else None
    x_train, y_train = tensors(train, columns)
    x_train, prep = encode_up_front(x_train, numbers)
    x_val, y_val = tensors(val, columns) if val is not None else ((), None)
    x_val, val_prep = encode_up_front(x_val, numbers)
    # fused: one kernel for every parameter's update (0.38 against 1.23 ms a step for the default
    # 8 members of 32-32, whose block-diagonal weights are mostly zeros that never get a gradient).
    optimizer = FusedAdamW(
        model.parameters(),
        config.learning_rate,
        config.weight_decay,
        schedule_steps(config, len(y_train)),
    )
    monitor = GradientMonitor(model.linear_layers())
    history, best, best_state = History(), -math.inf, copy.deepcopy(model.state_dict())
    # The ETA counts to `epochs`: an upper bound while early stopping may end sooner, exact for
    # the refit on every row.
    desc = "train (early stopping)" if val is not None else "refit on every row"
    bar = tqdm(range(1, config.epochs + 1), desc=desc, disable=not config.progress, leave=False)
    for epoch in bar:
        train_loss, norms = train_one_epoch(
            model, x_train, y_train, optimizer, monitor, config, generator, prep
        )
        record: dict[str, float] = {"epoch": epoch, "train_loss": train_loss}
        history.grad_norms.append(norms)
        if y_val is None:
            history.epochs.append(record)
            history.best_epoch = epoch
            bar.set_postfix(loss=f"{train_loss:.4f}")
            continue
        scores = evaluate(model, x_val, y_val, val_prep)
        history.epochs.append({**record, **{f"val_{k}": v for k, v in scores.items()}})
        bar.set_postfix(loss=f"{train_loss:.4f}", val_auc=f"{scores['roc_auc']:.4f}")
        if _score(scores) > best + 1e-6:
            best, history.best_epoch = _score(scores), epoch
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - history.best_epoch >= config.patience:
            log.info("early stop at epoch %d (best %d)", epoch, history.best_epoch)
            break
    bar.close()
    if y_val is not None:
        model.load_state_dict(best_state)
    return history


class FusedAdamW:
    """AdamW through torch's functional form and fused kernel (`torch.optim.adamw.adamw`,
    fused=True), the same arithmetic as `torch.optim.AdamW(fused=True)` to the bit (tests check
    it), with a cosine decay of the learning rate stepped per batch as `CosineAnnealingLR` does it.

    Not torch.optim.AdamW itself: constructing any torch.optim.Optimizer imports torch._dynamo
    (1.9 s, once a process: a third of a `train` on nassCDS), which the functional form skips.
    """

    def __init__(
        self, parameters: Iterator[nn.Parameter], lr: float, weight_decay: float, steps: int = 0
    ):
        self.parameters = [p for p in parameters if p.requires_grad]
        self.exp_avgs = [torch.zeros_like(p) for p in self.parameters]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in self.parameters]
        self.state_steps = [torch.zeros((), dtype=torch.float32) for _ in self.parameters]
        self.lr, self.weight_decay = lr, weight_decay
        self.steps, self.step_count = steps, 0  # steps: the cosine's length; 0: constant rate

    def zero_grad(self) -> None:
        for p in self.parameters:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        held = [i for i, p in enumerate(self.parameters) if p.grad is not None]
        adamw(
            [self.parameters[i] for i in held],
            [self.parameters[i].grad for i in held],  # type: ignore[misc]
            [self.exp_avgs[i] for i in held],
            [self.exp_avg_sqs[i] for i in held],
            [],
            [self.state_steps[i] for i in held],
            fused=True,
            amsgrad=False,
            beta1=0.9,
            beta2=0.999,
            lr=self.lr,
            weight_decay=self.weight_decay,
            eps=1e-8,
            maximize=False,
        )
        if self.steps:
            # CosineAnnealingLR's recursive form (not the closed one), for the same floats.
            t, steps = self.step_count + 1, self.steps
            self.lr *= (1 + math.cos(math.pi * t / steps)) / (
                1 + math.cos(math.pi * (t - 1) / steps)
            )
            self.step_count = t


def schedule_steps(config: TrainConfig, rows: int) -> int:
    """The cosine's length in optimizer steps (0: a constant rate)."""
    if config.schedule == "constant":
        return 0
    size = config.batch_size or auto_batch_size(rows)
    steps_per_epoch = sum(1 for start in range(0, rows, size) if rows - start > 1)
    return max(1, steps_per_epoch * (config.schedule_epochs or config.epochs))


def history_to_dict(history: History) -> dict[str, Any]:
    return {
        "epochs": history.epochs,
        "grad_norms": history.grad_norms,
        "best_epoch": history.best_epoch,
    }


__all__ = [
    "FusedAdamW",
    "History",
    "NonFiniteLossError",
    "TrainConfig",
    "auto_batch_size",
    "encode_up_front",
    "evaluate",
    "fit",
    "history_to_dict",
    "schedule_steps",
    "seed_everything",
    "tensors",
    "torch_threads",
    "train_one_epoch",
]
