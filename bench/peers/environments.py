"""Other KServe v2 servers in the benchmark (`stablemlp bench --peers kserve,mlserver`, never CI).

Each peer is pinned in its own environment (.venv-kserve, .venv-mlserver: made on first use with
pip; nothing enters ours), serves the same model.onnx through its documented custom-model API (the
glue is bench/peers/peer_kserve.py or bench/peers/peer_mlserver.py, copied into a temporary folder),
binds 127.0.0.1 on free ports, and counts as started once its ServerReady and ModelReady say so.
`mlserver-inline` is MLServer with its parallel inference workers off (`parallel_workers: 0`).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
INSTALL_TIMEOUT_S = 1200.0  # pip resolving and fetching a server's dependencies


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


def describe(peer: Peer, venv: Path) -> dict[str, Any]:
    """bench.json's record of a peer: what was installed and how it runs."""
    return {"requirements": requirements(peer), "versions": versions(peer, venv), "note": peer.note}


__all__ = [
    "PEERS",
    "Peer",
    "PeerError",
    "describe",
    "ensure_venv",
    "free_port",
    "parse_peers",
    "requirements",
    "versions",
    "write_kserve",
    "write_mlserver",
    "write_peer",
]
