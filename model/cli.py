"""`stablemlp train`: data -> stabilized MLP -> checkpoint, metrics, plots in one output folder."""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np

from ..files import atomic_write_bytes
from .categories import MAX_CATEGORIES, MIN_CATEGORY_COUNT
from .checkpoint import CHECKPOINT_NAME, FeatureSchema
from .csvdata import load_dataset
from .data import DataError, Dataset
from .encoding import DEFAULT_ENCODING, ENCODINGS
from .estimator import (
    DEFAULT_DROPOUT,
    DEFAULT_HIDDEN,
    DEFAULT_MEMBERS,
    REFIT_MAX_ROWS,
    REFIT_MODES,
    SCHEDULES,
    StableMLPClassifier,
)
from .gradients import NonFiniteGradientError
from .plots import plot_training
from .preprocess import DEFAULT_BINS
from .train import NonFiniteLossError, TrainConfig, history_to_dict

log = logging.getLogger(__name__)
# The raw validation rows (early stopping's), for the export's parity proof. Named so since /1.
TEST_SPLIT_NAME = "test_split.npz"


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
    parser.add_argument(
        "--bins",
        type=int,
        default=DEFAULT_BINS,
        help="quantile bins of the piecewise-linear encoding per numeric column (0: none)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=TrainConfig.epochs,
        help="epochs of the learning-rate schedule; early stopping may end sooner",
    )
    parser.add_argument("--schedule", choices=SCHEDULES, default=TrainConfig.schedule)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument(
        "--hidden", type=_hidden, default=DEFAULT_HIDDEN, help="widths per member, e.g. 32,32"
    )
    parser.add_argument(
        "--members", type=int, default=DEFAULT_MEMBERS, help="ensemble members in the one graph"
    )
    parser.add_argument("--dropout", type=float, default=DEFAULT_DROPOUT)
    parser.add_argument("--lr", type=float, default=TrainConfig.learning_rate)
    parser.add_argument(
        "--batch-size", type=int, default=TrainConfig.batch_size, help="0: by the row count"
    )
    parser.add_argument("--patience", type=int, default=TrainConfig.patience)
    parser.add_argument(
        "--refit",
        choices=REFIT_MODES,
        default="auto",
        help=f"train again on every row for the best epoch count (auto: <= {REFIT_MAX_ROWS} rows)",
    )
    parser.add_argument("--no-refit", action="store_true", help="the same as --refit never")
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


def estimator_from(args: argparse.Namespace) -> StableMLPClassifier:
    """The estimator the flags describe; its parameters are checked before any data is read."""
    estimator = StableMLPClassifier(
        hidden=args.hidden,
        members=args.members,
        dropout=args.dropout,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        patience=args.patience,
        grad_clip=args.grad_clip,
        bins=args.bins,
        encoding=args.encoding,
        min_category_count=args.min_category_count,
        max_categories=args.max_categories,
        refit="never" if args.no_refit else args.refit,
        schedule=args.schedule,
        threshold=args.threshold,
        random_state=args.seed,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    try:
        estimator.check_params()
    except ValueError as err:
        raise DataError(str(err)) from None
    return estimator


def run(args: argparse.Namespace) -> dict[str, object]:
    """Train and write the run folder; returns the metrics written to metrics.json."""
    out: Path = args.output
    if out.exists() and not out.is_dir():
        raise DataError(f"--output {str(out)!r} exists and is not a folder")
    estimator = estimator_from(args)
    # Fails before anything is written.
    data = _read(args)
    estimator.fit_dataset(data)
    checkpoint = estimator.checkpoint_
    if args.name:
        checkpoint.model_name = args.name
    print(describe(data, checkpoint.schema))
    metrics = checkpoint.metrics
    out.mkdir(parents=True, exist_ok=True)
    estimator.save(out / CHECKPOINT_NAME)
    _save_test_split(out / TEST_SPLIT_NAME, estimator.heldout_)
    history = estimator.history_
    report = {
        **metrics,
        "schema": checkpoint.schema.describe(),
        "history": history_to_dict(history),
    }
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
    val = metrics["val"]
    assert isinstance(val, dict)
    refit = f", then {metrics['refit_epochs']} on every row" if metrics["refit_epochs"] else ""
    print(
        f"trained {args.output}: validation ROC AUC {val['roc_auc']:.4f},"
        f" accuracy {val['accuracy']:.4f}"
        f" (best epoch {metrics['best_epoch']}{refit}; {metrics['train_seconds']} s)"
    )
    return 0


__all__ = ["TEST_SPLIT_NAME", "build_parser", "main", "run"]
