"""A model's version folders: which names count as versions, when one changed, and what is kept
for each (its state, runtime and counters) once the repository has looked at it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ContractError, clip
from .manifest import MANIFEST_FILE, MODEL_FILE, Manifest
from .metrics import VersionStats
from .runtime import ModelRuntime

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"
UNLOADED = "unloaded"  # the reason given for a version unloaded on request
# (inode, size, mtime_ns) of manifest.json and model.onnx: a version folder replaced or rewritten
# changes it. Published folders appear by rename, so this is cheap and never sees half a file.
Signature = tuple[tuple[int, int, int], ...]


def _stat(path: Path) -> tuple[int, int, int]:
    try:
        st = path.stat()
    except OSError:
        return (0, 0, 0)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def signature(folder: Path) -> Signature:
    return (_stat(folder / MANIFEST_FILE), _stat(folder / MODEL_FILE))


@dataclass(frozen=True)
class VersionEntry:
    version: int
    state: str  # READY | UNAVAILABLE
    reason: str  # why it is unavailable ("" when ready, or why newer files were refused)
    runtime: ModelRuntime | None
    stats: VersionStats
    signature: Signature = ()


@dataclass(frozen=True)
class Loaded:
    """What one inference needs: a ready version of a model."""

    name: str
    version: int
    runtime: ModelRuntime
    stats: VersionStats


def version_number(name: str) -> int | None:
    """Version folders are positive integers written plainly; anything else is ignored."""
    return int(name) if name.isdigit() and name == str(int(name)) and int(name) > 0 else None


def check_interface(new: Manifest, serving: Manifest) -> None:
    """A hot swap must not change what clients send or get under their feet."""
    for what in ("inputs", "outputs", "feature_names"):
        got, want = getattr(new, what), getattr(serving, what)
        if got != want:
            raise ContractError(
                f"manifest {what} differ from version {serving.version}, which is serving "
                f"(got {clip(str(got), 200)}, expected {clip(str(want), 200)}); "
                "unload the model first to change its interface"
            )


__all__ = [
    "READY",
    "UNAVAILABLE",
    "UNLOADED",
    "Loaded",
    "Signature",
    "VersionEntry",
    "check_interface",
    "signature",
    "version_number",
]
