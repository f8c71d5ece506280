"""What a published version says about itself: manifest, ONNX metadata, model card, Triton config.

Pure functions from a Release to text or dicts; publish.py writes them (the model card: card.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import onnx
import torch

from ..model.categories import MISSING_MARKERS
from ..serving.manifest import PLATFORM, FileEntry, Manifest, TensorSpec
from .formats import INPUT_NAME, OPSET, OUTPUT_NAMES
from .parity import ParityReport

# Largest batch Triton may send in one request (config.pbtxt max_batch_size, manifest key of the
# same name); parity is proven up to this size (parity.BATCH_SIZES ends at 1024).
MAX_BATCH_SIZE = 1024
# KServe v2 / Triton datatype names of the contract tensors, in graph order; text columns are BYTES
# (Triton's TYPE_STRING).
INPUT_DATATYPE = "FP32"
TEXT_DATATYPE = "BYTES"
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
    # Every column in file order (FeatureSchema.describe()): kind, input tensor, statistics or
    # vocabulary. Text columns are the inputs after `features`, in this order.
    columns: tuple[dict[str, Any], ...] = ()
    target: str = "target"
    positive_class: str = "1"
    encoding: str = ""  # how text codes reach the MLP: "onehot" or "embedding" ("" without text)

    @property
    def text_columns(self) -> tuple[str, ...]:
        return tuple(c["name"] for c in self.columns if c["kind"] == "categorical")

    def details(self) -> dict[str, Any]:
        """What the manifest says about the columns (also in the ONNX metadata)."""
        return {
            "columns": list(self.columns),
            "target": self.target,
            "positive_class": self.positive_class,
            "missing_markers": list(MISSING_MARKERS),
            "encoding": self.encoding,
        }


def tensors(
    n_features: int, text_columns: Sequence[str] = ()
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The graph's inputs and outputs: names, datatypes, shapes (-1 = any batch).

    Inputs: `features` [-1, F] when F > 0, then [-1, 1] text per text column, named after it.
    """
    outputs = zip(OUTPUT_NAMES, OUTPUT_DATATYPES, strict=True)
    numeric = [TensorSpec(INPUT_NAME, INPUT_DATATYPE, (-1, n_features))] if n_features else []
    text = [TensorSpec(name, TEXT_DATATYPE, (-1, 1)) for name in text_columns]
    return (
        (*numeric, *text),
        tuple(TensorSpec(name, dtype, (-1, 1)) for name, dtype in outputs),
    )


def manifest(
    release: Release, version: int, created_utc: str, files: dict[str, FileEntry]
) -> Manifest:
    inputs, outputs = tensors(len(release.feature_names), release.text_columns)
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
            **finite(release.details()),
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
        **{key: json.dumps(finite(value)) for key, value in release.details().items()},
    }


def config_pbtxt(
    model_name: str,
    n_features: int,
    max_batch_size: int = MAX_BATCH_SIZE,
    text_columns: Sequence[str] = (),
) -> str:
    """Triton's model config in protobuf text format; dims exclude the batch dimension.

    Text columns are TYPE_STRING inputs of dims [ 1 ], named after the column.
    """
    inputs, outputs = tensors(n_features, text_columns)
    triton = {"FP32": "TYPE_FP32", "INT64": "TYPE_INT64", TEXT_DATATYPE: "TYPE_STRING"}
    entries = [
        ",\n".join(
            f'  {{\n    name: "{_escape(spec.name)}"\n    data_type: {triton[spec.datatype]}\n'
            f"    dims: [ {spec.width} ]\n  }}"
            for spec in specs
        )
        for specs in (inputs, outputs)
    ]
    layout = (
        "# Inputs: `features` holds the numeric columns (NaN = missing) in manifest.json's\n"
        "# feature_names order; each text column is a TYPE_STRING input of its own, named after\n"
        "# the column, one UTF-8 value per row (stripped; missing = one of manifest.json's\n"
        '# missing_markers, e.g. "" or "NA"). Vocabularies: manifest.json "columns" and the\n'
        "# model card.\n"
        if text_columns
        else ""
    )
    return (
        "# Written by `stablemlp export`; versions live in the numbered subdirectories.\n"
        f"{layout}"
        f'name: "{model_name}"\n'
        f'platform: "{PLATFORM}"\n'
        f"max_batch_size: {max_batch_size}\n"
        f"input [\n{entries[0]}\n]\n"
        f"output [\n{entries[1]}\n]\n"
    )


def _escape(name: str) -> str:
    """A column name inside a protobuf text-format string literal."""
    return name.replace("\\", "\\\\").replace('"', '\\"')


def finite(value: Any) -> Any:
    """JSON has no NaN/Infinity: a non-finite number becomes null instead of invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


__all__ = [
    "INPUT_DATATYPE",
    "MAX_BATCH_SIZE",
    "OUTPUT_DATATYPES",
    "PLATFORM",
    "TEXT_DATATYPE",
    "Release",
    "config_pbtxt",
    "finite",
    "manifest",
    "onnx_metadata",
    "tensors",
]
