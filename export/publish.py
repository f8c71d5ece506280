"""Publish a release into a Triton-layout model repository, one atomic integer version at a time.

    <repository>/<model>/config.pbtxt          Triton config (onnxruntime_onnx backend)
    <repository>/<model>/<version>/model.onnx  + model.pt, parity.json, MODEL_CARD.md, manifest.json

A version directory is staged under <repository>/<model>/.tmp-* and renamed into place, so a
reader sees either no version or a complete one; an existing version is never overwritten.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..serving.manifest import MANIFEST_FILE, MODEL_FILE, MODEL_NAME, VERSION, FileEntry
from . import documents
from .card import model_card
from .documents import Release
from .errors import PublishError
from .formats import with_metadata

log = logging.getLogger(__name__)

ONNX_FILE = MODEL_FILE
TORCHSCRIPT_FILE = "model.pt"
PARITY_FILE = "parity.json"
CARD_FILE = "MODEL_CARD.md"
CONFIG_FILE = "config.pbtxt"
# How many times a version number may be lost to a concurrent publisher before giving up.
MAX_PUBLISH_ATTEMPTS = 20


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_model_name(name: str) -> str:
    if not MODEL_NAME.fullmatch(name):  # it becomes a folder name and Triton's model name
        raise PublishError(f"model name {name!r} must match {MODEL_NAME.pattern}")
    return name


def versions(model_dir: Path) -> list[int]:
    """Published versions, ascending; entries whose name is not a positive integer are ignored."""
    if not model_dir.is_dir():
        return []
    found = [int(p.name) for p in model_dir.iterdir() if VERSION.fullmatch(p.name) and p.is_dir()]
    return sorted(found)


def next_version(model_dir: Path) -> int:
    return max(versions(model_dir), default=0) + 1


def build_files(release: Release, version: int, created_utc: str) -> dict[str, bytes]:
    """The version directory's files; manifest.json holds the sha256 of every other one."""
    metadata = documents.onnx_metadata(release, version, created_utc)
    onnx_model = with_metadata(release.onnx_model, metadata)
    onnx_model.model_version = version
    files = {
        ONNX_FILE: onnx_model.SerializeToString(),
        TORCHSCRIPT_FILE: release.torchscript,
        PARITY_FILE: _json_bytes(release.parity.to_dict()),
        CARD_FILE: model_card(release, version, created_utc).encode(),
    }
    hashes = {name: FileEntry(sha256_hex(data), len(data)) for name, data in files.items()}
    files[MANIFEST_FILE] = documents.manifest(release, version, created_utc, hashes).to_json()
    return files


def publish(repository: Path, release: Release) -> Path:
    """Write config.pbtxt, then the next version atomically; return the version directory."""
    model_dir = repository / check_model_name(release.model_name)
    model_dir.mkdir(parents=True, exist_ok=True)
    config = documents.config_pbtxt(
        release.model_name,
        len(release.feature_names),
        text_columns=release.text_columns,
    )
    write_config(model_dir, config)
    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return publish_version(model_dir, lambda version: build_files(release, version, created))


def publish_version(model_dir: Path, build: Callable[[int], dict[str, bytes]]) -> Path:
    """Stage build(version) in a temp dir and rename it to the next free version number.

    If another publisher takes the number between choosing and renaming, the files are rebuilt
    for the following number (they name their version) and the rename is retried.
    """
    for _ in range(MAX_PUBLISH_ATTEMPTS):
        version = next_version(model_dir)
        staging = _stage(model_dir, build(version))
        target = model_dir / str(version)
        try:
            if target.exists():  # rename() would replace an empty directory
                raise FileExistsError(errno.EEXIST, "version exists", str(target))
            os.rename(staging, target)
        except OSError as err:
            shutil.rmtree(staging, ignore_errors=True)
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            log.info("version %d of %s was taken concurrently; retrying", version, model_dir.name)
            continue
        _fsync_dir(model_dir)
        log.info("published %s", target)
        return target
    raise PublishError(f"{model_dir}: no free version after {MAX_PUBLISH_ATTEMPTS} attempts")


def write_config(model_dir: Path, text: str) -> None:
    """Atomically (temp file + rename) write <model>/config.pbtxt, world-readable for Triton."""
    path = model_dir / CONFIG_FILE
    if path.is_file() and path.read_text() != text:
        log.warning("%s changes (inputs or batch size differ from before)", path)
    fd, tmp = tempfile.mkstemp(dir=model_dir, prefix=f".{CONFIG_FILE}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode())
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; Triton may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _stage(model_dir: Path, files: dict[str, bytes]) -> Path:
    staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=".tmp-"))
    try:
        os.chmod(staging, 0o755)  # mkdtemp creates 0700; readers may be other users
        for name, data in files.items():
            with open(staging / name, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        _fsync_dir(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_bytes(data: dict[str, Any]) -> bytes:
    return (json.dumps(documents.finite(data), indent=2, allow_nan=False) + "\n").encode()


__all__ = [
    "CARD_FILE",
    "CONFIG_FILE",
    "MANIFEST_FILE",
    "MAX_PUBLISH_ATTEMPTS",
    "ONNX_FILE",
    "PARITY_FILE",
    "TORCHSCRIPT_FILE",
    "build_files",
    "check_model_name",
    "next_version",
    "publish",
    "publish_version",
    "sha256_hex",
    "versions",
]
