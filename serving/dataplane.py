"""The protocol-neutral core both fronts (gRPC, REST) call: inference, readiness, metadata, control.

An inference is admitted (limits.py), resolves one version (kept for the whole call), is decoded by
that version's codec, runs where its scheduler says, is encoded and is counted once (metrics.py).
The front supplies a `Wire`: how its requests are decoded and its replies encoded, with the same
codec. Model control follows Triton's modes: `none` (the models found at start, fixed), `poll`
(the repository is rescanned; load/unload refused) and `explicit` (load/unload over the API only,
behind a control token the fronts check). Health is republished after every change has finished,
even when the call that asked for it was cancelled first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .codec import Codec, Decoded
from .errors import ControlDisabledError
from .manifest import Manifest
from .observe.telemetry import Telemetry, VersionStats
from .repository.models import Loaded, ModelRepository
from .runtime.admission import Admission
from .runtime.batcher import Results
from .settings import ControlMode

if TYPE_CHECKING:  # the hook's module imports this one
    from .observe.hook import Hook

log = logging.getLogger(__name__)


class Wire(Protocol):
    """How one front's inference requests and replies map to the version's codec."""

    protocol: str  # "grpc" or "http": what traces and request logs say the call came over

    def decode(self, codec: Codec, request: Any) -> Decoded: ...

    def encode(self, codec: Codec, request: Any, decoded: Decoded, results: Results) -> Any: ...


@dataclass(frozen=True)
class ModelFacts:
    """What ModelMetadata says of a model: its ready versions and the tensors of one of them."""

    name: str
    versions: list[str]  # newest first
    manifest: Manifest


class DataPlane:
    def __init__(
        self,
        repository: ModelRepository,
        admission: Admission,
        telemetry: Telemetry,
        control_mode: ControlMode,
    ) -> None:
        self.repository, self.admission, self.telemetry = repository, admission, telemetry
        self.control_mode = control_mode
        self.on_change: Callable[[], Awaitable[None]] | None = None  # health republishes
        # Tracing and request logs (observe.py); None when both are off, and then an inference
        # pays two `is None` checks for them.
        self.hook: Hook | None = None
        self._changes: set[asyncio.Future[Any]] = set()

    async def infer(
        self,
        name: str,
        version: str,
        request: Any,
        wire: Wire,
        cancelled: Callable[[], str],
        carrier: Callable[[], Iterable[tuple[str, str]]] | None = None,
    ) -> Any:
        """Admit, resolve, decode, run, encode; counted once whatever happens. `carrier`: the
        call's headers (gRPC metadata, HTTP headers), read only by the hook (trace context)."""
        hook = self.hook
        with (
            self.telemetry.track(cancelled) as call,
            (
                self.admission.admit()
                if hook is None
                else hook.watch(call, self.admission, name, version, request, wire, carrier)
            ) as watched,
        ):
            if watched is not None:  # tracing or request logs: the hook's wire times each phase
                wire = watched
            loaded = self.repository.get(name, version)
            call.stats, live = loaded.stats, loaded.live
            decoded = wire.decode(live.codec, request)
            call.decoded, call.rows = time.perf_counter_ns(), decoded.rows
            executed = call.executed = await live.scheduler.run(decoded.inputs, decoded.rows)
            return wire.encode(live.codec, request, decoded, executed.results)

    # ------------------------------------------------------------------ readiness, metadata

    def server_ready(self) -> bool:
        return self.repository.server_ready()

    def model_ready(self, name: str, version: str) -> bool:
        return self.repository.is_ready(name, version)

    def resolve(self, name: str, version: str) -> Loaded:
        return self.repository.get(name, version)

    def metadata(self, name: str, version: str) -> ModelFacts:
        loaded = self.repository.get(name, version)
        entries = self.repository.entries(name)
        versions = [str(v) for v in sorted(entries, reverse=True) if entries[v].ready]
        return ModelFacts(loaded.name, versions, loaded.live.manifest)

    def statistics(self, name: str, version: str) -> list[tuple[str, int, VersionStats]]:
        """(model, version, counters) of the named model (every model if `name` is empty)."""
        rows = []
        for model in [name] if name else self.repository.names():
            entries = self.repository.entries(model)
            if version:
                self.repository.get(model, version)  # NOT_FOUND/UNAVAILABLE as for infer
            rows += [
                (model, number, entry.stats)
                for number, entry in sorted(entries.items())
                if not version or str(number) == version
            ]
        return rows

    async def index(self, ready_only: bool) -> list[tuple[str, str, str, str]]:
        rows = await asyncio.to_thread(self.repository.index)  # lists folders: off the loop
        return [row for row in rows if not ready_only or row[2] == "READY"]

    # ------------------------------------------------------------------ model control

    async def load(self, name: str) -> None:
        self._check_control("load")
        self.repository.check_name(name)
        await self._change(self.repository.load, name)

    async def unload(self, name: str) -> None:
        self._check_control("unload")
        self.repository.check_name(name)
        await self._change(self.repository.unload, name)

    def _check_control(self, action: str) -> None:
        if self.control_mode != "explicit":
            how = "by polling the repository" if self.control_mode == "poll" else "only at start"
            raise ControlDisabledError(
                f"model {action}: refused in model control mode '{self.control_mode}' (models "
                f"change {how}); start the server with --model-control-mode explicit and a "
                "control token to load and unload models over the API"
            )

    async def _change(self, change: Callable[[str], None], name: str) -> None:
        """Run `change` on a worker thread; health follows once it has finished, even if the
        caller's deadline passed first (the change itself is not interrupted)."""
        task = asyncio.ensure_future(asyncio.to_thread(change, name))
        self._changes.add(task)
        task.add_done_callback(self._changed)
        await asyncio.shield(task)

    def _changed(self, task: asyncio.Future[Any]) -> None:
        self._changes.discard(task)
        if self.on_change is not None:
            publish = asyncio.ensure_future(self.on_change())
            self._changes.add(publish)  # kept until done, like the changes
            publish.add_done_callback(self._changes.discard)


__all__ = ["DataPlane", "ModelFacts", "Wire"]
