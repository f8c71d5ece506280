"""The model repository: REPO/<model>/<version>/, which versions are loaded, and their readiness.

This is the one source of truth for readiness: health, ModelReady, ServerReady and RepositoryIndex
all ask it. A (re)load builds every selected version fully (hash, session, warm-up) before one
dict assignment swaps it in, so requests see the old versions or the new ones, never a mix.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelLoadError, ModelNotFoundError, ModelUnavailableError, ServingError
from .runtime import ModelRuntime, RuntimeOptions
from .settings import VersionPolicy

log = logging.getLogger(__name__)

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"
UNLOADED = "unloaded"  # the reason given for a version unloaded on request


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


@dataclass
class VersionStats:
    """Triton's per-version ModelStatistics counters; updated on the event loop thread only."""

    last_inference_ms: int = 0
    inference_count: int = 0  # rows
    execution_count: int = 0  # session runs
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)

    @contextmanager
    def measure(self) -> Iterator[RequestTimer]:
        """Time one request; an exception counts it as failed and propagates."""
        timer = RequestTimer()
        try:
            yield timer
        except BaseException:
            self.fail.add(time.perf_counter_ns() - timer.start)
            raise
        self.success.add(time.perf_counter_ns() - timer.start)
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.inference_count += timer.rows
        self.execution_count += 1
        for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
            getattr(self, phase).add(timer.phases.get(phase, 0))


class RequestTimer:
    """Splits one request's time into Triton's phases: `lap(phase)` ends the current phase."""

    def __init__(self) -> None:
        self.start = self._last = time.perf_counter_ns()
        self.phases: dict[str, int] = {}
        self.rows = 0

    def lap(self, phase: str, until: int | None = None) -> None:
        now = time.perf_counter_ns() if until is None else until
        self.phases[phase] = self.phases.get(phase, 0) + now - self._last
        self._last = now


@dataclass(frozen=True)
class VersionEntry:
    version: int
    state: str  # READY | UNAVAILABLE
    reason: str  # why it is unavailable; "" when ready
    runtime: ModelRuntime | None
    stats: VersionStats


@dataclass(frozen=True)
class Loaded:
    """What one inference needs: a ready version of a model."""

    name: str
    version: int
    runtime: ModelRuntime
    stats: VersionStats


def _version(name: str) -> int | None:
    """Version folders are positive integers written plainly; anything else is ignored."""
    return int(name) if name.isdigit() and name == str(int(name)) and int(name) > 0 else None


class ModelRepository:
    def __init__(
        self,
        root: Path,
        *,
        policy: VersionPolicy,
        options: RuntimeOptions,
        warmup_batch_sizes: tuple[int, ...],
        warmup_runs: int,
        only: tuple[str, ...] = (),
    ) -> None:
        self.root = root
        self._policy, self._options, self._only = policy, options, only
        self._warmup = (warmup_batch_sizes, warmup_runs)
        self._models: dict[str, dict[int, VersionEntry]] = {}  # swapped per model, never mutated
        self._lock = threading.Lock()  # one load or unload at a time
        self._draining = False

    def on_disk(self) -> list[str]:
        if not self.root.is_dir():
            raise ModelNotFoundError(f"model repository {self.root}: not a folder")
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def _version_dirs(self, name: str) -> dict[int, Path]:
        folder = self.root / name
        if not name or name.startswith(".") or "/" in name or not folder.is_dir():
            raise ModelNotFoundError(f"model '{name}': not found in the repository")
        found = {_version(p.name): p for p in folder.iterdir() if p.is_dir()}
        return {v: p for v, p in found.items() if v is not None}

    def load_all(self) -> None:
        names = list(self._only) or self.on_disk()
        if not names:
            raise ModelLoadError(f"model repository {self.root}: no model folders")
        for name in names:
            self.load(name)

    def load(self, name: str) -> None:
        """Rescan REPO/<name>, load the versions the policy selects, then swap them in at once."""
        with self._lock:
            folders = self._version_dirs(name)
            chosen = self._policy.select(list(folders))
            if not chosen:
                raise ModelLoadError(
                    f"model '{name}': got versions {sorted(folders)}, "
                    f"expected at least one matching policy {self._policy}"
                )
            entries = {v: self._open(name, v, folders[v]) for v in chosen}
            self._models[name] = entries
        providers = {",".join(e.runtime.providers) for e in entries.values() if e.runtime}
        log.info("model %s: versions %s READY on %s", name, chosen, " | ".join(sorted(providers)))

    def _open(self, name: str, version: int, folder: Path) -> VersionEntry:
        try:
            runtime = ModelRuntime(folder, self._options)
            runtime.warm_up(*self._warmup)
        except ModelLoadError as err:
            raise type(err)(f"model '{name}' version {version}: {err}") from err
        manifest = runtime.manifest
        if (manifest.model_name, manifest.version) != (name, version):
            log.warning(
                "model %s version %d: manifest.json says %s version %d; serving it as its folder",
                name, version, manifest.model_name, manifest.version,
            )  # fmt: skip
        return VersionEntry(version, READY, "", runtime, VersionStats())

    def unload(self, name: str) -> None:
        with self._lock:
            entries = self.entries(name)
            self._models[name] = {
                v: VersionEntry(v, UNAVAILABLE, UNLOADED, None, e.stats) for v, e in entries.items()
            }
        log.info("model %s: unloaded", name)

    def names(self) -> list[str]:
        return sorted(self._models)

    def entries(self, name: str) -> dict[int, VersionEntry]:
        entries = self._models.get(name)
        if entries is None:
            raise ModelNotFoundError(f"model '{name}': not found (serving {self.names()})")
        return entries

    def get(self, name: str, version: str = "") -> Loaded:
        """The requested version, or the newest ready one when `version` is empty."""
        entries = self.entries(name)
        if version:
            number = _version(version)
            entry = entries.get(number) if number is not None else None
            if entry is None:
                raise ModelNotFoundError(
                    f"model '{name}' version: got '{version}', expected one of {sorted(entries)}"
                )
        else:
            ready = [e for e in entries.values() if e.state == READY]
            entry = max(ready, key=lambda e: e.version) if ready else next(iter(entries.values()))
        if entry.runtime is None or entry.state != READY:
            raise ModelUnavailableError(
                f"model '{name}' version {entry.version}: {entry.state} ({entry.reason})"
            )
        return Loaded(name, entry.version, entry.runtime, entry.stats)

    def is_ready(self, name: str, version: str = "") -> bool:
        if self._draining:
            return False
        try:
            self.get(name, version)
        except ServingError:
            return False
        return True

    def server_ready(self) -> bool:
        """Every model that was not unloaded on request has a ready version."""
        return not self._draining and all(
            self.is_ready(name) or all(e.reason == UNLOADED for e in entries.values())
            for name, entries in self._models.items()
        )

    def index(self) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) for each known version, and models never loaded."""
        rows = [
            (name, str(v), e.state, e.reason)
            for name, entries in sorted(self._models.items())
            for v, e in sorted(entries.items())
        ]
        rows += [
            (name, "", UNAVAILABLE, "not loaded")
            for name in self.on_disk()
            if name not in self._models
        ]
        return sorted(rows)

    def providers(self) -> tuple[str, ...]:
        """Execution providers in use, in ONNX Runtime's priority order."""
        seen: dict[str, None] = {}
        for entries in self._models.values():
            for entry in entries.values():
                seen.update(dict.fromkeys(entry.runtime.providers if entry.runtime else ()))
        return tuple(seen)

    def begin_shutdown(self) -> None:
        self._draining = True


__all__ = [
    "READY",
    "UNAVAILABLE",
    "Duration",
    "Loaded",
    "ModelRepository",
    "RequestTimer",
    "VersionEntry",
    "VersionStats",
]
