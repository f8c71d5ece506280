"""A model's version folders: which names count as versions, when one changed, and what is kept
for each (its state, its live parts and counters) once the repository has looked at it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .codec import Codec
from .errors import ContractError, clip
from .manifest import MANIFEST_FILE, MODEL_FILE, VERSION, Manifest
from .metrics import VersionStats
from .runtime import ModelRuntime, RuntimeOptions
from .scheduler import Scheduler

log = logging.getLogger(__name__)
SchedulerFactory = Callable[[ModelRuntime], Scheduler]
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
class Live:
    """A loaded version's working parts: its session, its wire codec, where its runs happen."""

    runtime: ModelRuntime
    codec: Codec
    scheduler: Scheduler

    @property
    def manifest(self) -> Manifest:
        return self.runtime.manifest


@dataclass(frozen=True)
class VersionEntry:
    version: int
    state: str  # READY | UNAVAILABLE
    reason: str  # why it is unavailable ("" when ready, or why newer files were refused)
    live: Live | None
    stats: VersionStats
    signature: Signature = ()

    @property
    def ready(self) -> bool:
        return self.live is not None and self.state == READY


@dataclass(frozen=True)
class Loaded:
    """What one inference needs: a ready version of a model, kept for the whole call."""

    name: str
    version: int
    live: Live
    stats: VersionStats


def version_number(name: str) -> int | None:
    """Version folders and requested versions are ASCII [1-9][0-9]*; anything else is none."""
    return int(name) if VERSION.fullmatch(name) else None


def open_live(
    folder: Path,
    name: str,
    version: int,
    options: RuntimeOptions,
    warmup_runs: int,
    scheduler: SchedulerFactory,
    serving: Manifest | None,
) -> Live:
    """Load, check and warm one version folder and give it its codec and scheduler. `serving`:
    the interface a hot swap must keep (of the newest version serving, if this one replaces it)."""
    runtime = ModelRuntime(folder, options)
    if serving is not None:
        check_interface(runtime.manifest, serving)
    runtime.warm_up(warmup_runs)
    manifest = runtime.manifest
    if (manifest.model_name, manifest.version) != (name, version):
        log.warning(
            "model %s version %d: manifest.json says %s version %d; serving it as its folder",
            name, version, manifest.model_name, manifest.version,
        )  # fmt: skip
    codec = Codec(manifest, runtime.max_batch_size, name, str(version))
    return Live(runtime, codec, scheduler(runtime))


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
    "Live",
    "Loaded",
    "SchedulerFactory",
    "Signature",
    "VersionEntry",
    "check_interface",
    "open_live",
    "signature",
    "version_number",
]
