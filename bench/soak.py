"""Soak test (not run in CI): inference at concurrency 64 while model versions are hot-reloaded.

    python -m stablemlp.bench.soak [--model-repository REPO] [--seconds 60] [--concurrency 64]

Copies the repository (the original is never touched), serves the copy with `stablemlp serve`
(started as the benchmark starts it, in poll mode: the repository rescanned every second), and
keeps `concurrency` ModelInfer calls outstanding. Every `--reload-every` seconds the next version
is published with export's own publisher (staged, then renamed into place: version 1's files,
manifest renumbered) and found by the poller; every third publication is a damaged copy, which
must be refused while the previous version serves on. Each reply is checked against in-process
ONNX Runtime.

Reports calls, errors by status code, versions served, and the server's resident memory after the
warm-up and at the end; exits 1 if any call failed or memory grew by 10% or more. Without
--model-repository it trains and exports a small model first (needs the train extra).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from ..export.publish import publish_version
from ..protos import grpc_service_pb2 as pb
from ..protos import grpc_service_pb2_grpc as pb_grpc
from ..serving.manifest import MANIFEST_FILE, MODEL_FILE, Manifest
from .servers import ServerProcess, memory_mb, our_server_command, start_server

MAX_GROWTH = 0.10  # issue 6: RSS at the end under 1.1 x RSS after the warm-up


def rss_mb(pid: int) -> float:
    return memory_mb(pid)["rss_mb"]


def start_soak_server(repository: Path) -> ServerProcess:
    extra = ["--metrics-port", "-1", "--model-control-mode", "poll", "--repository-poll-s", "1"]
    return start_server("ours", our_server_command(repository, extra), timeout_s=120)


def publish(repository: Path, model: str, damaged: bool) -> int:
    """Version 1's files as the next version, through export's publisher; returns the version."""
    source = repository / model / "1"
    files = {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()}
    if damaged:  # one flipped byte: the sha256 no longer matches
        data = bytearray(files[MODEL_FILE])
        data[len(data) // 2] ^= 0xFF
        files[MODEL_FILE] = bytes(data)
    manifest = Manifest.read(source / MANIFEST_FILE)

    def build(version: int) -> dict[str, bytes]:
        renumbered = dataclasses.replace(manifest, version=version).to_json()
        return {**files, MANIFEST_FILE: renumbered}

    return int(publish_version(repository / model, build).name)


class Soak:
    def __init__(self, address: str, model: str, rows: np.ndarray, expected: np.ndarray) -> None:
        self.address, self.model, self.rows, self.expected = address, model, rows, expected
        self.calls = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.details: dict[str, str] = {}  # the first message of each failing code
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
                self.details.setdefault(err.code().name, (err.details() or "")[:300])
                continue
            self.calls += 1
            self.versions[reply.model_version] += 1
            names = [t.name for t in reply.outputs]
            label = np.frombuffer(reply.raw_output_contents[names.index("label")], "<i8")
            self.wrong += int(not np.array_equal(label, self.expected[index]))


async def reload_loop(soak: Soak, stub: Any, repository: Path, every: float) -> dict[str, int]:
    counts = {"published": 0, "damaged": 0, "refused_as_expected": 0}
    while True:
        try:
            await asyncio.wait_for(soak.stop.wait(), every)
            return counts
        except TimeoutError:
            pass
        damaged = counts["published"] % 3 == 1  # every third publication
        version = publish(repository, soak.model, damaged)
        counts["published"] += 1
        counts["damaged"] += damaged
        if damaged:  # the poller finds it within a second and must refuse it
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
        "first_error": soak.details,
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
        server = start_soak_server(repository)
        try:
            report = asyncio.run(run(args, repository, server.pid, server.address))
        finally:
            report_code = server.stop()
    report["server_exit_code"] = report_code
    report["refusals_logged"] = sum(": refused: " in line for line in server.lines)
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
