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

from ..files import atomic_write_bytes
from .categories import MAX_CATEGORIES, MIN_CATEGORY_COUNT, CategoricalColumn
from .checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    FeatureSchema,
    save_checkpoint,
)
from .csvdata import load_dataset
from .data import DataError, Dataset, category_stats, feature_stats, split_dataset
from .encoding import (
    DEFAULT_ENCODING,
    ENCODINGS,
    CategoryEncoder,
    EncoderConfig,
    TabularNet,
    fill_unseen_codes,
)
from .gradients import NonFiniteGradientError
from .network import MLPConfig, StabilizedMLP, count_parameters
from .plots import plot_training
from .preprocess import Standardize
from .train import NonFiniteLossError, TrainConfig, evaluate, fit, history_to_dict, tensors

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


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stablemlp train", description=__doc__)
    parser.add_argument("--csv", type=Path, help="training CSV (header row; empty cell = missing)")
    parser.add_argument("--target", help="name of the binary target column in --csv")
    parser.add_argument(
        "--categorical",
        type=_names,
        default=(),
        metavar="COL,...",
        help="columns to treat as categories even though they hold numbers (zip codes, ids)",
    )
    parser.add_argument(
        "--drop", type=_names, default=(), metavar="COL,...", help="columns to leave out"
    )
    parser.add_argument(
        "--keep",
        type=_names,
        default=(),
        metavar="COL,...",
        help="columns to use even though they look like identifiers (unique text, a row index)",
    )
    parser.add_argument(
        "--na-values",
        type=_names,
        default=(),
        metavar="TEXT,...",
        help="more cells meaning 'missing' (e.g. unknown), beside empty, NA, NaN, null, None, ?",
    )
    parser.add_argument(
        "--positive-class",
        metavar="VALUE",
        help="the target value to predict as 1 (default: yes/true/1, else printed with a warning)",
    )
    parser.add_argument(
        "--sep", metavar="CHAR", help="the CSV's delimiter (default: detected among , ; tab |)"
    )
    parser.add_argument(
        "--file-encoding",
        metavar="CODEC",
        help="the CSV file's text encoding, e.g. cp1252 (default: UTF-8, or UTF-16 by its BOM);"
        " --encoding is the categories' encoding inside the model",
    )
    parser.add_argument(
        "--min-category-count",
        type=int,
        default=MIN_CATEGORY_COUNT,
        help="categories seen in fewer training rows share the 'other' code",
    )
    parser.add_argument(
        "--max-categories",
        type=int,
        default=MAX_CATEGORIES,
        help="keep at most this many categories per column (the most frequent)",
    )
    parser.add_argument(
        "--encoding",
        choices=ENCODINGS,
        default=DEFAULT_ENCODING,
        help="how the model encodes categories (the file's text encoding: --file-encoding)",
    )
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


def describe(data: Dataset, schema: FeatureSchema) -> str:
    """The inferred schema, one line per column, as `train` prints it."""
    lines = [
        *data.notes,
        f"target {data.target!r}: positive class {data.positive_class!r}; columns:",
    ]
    width = max(len(name) for name in schema.columns)
    for column in schema.describe():
        if column["kind"] == "numeric":
            missing = int(np.isnan(data.features[:, column["index"]]).sum())
            detail = f"mean {column['mean']:.4g}, std {column['std']:.4g}, {missing} missing"
        else:
            shown = ", ".join(repr(c) for c in column["categories"][:5])
            more = ", ..." if len(column["categories"]) > 5 else ""
            detail = f"{len(column['categories'])} categories + other + missing ({shown}{more})"
        lines.append(f"  {column['name']:<{width}}  {column['kind']:<11}  {detail}")
    return "\n".join(lines)


def _read(args: argparse.Namespace) -> Dataset:
    """The data set as the arguments name it; a progress bar over a CSV when on a terminal."""
    return load_dataset(
        args.csv,
        args.target,
        args.categorical,
        args.drop,
        keep=args.keep,
        na_values=args.na_values,
        positive_class=args.positive_class,
        sep=args.sep,
        file_encoding=args.file_encoding,
        progress=not args.no_progress and sys.stderr.isatty(),
    )


def _network(
    n_numeric: int, columns: tuple[CategoricalColumn, ...], args: argparse.Namespace
) -> tuple[StabilizedMLP | TabularNet, EncoderConfig | None]:
    torch.manual_seed(args.seed)  # the initial weights depend on the seed too
    if not columns:
        config = MLPConfig(n_numeric, hidden=args.hidden, dropout=args.dropout)
        return StabilizedMLP(config), None
    encoder = CategoryEncoder(EncoderConfig.build(args.encoding, columns))
    config = MLPConfig(n_numeric + encoder.config.width, hidden=args.hidden, dropout=args.dropout)
    return TabularNet(encoder, StabilizedMLP(config), n_numeric), encoder.config


def run(args: argparse.Namespace) -> dict[str, object]:
    """Train and write the run folder; returns the metrics written to metrics.json."""
    started = time.perf_counter()
    # Fails before anything is written.
    data = _read(args)
    splits = split_dataset(data, seed=args.seed)
    mean, std = feature_stats(splits.train)
    columns = category_stats(splits.train, args.min_category_count, args.max_categories)
    schema = FeatureSchema(
        tuple(data.feature_names),
        tuple(map(float, mean)),
        tuple(map(float, std)),
        columns,
        data.columns,
        data.target,
        data.positive_class,
    )
    print(describe(data, schema))
    standardize = Standardize(torch.from_numpy(mean), torch.from_numpy(std))
    train_config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        patience=args.patience,
        grad_clip=args.grad_clip,
        seed=args.seed,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    model, encoder = _network(len(data.feature_names), columns, args)
    history = fit(model, splits.train, splits.val, standardize, train_config, columns)
    if isinstance(model, TabularNet):
        fill_unseen_codes(model, columns)
    scores = {
        name: evaluate(model, *tensors(part, standardize, columns))
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
    config = model.mlp.config if isinstance(model, TabularNet) else model.config
    checkpoint = Checkpoint(
        config=config,
        state_dict=model.state_dict(),
        schema=schema,
        threshold=args.threshold,
        metrics=metrics,
        model_name=args.name or data.name,
        seed=args.seed,
        encoder=encoder,
    )
    save_checkpoint(checkpoint, out / CHECKPOINT_NAME)
    _save_test_split(out / TEST_SPLIT_NAME, splits.test)
    report = {**metrics, "schema": schema.describe(), "history": history_to_dict(history)}
    atomic_write_bytes(out / "metrics.json", json.dumps(report, indent=2).encode())
    plot_training(history, out)
    return metrics


def _save_test_split(path: Path, test: Dataset) -> None:
    """The raw held-out rows, text as fixed-width unicode (loads with allow_pickle=False)."""
    arrays = {"features": test.features, "labels": test.labels}
    if test.text_names:
        arrays["text"] = test.text
        arrays["text_names"] = np.array(test.text_names, dtype=str)
    _save_npz(path, **arrays)


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
