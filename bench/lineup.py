"""The servers one benchmark run measures: ours (its cold starts timed), the transport and model
floors, and the peers; each on 127.0.0.1, each stopped when the run's ExitStack closes."""

from __future__ import annotations

import contextlib
import logging
import statistics
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..protos import grpc_service_pb2 as pb
from .cells import Cell
from .checks import check_peer
from .grid import Target, model_path
from .peers import Peer, PeerError, describe, ensure_venv, requirements, start_peer
from .servers import (
    OUR_SERVER_ENV,
    ServerProcess,
    child_env,
    floor_server_command,
    memory_mb,
    our_server_command,
    start_server,
)

log = logging.getLogger(__name__)

TRAIN_TIMEOUT_S = 900.0


def build_repository(root: Path, model: str, wide_model: str | None) -> Path:
    """Train and export the models in subprocesses (torch stays out of this process)."""
    repository = root / "model_repository"
    jobs = [(model, ["--epochs", "3"])]
    if wide_model:
        jobs.append((wide_model, ["--epochs", "2", "--hidden", "256,256,256"]))
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
    """The transport floor and the model floor (bench/floors.py), each its own process."""
    targets = []
    for name, run_model in (("transport_floor", False), ("model_floor", True)):
        server = start_server(name, floor_server_command(repository, run_model=run_model))
        stack.callback(server.stop)
        targets.append(Target(name, server.address, server.pid))
    return targets[0], targets[1]


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
        docs[peer.name] = {**describe(peer, venv, running), "idle_rss_mb": _rss(running.pid)}
        targets.append(Target(peer.name, running.address, running.pid))
    return targets, docs


def _rss(pid: int) -> float:
    return round(memory_mb(pid)["rss_mb"], 1)


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
    "build_repository",
    "checked_peers",
    "install_peers",
    "start_floors",
    "start_ours",
    "start_peers",
]
