"""Soak test (not run in CI): inference at concurrency 64 while model versions are hot-reloaded.

    python -m stablemlp.bench.soak [--model-repository REPO] [--seconds 60] [--concurrency 64]

Copies the repository (the original is never touched), serves the copy with `stablemlp serve`
(repository polling every second), and keeps `concurrency` ModelInfer calls outstanding. Every
`--reload-every` seconds the next version is published the way export does it (a folder renamed
into place: version 1's files, manifest renumbered), found in turn by the poller or loaded through
RepositoryModelLoad; every third publication is a damaged copy, which must be refused while the
previous version serves on. Each reply is checked against in-process ONNX Runtime.

Reports calls, errors by status code, versions served, and the server's resident memory after the
warm-up and at the end; exits 1 if any call failed or memory grew by 10% or more. Without
--model-repository it trains and exports a small model first (needs the train extra).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from ..protos import grpc_service_pb2 as pb
from ..protos import grpc_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
MAX_GROWTH = 0.10  # issue 6: RSS at the end under 1.1 x RSS after the warm-up


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"no VmRSS for pid {pid}")


def start_server(repository: Path) -> tuple[subprocess.Popen[str], str, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STABLEMLP_LOG_LEVEL": "INFO"}
    command = [sys.executable, "-m", "stablemlp", "serve", "--model-repository", str(repository),
               "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
               "--repository-poll-s", "1"]  # fmt: skip
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    found: list[str] = []
    ready = threading.Event()

    def drain() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            match = re.search(r"ready: listening on (\S+)", line)
            if match:
                found.append(match.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    if not ready.wait(120) or not found:
        process.kill()
        raise RuntimeError("server did not start:\n" + "".join(lines[-20:]))
    return process, found[0], lines


def publish(repository: Path, model: str, version: int, damaged: bool) -> None:
    """Version 1 copied to `version` through a hidden folder and a rename, as export publishes."""
    staging = repository / model / f".tmp-soak-{version}"
    shutil.copytree(repository / model / "1", staging)
    manifest = json.loads((staging / "manifest.json").read_text())
    manifest["version"] = version
    (staging / "manifest.json").write_text(json.dumps(manifest))
    if damaged:  # one flipped byte: the sha256 no longer matches
        data = bytearray((staging / "model.onnx").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (staging / "model.onnx").write_bytes(bytes(data))
    staging.rename(repository / model / str(version))


class Soak:
    def __init__(self, address: str, model: str, rows: np.ndarray, expected: np.ndarray) -> None:
        self.address, self.model, self.rows, self.expected = address, model, rows, expected
        self.calls = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.wrong = 0
        self.versions: collections.Counter[str] = collections.Counter()
        self.stop = asyncio.Event()

    def request(self, index: np.ndarray) -> pb.ModelInferRequest:
        request = pb.ModelInferRequest(model_name=self.model)
        rows = self.rows[index]
        request.inputs.add(name="features", datatype="FP32", shape=rows.shape)
        request.raw_input_contents.append(np.ascontiguousarray(rows, "<f4").tobytes())
        return request

    async def client(self, stub: Any, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not self.stop.is_set():
            index = rng.choice(len(self.rows), size=int(rng.integers(1, 9)))
            try:
                reply = await stub.ModelInfer(self.request(index), timeout=30)
            except grpc.aio.AioRpcError as err:
                self.errors[err.code().name] += 1
                continue
            self.calls += 1
            self.versions[reply.model_version] += 1
            names = [t.name for t in reply.outputs]
            label = np.frombuffer(reply.raw_output_contents[names.index("label")], "<i8")
            self.wrong += int(not np.array_equal(label, self.expected[index]))


async def reload_loop(soak: Soak, stub: Any, repository: Path, every: float) -> dict[str, int]:
    counts = {"published": 0, "damaged": 0, "rpc_loads": 0, "refused_as_expected": 0}
    version = 1
    while True:
        try:
            await asyncio.wait_for(soak.stop.wait(), every)
            return counts
        except asyncio.TimeoutError:
            pass
        version += 1
        damaged = version % 3 == 0  # by RPC (odd versions) or by the poller (even ones)
        publish(repository, soak.model, version, damaged)
        counts["published"] += 1
        counts["damaged"] += damaged
        if version % 2:  # odd: ask for it; even: the poller finds it within a second
            counts["rpc_loads"] += 1
            try:
                request = pb.RepositoryModelLoadRequest(model_name=soak.model)
                await stub.RepositoryModelLoad(request, timeout=60)
            except grpc.aio.AioRpcError as err:
                if not damaged or err.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
        if damaged:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                index = await stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
                rows = {m.version: (m.state, m.reason) for m in index.models}
                if rows.get(str(version), ("", ""))[0] == "UNAVAILABLE":
                    counts["refused_as_expected"] += "sha256" in rows[str(version)][1]
                    break
                await asyncio.sleep(0.1)


async def run(args: argparse.Namespace, repository: Path, pid: int, address: str) -> dict[str, Any]:
    import onnxruntime as ort

    model = args.model
    manifest = json.loads((repository / model / "1" / "manifest.json").read_text())
    width = int(manifest["inputs"][0]["shape"][1])
    rows = np.random.default_rng(0).normal(size=(256, width)).astype(np.float32)
    session = ort.InferenceSession(str(repository / model / "1" / "model.onnx"))
    expected = session.run(["label"], {"features": rows})[0][:, 0]
    channels = [grpc.aio.insecure_channel(address) for _ in range(4)]
    stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in channels]  # type: ignore[no-untyped-call]
    soak = Soak(address, model, rows, expected)
    clients = [asyncio.create_task(soak.client(stubs[i % 4], i)) for i in range(args.concurrency)]
    reloads = asyncio.create_task(reload_loop(soak, stubs[0], repository, args.reload_every))
    started = time.monotonic()
    await asyncio.sleep(args.warmup)
    rss_start = rss_mb(pid)
    samples = [rss_start]
    while time.monotonic() - started < args.seconds:
        await asyncio.sleep(1.0)
        samples.append(rss_mb(pid))
    rss_end = rss_mb(pid)
    soak.stop.set()
    await asyncio.gather(*clients)
    counts = await reloads
    elapsed = time.monotonic() - started
    stats = await stubs[0].ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10)
    for channel in channels:
        await channel.close(None)
    return {
        "seconds": round(elapsed, 1),
        "concurrency": args.concurrency,
        "calls": soak.calls,
        "calls_per_s": round(soak.calls / elapsed, 1),
        "errors": dict(soak.errors),
        "wrong_replies": soak.wrong,
        "reloads": counts,
        "versions_served": dict(sorted(soak.versions.items(), key=lambda kv: int(kv[0]))),
        "serving_at_end": [s.version for s in stats.model_stats],
        "rss_mb_after_warmup": round(rss_start, 1),
        "rss_mb_end": round(rss_end, 1),
        "rss_mb_max": round(max(samples), 1),
        "rss_growth": round(rss_end / rss_start - 1, 4),
    }


def trained_repository(work: Path) -> Path:
    from ..export.cli import export_main
    from ..model.cli import main as train_main

    run_dir, repository = work / "run", work / "repo"
    if train_main(["--epochs", "3", "--seed", "0", "--no-progress", "--output", str(run_dir)]):
        raise RuntimeError("training failed")
    if export_main([str(run_dir), "--repository", str(repository)]):
        raise RuntimeError("export failed")
    return repository


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stablemlp.bench.soak", description=__doc__)
    parser.add_argument("--model-repository", type=Path, help="default: train and export one")
    parser.add_argument("--model", default="breast_cancer")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--reload-every", type=float, default=3.0, help="seconds")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before RSS at start")
    parser.add_argument("--output", type=Path, help="also write the report (JSON) here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="stablemlp-soak-") as tmp:
        work = Path(tmp)
        source = args.model_repository or trained_repository(work)
        repository = Path(shutil.copytree(source, work / "soak-repo"))
        for extra in sorted((repository / args.model).iterdir()):  # serve version 1 only
            if extra.name != "1" and extra.is_dir():
                shutil.rmtree(extra)
        process, address, lines = start_server(repository)
        try:
            report = asyncio.run(run(args, repository, process.pid, address))
        finally:
            process.send_signal(signal.SIGTERM)
            report_code = process.wait(timeout=60)
    report["server_exit_code"] = report_code
    refusals = ("failed: FAILED_PRECONDITION", ": refused: ")
    report["refusals_logged"] = sum(any(r in line for r in refusals) for line in lines)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    ok = not report["errors"] and not report["wrong_replies"] and report["rss_growth"] < MAX_GROWTH
    print(f"soak {'passed' if ok else 'FAILED'}: {report['calls']} calls, errors "
          f"{report['errors'] or 0}, RSS {report['rss_mb_after_warmup']} -> "
          f"{report['rss_mb_end']} MB ({report['rss_growth']:+.1%})")  # fmt: skip
    return 0 if ok and report_code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
