"""Shared fixtures: one real trained + exported model repository per session, real servers.

Session fixtures
    model_repository   Path: a repository made by the real pipeline (`stablemlp train --epochs 3`,
                       then `stablemlp export`) holding `breast_cancer/1`. Read-only: copy it
                       (shutil.copytree) before changing anything.
    run_dir            Path: the training run folder behind it (checkpoint.pt, test_split.npz).
    test_split         HeldOutSplit: the held-out raw rows (some cells set to NaN = missing) with
                       the outputs in-process ONNX Runtime gives for them: what servers must return.
    reference          Reference: `reference(rows) -> (probability [N,1] f32, label [N,1] i64)` by
                       in-process ONNX Runtime on the exported model.onnx.
    start_server       `with start_server(repository, "--device", "cpu", ...) as srv:` a real
                       `stablemlp serve` subprocess on 127.0.0.1, port 0 (metrics on any free
                       port, REST on any free port, repository polling off unless the flags
                       say otherwise); `srv.address` is "127.0.0.1:PORT" once health says
                       SERVING, `srv.rest_url` its REST base URL, `srv.metrics_url` its
                       /metrics URL; `srv.log()` its output so far;
                       `srv.wait_for_log(text, count)` waits (bounded) for log lines;
                       `srv.stop()` sends SIGTERM and returns the exit code. Keywords: `env`
                       (extra variables), `credentials` and `metadata` for the health wait.
Module fixture
    server             ServerProcess already running on `model_repository` (`--device auto`);
                       stopped after the module.

Helpers (plain functions)
    infer_request(rows, ...), outputs(response)   a raw/contents ModelInfer request, its arrays
    publish_version(repository, version, shift)   copy version 1 to `version` the way export does
                                                  (tmp folder, then rename); a non-zero `shift`
                                                  moves the output logit, so replies tell versions
                                                  apart; manifest hashes rewritten to match
    break_version(repository, version, kind)      publish a version that must be refused:
                                                  truncate | flip | garbage | shape

Servers are subprocesses (`python -m stablemlp serve ...`), as in production, started, waited for
and stopped by the harness bench and scripts use too (stablemlp.bench.servers): the bound port is
read from the "ready: listening on HOST:PORT" log line, then grpc.health.v1 is watched with a
deadline.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from stablemlp.bench.servers import ServerProcess as ServerProcess
from stablemlp.bench.servers import serve_command
from stablemlp.bench.servers import start_server as start_process
from stablemlp.bench.servers import wait_until_serving as wait_until_serving

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "breast_cancer"
# Every test server: one warm-up run (start-up speed), Prometheus and REST on free ports, no
# repository polling unless a test's own flags (later, so they win) ask for it.
SERVER_FLAGS = (
    *("--warmup-runs", "1", "--metrics-port", "0"),
    *("--http-port", "0", "--repository-poll-s", "0"),
)


def pytest_report_header() -> str:
    """The CPU kernels in use (`make test-kernels` runs the numeric modules at each level)."""
    try:
        import torch
    except ImportError:
        return "torch: not installed"
    level = os.environ.get("ATEN_CPU_CAPABILITY", "unset")
    capability = torch.backends.cpu.get_cpu_capability()
    return f"torch CPU capability: {capability} (ATEN_CPU_CAPABILITY={level})"


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch", reason="training needs the train extra")
    from stablemlp.model.cli import main as train_main

    run = tmp_path_factory.mktemp("run")
    assert train_main(["--epochs", "3", "--seed", "0", "--no-progress", "--output", str(run)]) == 0
    return run


@pytest.fixture(scope="session")
def model_repository(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stablemlp.export.cli import export_main

    repository = tmp_path_factory.mktemp("model_repository")
    assert export_main([str(run_dir), "--repository", str(repository)]) == 0
    assert (repository / MODEL_NAME / "1" / "model.onnx").is_file()
    return repository


class Reference:
    """In-process ONNX Runtime on one exported version: the outputs a server must reproduce."""

    def __init__(self, model_path: Path) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])

    def __call__(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probability, label = self.session.run(
            ["probability", "label"], {"features": np.asarray(rows, dtype=np.float32)}
        )
        return probability, label


@pytest.fixture(scope="session")
def reference(model_repository: Path) -> Reference:
    return Reference(model_repository / MODEL_NAME / "1" / "model.onnx")


@dataclass(frozen=True)
class HeldOutSplit:
    features: np.ndarray  # float32 [N, F], raw values, a few NaN (missing)
    probability: np.ndarray  # float32 [N, 1], in-process ONNX Runtime
    label: np.ndarray  # int64 [N, 1]
    feature_names: tuple[str, ...]


@pytest.fixture(scope="session")
def test_split(run_dir: Path, reference: Reference, model_repository: Path) -> HeldOutSplit:
    import json

    with np.load(run_dir / "test_split.npz", allow_pickle=False) as saved:
        features = np.array(saved["features"], dtype=np.float32)
    rng = np.random.default_rng(0)
    holes = rng.random(features.shape) < 0.05  # missing values exercise the graph's imputation
    features[holes] = np.nan
    probability, label = reference(features)
    manifest = json.loads((model_repository / MODEL_NAME / "1" / "manifest.json").read_text())
    return HeldOutSplit(features, probability, label, tuple(manifest["feature_names"]))


def run_isolated(code: str, cwd: Path) -> str:
    """`code` in a fresh interpreter that cannot see the project (-I: neither the cwd nor
    PYTHONPATH nor user site on sys.path); its stdout. It must exit 0."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-I", "-W", "ignore", "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="session")
def start_server() -> Callable[..., contextlib.AbstractContextManager[ServerProcess]]:
    @contextlib.contextmanager
    def start(
        repository: Path,
        *args: str,
        env: dict[str, str] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> Iterator[ServerProcess]:
        command = serve_command(repository, *SERVER_FLAGS, *args)
        server = start_process("server", command, env, credentials=credentials, metadata=metadata)
        try:
            yield server
        finally:
            server.stop()

    return start


@pytest.fixture(scope="module")
def server(
    model_repository: Path,
    start_server: Callable[..., contextlib.AbstractContextManager[ServerProcess]],
) -> Iterator[ServerProcess]:
    with start_server(model_repository, "--device", "auto") as running:
        yield running


def infer_request(rows: np.ndarray, raw: bool = True, **fields: Any) -> Any:
    """A ModelInfer request for `rows` of the breast_cancer model."""
    from stablemlp.protos import grpc_service_pb2 as pb

    request = pb.ModelInferRequest(**{"model_name": MODEL_NAME, **fields})
    tensor = request.inputs.add(name="features", datatype="FP32", shape=rows.shape)
    if raw:
        request.raw_input_contents.append(np.ascontiguousarray(rows, "<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(rows.ravel().tolist())
    return request


def outputs(response: Any) -> dict[str, np.ndarray]:
    """name -> array of a ModelInferResponse, in whichever form (raw or contents) it came."""
    if response.raw_output_contents:
        dtypes = {"FP32": "<f4", "INT64": "<i8"}
        return {
            t.name: np.frombuffer(raw, dtypes[t.datatype]).reshape(t.shape)
            for t, raw in zip(response.outputs, response.raw_output_contents, strict=True)
        }
    return {
        t.name: np.array(
            t.contents.fp32_contents if t.datatype == "FP32" else t.contents.int64_contents
        ).reshape(t.shape)
        for t in response.outputs
    }


def cpu_repository(root: Path, policy: str = "latest:1") -> Any:
    """A ModelRepository on the CPU, unbatched, for tests that load versions in process."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from stablemlp.serving.repository.models import ModelRepository
    from stablemlp.serving.repository.policy import VersionPolicy
    from stablemlp.serving.runtime.scheduler import Scheduler
    from stablemlp.serving.runtime.session import RuntimeOptions

    loop = asyncio.new_event_loop()  # never run: unbatched schedulers do not touch it
    loop.close()
    return ModelRepository(
        root,
        policy=VersionPolicy.parse(policy),
        options=RuntimeOptions(device="cpu", intra_op_threads=1, inter_op_threads=1),
        warmup_runs=1,
        scheduler=lambda runtime: Scheduler(runtime, ThreadPoolExecutor(1), None, loop),
    )


def publish_onnx(folder: Path, name: str, model: Any) -> Path:
    """Write a hand-built ONNX `model` as version 1 of `name` under repository `folder`, with a
    manifest honouring the serving contract (features FP32 [-1,30] -> probability, label)."""
    import hashlib
    import json

    version = folder / name / "1"
    version.mkdir(parents=True)
    data = model.SerializeToString()
    (version / "model.onnx").write_bytes(data)
    manifest = {
        "format": "stablemlp.manifest/1", "model_name": name, "version": 1,
        "created_utc": "2026-01-01T00:00:00Z", "platform": "onnxruntime_onnx", "opset": 18,
        "max_batch_size": 1024,
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 30]}],
        "outputs": [{"name": "probability", "datatype": "FP32", "shape": [-1, 1]},
                    {"name": "label", "datatype": "INT64", "shape": [-1, 1]}],
        "feature_names": [f"f{i}" for i in range(30)], "threshold": 0.5,
        "files": {"model.onnx": {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}},
    }  # fmt: skip
    (version / "manifest.json").write_text(json.dumps(manifest))
    return version


def _rehash(folder: Path) -> None:
    import hashlib
    import json

    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / "model.onnx").read_bytes()
    manifest["files"]["model.onnx"] = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _edit_manifest(folder: Path, **changes: Any) -> None:
    import json

    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(changes)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def publish_version(
    repository: Path, version: int, shift: float = 0.0, edit: Callable[[Path], None] | None = None
) -> Path:
    """Version 1 copied to `version`; `shift` is added to the output layer's bias (the logit)."""
    import shutil

    model = repository / MODEL_NAME
    staging = model / f".tmp-{version}"
    shutil.copytree(model / "1", staging)
    _edit_manifest(staging, version=version)
    if shift:
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(str(staging / "model.onnx"))
        (bias,) = [t for t in graph.graph.initializer if t.name == "net.head.bias"]
        bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + shift, bias.name))
        onnx.save(graph, str(staging / "model.onnx"))
        _rehash(staging)
    if edit is not None:
        edit(staging)
    return Path(shutil.move(staging, model / str(version)))


def _truncate(folder: Path) -> None:
    data = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[: len(data) // 2])


def _flip(folder: Path) -> None:
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "model.onnx").write_bytes(bytes(data))


def _garbage(folder: Path) -> None:
    (folder / "model.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    _rehash(folder)  # the hash matches: the graph check (graph_files.py) must refuse it


def _wrong_shape(folder: Path) -> None:
    import json

    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["inputs"][0]["shape"] = [-1, 29]
    manifest["feature_names"] = manifest["feature_names"][:29]
    (folder / "manifest.json").write_text(json.dumps(manifest))


BREAKS: dict[str, tuple[Callable[[Path], None], str]] = {
    # kind -> (damage, a fragment of the reason the server gives)
    "truncate": (_truncate, "bytes), expected"),
    "flip": (_flip, "sha256"),
    "garbage": (_garbage, "model.onnx: not an ONNX protobuf"),
    "shape": (_wrong_shape, "expected [-1, 29]"),
}


def break_version(repository: Path, version: int, kind: str) -> str:
    """Publish a damaged `version`; returns a fragment of the reason it must be refused for."""
    damage, reason = BREAKS[kind]
    publish_version(repository, version, edit=damage)
    return reason
