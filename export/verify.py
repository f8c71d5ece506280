"""Re-check a published version from its files alone: hashes, graph contract, TorchScript, parity.

Parity here compares ONNX Runtime with the TorchScript file on random rows drawn from the feature
statistics and vocabularies stored in the ONNX metadata (the test split is not in the repository),
with NaNs in some rows and unseen and missing text, on batches of 1, 7 and 1024 rows and one of
extreme finite values, seeded with VERIFY_SEED so reruns are identical.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import DecodeError

from ..model.categories import CategoricalColumn
from ..serving.errors import ContractError as ManifestError
from ..serving.manifest import Manifest
from ..serving.runtime.graph_files import refuse_file_references
from . import documents
from .errors import ContractError, VerifyError
from .formats import OPSET, check_onnx, load_torchscript, metadata_of
from .parity import ParityError, ParityReport, compare, onnxruntime_runner, torch_runner
from .publish import (
    CARD_FILE,
    CONFIG_FILE,
    MANIFEST_FILE,
    ONNX_FILE,
    TORCHSCRIPT_FILE,
    sha256_hex,
    versions,
)
from .rows import parity_feeds

VERIFY_SEED = 0
REQUIRED_FILES = (ONNX_FILE, TORCHSCRIPT_FILE, CARD_FILE)
# The manifest's free-form part that export always writes.
DETAIL_KEYS = ("parity", "metrics", "torch_version")
# Details that the ONNX metadata repeats, so both must agree (Release.details()).
COLUMN_KEYS = ("columns", "target", "positive_class", "missing_markers", "encoding")


@dataclass(frozen=True)
class Verified:
    model_name: str
    version: int
    files: int  # how many files had their sha256 checked
    parity: ParityReport


def select(repository: Path, model: str | None, version: int | None) -> list[tuple[str, int]]:
    """(model, version) pairs to verify: the given ones, else every model at its newest version."""
    if not repository.is_dir():
        raise VerifyError(f"{repository}: no such repository")
    names = (
        [model]
        if model
        else sorted(
            p.name for p in repository.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
    )
    chosen = []
    for name in names:
        found = versions(repository / name)
        if version is not None:
            if version not in found:
                raise VerifyError(f"{name}: no version {version} (have {found or 'none'})")
            chosen.append((name, version))
        elif found:
            chosen.append((name, found[-1]))
        elif model:
            raise VerifyError(f"{name}: no published version in {repository}")
    if not chosen:
        raise VerifyError(f"{repository}: no published model")
    return chosen


def verify_version(repository: Path, model: str, version: int) -> Verified:
    """Raise VerifyError (or ParityError) naming the first failed check of model/version."""
    version_dir = repository / model / str(version)
    manifest = _manifest(version_dir)
    _check_hashes(version_dir, manifest)
    onnx_bytes = (version_dir / ONNX_FILE).read_bytes()
    try:  # the check serving makes: onnx.checker accepts external data with relative paths
        refuse_file_references(onnx_bytes)
    except ManifestError as err:
        raise VerifyError(str(err)) from err
    try:
        graph = onnx.load_from_string(onnx_bytes)
    except DecodeError as err:
        raise VerifyError(f"{ONNX_FILE} is not an ONNX model: {err}") from err
    n_features, text = len(manifest.feature_names), manifest.text_columns
    try:
        check_onnx(graph, n_features, text)
    except ContractError as err:
        raise VerifyError(f"{ONNX_FILE}: {err}") from err
    metadata = metadata_of(graph)
    _check_manifest(manifest, metadata, model, version)
    _check_config(repository / model, manifest)
    try:
        script = load_torchscript((version_dir / TORCHSCRIPT_FILE).read_bytes())
    except RuntimeError as err:
        raise VerifyError(f"{TORCHSCRIPT_FILE} does not load: {str(err).splitlines()[0]}") from err
    means, stds = _feature_stats(metadata, n_features)
    # Versions exported before text columns (no "columns" metadata) do not bound standardized
    # values either: extreme rows make both formats NaN, so they are not probed there.
    batches = parity_feeds(
        means, stds, _vocabularies(metadata, text), VERIFY_SEED, extremes="columns" in metadata
    )
    report = compare(
        ("torchscript", torch_runner(script, text)),
        {"onnxruntime": onnxruntime_runner(onnx_bytes)},
        batches,
    )
    if not report.passed:
        raise ParityError(report)
    return Verified(model, version, len(manifest.files), report)


def _manifest(version_dir: Path) -> Manifest:
    try:
        manifest = Manifest.read(version_dir / MANIFEST_FILE)
    except ManifestError as err:
        raise VerifyError(str(err)) from err
    missing = [key for key in DETAIL_KEYS if key not in manifest.details]
    if missing:
        raise VerifyError(f"{MANIFEST_FILE}: missing {missing}")
    return manifest


def _feature_stats(metadata: dict[str, str], n_features: int) -> tuple[list[float], list[float]]:
    try:
        means = [float(v) for v in json.loads(metadata["feature_means"])]
        stds = [float(v) for v in json.loads(metadata["feature_stds"])]
    except (KeyError, ValueError, TypeError) as err:
        raise VerifyError(f"{ONNX_FILE}: metadata lacks valid feature_means/feature_stds") from err
    if len(means) != n_features or len(stds) != n_features:
        raise VerifyError(f"{ONNX_FILE}: metadata feature statistics are not {n_features} long")
    return means, stds


def _vocabularies(metadata: dict[str, str], text: tuple[str, ...]) -> list[CategoricalColumn]:
    """The text columns' vocabularies from the ONNX metadata, in the order of the text inputs."""
    try:
        described: list[dict[str, Any]] = json.loads(metadata.get("columns", "[]"))
        columns = [CategoricalColumn.from_dict(c) for c in described if c["kind"] == "categorical"]
    except (ValueError, TypeError, KeyError) as err:
        raise VerifyError(f"{ONNX_FILE}: metadata 'columns' is not a column list ({err})") from err
    if tuple(c.name for c in columns) != text:
        raise VerifyError(f"{ONNX_FILE}: metadata columns do not match the text inputs {text}")
    return columns


def _check_hashes(version_dir: Path, manifest: Manifest) -> None:
    for name in REQUIRED_FILES:
        if name not in manifest.files:
            raise VerifyError(f"{MANIFEST_FILE} lists no {name}")
    for name, expected in manifest.files.items():
        path = version_dir / name
        if not path.is_file():
            raise VerifyError(f"{name} is missing")
        data = path.read_bytes()
        if sha256_hex(data) != expected.sha256 or len(data) != expected.size:
            raise VerifyError(f"{name}: sha256 mismatch with {MANIFEST_FILE} (file changed)")


def _check_manifest(manifest: Manifest, metadata: dict[str, str], model: str, version: int) -> None:
    inputs, outputs = documents.tensors(len(manifest.feature_names), manifest.text_columns)
    expected: dict[str, Any] = {
        "model_name": model,
        "version": version,
        "opset": OPSET,
        "inputs": inputs,
        "outputs": outputs,
        "feature_names": tuple(json.loads(metadata.get("feature_names", "null")) or ()),
        "threshold": float(metadata.get("threshold", "nan")),
    }
    for key, value in expected.items():
        if getattr(manifest, key) != value:
            raise VerifyError(
                f"{MANIFEST_FILE}: {key} is {getattr(manifest, key)!r}, expected {value!r}"
            )
    for key in COLUMN_KEYS:  # versions exported before text columns have none of them
        if key in metadata and manifest.details.get(key) != json.loads(metadata[key]):
            raise VerifyError(f"{MANIFEST_FILE}: {key} differs from the ONNX metadata")


def _check_config(model_dir: Path, manifest: Manifest) -> None:
    expected = documents.config_pbtxt(
        manifest.model_name,
        len(manifest.feature_names),
        manifest.max_batch_size,
        manifest.text_columns,
    )
    path = model_dir / CONFIG_FILE
    if not path.is_file() or path.read_text() != expected:
        raise VerifyError(f"{CONFIG_FILE} is missing or does not match the manifest")


__all__ = [
    "COLUMN_KEYS",
    "DETAIL_KEYS",
    "REQUIRED_FILES",
    "VERIFY_SEED",
    "Verified",
    "select",
    "verify_version",
]
