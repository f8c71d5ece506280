"""One ONNX Runtime session for one published model version: manifest, hash, providers, contract.

Everything about a version that can be checked before serving it is checked here, once, at load:
the manifest (manifest.py) and model.onnx's sha256, the graph's tensors against the manifest, the
execution provider actually obtained, and a warm-up that proves the outputs have the declared
shapes and times the runs (where requests will run: see `calibrate`). The session is made from the
very bytes that were hashed (no second read of the file), once graph_files.py has found nothing in
them that would make ONNX Runtime open a file (external data, file-path attributes); nothing else
of a version folder is read: model.pt and pickles are never loaded. This module knows ONNX Runtime
and numpy only: no wire protocol (the version's codec is codec.py's, built beside it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..datatypes import BY_ORT_TYPE, DTYPES
from ..errors import ContractError, ProviderError, clip
from ..manifest import MANIFEST_FILE, MODEL_FILE, Manifest, TensorSpec, verify_file
from ..settings import Device, RunInline, Settings
from .graph_files import refuse_file_references

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# Timed runs per batch size when deciding where runs happen; the fastest counts (the others
# include the odd preemption on a busy machine).
CALIBRATION_RUNS = 5


# Settings' defaults: said (and explained) there only.
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(Settings)}


@dataclass(frozen=True)
class RuntimeOptions:
    """What a session needs of the settings: the same names, copied by name (server.py)."""

    device: Device  # cpu | cuda | auto
    intra_op_threads: int
    inter_op_threads: int
    cuda_device_id: int = _DEFAULTS["cuda_device_id"]
    cuda_memory_limit: int = _DEFAULTS["cuda_memory_limit"]  # bytes; 0 = no limit
    max_batch_size: int = _DEFAULTS["max_batch_size"]  # capped by the manifest's own
    run_inline: RunInline = _DEFAULTS["run_inline"]  # session.run on the event loop?
    inline_threshold_us: float = _DEFAULTS["inline_threshold_us"]  # `auto`: runs under this


def _providers(options: RuntimeOptions) -> list[str | tuple[str, dict[str, str]]]:
    """`cuda` always asks for CUDA, so a missing provider is caught by the one check below."""
    if options.device == "cpu" or (
        options.device == "auto" and CUDA not in ort.get_available_providers()
    ):
        return [CPU]
    cuda: dict[str, str] = {"device_id": str(options.cuda_device_id)}
    if options.cuda_memory_limit:
        cuda["gpu_mem_limit"] = str(options.cuda_memory_limit)
    return [(CUDA, cuda), CPU]


def create_session(model: bytes, options: RuntimeOptions) -> ort.InferenceSession:
    """A session on the requested device; `cuda` refuses what ONNX Runtime would only warn about.

    From bytes, and only bytes that name no file: ONNX Runtime would resolve a relative external
    data location against the working directory and serve that file's bytes as weights."""
    refuse_file_references(model)
    if options.device != "cpu" and CUDA in ort.get_available_providers():
        # onnxruntime-gpu finds CUDA/cuDNN installed as pip packages (its [cuda,cudnn] extras)
        # only once preloaded; system-wide libraries are found either way (a no-op then).
        ort.preload_dlls()
    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session_options.intra_op_num_threads = options.intra_op_threads
    session_options.inter_op_num_threads = options.inter_op_threads
    try:
        session = ort.InferenceSession(model, session_options, providers=_providers(options))
    except Exception as err:  # ONNX Runtime raises its own untyped errors for unloadable graphs
        raise ContractError(f"{MODEL_FILE}: ONNX Runtime cannot load it ({err})") from None
    got = session.get_providers()
    if options.device != "cpu" and got[0] != CUDA:
        available = ort.get_available_providers()
        why = (
            "this onnxruntime build has no CUDA support; install onnxruntime-gpu instead of "
            "onnxruntime"
            if CUDA not in available
            else "the CUDA provider failed to start (driver, CUDA or cuDNN libraries; see the "
            "ONNX Runtime messages above)"
        )
        if options.device == "cuda":
            raise ProviderError(
                f"device cuda: the session got providers {got}, expected {CUDA} first; {why}"
            )
        log.warning("device auto: falling back to CPU (providers %s): %s", got, why)
    return session


def _check_graph(session: ort.InferenceSession, manifest: Manifest) -> None:
    _check_threshold(session, manifest)
    for kind, nodes, specs in (
        ("input", session.get_inputs(), manifest.inputs),
        ("output", session.get_outputs(), manifest.outputs),
    ):
        graph = {node.name: node for node in nodes}
        for spec in specs:
            node = graph.get(spec.name)
            if node is None:
                raise ContractError(
                    f"model.onnx {kind} '{spec.name}': missing (graph has {sorted(graph)})"
                )
            known = BY_ORT_TYPE.get(node.type)
            datatype = node.type if known is None else known.name
            dims = [d if isinstance(d, int) else -1 for d in node.shape]
            if datatype != spec.datatype or len(dims) != len(spec.shape):
                raise ContractError(
                    f"model.onnx {kind} '{spec.name}': got {datatype} {dims}, "
                    f"expected {spec.describe()} from manifest.json"
                )
            if any(0 <= g != w for g, w in zip(dims[1:], spec.shape[1:], strict=True)):
                raise ContractError(
                    f"model.onnx {kind} '{spec.name}': got dims {dims}, expected {list(spec.shape)}"
                )


def _check_threshold(session: ort.InferenceSession, manifest: Manifest) -> None:
    """The graph decides labels with the threshold export recorded in its metadata_props; a
    manifest saying another one would describe a model that is not the one served. Graphs
    without that record (built elsewhere) are taken at the manifest's word."""
    recorded = session.get_modelmeta().custom_metadata_map.get("threshold")
    if recorded is None:
        return
    try:
        value = float(recorded)
    except ValueError:
        raise ContractError(
            f"model.onnx metadata 'threshold': got {clip(recorded)}, expected a number"
        ) from None
    if value != manifest.threshold:
        raise ContractError(
            f"manifest.json 'threshold': got {manifest.threshold!r}, expected {value!r} "
            "(the threshold inside model.onnx)"
        )


class RunControl:
    """Lets another thread stop a session.run (ONNX Runtime checks the flag between nodes)."""

    def __init__(self) -> None:
        self.options = ort.RunOptions()
        self.started = False  # set by the worker thread as the run begins

    def cancel(self) -> None:
        self.options.terminate = True


class ModelRuntime:
    """A loaded, verified, warmed-up version; `run` is safe to call from several threads."""

    def __init__(self, version_dir: Path, options: RuntimeOptions) -> None:
        self.path = version_dir / MODEL_FILE
        self.manifest = Manifest.read(version_dir / MANIFEST_FILE)
        if not self.path.exists():
            raise ContractError(f"{version_dir.name}/{MODEL_FILE}: missing")
        model = verify_file(self.path, self.manifest.files[MODEL_FILE])
        self._session = create_session(model, options)
        _check_graph(self._session, self.manifest)
        self.providers: tuple[str, ...] = tuple(self._session.get_providers())
        self.options = options
        # Parity was proven up to the manifest's batch size: never more, and the settings may cap.
        self.max_batch_size = min(self.manifest.max_batch_size, options.max_batch_size)
        self.output_names = [spec.name for spec in self.manifest.outputs]  # ORT takes a list
        # Requests of at most this many rows run on the event loop thread (see `calibrate`).
        self.inline_rows = self.max_batch_size if options.run_inline == "always" else 0
        self.run_ns: dict[int, int] = {}  # batch size -> fastest calibration run
        self._run = _direct_run(self._session)

    def run(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        control: RunControl | None = None,
    ) -> dict[str, np.ndarray]:
        options = control.options if control else None
        names = outputs if isinstance(outputs, list) else list(outputs)
        results = self._run(names, inputs if isinstance(inputs, dict) else dict(inputs), options)
        return dict(zip(names, results, strict=True))  # graph checked: outputs are tensors

    async def run_in(
        self,
        executor: Executor,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        control: RunControl | None = None,
    ) -> tuple[int, dict[str, np.ndarray]]:
        """`run` on `executor`; returns when it started (perf_counter_ns) and the results.

        Cancelling the awaiting task (gRPC does when the client's deadline passes) stops the work:
        a run still queued never starts, one under way is told to terminate."""
        control = control or RunControl()
        future = executor.submit(self._timed_run, inputs, outputs, control)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if not future.cancel():  # already running: ONNX Runtime stops at the next node
                control.cancel()
            raise

    def _timed_run(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], control: RunControl
    ) -> tuple[int, dict[str, np.ndarray]]:
        control.started = True
        return time.perf_counter_ns(), self.run(inputs, outputs, control)

    def warm_up(self, runs: int) -> None:
        """Run all-missing rows (the imputation path) at 1 row and at the largest batch, and
        check every output's dtype and shape."""
        names = [spec.name for spec in self.manifest.outputs]
        batch_sizes = sorted({1, self.max_batch_size})
        for rows in batch_sizes if runs > 0 else ():
            feeds = {spec.name: _missing(spec, rows) for spec in self.manifest.inputs}
            try:
                results = [self.run(feeds, names) for _ in range(runs)][-1]
            except Exception as err:  # ONNX Runtime's own error types: the graph cannot run
                raise ContractError(f"warm-up on {rows} rows failed: {err}") from err
            for spec in self.manifest.outputs:
                got = results[spec.name]
                want_shape = (rows, *spec.shape[1:])
                if got.dtype != DTYPES[spec.datatype] or got.shape != want_shape:
                    raise ContractError(
                        f"warm-up output '{spec.name}': got {got.dtype} {list(got.shape)}, "
                        f"expected {spec.datatype} {list(want_shape)}"
                    )
        if runs > 0 and self.options.run_inline == "auto":
            self.calibrate(batch_sizes)

    def calibrate(self, batch_sizes: Sequence[int]) -> None:
        """Time runs at each warm-up size, smallest first, and set `inline_rows`.

        A run that costs less than handing it to a worker thread (submit, wake the thread, trade
        the GIL with the busy event loop: 50-150 us of CPU measured on 2 cores) is cheaper done on
        the event loop itself, which it blocks only that long. Sizes past the first over the
        threshold are not timed."""
        threshold_ns = int(self.options.inline_threshold_us * 1000)
        for rows in sorted(batch_sizes):
            feeds = {spec.name: _missing(spec, rows) for spec in self.manifest.inputs}
            timings = []
            for _ in range(CALIBRATION_RUNS):
                started = time.perf_counter_ns()
                self.run(feeds, self.output_names)
                timings.append(time.perf_counter_ns() - started)
            self.run_ns[rows] = min(timings)
            if self.run_ns[rows] > threshold_ns:
                break
        self.inline_rows = inline_rows(self.run_ns, threshold_ns)
        log.info(
            "%s/%s: session.run %s; runs of up to %d rows stay on the event loop (under %.0f us)",
            self.path.parent.parent.name, self.path.parent.name,
            ", ".join(f"{ns / 1000:.0f} us at {rows} rows" for rows, ns in self.run_ns.items()),
            self.inline_rows, self.options.inline_threshold_us,
        )  # fmt: skip


def _direct_run(session: ort.InferenceSession) -> Any:
    """The binding's own run for a CPU-only session, else the public `run`.

    The public wrapper re-checks every call what the codec has already checked (every input
    named, numpy arrays only) and retries a failed GPU provider on CPU; on CPU alone it adds
    nothing but ~3 us a call (a 1-row run of the 16-8 MLP takes ~14 us; measured on 2 cores).
    The binding is reached through a private attribute, so its absence means the public path."""
    binding = getattr(session, "_sess", None)
    if tuple(session.get_providers()) != (CPU,) or not callable(getattr(binding, "run", None)):
        return session.run
    return binding.run  # type: ignore[union-attr]


def _missing(spec: TensorSpec, rows: int) -> np.ndarray:
    """A batch of missing values: NaN numbers, empty text."""
    if spec.datatype == "BYTES":
        return np.full((rows, spec.width), "", dtype=object)
    return np.full((rows, spec.width), np.nan, dtype=DTYPES[spec.datatype])


def inline_rows(run_ns: Mapping[int, int], threshold_ns: int) -> int:
    """The most rows whose run is predicted to take at most `threshold_ns`, on the straight line
    between the measured sizes around the threshold; 0 if even the smallest size is slower."""
    points = sorted(run_ns.items())
    under = [(rows, ns) for rows, ns in points if ns <= threshold_ns]
    if not under:
        return 0
    rows, ns = under[-1]
    over = [(r, t) for r, t in points if r > rows]
    if not over:
        return rows
    next_rows, next_ns = over[0]
    if next_ns <= ns:  # noise: no slope to extrapolate along
        return rows
    extra = (threshold_ns - ns) * (next_rows - rows) // (next_ns - ns)
    return int(min(next_rows - 1, rows + extra))


__all__ = [
    "CPU",
    "CUDA",
    "ModelRuntime",
    "RunControl",
    "RuntimeOptions",
    "create_session",
    "inline_rows",
]
