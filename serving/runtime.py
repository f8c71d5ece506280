"""One ONNX Runtime session for one published model version: manifest, hash, providers, contract.

Everything about a version that can be checked before serving it is checked here, once, at load:
the manifest's keys, model.onnx's sha256, the graph's tensors against the manifest, the execution
provider actually obtained, and a warm-up that proves the outputs have the declared shapes. The
session is made from the very bytes that were hashed (no second read of the file, no external data
files); nothing else of a version folder is read: model.pt and pickles are never loaded.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .codec import DTYPES, TensorSpec
from .errors import ContractError, IntegrityError, ProviderError
from .settings import Device

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "stablemlp.manifest/1"
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
PLATFORM = "onnxruntime_onnx"  # Triton's platform name for ONNX models
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# ONNX Runtime's type strings for the protocol datatypes we carry.
ORT_TYPES = {"tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(int8)": "INT8",
             "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
             "tensor(float)": "FP32", "tensor(double)": "FP64"}  # fmt: skip


@dataclass(frozen=True)
class RuntimeOptions:
    device: Device  # cpu | cuda | auto
    intra_op_threads: int
    inter_op_threads: int
    cuda_device_id: int = 0
    cuda_memory_limit: int = 0  # bytes; 0 = ONNX Runtime's default (no limit)


@dataclass(frozen=True)
class Manifest:
    """The parts of manifest.json that serving uses (see the repository contract)."""

    model_name: str
    version: int
    opset: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    feature_names: tuple[str, ...]
    threshold: float
    sha256: str  # of model.onnx
    size: int  # bytes of model.onnx
    created_utc: str

    @classmethod
    def read(cls, path: Path) -> Manifest:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data["format"] != MANIFEST_FORMAT:
                raise ContractError(
                    f"{path.name} format: got {data['format']!r}, expected {MANIFEST_FORMAT!r}"
                )
            model_file = data["files"][MODEL_FILE]
            return cls(
                model_name=str(data["model_name"]),
                version=int(data["version"]),
                opset=int(data["opset"]),
                inputs=tuple(_spec(t) for t in data["inputs"]),
                outputs=tuple(_spec(t) for t in data["outputs"]),
                feature_names=tuple(str(n) for n in data["feature_names"]),
                threshold=float(data["threshold"]),
                sha256=str(model_file["sha256"]),
                size=int(model_file["bytes"]),
                created_utc=str(data["created_utc"]),
            )
        except OSError as err:
            raise ContractError(f"{path}: cannot read ({err.strerror})") from None
        except (KeyError, TypeError, ValueError) as err:
            raise ContractError(f"{path}: malformed ({type(err).__name__}: {err})") from None


def _spec(tensor: Mapping[str, Any]) -> TensorSpec:
    return TensorSpec(
        str(tensor["name"]), str(tensor["datatype"]), tuple(int(d) for d in tensor["shape"])
    )


def check_manifest(manifest: Manifest) -> None:
    """The model contract: one input [-1, F] with F feature names; outputs batched on dim 0."""
    if len(manifest.inputs) != 1:
        raise ContractError(f"manifest inputs: got {len(manifest.inputs)}, expected 1")
    features = manifest.inputs[0]
    if len(features.shape) != 2 or features.shape[1] != len(manifest.feature_names):
        raise ContractError(
            f"manifest input '{features.name}' shape: got {list(features.shape)}, "
            f"expected [-1, {len(manifest.feature_names)}] (one column per feature name)"
        )
    if not manifest.outputs:
        raise ContractError("manifest outputs: got none, expected at least one")
    for spec in (*manifest.inputs, *manifest.outputs):
        if spec.datatype not in DTYPES:
            raise ContractError(f"manifest tensor '{spec.name}' datatype: got {spec.datatype!r}")
        if not spec.shape or spec.shape[0] != -1 or min(spec.shape[1:], default=1) < 1:
            raise ContractError(
                f"manifest tensor '{spec.name}' shape: got {list(spec.shape)}, "
                "expected [-1, d1, ...] with a dynamic batch dimension and fixed dims >= 1"
            )


def verify_file(path: Path, sha256: str, size: int) -> bytes:
    """The file's bytes, if they are byte-for-byte the ones the manifest describes."""
    with path.open("rb") as stream:
        data = stream.read(size + 1)  # one byte more than promised reveals a longer file
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != size or digest != sha256:
        got = f"{len(data)} bytes" if len(data) <= size else f"more than {size} bytes"
        raise IntegrityError(
            f"{path.parent.parent.name}/{path.parent.name}/{path.name}: got sha256 "
            f"{digest} ({got}), expected {sha256} ({size} bytes) from manifest.json"
        )
    return data


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

    From bytes, so the graph cannot pull in files beside it (ONNX external data) unhashed."""
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
            datatype = ORT_TYPES.get(node.type, node.type)
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
        check_manifest(self.manifest)
        if not self.path.is_file():
            raise ContractError(f"{version_dir.name}/{MODEL_FILE}: missing")
        model = verify_file(self.path, self.manifest.sha256, self.manifest.size)
        self._session = create_session(model, options)
        _check_graph(self._session, self.manifest)
        self.providers: tuple[str, ...] = tuple(self._session.get_providers())
        self.options = options

    def run(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        control: RunControl | None = None,
    ) -> dict[str, np.ndarray]:
        options = control.options if control else None
        results = self._session.run(list(outputs), dict(inputs), options)
        return {name: np.asarray(value) for name, value in zip(outputs, results, strict=True)}

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

    def warm_up(self, batch_sizes: Sequence[int], runs: int) -> None:
        """Run all-missing rows (the imputation path) and check every output's dtype and shape."""
        names = [spec.name for spec in self.manifest.outputs]
        for rows in batch_sizes if runs > 0 else ():
            feeds = {
                spec.name: np.full((rows, *spec.shape[1:]), np.nan, dtype=DTYPES[spec.datatype])
                for spec in self.manifest.inputs
            }
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


__all__ = [
    "CPU",
    "CUDA",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "PLATFORM",
    "Manifest",
    "ModelRuntime",
    "RunControl",
    "RuntimeOptions",
    "check_manifest",
    "create_session",
    "verify_file",
]
