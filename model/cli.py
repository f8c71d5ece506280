"""`stablemlp train`: data -> stabilized MLP -> checkpoint, metrics, plots in one output folder."""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    FeatureSchema,
    atomic_write_bytes,
    save_checkpoint,
)
from .data import DataError, feature_stats, load_dataset, split_dataset
from .gradients import NonFiniteGradientError
from .network import MLPConfig, StabilizedMLP, count_parameters
from .plots import plot_training
from .preprocess import Standardize
from .train import NonFiniteLossError, TrainConfig, _tensors, evaluate, fit, history_to_dict

log = logging.getLogger(__name__)
TEST_SPLIT_NAME = "test_split.npz"  # raw test rows, for the export's parity proof


def _hidden(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"hidden sizes must be positive, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stablemlp train", description=__doc__)
    parser.add_argument("--csv", type=Path, help="training CSV (header row; empty cell = missing)")
    parser.add_argument("--target", help="name of the binary target column in --csv")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs, help="max epochs")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--hidden", type=_hidden, default=MLPConfig.hidden, help="e.g. 64,32,16")
    parser.add_argument("--dropout", type=float, default=MLPConfig.dropout)
    parser.add_argument("--lr", type=float, default=TrainConfig.learning_rate)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--patience", type=int, default=TrainConfig.patience)
    parser.add_argument("--grad-clip", type=float, default=None, help="max gradient norm (off)")
    parser.add_argument("--threshold", type=float, default=0.5, help="decision threshold")
    parser.add_argument("--name", help="model name (default: the data set's name)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--output", type=Path, required=True, help="folder for the run's files")
    return parser


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    atomic_write_bytes(path, buffer.getvalue())


def run(args: argparse.Namespace) -> dict[str, object]:
    """Train and write the run folder; returns the metrics written to metrics.json."""
    started = time.perf_counter()
    data = load_dataset(args.csv, args.target)  # fails before anything is written
    splits = split_dataset(data, seed=args.seed)
    mean, std = feature_stats(splits.train)
    standardize = Standardize(torch.from_numpy(mean), torch.from_numpy(std))
    config = MLPConfig(len(data.feature_names), hidden=args.hidden, dropout=args.dropout)
    train_config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        patience=args.patience,
        grad_clip=args.grad_clip,
        seed=args.seed,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    torch.manual_seed(args.seed)  # the initial weights depend on the seed too
    model = StabilizedMLP(config)
    history = fit(model, splits.train, splits.val, standardize, train_config)
    scores = {
        name: evaluate(model, *_tensors(part, standardize))
        for name, part in (("train", splits.train), ("val", splits.val), ("test", splits.test))
    }
    metrics: dict[str, object] = {
        **scores,
        "best_epoch": history.best_epoch,
        "epochs_run": len(history.epochs),
        "train_seconds": round(time.perf_counter() - started, 2),
        "rows": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "parameters": count_parameters(model),
        "data": data.name,
        "train_config": {k: v for k, v in vars(train_config).items() if k != "progress"},
    }
    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = Checkpoint(
        config=config,
        state_dict=model.state_dict(),
        schema=FeatureSchema(
            tuple(data.feature_names), tuple(map(float, mean)), tuple(map(float, std))
        ),
        threshold=args.threshold,
        metrics=metrics,
        model_name=args.name or data.name,
        seed=args.seed,
    )
    save_checkpoint(checkpoint, out / CHECKPOINT_NAME)
    _save_npz(out / TEST_SPLIT_NAME, features=splits.test.features, labels=splits.test.labels)
    report = {**metrics, "history": history_to_dict(history)}
    atomic_write_bytes(out / "metrics.json", json.dumps(report, indent=2).encode())
    plot_training(history, out)
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        metrics = run(args)
    except (DataError, NonFiniteLossError, NonFiniteGradientError) as err:
        print(f"stablemlp train: error: {err}", file=sys.stderr)
        return 1
    test = metrics["test"]
    assert isinstance(test, dict)
    print(
        f"trained {args.output}: test ROC AUC {test['roc_auc']:.4f},"
        f" accuracy {test['accuracy']:.4f}"
        f" (best epoch {metrics['best_epoch']}, {metrics['train_seconds']} s)"
    )
    return 0


__all__ = ["TEST_SPLIT_NAME", "build_parser", "main", "run"]
