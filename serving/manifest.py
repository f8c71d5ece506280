"""manifest.json, the contract a published version carries: its tensors, features and file hashes.

One module for both sides, and torch-free: `stablemlp export` builds a `Manifest` and writes
`to_json()`; serving and `stablemlp verify` read it back with `Manifest.read`, which accepts only
what the contract allows and refuses anything else, whatever the file holds (a number too large, a
NaN or Infinity, nesting too deep, a path in a file name), as one `ContractError` naming the key.

The contract: every tensor is [-1, d] (a dynamic batch, then d >= 1 values per row). Inputs are at
most one FP32 [-1, F] matrix of the numeric features (F = len(feature_names), NaN = missing) and
one BYTES [-1, 1] tensor per text column, named after the column; outputs are FP32 or INT64.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .datatypes import BYTES, FP32, INT64
from .errors import ContractError, IntegrityError, clip

FORMAT = "stablemlp.manifest/1"
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
PLATFORM = "onnxruntime_onnx"  # Triton's platform name for ONNX models
INPUT_DATATYPES = (FP32.name, BYTES.name)  # the contract's datatypes (check_contract)
OUTPUT_DATATYPES = (FP32.name, INT64.name)
MAX_MANIFEST_BYTES = 4 << 20  # a manifest with vocabularies and metrics is a few KiB
MAX_BATCH_SIZE = 1 << 16  # rows; the default is 1024 (export.documents)
MAX_WIDTH = 1 << 16  # values per row of one tensor
MAX_TENSORS = 1024
MAX_NAME_CHARS = 128  # tensor and feature names
MAX_FILE_BYTES = 1 << 34  # 16 GiB: far beyond any MLP, small enough for an int64
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")  # also a folder name
VERSION = re.compile(r"[1-9][0-9]{0,17}")  # ASCII only: str.isdigit() also accepts "²"
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the protocol describes it; -1 marks the batch dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def width(self) -> int:
        """Values per row."""
        return self.shape[1]

    def describe(self) -> str:
        return f"{self.datatype} {list(self.shape)}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int  # bytes


@dataclass(frozen=True)
class Manifest:
    model_name: str
    version: int
    created_utc: str
    opset: int
    max_batch_size: int  # rows per request that parity was proven up to
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    feature_names: tuple[str, ...]  # the columns of the FP32 input, in order
    threshold: float
    files: Mapping[str, FileEntry]
    # Written by export, read by people and `verify`, not interpreted by serving: parity,
    # metrics, torch_version, the columns' kinds and vocabularies.
    details: Mapping[str, Any] = field(default_factory=dict)
    platform: str = PLATFORM

    def __post_init__(self) -> None:
        check_contract(self)

    @property
    def text_columns(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.inputs if spec.datatype == BYTES.name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model_name": self.model_name,
            "version": self.version,
            "created_utc": self.created_utc,
            "platform": self.platform,
            "opset": self.opset,
            "max_batch_size": self.max_batch_size,
            "inputs": [spec.to_dict() for spec in self.inputs],
            "outputs": [spec.to_dict() for spec in self.outputs],
            "feature_names": list(self.feature_names),
            "threshold": self.threshold,
            "files": {n: {"sha256": f.sha256, "bytes": f.size} for n, f in self.files.items()},
            **self.details,
        }

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, source: str = MANIFEST_FILE) -> Manifest:
        if len(data) > MAX_MANIFEST_BYTES:
            raise ContractError(
                f"{source}: got {len(data)} bytes, expected <= {MAX_MANIFEST_BYTES}"
            )
        try:
            document = json.loads(data, parse_constant=_refuse_constant)
        except RecursionError:
            raise ContractError(f"{source}: nested too deeply") from None
        except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
            raise ContractError(f"{source}: not JSON ({clip(str(err), 200)})") from None
        try:
            return _from_document(document)
        except ContractError as err:
            raise ContractError(f"{source}: {err}") from None

    @classmethod
    def read(cls, path: Path) -> Manifest:
        return cls.from_json(read_regular(path, MAX_MANIFEST_BYTES + 1), path.name)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _get(document: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in document:
        raise ContractError(f"'{key}': missing")
    value = document[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ContractError(f"'{key}': got {type(value).__name__}, expected {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _integer(document: Mapping[str, Any], key: str, low: int, high: int) -> int:
    value: int = _get(document, key, int)
    if not low <= value <= high:
        raise ContractError(f"'{key}': got {clip(str(value))}, expected {low}..{high}")
    return value


def _text(value: Any, where: str, limit: int = MAX_NAME_CHARS) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= limit or not value.isprintable():
        shown = clip(value) if isinstance(value, str) else type(value).__name__
        raise ContractError(f"{where}: got {shown!r}, expected 1..{limit} printable characters")
    return value


def _tensor(value: Any, where: str, datatypes: tuple[str, ...]) -> TensorSpec:
    if not isinstance(value, dict):
        raise ContractError(f"{where}: got {type(value).__name__}, expected an object")
    name = _text(value.get("name"), f"{where}.name")
    datatype = value.get("datatype")
    if datatype not in datatypes:
        shown = clip(str(datatype))
        raise ContractError(f"{where}.datatype: got {shown!r}, expected one of {datatypes}")
    shape = value.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or shape[0] != -1
        or not all(type(d) is int for d in shape)
        or not 1 <= shape[1] <= MAX_WIDTH
    ):
        shown = clip(str(shape), 80)
        raise ContractError(
            f"{where}.shape: got {shown}, expected [-1, d] with 1 <= d <= {MAX_WIDTH}"
        )
    return TensorSpec(name, str(datatype), (-1, int(shape[1])))


def _tensors(
    document: Mapping[str, Any], key: str, datatypes: tuple[str, ...]
) -> tuple[TensorSpec, ...]:
    values: list[Any] = _get(document, key, list)
    if not 1 <= len(values) <= MAX_TENSORS:
        raise ContractError(f"'{key}': got {len(values)} tensors, expected 1..{MAX_TENSORS}")
    return tuple(_tensor(v, f"{key}[{i}]", datatypes) for i, v in enumerate(values))


def _files(document: Mapping[str, Any]) -> dict[str, FileEntry]:
    files: dict[str, Any] = _get(document, "files", dict)
    entries = {}
    for name, entry in list(files.items())[:MAX_TENSORS]:
        plain = _text(name, "files key")
        if plain in (".", "..") or "/" in plain or "\\" in plain:
            raise ContractError(f"files key: got {clip(plain)!r}, expected a plain file name")
        if not isinstance(entry, dict) or not _SHA256.fullmatch(str(entry.get("sha256", ""))):
            raise ContractError(f"files['{clip(plain)}'].sha256: expected 64 lowercase hex digits")
        size = entry.get("bytes")
        if type(size) is not int or not 0 <= size <= MAX_FILE_BYTES:
            raise ContractError(f"files['{clip(plain)}'].bytes: expected 0..{MAX_FILE_BYTES}")
        entries[plain] = FileEntry(str(entry["sha256"]), size)
    if MODEL_FILE not in entries:
        raise ContractError(f"files: no '{MODEL_FILE}' entry")
    return entries


_KEYS = ("format", "model_name", "version", "created_utc", "platform", "opset", "max_batch_size",
         "inputs", "outputs", "feature_names", "threshold", "files")  # fmt: skip


def _from_document(document: Any) -> Manifest:
    if not isinstance(document, dict):
        raise ContractError(f"got {type(document).__name__}, expected a JSON object")
    if document.get("format") != FORMAT:
        raise ContractError(
            f"'format': got {clip(str(document.get('format')))!r}, expected {FORMAT!r}"
        )
    name = _get(document, "model_name", str)
    if not MODEL_NAME.fullmatch(name):
        raise ContractError(f"'model_name': got {clip(name)!r}, expected {MODEL_NAME.pattern}")
    features: list[Any] = _get(document, "feature_names", list)
    if len(features) > MAX_WIDTH:
        raise ContractError(f"'feature_names': got {len(features)}, expected <= {MAX_WIDTH}")
    threshold = _get(document, "threshold", (int, float))
    if not (math.isfinite(threshold) and 0 <= threshold <= 1):
        raise ContractError(f"'threshold': got {clip(str(threshold))}, expected 0..1")
    return Manifest(
        model_name=name,
        version=_integer(document, "version", 1, 10**18 - 1),
        created_utc=_text(_get(document, "created_utc", str), "'created_utc'", 64),
        platform=_get(document, "platform", str),
        opset=_integer(document, "opset", 1, 1000),
        max_batch_size=_integer(document, "max_batch_size", 1, MAX_BATCH_SIZE),
        inputs=_tensors(document, "inputs", INPUT_DATATYPES),
        outputs=_tensors(document, "outputs", OUTPUT_DATATYPES),
        feature_names=tuple(_text(f, f"feature_names[{i}]") for i, f in enumerate(features)),
        threshold=float(threshold),
        files=_files(document),
        details={k: v for k, v in document.items() if k not in _KEYS},
    )


def check_contract(manifest: Manifest) -> None:
    """The tensors' layout (module docstring); raises ContractError naming what breaks it."""
    if manifest.platform != PLATFORM:
        raise ContractError(f"'platform': got {clip(manifest.platform)!r}, expected {PLATFORM!r}")
    names = [spec.name for spec in (*manifest.inputs, *manifest.outputs)]
    if len(set(names)) != len(names):
        raise ContractError(f"tensor names: got {clip(str(names), 200)}, expected each once")
    numeric = [spec for spec in manifest.inputs if spec.datatype == FP32.name]
    if len(numeric) > 1:
        raise ContractError(f"inputs: got {len(numeric)} FP32 tensors, expected at most one")
    width = numeric[0].width if numeric else 0
    if width != len(manifest.feature_names):
        raise ContractError(
            f"inputs: the FP32 tensor has {width} columns, expected one per feature name "
            f"({len(manifest.feature_names)})"
        )
    for spec in manifest.inputs:
        if spec.datatype == BYTES.name and spec.width != 1:
            raise ContractError(
                f"input '{spec.name}' shape: got {list(spec.shape)}, expected [-1, 1]"
            )


def read_regular(path: Path, limit: int) -> bytes:
    """Up to `limit` bytes of `path`, if it is a regular file. Opened without blocking, so a FIFO
    (or a device) in a version folder is refused at once instead of holding the load, and with
    it the model's lock and a worker thread, until something writes to it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise ContractError(f"{path.name}: cannot read ({err.strerror})") from None
    with os.fdopen(fd, "rb") as stream:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ContractError(f"{path.name}: not a regular file (a FIFO, device or folder)")
        try:
            return stream.read(limit)
        except OSError as err:
            raise ContractError(f"{path.name}: cannot read ({err.strerror})") from None


def verify_file(path: Path, entry: FileEntry) -> bytes:
    """The file's bytes, if they are byte-for-byte the ones the manifest describes."""
    data = read_regular(path, entry.size + 1)  # one byte more than promised reveals a longer file
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != entry.size or digest != entry.sha256:
        got = f"{len(data)} bytes" if len(data) <= entry.size else f"more than {entry.size} bytes"
        raise IntegrityError(
            f"{path.parent.parent.name}/{path.parent.name}/{path.name}: got sha256 "
            f"{digest} ({got}), expected {entry.sha256} ({entry.size} bytes) from {MANIFEST_FILE}"
        )
    return data


__all__ = [
    "FORMAT",
    "INPUT_DATATYPES",
    "MANIFEST_FILE",
    "MAX_BATCH_SIZE",
    "MODEL_FILE",
    "MODEL_NAME",
    "OUTPUT_DATATYPES",
    "PLATFORM",
    "VERSION",
    "FileEntry",
    "Manifest",
    "TensorSpec",
    "check_contract",
    "read_regular",
    "verify_file",
]
