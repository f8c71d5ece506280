"""What a published version says about itself: manifest, ONNX metadata, model card, Triton config.

Pure functions from a Release to text or dicts; publish.py writes them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import onnx
import torch

from ..serving.manifest import PLATFORM, FileEntry, Manifest, TensorSpec
from .formats import INPUT_NAME, OPSET, OUTPUT_NAMES
from .parity import ParityReport

# Largest batch Triton may send in one request (config.pbtxt max_batch_size, manifest key of the
# same name); parity is proven up to this size (parity.BATCH_SIZES ends at 1024).
MAX_BATCH_SIZE = 1024
# KServe v2 / Triton datatype names of the contract tensors, in graph order.
INPUT_DATATYPE = "FP32"
OUTPUT_DATATYPES = ("FP32", "INT64")


@dataclass(frozen=True)
class Release:
    """Everything a version is built from: the artifacts and what the documents say about them."""

    model_name: str
    feature_names: tuple[str, ...]
    feature_means: tuple[float, ...]
    feature_stds: tuple[float, ...]
    threshold: float
    metrics: dict[str, Any]
    onnx_model: onnx.ModelProto  # without metadata: that names the version, added at publish
    torchscript: bytes
    parity: ParityReport


def tensors(n_features: int) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The graph's inputs and outputs: names, datatypes, shapes (-1 = any batch)."""
    outputs = zip(OUTPUT_NAMES, OUTPUT_DATATYPES, strict=True)
    return (
        (TensorSpec(INPUT_NAME, INPUT_DATATYPE, (-1, n_features)),),
        tuple(TensorSpec(name, dtype, (-1, 1)) for name, dtype in outputs),
    )


def manifest(
    release: Release, version: int, created_utc: str, files: dict[str, FileEntry]
) -> Manifest:
    inputs, outputs = tensors(len(release.feature_names))
    return Manifest(
        model_name=release.model_name,
        version=version,
        created_utc=created_utc,
        opset=OPSET,
        max_batch_size=MAX_BATCH_SIZE,
        inputs=inputs,
        outputs=outputs,
        feature_names=release.feature_names,
        threshold=release.threshold,
        files=files,
        details={
            "parity": finite(release.parity.summary()),
            "metrics": finite(release.metrics),
            "torch_version": torch.__version__,
        },
    )


def onnx_metadata(release: Release, version: int, created_utc: str) -> dict[str, str]:
    """metadata_props: enough for a consumer with only the .onnx file (verify reads the stats)."""
    return {
        "model_name": release.model_name,
        "model_version": str(version),
        "created_utc": created_utc,
        "feature_names": json.dumps(list(release.feature_names)),
        "feature_means": json.dumps(list(release.feature_means)),
        "feature_stds": json.dumps(list(release.feature_stds)),
        "threshold": repr(float(release.threshold)),
        "metrics": json.dumps(finite(release.metrics)),
        "torch_version": torch.__version__,
    }


def config_pbtxt(model_name: str, n_features: int, max_batch_size: int = MAX_BATCH_SIZE) -> str:
    """Triton's model config in protobuf text format; dims exclude the batch dimension."""
    outputs = ",\n".join(
        f'  {{\n    name: "{name}"\n    data_type: TYPE_{dtype}\n    dims: [ 1 ]\n  }}'
        for name, dtype in zip(OUTPUT_NAMES, OUTPUT_DATATYPES, strict=True)
    )
    return (
        "# Written by `stablemlp export`; versions live in the numbered subdirectories.\n"
        f'name: "{model_name}"\n'
        f'platform: "{PLATFORM}"\n'
        f"max_batch_size: {max_batch_size}\n"
        "input [\n"
        f'  {{\n    name: "{INPUT_NAME}"\n    data_type: TYPE_{INPUT_DATATYPE}\n'
        f"    dims: [ {n_features} ]\n  }}\n"
        "]\n"
        f"output [\n{outputs}\n]\n"
    )


def model_card(release: Release, version: int, created_utc: str) -> str:
    n = len(release.feature_names)
    # Only the per-split scores; the metrics dict also holds run facts (rows, config, timings).
    metrics = "\n".join(
        f"| {split} | {name} | {_fmt(value)} |"
        for split in ("train", "val", "test")
        if isinstance(release.metrics.get(split), dict)
        for name, value in sorted(release.metrics[split].items())
        if isinstance(value, int | float)
    )
    data = release.metrics.get("data", release.model_name)
    rows = release.metrics.get("rows")
    sizes = (
        ", ".join(f"{k} {v}" for k, v in rows.items()) + " rows"
        if isinstance(rows, dict)
        else "sizes not recorded"
    )
    parity = release.parity.summary()
    worst = max(parity["max_abs_diff"].values(), default=0.0)
    features = ", ".join(f"`{name}`" for name in release.feature_names)
    return f"""# {release.model_name}, version {version}

Binary classifier: a multilayer perceptron (Linear -> BatchNorm -> ELU blocks, BatchNorm folded
into the Linears for export) with its preprocessing built into the graph.
Exported {created_utc} with torch {torch.__version__}, ONNX opset {OPSET}.

## Data
Tabular data set `{data}`: {n} numeric features, a 0/1 target, stratified
train/validation/test split ({sizes}). Missing values (NaN) are replaced by the training mean of the
feature, then every feature is standardized with the training mean and standard deviation.

Features: {features}.

## Metrics
| split | metric | value |
| --- | --- | --- |
{metrics}

## Inputs and outputs
- `{INPUT_NAME}`: {INPUT_DATATYPE} [N, {n}], raw feature values in the order above; NaN = missing.
- `{OUTPUT_NAMES[0]}`: {OUTPUT_DATATYPES[0]} [N, 1], probability of class 1.
- `{OUTPUT_NAMES[1]}`: {OUTPUT_DATATYPES[1]} [N, 1], 1 if probability >= threshold, else 0.

Batches of up to {MAX_BATCH_SIZE} rows per request (Triton `max_batch_size`).

## Threshold
{release.threshold:g}, fixed at training time; it is not tuned to any cost of errors.

## Parity
PyTorch eval model, folded model, TorchScript (`model.pt`) and ONNX Runtime (`model.onnx`) agree
within {worst:.1e} on probabilities (tolerance {parity["tolerance"]:g}) with identical
labels; details in `parity.json`.

## Intended use
Demonstration and evaluation of a gradient-stabilized tabular MLP and its serving path. Scores
inputs drawn from the same population and feature definitions as the training data.

## Limitations
- Small tabular training set; metrics come from one held-out split and carry sampling error.
- Not validated for clinical or other high-stakes decisions; not a medical device.
- Inputs outside the training distribution, or with many missing values, are imputed and scored
  without any warning; probabilities are not calibrated.
"""


def finite(value: Any) -> Any:
    """JSON has no NaN/Infinity: a non-finite number becomes null instead of invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def _fmt(value: float) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


__all__ = [
    "INPUT_DATATYPE",
    "MAX_BATCH_SIZE",
    "OUTPUT_DATATYPES",
    "PLATFORM",
    "Release",
    "config_pbtxt",
    "finite",
    "manifest",
    "model_card",
    "onnx_metadata",
    "tensors",
]
