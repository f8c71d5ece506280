"""Our test ROC AUC next to logistic regression (one-hot) and HistGradientBoosting, same split.

    python -m stablemlp.model.baselines                      # built-in breast-cancer data
    python -m stablemlp.model.baselines --data penguins      # palmerpenguins' CSV, target `sex`
    python -m stablemlp.model.baselines --csv F --target T   # any CSV (with --categorical, --drop)
    ... --seeds 0,1,2,3,4 --encodings onehot,embedding       # several splits; both encodings

Every method sees the same training rows (`stablemlp train`'s split for that seed; ours also uses
the validation rows for early stopping) and is scored on the same test rows. Text columns reach
the baselines as our codes (the same vocabulary, "other" and "missing"): one-hot for logistic
regression, native categories for HistGradientBoosting. For our model, each encoding also reports
the in-process ONNX Runtime session.run time at batch 1 and 64 (median).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from .categories import is_missing
from .checkpoint import CHECKPOINT_NAME, load_checkpoint
from .cli import build_parser, run
from .csvdata import load_dataset
from .data import Dataset, category_stats, split_dataset

PENGUINS_TARGET = "sex"


def penguins_csv(folder: Path) -> Path:
    """palmerpenguins' penguins.csv (344 rows; species, island text; NA cells), without the 11
    rows whose target `sex` is missing, written to `folder`. Read from the installed package's
    files without importing it (that would import pandas)."""
    spec = importlib.util.find_spec("palmerpenguins")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--data penguins needs the palmerpenguins package (pip install it)")
    source = Path(spec.submodule_search_locations[0]) / "data" / "penguins.csv"
    with open(source, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    column = rows[0].index(PENGUINS_TARGET)
    kept = [rows[0], *(row for row in rows[1:] if not is_missing(row[column].strip()))]
    path = folder / "penguins.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(kept)
    return path


def _design(train: Dataset, parts: list[Dataset]) -> list[np.ndarray]:
    """Numeric block, then each text column as our codes (float, for scikit-learn)."""
    columns = category_stats(train)
    return [
        np.hstack(
            [part.features.astype(np.float64)]
            + [c.codes(part.text[:, j])[:, None].astype(np.float64) for j, c in enumerate(columns)]
        )
        for part in parts
    ]


def baseline_aucs(data: Dataset, seed: int) -> dict[str, float]:
    """Test ROC AUC of logistic regression (one-hot text) and HistGradientBoosting."""
    splits = split_dataset(data, seed=seed)
    x_train, x_test = _design(splits.train, [splits.train, splits.test])
    n, c = len(data.feature_names), len(data.text_names)
    numeric, text = list(range(n)), list(range(n, n + c))
    logreg = make_pipeline(
        ColumnTransformer(
            [
                ("numeric", make_pipeline(SimpleImputer(), StandardScaler()), numeric),
                ("text", OneHotEncoder(handle_unknown="ignore"), text),
            ]
        ),
        LogisticRegression(max_iter=5000),
    )
    boosting = HistGradientBoostingClassifier(
        categorical_features=[i >= n for i in range(n + c)] if c else None, random_state=seed
    )
    scores = {}
    for name, model in (("logreg_onehot", logreg), ("hist_gradient_boosting", boosting)):
        model.fit(x_train, splits.train.labels)
        proba = model.predict_proba(x_test)[:, 1]
        scores[name] = float(roc_auc_score(splits.test.labels, proba))
    return scores


def ours(train_args: list[str], seed: int, encoding: str, folder: Path) -> dict[str, float]:
    """`stablemlp train` with this seed and encoding: test ROC AUC and session.run times (us)."""
    out = folder / f"{encoding}-{seed}"
    args = [*train_args, "--seed", str(seed), "--encoding", encoding, "--no-progress"]
    metrics: dict[str, Any] = run(build_parser().parse_args([*args, "--output", str(out)]))
    return {"auc": float(metrics["test"]["roc_auc"]), **_session_times(out)}


def _session_times(run_dir: Path) -> dict[str, float]:
    # The export side is imported here only: the model package does not depend on it otherwise.
    import onnxruntime as ort

    from ..export.cli import build_release, parity_batches

    checkpoint = load_checkpoint(run_dir / CHECKPOINT_NAME)
    batches = parity_batches(run_dir, checkpoint)
    release = build_release(checkpoint, "timing", batches)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        release.onnx_model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    test = batches["test"]
    times = {}
    for rows in (1, 64):
        index = np.arange(rows) % len(next(iter(test.values())))
        feeds = {name: array[index] for name, array in test.items()}
        times[f"run_us_batch_{rows}"] = _median_us(partial(session.run, None, feeds))
    return times


def _median_us(call: Callable[[], object], repeats: int = 2000) -> float:
    for _ in range(100):
        call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        call()
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1000


def _summary(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} +- {spread:.4f}"


def compare(train_args: list[str], data: Dataset, seeds: list[int], encodings: list[str]) -> str:
    """The Markdown table: one row per method, mean +- sd of test ROC AUC over the seeds."""
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for seed in seeds:
            for name, auc in baseline_aucs(data, seed).items():
                results.setdefault(name, []).append(auc)
            for encoding in encodings:
                for key, value in ours(train_args, seed, encoding, Path(folder)).items():
                    results.setdefault(f"stablemlp_{encoding} {key}", []).append(value)
    lines = [f"data {data.name}, seeds {seeds}", "| method | figure | mean +- sd |"]
    lines.append("| --- | --- | --- |")
    for name, values in results.items():
        method, _, figure = name.partition(" ")
        lines.append(f"| {method} | {figure or 'auc'} | {_summary(values)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stablemlp.model.baselines", description=__doc__
    )
    parser.add_argument("--data", choices=("builtin", "penguins"), default="builtin")
    parser.add_argument("--csv", type=Path)
    parser.add_argument("--target")
    parser.add_argument("--categorical", default="")
    parser.add_argument("--drop", default="")
    parser.add_argument("--seeds", default="0", help="comma-separated split/training seeds")
    parser.add_argument("--encodings", default="onehot", help="onehot,embedding")
    parser.add_argument("--epochs", type=int, default=200)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        csv_path, target = args.csv, args.target
        if args.data == "penguins":
            csv_path, target = penguins_csv(Path(folder)), PENGUINS_TARGET
        train_args = ["--epochs", str(args.epochs)]
        if csv_path is not None:
            train_args += ["--csv", str(csv_path), "--target", str(target)]
            train_args += ["--categorical", args.categorical, "--drop", args.drop]
        options = build_parser().parse_args([*train_args, "--output", folder])
        data = load_dataset(options.csv, options.target, options.categorical, options.drop)
        seeds = [int(s) for s in args.seeds.split(",")]
        print(compare(train_args, data, seeds, args.encodings.split(",")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
