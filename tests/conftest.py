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
                       `stablemlp serve` subprocess on 127.0.0.1, port 0; `srv.address` is
                       "127.0.0.1:PORT" once health says SERVING; `srv.log()` its output so far;
                       `srv.stop()` sends SIGTERM and returns the exit code.
Module fixture
    server             ServerProcess already running on `model_repository` (`--device auto`);
                       stopped after the module.

Servers are subprocesses (`python -m serving serve ...`), as in production; the bound port is read
from the "ready: listening on HOST:PORT" log line, then grpc.health.v1 is watched with a deadline.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "breast_cancer"
START_TIMEOUT_S = 60.0  # import + load + warm-up on a busy 2-core machine
STOP_TIMEOUT_S = 20.0
_READY = re.compile(r"ready: listening on (\S+)")


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch", reason="training needs the train extra")
    from model.cli import main as train_main

    run = tmp_path_factory.mktemp("run")
    assert train_main(["--epochs", "3", "--seed", "0", "--no-progress", "--output", str(run)]) == 0
    return run


@pytest.fixture(scope="session")
def model_repository(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.cli import export_main

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


def _drain(stream: object, lines: list[str], ready: queue.Queue[str]) -> None:
    for line in iter(stream.readline, ""):  # type: ignore[attr-defined]
        lines.append(line)
        match = _READY.search(line)
        if match:
            ready.put(match.group(1))
    ready.put("")  # EOF: the process ended


class ServerProcess:
    """A `stablemlp serve` subprocess; every wait is bounded."""

    def __init__(self, repository: Path, *args: str) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        env["STABLEMLP_LOG_LEVEL"] = "INFO"
        command = [sys.executable, "-m", "serving", "serve", "--model-repository", str(repository)]
        command += ["--host", "127.0.0.1", "--port", "0", "--warmup-runs", "1", *args]
        self.process = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self._lines: list[str] = []
        ready: queue.Queue[str] = queue.Queue()
        threading.Thread(
            target=_drain, args=(self.process.stderr, self._lines, ready), daemon=True
        ).start()
        try:
            address = ready.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            address = ""
        if not address:
            self.stop()
            raise RuntimeError(f"server did not become ready:\n{self.log()}")
        self.address = address
        wait_until_serving(address, deadline_s=START_TIMEOUT_S)

    def log(self) -> str:
        return "".join(self._lines)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=STOP_TIMEOUT_S)


def wait_until_serving(address: str, deadline_s: float, service: str = "") -> None:
    """Watch grpc.health.v1 until `service` is SERVING; fails after `deadline_s`."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=deadline_s, wait_for_ready=True
        )
        try:
            for response in watch:  # one message per status change; the deadline bounds it
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError as err:
            raise TimeoutError(f"{address}: health '{service}' not SERVING: {err.code()}") from err
        finally:
            watch.cancel()
    raise TimeoutError(f"{address}: health stream for '{service}' ended before SERVING")


@pytest.fixture(scope="session")
def start_server() -> Callable[..., contextlib.AbstractContextManager[ServerProcess]]:
    @contextlib.contextmanager
    def start(repository: Path, *args: str) -> Iterator[ServerProcess]:
        server = ServerProcess(repository, *args)
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
