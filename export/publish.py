"""Publish a release into a Triton-layout model repository, one atomic integer version at a time.

    <repository>/<model>/config.pbtxt          Triton config (onnxruntime_onnx backend)
    <repository>/<model>/<version>/model.onnx  + model.pt, parity.json, MODEL_CARD.md, manifest.json

A version directory is staged under <repository>/<model>/.tmp-* and renamed into place, so a
reader sees either no version or a complete one; an existing version is never overwritten.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..files import atomic_write_bytes, fsync_dir
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
STAGING_PREFIX = ".tmp-"
# An export takes seconds; a staging folder an hour old belongs to one that was killed.
STALE_STAGING_S = 3600.0
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
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return publish_version(model_dir, lambda version: build_files(release, version, created))


def publish_version(model_dir: Path, build: Callable[[int], dict[str, bytes]]) -> Path:
    """Stage build(version) in a temp dir and rename it to the next free version number.

    If another publisher takes the number between choosing and renaming, the files are rebuilt
    for the following number (they name their version) and the rename is retried.
    """
    clean_stale_staging(model_dir)
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
        fsync_dir(model_dir)
        log.info("published %s", target)
        return target
    raise PublishError(f"{model_dir}: no free version after {MAX_PUBLISH_ATTEMPTS} attempts")


def write_config(model_dir: Path, text: str) -> None:
    """Atomically write <model>/config.pbtxt, world-readable for Triton."""
    path = model_dir / CONFIG_FILE
    if path.is_file() and path.read_text() != text:
        log.warning("%s changes (inputs or batch size differ from before)", path)
    atomic_write_bytes(path, text.encode())


def _stage(model_dir: Path, files: dict[str, bytes]) -> Path:
    staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=STAGING_PREFIX))
    try:
        os.chmod(staging, 0o755)  # mkdtemp creates 0700; readers may be other users
        for name, data in files.items():
            atomic_write_bytes(staging / name, data)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def clean_stale_staging(model_dir: Path, older_than_s: float = STALE_STAGING_S) -> list[str]:
    """Remove what an export killed mid-way (kill -9) left behind: staging folders and temp files
    older than `older_than_s` (a concurrent export's are younger, so they are left alone)."""
    removed = []
    cutoff = time.time() - older_than_s
    for entry in model_dir.iterdir() if model_dir.is_dir() else ():
        temporary = entry.name.startswith(STAGING_PREFIX) or (
            entry.name.startswith(".") and entry.name.endswith(".tmp")
        )
        with contextlib.suppress(OSError):
            if temporary and entry.lstat().st_mtime < cutoff:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed.append(entry.name)
    if removed:
        log.warning("%s: removed %d stale staging entries: %s", model_dir, len(removed), removed)
    return removed


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
    "clean_stale_staging",
    "next_version",
    "publish",
    "publish_version",
    "sha256_hex",
    "versions",
]
