"""The servers one benchmark run measures: ours (its cold starts timed), the transport and model
floors, and the peers (started from the files bench/peers/environments.py writes, ready once their
ServerReady and ModelReady say so); each on 127.0.0.1, each stopped when the run's ExitStack
closes."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc

from ...protos import grpc_service_pb2 as pb
from ...protos import grpc_service_pb2_grpc as pb_grpc
from ..peers.environments import (
    Peer,
    PeerError,
    describe,
    ensure_venv,
    free_port,
    requirements,
    write_peer,
)
from ..servers import (
    OUR_SERVER_ENV,
    ServerProcess,
    child_env,
    floor_server_command,
    memory_mb,
    our_server_command,
    process_tree,
    start_server,
)
from .checks import check_peer
from .grid import Cell, Target, model_path

log = logging.getLogger(__name__)

TRAIN_TIMEOUT_S = 900.0
PEER_START_TIMEOUT_S = 120.0  # a peer imports FastAPI, uvicorn, pandas, ... before it serves
PEER_STOP_TIMEOUT_S = 20.0
POLL_S = 0.2  # between readiness polls answered "not ready" (the peers have no watch to wait on)


def build_repository(
    root: Path, model: str, wide_model: str | None, text_model: str | None = None
) -> Path:
    """Train and export the models in subprocesses (torch stays out of this process); the text
    model on palmerpenguins' CSV (text categories), when that package is installed."""
    repository = root / "model_repository"
    jobs = [(model, ["--epochs", "3"])]
    if wide_model:
        jobs.append((wide_model, ["--epochs", "2", "--hidden", "256,256,256"]))
    if text_model and importlib.util.find_spec("palmerpenguins") is not None:
        from ..quality import PENGUINS_TARGET, penguins_csv

        data = penguins_csv(root)
        jobs.append(
            (text_model, ["--epochs", "5", "--csv", str(data), "--target", PENGUINS_TARGET])
        )
    for name, extra in jobs:
        run_dir = root / f"run-{name}"
        train = ["train", "--seed", "0", "--no-progress", "--name", name, *extra]
        for command in (
            [*train, "--output", str(run_dir)],
            ["export", str(run_dir), "--repository", str(repository)],
        ):
            out = subprocess.run(
                [sys.executable, "-m", "stablemlp", *command],
                env=child_env(),
                capture_output=True,
                text=True,
                timeout=TRAIN_TIMEOUT_S,
            )
            if out.returncode != 0:
                raise RuntimeError(f"stablemlp {command[0]} failed:\n{out.stderr[-3000:]}")
    return repository


def start_ours(
    repository: Path, extra: Sequence[str], starts: int, stack: contextlib.ExitStack
) -> tuple[ServerProcess, dict[str, Any]]:
    """Start our server `starts` times (timing each start), keep the last one running."""
    seconds = []
    for i in range(max(1, starts)):
        server = start_server("ours", our_server_command(repository, extra), OUR_SERVER_ENV)
        seconds.append(round(server.seconds_to_serving, 3))
        if i < starts - 1:
            server.stop()
    stack.callback(server.stop)
    startup = {
        "seconds_to_serving": seconds,
        "seconds_to_serving_median": statistics.median(seconds),
        "idle_rss_mb": memory_mb(server.pid)["rss_mb"],
    }
    return server, startup


def start_floors(repository: Path, stack: contextlib.ExitStack) -> tuple[Target, Target]:
    """The transport floor and the model floor (bench/speed/floors.py), each its own process."""
    targets = []
    for name, run_model in (("transport_floor", False), ("model_floor", True)):
        server = start_server(name, floor_server_command(repository, run_model=run_model))
        stack.callback(server.stop)
        targets.append(Target(name, server.address, server.pid))
    return targets[0], targets[1]


@dataclass
class PeerProcess:
    """A running peer; its output goes to a log file (a peer may log a line per request)."""

    name: str
    process: subprocess.Popen[bytes]
    address: str
    log_path: Path
    seconds_to_ready: float = 0.0

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> int | None:
        """SIGTERM; what is left of its process tree after PEER_STOP_TIMEOUT_S is killed."""
        tree = process_tree(self.pid)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=PEER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for pid in reversed(tree):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return self.process.wait(timeout=PEER_STOP_TIMEOUT_S)


def wait_ready(peer: PeerProcess, model: str, deadline: float) -> None:
    """ServerReady, then ModelReady(model), until both say ready; PeerError when the process
    ends or `deadline` (monotonic) passes."""
    last = "no answer"
    with grpc.insecure_channel(peer.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        for _ in range(100_000):  # bounded; each pass waits on the channel or POLL_S
            remaining = deadline - time.monotonic()
            if peer.process.poll() is not None or remaining <= 0:
                break
            try:
                timeout = min(remaining, 2.0)
                server = stub.ServerReady(pb.ServerReadyRequest(), timeout=timeout,
                                          wait_for_ready=True)  # fmt: skip
                ready = (
                    server.ready
                    and stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=timeout).ready
                )
            except grpc.RpcError as err:
                last = f"{err.code().name}: {err.details()}"
                continue
            if ready:
                return
            last = "answered not ready"
            time.sleep(POLL_S)
    code = peer.process.poll()
    state = f"exited with {code}" if code is not None else f"not ready in time ({last})"
    raise PeerError(f"{peer.name} {state}; its log ends:\n{peer.log_tail()}")


def start_peer(
    peer: Peer,
    venv: Path,
    folder: Path,
    model: str,
    onnx: Path,
    timeout_s: float = PEER_START_TIMEOUT_S,
) -> PeerProcess:
    """Write the peer's files into `folder`, start it there and wait until it serves `model`."""
    grpc_port = free_port()
    command = write_peer(peer, folder, venv, model, onnx, grpc_port)
    log_path = folder / f"{peer.name}.log"
    started = time.monotonic()
    with log_path.open("wb") as log_file:
        process = _popen(command, folder, log_file)
    running = PeerProcess(peer.name, process, f"127.0.0.1:{grpc_port}", log_path)
    try:
        wait_ready(running, model, started + timeout_s)
    except BaseException:
        running.stop()
        raise
    running.seconds_to_ready = time.monotonic() - started
    return running


def _popen(command: list[str], cwd: Path, log_file: IO[bytes]) -> subprocess.Popen[bytes]:
    # cwd: MLServer writes its .metrics and .envs folders there
    return subprocess.Popen(
        command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
    )


def install_peers(peers: Sequence[Peer], root: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """Each peer's environment (made once); the docs of those that could not be installed."""
    venvs: dict[str, Path] = {}
    failed: dict[str, Any] = {}
    for peer in peers:
        try:
            venvs[peer.name] = ensure_venv(peer, root)
        except PeerError as err:
            log.error("peer %s not measured: %s", peer.name, err)
            failed[peer.name] = {"requirements": requirements(peer), "error": str(err)}
    return venvs, failed


def start_peers(
    peers: Sequence[Peer],
    venvs: Mapping[str, Path],
    repository: Path,
    model: str,
    work: Path,
    stack: contextlib.ExitStack,
) -> tuple[list[Target], dict[str, Any]]:
    """Start each installed peer on `model`'s model.onnx; its doc, or why it did not start."""
    targets: list[Target] = []
    docs: dict[str, Any] = {}
    for peer in (p for p in peers if p.name in venvs):
        venv = venvs[peer.name]
        try:
            running = start_peer(peer, venv, work / peer.name, model, model_path(repository, model))
        except PeerError as err:
            log.error("peer %s not measured: %s", peer.name, err)
            docs[peer.name] = {"requirements": requirements(peer), "error": str(err)}
            continue
        stack.callback(running.stop)
        docs[peer.name] = {
            **describe(peer, venv),
            "seconds_to_ready": round(running.seconds_to_ready, 3),
            "idle_rss_mb": round(memory_mb(running.pid)["rss_mb"], 1),
        }
        targets.append(Target(peer.name, running.address, running.pid))
    return targets, docs


def checked_peers(
    peers: Sequence[Target],
    ours: Target,
    cells: Sequence[Cell],
    requests: Mapping[str, pb.ModelInferRequest],
    docs: dict[str, Any],
) -> list[Target]:
    """The peers whose replies match ours on their cells; the others' docs say why not."""
    passed = []
    for peer in peers:
        try:
            check_peer(peer, ours, cells, requests)
        except AssertionError as err:
            log.error("peer %s not measured: %s", peer.name, err)
            docs[peer.name]["error"] = f"wrong or failed replies: {err}"
            continue
        passed.append(peer)
    return passed


__all__ = [
    "PeerProcess",
    "build_repository",
    "checked_peers",
    "install_peers",
    "start_floors",
    "start_ours",
    "start_peer",
    "start_peers",
    "wait_ready",
]
