"""MODEL_CARD.md: what a published version is, takes, returns and was measured to do."""

from __future__ import annotations

from typing import Any

import torch

from ..model.categories import MISSING_MARKERS
from ..model.preprocess import STANDARDIZED_LIMIT
from .documents import INPUT_DATATYPE, MAX_BATCH_SIZE, OUTPUT_DATATYPES, TEXT_DATATYPE, Release
from .formats import INPUT_NAME, ML_DOMAIN, ML_OPSET, OPSET, OUTPUT_NAMES


def model_card(release: Release, version: int, created_utc: str) -> str:
    n, text = len(release.feature_names), release.text_columns
    data = release.metrics.get("data", release.model_name)
    rows = release.metrics.get("rows")
    sizes = (
        ", ".join(f"{k} {v}" for k, v in rows.items()) + " rows"
        if isinstance(rows, dict)
        else "sizes not recorded"
    )
    parity = release.parity.summary()
    worst = max(parity["max_abs_diff"].values(), default=0.0)
    return f"""# {release.model_name}, version {version}

Binary classifier: a multilayer perceptron (Linear -> BatchNorm -> ELU blocks, BatchNorm folded
into the Linears for export) with its preprocessing built into the graph.
Exported {created_utc} with torch {torch.__version__}, ONNX opset {OPSET}{_ml_opset(text)}.

## Data
Tabular data set `{data}`: {n} numeric and {len(text)} text columns, target `{release.target}`
(class 1 = `{release.positive_class}`), stratified split ({sizes}; "final": the rows the
published weights were trained on, when training was repeated on every row after early stopping).
Numeric columns: missing values (NaN) are replaced by the training mean, then standardized with the
training mean and standard deviation and clamped to +-{STANDARDIZED_LIMIT:g}; models trained since
checkpoint format /3 add a soft clip, a piecewise-linear encoding over quantile bins and
missing-value indicators.{_text_data(release)}

{_columns(release)}

## Metrics
| split | metric | value |
| --- | --- | --- |
{_metrics(release.metrics)}

## Inputs and outputs
{_inputs(release)}
- `{OUTPUT_NAMES[0]}`: {OUTPUT_DATATYPES[0]} [N, 1], probability of class 1.
- `{OUTPUT_NAMES[1]}`: {OUTPUT_DATATYPES[1]} [N, 1], 1 if probability >= threshold, else 0.

Batches of up to {MAX_BATCH_SIZE} rows per request (Triton `max_batch_size`). `model.pt`
(TorchScript) computes the same: {_torchscript_call(n, text)}.

## Threshold
{release.threshold:g}, fixed at training time; it is not tuned to any cost of errors.

## Parity
PyTorch eval model, folded model, TorchScript (`model.pt`) and ONNX Runtime (`model.onnx`) agree
within {worst:.1e} on probabilities (tolerance {parity["tolerance"]:g}) with identical
labels, on the held-out rows, random rows{" (with unseen and missing text)" if text else ""} and
rows of extreme finite values; details in `parity.json`.

## Intended use
Demonstration and evaluation of a gradient-stabilized tabular MLP and its serving path. Scores
inputs drawn from the same population and feature definitions as the training data.

## Limitations
- Small tabular training set; metrics come from one held-out split and carry sampling error.
- Not validated for clinical or other high-stakes decisions; not a medical device.
- Inputs outside the training distribution, or with many missing values, are imputed and scored
  without any warning; probabilities are not calibrated.
"""


def _ml_opset(text: tuple[str, ...]) -> str:
    return f" ({ML_DOMAIN} {ML_OPSET} for the text lookup)" if text else ""


def _text_data(release: Release) -> str:
    if not release.text_columns:
        return ""
    encoding = "a learned embedding" if release.encoding == "embedding" else "one-hot"
    return f"""
Text columns: each category seen often enough in the training rows has a code of its own; rarer
categories, those beyond the most frequent, and text never seen in training share the "other"
code; a missing marker has the "missing" code. Codes enter the network {encoding}; a code no
training row had (often "missing" or "other") carries the training-weighted mean of the column."""


def _columns(release: Release) -> str:
    rows = []
    for column in release.columns:
        if column["kind"] == "numeric":
            where = f"`{INPUT_NAME}`[:, {column['index']}]"
            detail = f"mean {column['mean']:.6g}, std {column['std']:.6g}"
        else:
            where = f"`{column['name']}`"
            shown = ", ".join(f"`{c}`" for c in column["categories"][:12])
            more = (
                f" and {len(column['categories']) - 12} more"
                if len(column["categories"]) > 12
                else ""
            )
            detail = (
                f"{len(column['categories'])} categories (codes in order): {shown or 'none'}{more};"
                f" other = {column['other']}, missing = {column['missing']}"
            )
        rows.append(f"| `{column['name']}` | {column['kind']} | {where} | {detail} |")
    if not rows:
        return "Features: " + ", ".join(f"`{name}`" for name in release.feature_names) + "."
    return "| column | kind | input | statistics / vocabulary |\n| --- | --- | --- | --- |\n" + (
        "\n".join(rows)
    )


def _inputs(release: Release) -> str:
    n, lines = len(release.feature_names), []
    if n:
        lines.append(
            f"- `{INPUT_NAME}`: {INPUT_DATATYPE} [N, {n}], raw values of the numeric columns in "
            "the order above; NaN = missing."
        )
    if release.text_columns:
        names = ", ".join(f"`{name}`" for name in release.text_columns)
        markers = ", ".join(f'"{m}"' for m in MISSING_MARKERS)
        lines.append(
            f"- {names}: {TEXT_DATATYPE} [N, 1] each (ONNX tensor(string), Triton TYPE_STRING), "
            "UTF-8 text with surrounding whitespace stripped (the server strips it), matched "
            f"exactly and case-sensitively against the categories. Missing: {markers}. Anything "
            'else is "other".'
        )
    return "\n".join(lines)


def _torchscript_call(n: int, text: tuple[str, ...]) -> str:
    if not text:
        return "`model(features)` -> `(probability, label)`"
    call = "model(features, text)" if n else "model(text)"
    return (
        f"`{call}` -> `(probability, label)`, `text` being one list of str per text column, "
        "in the input order above (the vocabulary is inside the module)"
    )


def _metrics(metrics: dict[str, Any]) -> str:
    # Only the per-split scores; the metrics dict also holds run facts (rows, config, timings).
    return "\n".join(
        f"| {split} | {name} | {value:.4f} |"
        if isinstance(value, float)
        else f"| {split} | {name} | {value} |"
        for split in ("train", "val", "test")
        if isinstance(metrics.get(split), dict)
        for name, value in sorted(metrics[split].items())
        if isinstance(value, int | float)
    )


__all__ = ["model_card"]
