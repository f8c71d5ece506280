"""The protocol-neutral core both fronts (gRPC, REST) call: inference, readiness, metadata, control.

A front reads its protocol into a neutral `InferRequest` (codec.py), then
`async with dataplane.infer(...) as inferred:` admits the call (runtime/admission.py), resolves
one version (kept for the whole call), decodes the request with that version's codec and runs it
where its scheduler says; the front writes its reply from the neutral `Inferred` inside the block,
and leaving the block counts the call once (observe/telemetry.py) and hands it to the hook
(observe/hook.py: tracing, request logs). Model control follows Triton's modes: `none` (the models
found at start, fixed), `poll` (the repository is rescanned; load/unload refused) and `explicit`
(load/unload over the API only, behind a control token the fronts check). Health is republished
after every change has finished, even when the call that asked for it was cancelled first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from .codec import Codec, Decoded, InferRequest
from .errors import ControlDisabledError
from .manifest import Manifest
from .observe.hook import Hook
from .observe.telemetry import Telemetry, VersionStats
from .repository.models import Loaded, ModelRepository
from .runtime.admission import Admission
from .runtime.batcher import Executed, Results
from .runtime.scheduler import Pending, Scheduler
from .settings import ControlMode

# The call's headers (gRPC metadata, HTTP headers), read only by the hook (trace context).
Carrier = Callable[[], Iterable[tuple[str, str]]] | None


class Inferred(NamedTuple):
    """What an inference gives its front to write the reply from."""

    codec: Codec  # the version that answered (its names; the front's per-version reply state)
    decoded: Decoded  # the outputs asked for, the rows, the content form the request used
    results: Results  # output name -> array


class Inference:
    """One inference call, entered by its front: entering admits, resolves, decodes and runs it;
    the block writes the reply; leaving counts the call once, whatever happened, and gives it to
    the hook. Keeps the facts tracing and request logs read (times are perf_counter_ns)."""

    __slots__ = ("admitted", "call", "carrier", "codec", "decode_ns", "decoded", "encode_ns",
                 "name", "plane", "protocol", "request", "results", "scheduler",
                 "version")  # fmt: skip

    def __init__(
        self,
        plane: DataPlane,
        name: str,
        version: str,
        request: InferRequest,
        protocol: str,
        cancelled: Callable[[], str],
        carrier: Carrier,
    ) -> None:
        self.plane, self.name, self.version, self.request = plane, name, version, request
        self.protocol, self.carrier = protocol, carrier  # protocol: "grpc" or "http"
        self.call = plane.telemetry.track(cancelled)
        self.codec: Codec | None = None
        self.decoded: Decoded | None = None
        self.results: Results | None = None
        self.scheduler: Scheduler | None = None
        self.decode_ns = self.encode_ns = 0  # when decoding, and writing the reply, began
        self.admitted = False

    async def __aenter__(self) -> Inferred:
        try:
            decoded, scheduler = self._begin()
            executed = await scheduler.run(decoded.inputs, decoded.rows)
        except BaseException as err:  # refused, failed or cancelled: counted all the same
            self._end(err)
            raise
        return self.ran(executed)

    async def __aexit__(
        self, kind: type[BaseException] | None, err: BaseException | None, _: Any
    ) -> None:
        self._end(err)

    def start(self) -> Executed | Pending:
        """The block's entry without a coroutine, for a front that keeps many calls going (a
        stream): admit, resolve, decode and start the run; its outputs if it ran at once, else
        their future. Then `ran` once they are there, and `close` (or `abandon`) once, always.
        A refusal or failure here has closed the call already, and raises."""
        try:
            decoded, scheduler = self._begin()
            return scheduler.start(decoded.inputs, decoded.rows)
        except BaseException as err:
            self._end(err)
            raise

    def ran(self, executed: Executed) -> Inferred:
        """What the front writes the reply from, once the call's run is done."""
        self.call.executed = executed
        self.results = executed.results
        self.encode_ns = time.perf_counter_ns()
        assert self.codec is not None and self.decoded is not None  # set by _begin
        return Inferred(self.codec, self.decoded, executed.results)

    def close(self, err: BaseException | None) -> None:
        """A started call is over (`err`: how it failed): counted once, given to the hook."""
        self._end(err)

    def abandon(self, pending: Pending) -> None:
        """A started call whose reply nobody will read (its stream went away): its run is dropped
        if still queued, and it is counted as cancelled."""
        assert self.scheduler is not None  # set by _begin
        self.scheduler.withdraw(pending)
        self._end(asyncio.CancelledError())

    def _begin(self) -> tuple[Decoded, Scheduler]:
        plane, call = self.plane, self.call
        plane.admission.enter()
        self.admitted = True
        loaded = plane.repository.get(self.name, self.version)
        call.stats, live = loaded.stats, loaded.live
        self.codec = live.codec
        self.decode_ns = time.perf_counter_ns()
        decoded = self.decoded = live.codec.decode(self.request)
        call.decoded, call.rows = time.perf_counter_ns(), decoded.rows
        self.scheduler = live.scheduler
        return decoded, live.scheduler

    def served_version(self) -> str:
        """The version that answered, else the one asked for (a call refused before resolving)."""
        return self.codec.model_version if self.codec is not None else self.version

    def _end(self, err: BaseException | None) -> None:
        ended = time.perf_counter_ns()
        if self.admitted:
            self.plane.admission.leave()
        self.call.finish(err)
        hook = self.plane.hook
        if hook is not None:
            hook.finish(self, err, ended)


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
        # Tracing and request logs (observe/hook.py); None when both are off, and then an
        # inference pays one `is None` check for them.
        self.hook: Hook | None = None
        self._changes: set[asyncio.Future[Any]] = set()

    def infer(
        self,
        name: str,
        version: str,
        request: InferRequest,
        protocol: str,
        cancelled: Callable[[], str],
        carrier: Carrier = None,
    ) -> Inference:
        """`async with dataplane.infer(...) as inferred:` one inference (see Inference)."""
        return Inference(self, name, version, request, protocol, cancelled, carrier)

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


__all__ = ["Carrier", "DataPlane", "Inference", "Inferred", "ModelFacts"]
