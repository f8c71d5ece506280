"""Host-side half of scripts/container_check.sh: talk to the containerized server over gRPC and
REST.

    python scripts/container_probe.py --target 127.0.0.1:PORT --repository REPO \
        --rows RUN/test_split.npz [--rest 127.0.0.1:HTTP_PORT --readme README.md]

Waits (bounded) for grpc.health.v1 to report the inference service SERVING, then sends the rows
(with some cells blanked to NaN, so the graph's imputation is exercised) through the published
port with the project's client, and compares the answers with in-process ONNX Runtime on the same
exported model.onnx (hash-checked against the manifest). With --rest, runs the README's REST curl
example (the block after `<!-- rest-example -->`) against the published REST port, as a reader
would, and checks its answer the same way. Exit 0 when everything agrees; 1 with a message
otherwise. Imports no torch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stablemlp.protos import grpc_service_pb2 as pb
from stablemlp.serving.client import predict

READINESS_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
MISSING_FRACTION = 0.05


class ProbeError(RuntimeError):
    """A check failed; the message says which and by how much."""


def wait_until_serving(target: str, deadline_s: float, since: float) -> float:
    """Seconds from `since` (a time.time()) until the inference service was SERVING.

    Raises ProbeError when it is not SERVING `deadline_s` after `since`.

    One Watch stream instead of polling: it waits for the port (wait_for_ready, with a short
    reconnect backoff while the container starts) and then for the status to change.
    """
    remaining = since + deadline_s - time.time()
    options = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000)]
    with grpc.insecure_channel(target, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=READINESS_SERVICE)
        try:
            for response in stub.Watch(request, timeout=max(remaining, 0.1), wait_for_ready=True):
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.time() - since
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
    raise ProbeError(f"{target}: {READINESS_SERVICE} not SERVING within {deadline_s:.0f} s")


def newest_version(model_dir: Path) -> Path:
    versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        raise ProbeError(f"{model_dir}: no version folder")
    return max(versions, key=lambda p: int(p.name))


def reference_session(version: Path) -> tuple[ort.InferenceSession, dict[str, object]]:
    manifest = json.loads((version / "manifest.json").read_text())
    onnx_bytes = (version / "model.onnx").read_bytes()
    if hashlib.sha256(onnx_bytes).hexdigest() != manifest["files"]["model.onnx"]["sha256"]:
        raise ProbeError(f"{version}/model.onnx does not match its manifest hash")
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return session, manifest


def compare(target: str, model_dir: Path, rows: np.ndarray) -> str:
    session, manifest = reference_session(newest_version(model_dir))
    expected_p, expected_l = session.run(["probability", "label"], {"features": rows})
    answers = predict(target, rows, model=model_dir.name, timeout=30.0)
    got_p = np.array([p for p, _ in answers], dtype=np.float32)
    got_l = np.array([label for _, label in answers], dtype=np.int64)
    if got_p.shape != (len(rows),):
        raise ProbeError(f"{len(answers)} answers for {len(rows)} rows")
    worst = float(np.max(np.abs(got_p - expected_p.reshape(-1))))
    tolerance = float(manifest["parity"]["tolerance"])  # type: ignore[index]
    if not worst <= tolerance:
        raise ProbeError(f"probabilities differ by {worst:.3g} (tolerance {tolerance:g})")
    mismatched = int(np.sum(got_l != expected_l.reshape(-1)))
    if mismatched:
        raise ProbeError(f"{mismatched} of {len(rows)} labels differ from in-process ONNX Runtime")
    return f"{len(rows)} rows: max |dp| {worst:.2e} <= {tolerance:g}, labels identical"


def load_rows(path: Path, seed: int = 0) -> np.ndarray:
    with np.load(path, allow_pickle=False) as saved:
        rows = np.array(saved["features"], dtype=np.float32)
    holes = np.random.default_rng(seed).random(rows.shape) < MISSING_FRACTION
    rows[holes] = np.nan
    return rows


def check_readme_curl(readme: Path, rest: str, repository: Path) -> str:
    """Run the README's curl example against `rest` (HOST:PORT); compare with ONNX Runtime."""
    found = re.search(r"<!-- rest-example -->\s*```sh\n(.*?)```", readme.read_text(), re.S)
    if found is None:
        raise ProbeError(f"{readme}: no <!-- rest-example --> block")
    command = found.group(1).replace("localhost:8000", rest)
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise ProbeError(f"the README's curl example failed: {done.stderr.strip()[:300]}")
    try:
        outputs = {o["name"]: o["data"] for o in json.loads(done.stdout)["outputs"]}
    except (ValueError, KeyError) as err:
        raise ProbeError(f"the README's curl example got {done.stdout[:300]!r} ({err})") from None
    body = re.search(r"-d '(.*?)'", command, re.S)
    model = re.search(r"/v2/models/([^/]+)/infer", command)
    if body is None or model is None:
        raise ProbeError("the README's curl example has no /v2/models/NAME/infer or -d '...'")
    model_dir = repository / model.group(1)
    sent = json.loads(body.group(1))["inputs"][0]
    rows = np.asarray([np.nan if v is None else v for v in sent["data"]], dtype=np.float32).reshape(
        sent["shape"]
    )
    session, manifest = reference_session(newest_version(model_dir))
    expected_p, expected_l = session.run(["probability", "label"], {"features": rows})
    worst = float(np.max(np.abs(np.asarray(outputs["probability"]) - expected_p.reshape(-1))))
    tolerance = float(manifest["parity"]["tolerance"])  # type: ignore[index]
    if not worst <= tolerance or outputs["label"] != expected_l.reshape(-1).tolist():
        raise ProbeError(f"REST answered {outputs}, in-process ONNX Runtime {expected_p.tolist()}")
    return f"README curl example: {outputs}, |dp| {worst:.2e}"


def check_metrics(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    if "# TYPE" not in text:
        raise ProbeError(f"{url}: no Prometheus exposition in the answer")
    return f"{url}: {len(text.splitlines())} lines of Prometheus text"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="HOST:PORT of the published gRPC port")
    parser.add_argument("--repository", type=Path, required=True, help="the exported repository")
    parser.add_argument("--rows", type=Path, required=True, help="npz with a `features` array")
    parser.add_argument("--deadline", type=float, default=90.0, help="seconds to wait for health")
    parser.add_argument(
        "--since", type=float, help="container start (Unix time) to time readiness from"
    )
    parser.add_argument("--metrics-url", help="also check this Prometheus endpoint")
    parser.add_argument("--rest", help="HOST:PORT of the published REST port")
    parser.add_argument(
        "--readme",
        type=Path,
        default=Path("README.md"),
        help="the README whose REST curl example is run (with --rest)",
    )
    args = parser.parse_args(argv)
    try:
        since = time.time() if args.since is None else args.since
        waited = wait_until_serving(args.target, args.deadline, since)
        print(f"health: {READINESS_SERVICE} SERVING {waited:.1f} s after the container started")
        rows = load_rows(args.rows)
        for model_dir in sorted(p.parent for p in args.repository.glob("*/config.pbtxt")):
            print(f"predictions ({model_dir.name}): {compare(args.target, model_dir, rows)}")
        if args.rest:
            print(f"rest: {check_readme_curl(args.readme, args.rest, args.repository)}")
        if args.metrics_url:
            print(f"metrics: {check_metrics(args.metrics_url)}")
    except (ProbeError, grpc.RpcError, OSError, subprocess.TimeoutExpired) as err:
        print(f"container probe failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
