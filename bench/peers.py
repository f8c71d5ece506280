"""Other KServe v2 servers in the benchmark (`stablemlp bench --peers kserve,mlserver`, never CI).

Each peer is pinned in its own environment (.venv-kserve, .venv-mlserver: made on first use with
pip; nothing enters ours), serves the same model.onnx through its documented custom-model API (the
glue is bench/peer_kserve.py or bench/peer_mlserver.py, copied into a temporary folder), binds
127.0.0.1 on free ports, and counts as started once its ServerReady and ModelReady say so.
`mlserver-inline` is MLServer with its parallel inference workers off (`parallel_workers: 0`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc

from ..protos import grpc_service_pb2 as pb
from ..protos import grpc_service_pb2_grpc as pb_grpc
from .servers import process_tree

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
INSTALL_TIMEOUT_S = 1200.0  # pip resolving and fetching a server's dependencies
START_TIMEOUT_S = 120.0  # a peer imports FastAPI, uvicorn, pandas, ... before it serves
STOP_TIMEOUT_S = 20.0
POLL_S = 0.2  # between readiness polls that were answered "not ready" (no watch API to wait on)


class PeerError(RuntimeError):
    """A peer could not be installed, started or checked; the message says which and why."""


@dataclass(frozen=True)
class Peer:
    name: str
    requirement: str  # pinned: the version measured is the version named
    distribution: str  # its name for importlib.metadata
    note: str  # how it runs, for bench.md
    constraints: tuple[str, ...] = ()  # what the peer's own pins miss
    settings: Mapping[str, Any] = field(default_factory=dict)  # MLServer settings.json entries


# uvloop 0.22 broke MLServer 1.7.1's inference workers ("There is no current event loop";
# SeldonIO/MLServer issue 2286, open): the pin MLflow uses too.
_MLSERVER_PINS = ("uvloop<0.22",)
PEERS = {
    "kserve": Peer(
        "kserve",
        "kserve==0.21.0",
        "kserve",
        "a `kserve.Model` subclass running ONNX Runtime in predict(), served by "
        "`kserve.ModelServer` (its gRPC v2 server); KServe's defaults except per-request logging "
        "(off) and the listen addresses (127.0.0.1)",
    ),
    "mlserver": Peer(
        "mlserver",
        "mlserver==1.7.1",
        "mlserver",
        "a custom `MLModel` runtime (NumPy codec) named in model-settings.json, `mlserver start`; "
        "MLServer's defaults (inference in one parallel worker process) except host 127.0.0.1",
        _MLSERVER_PINS,
    ),
    # MLServer's documented switch for running inference in the server process itself
    "mlserver-inline": Peer(
        "mlserver-inline",
        "mlserver==1.7.1",
        "mlserver",
        "as mlserver, with `parallel_workers: 0` (inference on the server's own event loop, as "
        "ours runs small batches)",
        _MLSERVER_PINS,
        {"parallel_workers": 0},
    ),
}


def parse_peers(text: str) -> list[Peer]:
    """'kserve,mlserver' -> the peers, in order; ValueError naming the known ones otherwise."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PEERS]
    if unknown or not names:
        raise ValueError(f"unknown peer(s) {unknown or text!r}; known: {', '.join(PEERS)}")
    return [PEERS[n] for n in dict.fromkeys(names)]


def requirements(peer: Peer) -> list[str]:
    """The peer pinned, with the ONNX Runtime this environment runs (the same kernels)."""
    onnxruntime = f"onnxruntime=={importlib.metadata.version('onnxruntime')}"
    return [peer.requirement, onnxruntime, *peer.constraints]


def _run(command: list[str], what: str, timeout_s: float) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise PeerError(f"{what}: {err}") from None
    if out.returncode != 0:
        raise PeerError(f"{what} failed ({out.returncode}):\n{(out.stdout + out.stderr)[-2000:]}")
    return out.stdout


def ensure_venv(peer: Peer, root: Path, timeout_s: float = INSTALL_TIMEOUT_S) -> Path:
    """root/.venv-<distribution> holding exactly requirements(peer); made (or remade) when it
    does not (the MLServer variants share one)."""
    venv = (
        root / f".venv-{peer.distribution}"
    ).resolve()  # commands run from the peer's own folder
    marker, wanted = venv / "stablemlp-peer.txt", "\n".join(requirements(peer)) + "\n"
    if marker.is_file() and marker.read_text() == wanted:
        return venv
    log.info("installing %s into %s (once; a few minutes)", " ".join(requirements(peer)), venv)
    _run([sys.executable, "-m", "venv", "--clear", str(venv)], f"{peer.name}: venv", 120)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, *requirements(peer)], f"{peer.name}: pip install", timeout_s)
    marker.write_text(wanted)
    return venv


def versions(peer: Peer, venv: Path) -> dict[str, str]:
    """The installed versions that matter for the figures, read in the peer's environment."""
    names = [peer.distribution, "onnxruntime", "grpcio", "protobuf", "numpy", "uvloop"]
    code = (
        "import importlib.metadata as m, json, sys; "
        "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
    )
    out = _run([str(venv / "bin" / "python"), "-c", code, *names], f"{peer.name}: versions", 60)
    found: dict[str, str] = json.loads(out)
    return found


def free_port() -> int:
    """A port free on 127.0.0.1 now (the peers take ports as numbers, not 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_kserve(folder: Path, venv: Path, model: str, onnx: Path, grpc_port: int) -> list[str]:
    """The glue copied into `folder`; the command that serves `onnx` as `model` on grpc_port."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "peer_kserve.py"
    shutil.copyfile(HERE / "peer_kserve.py", script)
    return [
        *(str(venv / "bin" / "python"), "-I", str(script), "--model_name", model),
        *("--model-path", str(onnx), "--grpc_port", str(grpc_port)),
        *("--http_port", str(free_port()), "--enable_latency_logging", "false"),
    ]


def write_mlserver(
    folder: Path,
    venv: Path,
    model: str,
    onnx: Path,
    grpc_port: int,
    extra: Mapping[str, Any] | None = None,
) -> list[str]:
    """settings.json (loopback, free ports, `extra`) and <model>/model-settings.json with the
    runtime beside it, as MLServer's custom-runtime example lays them out; the command that
    serves them."""
    model_folder = folder / model
    model_folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HERE / "peer_mlserver.py", model_folder / "peer_mlserver.py")
    settings = {
        "host": "127.0.0.1",
        "grpc_port": grpc_port,
        "http_port": free_port(),
        "metrics_port": free_port(),
        "model_repository_root": str(folder),
        **(extra or {}),
    }
    model_settings = {
        "name": model,
        "implementation": "peer_mlserver.OnnxModel",
        "parameters": {"uri": str(onnx)},
    }
    (folder / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    (model_folder / "model-settings.json").write_text(json.dumps(model_settings, indent=2) + "\n")
    return [str(venv / "bin" / "mlserver"), "start", str(folder)]


def write_peer(
    peer: Peer, folder: Path, venv: Path, model: str, onnx: Path, port: int
) -> list[str]:
    if peer.distribution == "kserve":
        return write_kserve(folder, venv, model, onnx, port)
    return write_mlserver(folder, venv, model, onnx, port, peer.settings)


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
        """SIGTERM; what is left of its process tree after STOP_TIMEOUT_S is killed."""
        tree = process_tree(self.pid)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for pid in reversed(tree):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return self.process.wait(timeout=STOP_TIMEOUT_S)


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
    peer: Peer, venv: Path, folder: Path, model: str, onnx: Path, timeout_s: float = START_TIMEOUT_S
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


def describe(peer: Peer, venv: Path, running: PeerProcess | None = None) -> dict[str, Any]:
    """bench.json's record of a peer: what was installed, how it ran, how it started."""
    doc: dict[str, Any] = {
        "requirements": requirements(peer),
        "versions": versions(peer, venv),
        "note": peer.note,
    }
    if running is not None:
        doc["seconds_to_ready"] = round(running.seconds_to_ready, 3)
    return doc


__all__ = [
    "PEERS",
    "Peer",
    "PeerError",
    "PeerProcess",
    "describe",
    "ensure_venv",
    "free_port",
    "parse_peers",
    "requirements",
    "start_peer",
    "versions",
    "wait_ready",
    "write_kserve",
    "write_mlserver",
    "write_peer",
]
