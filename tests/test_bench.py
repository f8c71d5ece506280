"""bench/: the maths unit-tested; a smoke run of `stablemlp bench` against real servers; the
transport floor under perf_analyzer when Triton's client environment exists."""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from stablemlp.bench import stats
from stablemlp.bench.cli import is_loopback
from stablemlp.bench.cli import main as bench_main
from stablemlp.bench.perfanalyzer import find_wrapper, parse_csv, run_perf_analyzer
from stablemlp.bench.report import targets
from stablemlp.bench.servers import child_env, floor_server_command, start_server
from stablemlp.protos import grpc_service_pb2 as pb
from stablemlp.protos import grpc_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
WIDE = "breast_cancer_wide"
TRAIN_TIMEOUT_S = 300.0


# --- unit: the arithmetic ----------------------------------------------------------------------


@pytest.mark.parametrize("q", [0, 1, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(q: float) -> None:
    values = np.random.default_rng(1).exponential(size=101).tolist()
    assert stats.percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_percentile_edges() -> None:
    assert math.isnan(stats.percentile([], 50))
    assert stats.percentile([7.0], 99) == 7.0
    assert stats.percentile([1.0, 3.0], 50) == 2.0


def test_measurement_turns_cpu_into_cores_and_per_request() -> None:
    figures = stats.measurement(
        [1000, 2000, 3000], 1500.0, batch=4, window_s=2.0, server_cpu_s=1.5, client_cpu_s=0.5
    )
    assert figures["inferences_per_s"] == 6000.0
    assert figures["p50_us"] == 2.0
    assert figures["server_cpu_cores"] == 0.75
    assert figures["server_cpu_us_per_request"] == pytest.approx(1.5 / 3000 * 1e6)
    assert figures["client_cpu_cores"] == 0.25
    assert "server_cpu_cores" not in stats.measurement([1], 1.0, 1, 1.0, None, 0.0)


def test_medians_and_ratios() -> None:
    repeats = [
        {"requests_per_s": 10.0, "p50_us": 5.0},
        {"requests_per_s": 30.0, "p50_us": 1.0},
        {"requests_per_s": 20.0, "p50_us": 3.0, "extra": 1.0},
    ]
    median = stats.median_figures(repeats)
    assert median == {"requests_per_s": 20.0, "p50_us": 3.0}
    assert stats.ratios(median, {"requests_per_s": 40.0, "p50_us": 2.0, "errors": 0.0}) == {
        "requests_per_s": 0.5,
        "p50_us": 1.5,
    }
    assert stats.ratio(1.0, 0.0) is None
    assert stats.ratio(None, 1.0) is None
    assert stats.ratio(math.nan, 1.0) is None


def test_paired_ratios_cancel_drift_between_repeats() -> None:
    # The machine slows down 2x between repeats; within each repeat ours is half the floor.
    floor = [{"requests_per_s": 1000.0}, {"requests_per_s": 500.0}, {"requests_per_s": 800.0}]
    ours = [{"requests_per_s": 500.0}, {"requests_per_s": 250.0}, {"requests_per_s": 440.0}]
    assert stats.paired_ratios(ours, floor) == {"requests_per_s": 0.5}
    assert stats.ratio_range(ours, floor, "requests_per_s") == [0.5, 0.55]
    assert stats.ratio_range(ours, floor, "p50_us") == []


def test_phase_means_per_request() -> None:
    before = {"success": (10, 10_000), "queue": (10, 1_000), "compute_infer": (0, 0)}
    after = {"success": (30, 50_000), "queue": (30, 3_000), "compute_infer": (0, 0)}
    assert stats.phase_means_us(before, after) == {"server_success_us": 2.0, "server_queue_us": 0.1}
    assert stats.phase_means_us(after, after) == {}  # nothing counted: a server without stats


@pytest.mark.parametrize(
    ("address", "ok"),
    [
        ("127.0.0.1:8001", True),
        ("localhost:1", True),
        ("[::1]:9", True),
        ("10.0.0.1:8001", False),
        ("example.com:80", False),
    ],
)
def test_only_loopback_servers(address: str, ok: bool) -> None:
    assert is_loopback(address) is ok


def test_targets_compare_ratios_with_issue_figures() -> None:
    def cell(batch: int, conc: int, rps: float, p50: float) -> dict[str, Any]:
        return {
            "model": "m",
            "form": "raw_input_contents",
            "batch": batch,
            "concurrency": conc,
            "vs_transport_floor": {"requests_per_s": rps, "p50_us": p50},
        }

    rows = targets(
        [cell(1, 1, 0.5, 1.1), cell(1, 8, 0.9, 2.0), cell(64, 8, 0.8, 2.0), cell(1, 32, 0.1, 9)],
        {"seconds_to_serving_median": 0.5, "idle_rss_mb": None},
    )
    assert [r["met"] for r in rows] == [True, True, False, True, None]


def test_parse_perf_analyzer_csv(tmp_path: Path) -> None:
    path = tmp_path / "pa.csv"
    path.write_text(
        "Concurrency,Inferences/Second,Client Send,Client Recv,p50 latency,p90 latency,"
        "p95 latency,p99 latency\n8,6400.5,0,0,890,1327,1505,2457\n"
    )
    figures = parse_csv(path, batch=64)
    assert figures["inferences_per_s"] == 6400.5
    assert figures["requests_per_s"] == pytest.approx(100.0078125)
    assert (figures["p50_us"], figures["p90_us"], figures["p99_us"]) == (890, 1327, 2457)


# --- integration: a smoke run against real servers ---------------------------------------------


@pytest.fixture(scope="module")
def bench_repository(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's repository plus a 256-wide model (one epoch: its weights do not matter)."""
    root = tmp_path_factory.mktemp("bench")
    repository = root / "repo"
    shutil.copytree(model_repository, repository)
    run = root / "wide-run"
    for command in (
        [
            "train",
            "--epochs",
            "1",
            "--seed",
            "0",
            "--no-progress",
            "--hidden",
            "256,256,256",
            "--name",
            WIDE,
            "--output",
            str(run),
        ],
        ["export", str(run), "--repository", str(repository)],
    ):
        subprocess.run(
            [sys.executable, "-m", "stablemlp", *command],
            env=child_env(),
            check=True,
            capture_output=True,
            timeout=TRAIN_TIMEOUT_S,
        )
    return repository


@pytest.mark.slow
def test_smoke_run_writes_a_complete_report(bench_repository: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["--model-repository", str(bench_repository), "--smoke", "--output", str(out)]
    assert bench_main([*argv, "--rest"]) == 0

    doc = json.loads((out / "bench.json").read_text())
    assert doc["format"] == "stablemlp.bench/1" and doc["smoke"] is True
    assert doc["models"] == {"main": "breast_cancer", "wide": WIDE}
    shapes = {(c["model"], c["form"], c["batch"], c["concurrency"]) for c in doc["cells"]}
    for form in ("fp32_contents", "raw_input_contents"):
        for batch, conc in ((1, 1), (1, 8), (1, 32), (64, 8)):
            assert ("breast_cancer", form, batch, conc) in shapes
        assert {(WIDE, form, 1, 1), (WIDE, form, 1, 8)} <= shapes
    for cell in doc["cells"]:
        for who in ("ours", "transport_floor"):
            figures = cell[who]
            assert figures["requests_per_s"] > 0, (cell["model"], who)
            assert 0 < figures["p50_us"] <= figures["p90_us"] <= figures["p99_us"]
            assert figures["errors"] == 0
            assert figures["rss_mb"] > 0 and "server_cpu_cores" in figures
        assert cell["ours"]["server_success_us"] > 0  # our server's own ModelStatistics
        assert "server_success_us" not in cell["transport_floor"]  # the floor counts nothing
        assert cell["vs_transport_floor"]["requests_per_s"] > 0
        assert cell["model_floor"]["requests_per_s"] > 0 and cell["model_floor"]["errors"] == 0
        assert cell["vs_model_floor"]["requests_per_s"] > 0
        assert len(cell["vs_transport_floor_range"]["requests_per_s"]) == 2
        assert len(cell["ours_repeats"]) == len(cell["transport_floor_repeats"]) == 1
    assert {(f["model"], f["batch"]) for f in doc["compute_floor"]} == {
        ("breast_cancer", 1),
        ("breast_cancer", 64),
        (WIDE, 1),
    }
    assert all(f["p50_us"] > 0 for f in doc["compute_floor"])
    startup = doc["startup"]
    assert startup["torch_imported"] is False
    assert 0 < startup["seconds_to_serving_median"] < 60 and startup["idle_rss_mb"] > 0
    assert [t["met"] is not None for t in doc["targets"]] == [True] * len(doc["targets"])
    assert doc["perf_analyzer"]["cells"] == []  # a smoke run leaves it out unless asked
    assert doc["settings"]["pinned"] is None  # --pin not given

    rest = {(c["batch"], c["protocol"], c["form"]): c for c in doc["rest"]["cells"]}
    for batch in (1, 64):  # our REST (JSON, binary) beside our gRPC, in the same run
        for key in (("http", "json"), ("http", "binary"), ("grpc", "raw")):
            assert rest[(batch, *key)]["requests_per_s"] > 0, (batch, key)
            assert (
                rest[(batch, *key)]["concurrency"] == 8 and rest[(batch, *key)]["target"] == "ours"
            )

    text = (out / "bench.md").read_text()
    assert "## REST beside gRPC" in text
    assert "Placement: unpinned" in text and "## The model floor" in text
    assert "## Targets (issue 5)" in text and "| breast_cancer_wide | raw | 1 | 8 |" in text
    if doc["plot"]:
        assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_bench_refuses_an_unknown_model(model_repository: Path, tmp_path: Path) -> None:
    argv = [
        "--model-repository",
        str(model_repository),
        "--model",
        "nope",
        "--smoke",
        "--output",
        str(tmp_path),
    ]
    assert bench_main(argv) == 1
    assert not (tmp_path / "bench.json").exists()


TRITON_VENV = Path(os.environ.get("STABLEMLP_TRITON_VENV", ROOT / ".venv-triton"))


@pytest.mark.slow
@pytest.mark.skipif(find_wrapper(TRITON_VENV) is None, reason="no perf_analyzer environment")
def test_perf_analyzer_drives_the_transport_floor(model_repository: Path, tmp_path: Path) -> None:
    wrapper = find_wrapper(TRITON_VENV)
    assert wrapper is not None
    floor = start_server("transport_floor", floor_server_command(model_repository))
    try:
        figures = run_perf_analyzer(
            wrapper, floor.address, "breast_cancer", 1, 1, tmp_path, 300, timeout_s=60
        )
    finally:
        assert floor.stop() == 0
    assert figures is not None and figures["inferences_per_s"] > 0 and figures["p99_us"] > 0


@pytest.mark.slow
def test_the_model_floor_runs_the_model_on_every_request(model_repository: Path) -> None:
    """It answers like the transport floor but counts a session.run per request, in both forms."""
    from stablemlp.bench.grid import build_request, make_rows

    server = start_server("model_floor", floor_server_command(model_repository, run_model=True))
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
            for form, rows in (("raw_input_contents", 1), ("fp32_contents", 64)):
                request = build_request("breast_cancer", "features", make_rows(rows, 30), form)
                reply = stub.ModelInfer(request, timeout=10)
                assert [list(o.shape) for o in reply.outputs] == [[rows, 1], [rows, 1]]
            stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="breast_cancer"))
    finally:
        assert server.stop() == 0
    assert (stats.model_stats[0].execution_count, stats.model_stats[0].inference_count) == (2, 65)


def test_server_cpu_and_memory_include_worker_processes() -> None:
    """A `--workers N` supervisor's figures must count its server processes too (they were
    read from the supervisor's PID alone, so 2-worker runs showed ~0 CPU)."""
    from stablemlp.bench.servers import memory_mb, process_tree

    child_code = "import sys, time; x = bytearray(60_000_000); print(flush=True); time.sleep(30)"
    parent_code = (
        "import subprocess, sys; "
        f"c = subprocess.Popen([sys.executable, '-c', {child_code!r}], stdout=sys.stdout); "
        "c.wait()"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        parent.stdout.readline()  # the child has allocated its memory
        tree = process_tree(parent.pid)
        assert len(tree) == 2 and tree[0] == parent.pid
        assert memory_mb(parent.pid)["rss_mb"] > 60
    finally:
        for pid in reversed(process_tree(parent.pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        parent.wait(timeout=10)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="--pin needs 2 cores")
def test_pin_binds_every_thread_of_a_process_tree() -> None:
    """--pin: the server side's threads (a worker's too) all on one half of the cores."""
    from stablemlp.bench.servers import pin, process_tree, split_cores

    server_cores, load_cores = split_cores()
    assert server_cores and load_cores and not server_cores & load_cores
    code = (
        "import subprocess, sys, threading, time; "
        "threading.Thread(target=time.sleep, args=(30,), daemon=True).start(); "
        "c = subprocess.Popen([sys.executable, '-c', 'import time; print(flush=True); "
        "time.sleep(30)'], stdout=sys.stdout); c.wait()"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None and parent.stdout.readline() == b"\n"  # child is up
        pin(parent.pid, server_cores)
        threads = [
            int(task.rsplit("/", 1)[1])
            for member in process_tree(parent.pid)
            for task in glob.glob(f"/proc/{member}/task/*")
        ]
        assert len(threads) >= 3  # parent, its thread, the child
        assert all(os.sched_getaffinity(tid) == server_cores for tid in threads)
    finally:
        for member in reversed(process_tree(parent.pid)):
            os.kill(member, signal.SIGKILL)
        parent.wait(timeout=10)
