"""The model repository: REPO/<model>/<version>/, which versions are loaded, and their readiness.

This is the one source of truth for readiness: health, ModelReady, ServerReady, RepositoryIndex and
/metrics all ask it. A (re)load builds each new version fully (hash, session, interface, warm-up,
codec, scheduler) before one dict assignment swaps the model's versions, so a request sees the old
versions or the new ones, never a mix; the schedulers of versions that went are closed then. A
version that fails is refused, whatever its files hold: its reason stays in RepositoryIndex and the
versions that were serving keep serving. `refresh` (the poller) reloads only models whose version
folders changed since it last looked. Names from clients are checked before they touch the disk.

Each version kept: which folder names count as versions, the signature that tells when one changed,
and its state, live parts (runtime, codec, scheduler) and counters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..codec import Codec
from ..errors import (
    ContractError,
    ModelLoadError,
    ModelNotFoundError,
    ModelUnavailableError,
    ServingError,
    clip,
)
from ..manifest import MANIFEST_FILE, MODEL_FILE, MODEL_NAME, VERSION, Manifest
from ..observe.telemetry import VersionStats
from ..runtime.scheduler import Scheduler
from ..runtime.session import ModelRuntime, RuntimeOptions
from .policy import VersionPolicy

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


# How long a load or unload waits for another one of the same model (a load hashes, builds and
# warms a session: seconds for an MLP) before it is refused, so stuck files cannot pile up calls.
LOCK_WAIT_S = 60.0


class ModelRepository:
    def __init__(
        self,
        root: Path,
        *,
        policy: VersionPolicy,
        options: RuntimeOptions,
        warmup_runs: int,
        scheduler: SchedulerFactory,
        only: tuple[str, ...] = (),
    ) -> None:
        self.root = root
        self._policy, self._options, self._only = policy, options, only
        self._warmup_runs, self._scheduler = warmup_runs, scheduler
        self._models: dict[str, dict[int, VersionEntry]] = {}  # swapped per model, never mutated
        self._seen: dict[str, dict[int, Signature]] = {}  # the folders each load last saw
        self._unloaded: set[str] = set()  # unloaded on request: the poller leaves them alone
        self._problems: dict[str, str] = {}  # models with nothing to serve: why
        # One load or unload of a model at a time; other models' go on beside it (a version
        # folder whose files hang holds its own model only). Publishing is short and global.
        self._locks: dict[str, threading.Lock] = {}
        self._publish = threading.Lock()
        self._draining = False
        self._serving: dict[tuple[str, str], Loaded] = {}  # (name, version or "") -> ready

    def on_disk(self) -> list[str]:
        if not self.root.is_dir():
            raise ModelNotFoundError(f"model repository {self.root}: not a folder")
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and MODEL_NAME.fullmatch(p.name)
        )

    def check_name(self, name: str) -> str:
        """A client's model name, refused before it reaches the file system unless it is one
        this server may serve."""
        if not MODEL_NAME.fullmatch(name) or (self._only and name not in self._only):
            served = f" (this server serves {list(self._only)})" if self._only else ""
            raise ModelNotFoundError(f"model '{clip(name)}': not found in the repository{served}")
        return name

    def _version_dirs(self, name: str) -> dict[int, Path]:
        folder = self.root / self.check_name(name)
        if not folder.is_dir():
            raise ModelNotFoundError(f"model '{name}': not found in the repository")
        found = {version_number(p.name): p for p in folder.iterdir() if p.is_dir()}
        return {v: p for v, p in found.items() if v is not None}

    def load_all(self) -> None:
        names = list(self._only) or self.on_disk()
        if not names:
            raise ModelLoadError(f"model repository {self.root}: no model folders")
        for name in names:
            self.load(name)

    def load(self, name: str, *, reuse: bool = False) -> None:
        """Rescan REPO/<name>, load the versions the policy selects, then swap them in at once.

        `reuse` keeps versions whose files did not change as they are (the poller); otherwise each
        selected version is loaded afresh. The first refusal is raised after the swap."""
        self._version_dirs(name)  # an unknown name gets no lock
        with self._locked(name):
            folders = self._version_dirs(name)
            self._seen[name] = {v: signature(p) for v, p in folders.items()}
            self._unloaded.discard(name)
            chosen = self._policy.select(list(folders))
            if not chosen:
                self._problems[name] = (
                    f"got versions {sorted(folders)}, expected one matching policy {self._policy}"
                )
                raise ModelLoadError(f"model '{name}': {self._problems[name]}")
            current = self._models.get(name, {})
            ready = [e for e in current.values() if e.ready]
            serving = max(ready, key=lambda e: e.version) if ready else None
            results = {
                v: self._open(name, v, folders[v], current.get(v), reuse, serving) for v in chosen
            }
            entries = {v: entry for v, (entry, _) in results.items()}
            errors = [err for _, err in results.values() if err is not None]
            if any(not e.ready for e in entries.values()):  # the old ones serve on
                entries.update({e.version: e for e in ready if e.version not in entries})
            self._swap(name, entries)
            self._problems.pop(name, None)
        live = {v: e.live for v, e in entries.items() if e.live and e.ready}
        if live:
            providers = " | ".join(sorted({",".join(lv.runtime.providers) for lv in live.values()}))
            log.info(
                "model %s: versions %s READY on %s", name, sorted(live, reverse=True), providers
            )
        if errors:
            raise errors[0]

    def _open(
        self,
        name: str,
        version: int,
        folder: Path,
        old: VersionEntry | None,
        reuse: bool,
        serving: VersionEntry | None,
    ) -> tuple[VersionEntry, ModelLoadError | None]:
        seen = signature(folder)
        if reuse and old is not None and old.signature == seen and old.reason != UNLOADED:
            return old, None  # unchanged: still serving, or still refused for the same files
        stats = old.stats if old is not None else VersionStats()
        try:
            interface = (
                serving.live.manifest
                if serving and serving.live and version >= serving.version
                else None
            )
            live = open_live(
                folder, name, version, self._options, self._warmup_runs, self._scheduler, interface
            )
        except Exception as err:  # whatever the files hold, the version is refused with a reason
            if not isinstance(err, ModelLoadError):
                log.exception(
                    "model %s version %d: unexpected failure while loading", name, version
                )
            kind = type(err) if isinstance(err, ModelLoadError) else ModelLoadError
            reason = clip(str(err) if isinstance(err, ServingError) else repr(err), 500)
            error = kind(f"model '{name}' version {version}: {reason}")
            if old is not None and old.ready:
                kept = f"serving the files loaded before; the new ones were refused: {reason}"
                return dataclasses.replace(old, reason=kept), error  # rewritten in place
            return VersionEntry(version, UNAVAILABLE, reason, None, stats, seen), error
        return VersionEntry(version, READY, "", live, stats, seen), None

    def refresh(self) -> list[str]:
        """Reload each model whose version folders changed since the last load; returns them."""
        changed = []
        for name in list(self._only) or self.on_disk():
            if name in self._unloaded:
                continue
            try:
                folders = self._version_dirs(name)
            except ModelNotFoundError:
                continue  # the folder went away: keep serving what is loaded
            if self._seen.get(name) == {v: signature(p) for v, p in folders.items()}:
                continue
            changed.append(name)
            try:
                self.load(name, reuse=True)
            except ServingError as err:
                log.warning("model %s: refused: %s", name, err)
        return changed

    def unload(self, name: str) -> None:
        entries = self.entries(name)  # an unknown name gets no lock
        with self._locked(name):
            entries = self.entries(name)
            self._swap(name, {
                v: VersionEntry(v, UNAVAILABLE, UNLOADED, None, e.stats, e.signature)
                for v, e in entries.items()
                if e.live is not None
            })  # fmt: skip
            self._unloaded.add(name)
        log.info("model %s: unloaded", name)

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        """The model's lock, or ModelUnavailableError once LOCK_WAIT_S have passed waiting for
        it: a load stuck on its files never queues every later call behind it."""
        with self._publish:
            lock = self._locks.setdefault(name, threading.Lock())
        if not lock.acquire(timeout=LOCK_WAIT_S):
            raise ModelUnavailableError(
                f"model '{name}': another load or unload of it has not finished in "
                f"{LOCK_WAIT_S:g} s; retry later"
            )
        try:
            yield
        finally:
            lock.release()

    def names(self) -> list[str]:
        return sorted(self._models)

    def entries(self, name: str) -> dict[int, VersionEntry]:
        entries = self._models.get(name)
        if entries is None:
            raise ModelNotFoundError(f"model '{clip(name)}': not found (serving {self.names()})")
        return entries

    def _swap(self, name: str, entries: dict[int, VersionEntry]) -> None:
        """Publish a model's new versions; `get`'s table follows at once; schedulers of versions
        that went are closed (their requests in flight finish on them)."""
        with self._publish:
            before = self._publish_versions(name, entries)
        kept = {id(e.live) for e in entries.values() if e.live}
        for key, live in before.items():
            if key not in kept:
                live.scheduler.close()

    def _publish_versions(self, name: str, entries: dict[int, VersionEntry]) -> dict[int, Live]:
        before = {id(e.live): e.live for e in self._models.get(name, {}).values() if e.live}
        self._models[name] = entries
        serving: dict[tuple[str, str], Loaded] = {}
        for model, versions in self._models.items():
            ready = sorted(v for v, e in versions.items() if e.ready)
            for v in ready:
                live = versions[v].live
                assert live is not None
                serving[model, str(v)] = Loaded(model, v, live, versions[v].stats)
            if ready:
                serving[model, ""] = serving[model, str(ready[-1])]  # the newest
        self._serving = serving  # one assignment: a reader sees the old table or the new
        return before

    def get(self, name: str, version: str = "") -> Loaded:
        """The requested version, or the newest ready one when `version` is empty."""
        found = self._serving.get((name, version))  # every request: one lookup
        if found is not None:
            return found
        entries = self.entries(name)  # the reason it is not served
        if version:
            number = version_number(version)
            entry = entries.get(number) if number is not None else None
            if entry is None:
                raise ModelNotFoundError(
                    f"model '{name}' version: got '{clip(version)}', "
                    f"expected one of {sorted(entries)}"
                )
        else:
            ready = [e for e in entries.values() if e.state == READY]
            entry = max(ready or entries.values(), key=lambda e: e.version, default=None)
        if entry is None:
            raise ModelUnavailableError(f"model '{name}': no version loaded")
        if entry.live is None or entry.state != READY:
            raise ModelUnavailableError(
                f"model '{name}' version {entry.version}: {entry.state} ({entry.reason})"
            )
        return Loaded(name, entry.version, entry.live, entry.stats)

    def is_ready(self, name: str, version: str = "") -> bool:
        if self._draining:
            return False
        try:
            self.get(name, version)
        except ServingError:
            return False
        return True

    def served(self) -> list[str]:
        """The models this server is meant to be serving: known ones not unloaded on request."""
        return [name for name in self.names() if name not in self._unloaded]

    def server_ready(self) -> bool:
        """Some model is meant to be served, and every one that is has a ready version."""
        served = self.served()
        return not self._draining and bool(served) and all(self.is_ready(n) for n in served)

    def index(self) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) for each known version, and models never loaded."""
        rows = [
            (name, str(v), e.state, e.reason)
            for name, entries in sorted(self._models.items())
            for v, e in sorted(entries.items())
        ]
        names = list(self._only) or self.on_disk()
        rows += [
            (name, "", UNAVAILABLE, self._problems.get(name, "not loaded"))
            for name in names
            if name not in self._models
        ]
        return sorted(rows)

    def snapshot(self) -> list[tuple[str, str, bool, VersionStats]]:
        """(name, version, ready, stats) per known version; safe from another thread."""
        models = list(self._models.items())
        return [(n, str(v), e.ready, e.stats) for n, es in models for v, e in es.items()]

    def providers(self) -> tuple[str, ...]:
        """Execution providers in use, in ONNX Runtime's priority order."""
        seen: dict[str, None] = {}
        for entries in list(self._models.values()):
            for entry in entries.values():
                seen.update(dict.fromkeys(entry.live.runtime.providers if entry.live else ()))
        return tuple(seen)

    def largest_request_bytes(self) -> int:
        """The largest well-formed request any loaded version takes (its tensor data)."""
        return max(
            (
                e.live.codec.max_request_bytes()
                for es in self._models.values()
                for e in es.values()
                if e.live
            ),
            default=0,
        )

    def begin_shutdown(self) -> None:
        self._draining = True


__all__ = [
    "READY",
    "UNAVAILABLE",
    "UNLOADED",
    "Live",
    "Loaded",
    "ModelRepository",
    "SchedulerFactory",
    "Signature",
    "VersionEntry",
    "check_interface",
    "open_live",
    "signature",
    "version_number",
]
