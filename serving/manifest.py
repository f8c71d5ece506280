"""manifest.json, the contract a published version carries: its tensors, features and file hashes.

Read and checked once per version at load (runtime.py then checks the graph against it); the
model file is accepted only if its bytes hash to what the manifest promises.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .codec import DTYPES, TensorSpec
from .errors import ContractError, IntegrityError

MANIFEST_FORMAT = "stablemlp.manifest/1"
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
PLATFORM = "onnxruntime_onnx"  # Triton's platform name for ONNX models


@dataclass(frozen=True)
class Manifest:
    """The parts of manifest.json that serving uses (see the repository contract)."""

    model_name: str
    version: int
    opset: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    feature_names: tuple[str, ...]
    threshold: float
    sha256: str  # of model.onnx
    size: int  # bytes of model.onnx
    created_utc: str

    @classmethod
    def read(cls, path: Path) -> Manifest:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data["format"] != MANIFEST_FORMAT:
                raise ContractError(
                    f"{path.name} format: got {data['format']!r}, expected {MANIFEST_FORMAT!r}"
                )
            model_file = data["files"][MODEL_FILE]
            return cls(
                model_name=str(data["model_name"]),
                version=int(data["version"]),
                opset=int(data["opset"]),
                inputs=tuple(_spec(t) for t in data["inputs"]),
                outputs=tuple(_spec(t) for t in data["outputs"]),
                feature_names=tuple(str(n) for n in data["feature_names"]),
                threshold=float(data["threshold"]),
                sha256=str(model_file["sha256"]),
                size=int(model_file["bytes"]),
                created_utc=str(data["created_utc"]),
            )
        except OSError as err:
            raise ContractError(f"{path}: cannot read ({err.strerror})") from None
        except (KeyError, TypeError, ValueError) as err:
            raise ContractError(f"{path}: malformed ({type(err).__name__}: {err})") from None


def _spec(tensor: Mapping[str, Any]) -> TensorSpec:
    return TensorSpec(
        str(tensor["name"]), str(tensor["datatype"]), tuple(int(d) for d in tensor["shape"])
    )


def check_manifest(manifest: Manifest) -> None:
    """The model contract: one input [-1, F] with F feature names; outputs batched on dim 0."""
    if len(manifest.inputs) != 1:
        raise ContractError(f"manifest inputs: got {len(manifest.inputs)}, expected 1")
    features = manifest.inputs[0]
    if len(features.shape) != 2 or features.shape[1] != len(manifest.feature_names):
        raise ContractError(
            f"manifest input '{features.name}' shape: got {list(features.shape)}, "
            f"expected [-1, {len(manifest.feature_names)}] (one column per feature name)"
        )
    if not manifest.outputs:
        raise ContractError("manifest outputs: got none, expected at least one")
    for spec in (*manifest.inputs, *manifest.outputs):
        if spec.datatype not in DTYPES:
            raise ContractError(f"manifest tensor '{spec.name}' datatype: got {spec.datatype!r}")
        if not spec.shape or spec.shape[0] != -1 or min(spec.shape[1:], default=1) < 1:
            raise ContractError(
                f"manifest tensor '{spec.name}' shape: got {list(spec.shape)}, "
                "expected [-1, d1, ...] with a dynamic batch dimension and fixed dims >= 1"
            )


def verify_file(path: Path, sha256: str, size: int) -> bytes:
    """The file's bytes, if they are byte-for-byte the ones the manifest describes."""
    with path.open("rb") as stream:
        data = stream.read(size + 1)  # one byte more than promised reveals a longer file
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != size or digest != sha256:
        got = f"{len(data)} bytes" if len(data) <= size else f"more than {size} bytes"
        raise IntegrityError(
            f"{path.parent.parent.name}/{path.parent.name}/{path.name}: got sha256 "
            f"{digest} ({got}), expected {sha256} ({size} bytes) from manifest.json"
        )
    return data


__all__ = [
    "MANIFEST_FILE",
    "MANIFEST_FORMAT",
    "MODEL_FILE",
    "PLATFORM",
    "Manifest",
    "check_manifest",
    "verify_file",
]
