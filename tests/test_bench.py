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

from stablemlp.bench.cli import main as bench_main
from stablemlp.bench.peers.environments import (
    PEERS,
    parse_peers,
    requirements,
    write_kserve,
    write_mlserver,
    write_peer,
)
from stablemlp.bench.profile import TRANSPORT, cpu_by_thread, layer_shares
from stablemlp.bench.servers import (
    child_env,
    floor_server_command,
    is_loopback,
    spawn_server,
    start_server,
)
from stablemlp.bench.speed import stats
from stablemlp.bench.speed.grid import Cell, build_grid, is_peer_cell
from stablemlp.bench.speed.loadgen import LoadGenerator, LoadSpec, inband_error
from stablemlp.bench.speed.markdown import markdown
from stablemlp.bench.speed.perfanalyzer import find_wrapper, parse_csv, run_perf_analyzer
from stablemlp.bench.speed.report import targets
from stablemlp.bench.speed.scaling import parse_counts, placement
from stablemlp.protos import grpc_service_pb2 as pb
from stablemlp.protos import grpc_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
WIDE = "breast_cancer_wide"
TEXT = "penguins"  # a model with text columns (issue 13)
TRAIN_TIMEOUT_S = 300.0


# --- unit: the arithmetic ----------------------------------------------------------------------


@pytest.mark.parametrize("q", [0, 1, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(q: float) -> None:
    values = np.random.default_rng(1).exponential(size=101).tolist()
    assert stats.percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_a_stopped_servers_log_holds_every_line_it_wrote() -> None:
    """stop() returns once the reader has reached the end of the output: a process that exits
    with 64 KB still in the pipe had its last lines missing from log() (a test checking a log line
    after the server stopped failed under load)."""
    lines = 50_000  # 100 KB: more than a pipe holds, so the reader is behind when it exits
    command = [sys.executable, "-c", f"import sys; sys.stdout.write('x\\n' * {lines})"]
    server = spawn_server("writer", command)
    assert server.process.wait(timeout=30) == 0  # it wrote everything and exited
    assert server.stop() == 0
    assert server.log().count("x\n") == lines


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


def test_targets_hold_server_cpu_per_request_against_the_floor() -> None:
    """Issue 25: CPU per request / the floor's at b1 c8 and b64 c8, when both were read."""
    vs = {"requests_per_s": 0.9, "p50_us": 1.0}
    cells = [
        {"model": "m", "form": "raw_input_contents", "batch": b, "concurrency": 8,
         "vs_transport_floor": {**vs, "server_cpu_us_per_request": cpu}}
        for b, cpu in ((1, 1.25), (64, 1.66))
    ]  # fmt: skip
    rows = [r for r in targets(cells, {}) if r["name"].startswith("server CPU")]
    assert [(r["measured"], r["limit"], r["comparison"], r["met"]) for r in rows] == [
        (1.25, 1.3, "<=", True),
        (1.66, 1.3, "<=", False),
    ]


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


# --- unit: issue 14's plumbing (streams, peers, costs, worker scaling) ------------------------


@pytest.mark.parametrize("text", ["bad input", "x" * 300])  # a 1- and a 2-byte varint length
def test_inband_error_is_read_without_parsing(text: str) -> None:
    failed = pb.ModelStreamInferResponse(error_message=text).SerializeToString()
    answered = pb.ModelStreamInferResponse(
        infer_response=pb.ModelInferResponse(model_name="m", id="r1")
    ).SerializeToString()
    assert inband_error(failed) == text
    assert inband_error(answered) == ""
    assert inband_error(b"") == ""


def test_the_grid_has_stream_cells_read_against_unary_cells() -> None:
    cells = build_grid("m", "w")
    keys = {c.key for c in cells}
    streams = [c for c in cells if c.streams]
    assert [(c.streams, c.depth, c.concurrency, c.batch) for c in streams] == [
        (8, 1, 8, 1),
        (1, 8, 8, 1),
    ]
    assert all(c.unary().key in keys and c.key not in {u.key for u in cells if not u.streams}
               for c in streams)  # fmt: skip
    assert streams[0].key == "m/raw_input_contents/b1/c8/stream8x1"
    peer_cells = [(c.batch, c.concurrency) for c in cells if is_peer_cell(c, "m")]
    assert peer_cells == [(1, 1), (1, 8), (1, 32), (64, 8)]


def _figures(rps: float, cpu: float = 0.2, rss: float = 100.0) -> dict[str, float]:
    return {"requests_per_s": rps, "p50_us": 1e6 / rps, "p99_us": 2e6 / rps,
            "server_cpu_s_per_1000": cpu, "rss_mb": rss}  # fmt: skip


def test_stream_and_peer_documents_pair_repeats() -> None:
    unary, stream = Cell("m", "raw_input_contents", 1, 8), Cell("m", "raw_input_contents", 1, 8, 8)
    base = {"ours": [_figures(900), _figures(450)], "model_floor": [_figures(800)] * 2}
    grid = {
        unary.key: {**base, "transport_floor": [_figures(1000), _figures(500)],
                    "kserve": [_figures(300), _figures(150)]},
        stream.key: {**base, "transport_floor": [_figures(4000)] * 2,
                     "ours": [_figures(2000), _figures(1100)]},
    }  # fmt: skip
    compute = {("m", 1): _figures(50_000)}
    plain, streamed = stats.cell_documents([unary, stream], grid, compute)
    assert streamed["streams"] == 8 and "peers" not in streamed
    assert streamed["vs_unary_transport_floor"]["requests_per_s"] == pytest.approx(2.1)
    assert streamed["vs_unary_transport_floor_range"]["requests_per_s"] == [2.0, 2.2]
    assert streamed["vs_transport_floor"]["requests_per_s"] == pytest.approx(0.3875)
    assert "vs_unary_transport_floor" not in plain
    assert plain["peers"]["kserve"]["ours_vs_peer"]["requests_per_s"] == pytest.approx(3.0)
    assert plain["peers"]["kserve"]["figures"]["requests_per_s"] == 225
    rows = targets([plain, streamed], {})
    (stream_target,) = [r for r in rows if "stream" in r["name"]]
    assert (stream_target["limit"], stream_target["met"]) == (2.0, True)


def test_markdown_reports_streams_peers_and_costs() -> None:
    unary, stream = Cell("m", "raw_input_contents", 1, 8), Cell("m", "raw_input_contents", 1, 8, 1)
    runs = {"ours": [_figures(900, 0.3, 110)], "transport_floor": [_figures(1000, 0.1, 60)],
            "model_floor": [_figures(800)]}  # fmt: skip
    grid = {unary.key: {**runs, "mlserver": [_figures(200, 1.5, 400)]}, stream.key: runs}
    cells = stats.cell_documents([unary, stream], grid, {("m", 1): _figures(50_000)})
    doc = {
        "created_utc": "now", "smoke": True, "machine": {"cores": 2, "load_average_start": [],
        "load_average_end": []}, "startup": {}, "compute_floor": [], "plot": None,
        "settings": {"repeats": 1, "window_s": 1, "warmup_s": 0, "client_processes": 1},
        "perf_analyzer": {"note": "absent", "cells": []}, "cells": cells,
        "targets": targets(cells, {}),
        "peers": {"mlserver": {"versions": {"mlserver": "1.7.1"}, "note": "n",
                               "seconds_to_ready": 2, "idle_rss_mb": 300},
                  "kserve": {"requirements": ["kserve==0.21.0"],
                             "error": "pip install failed (1):\nno network"}},
    }  # fmt: skip
    text = markdown(doc)
    assert "| 1 x 8 | 900 | 1,000 | 0.90 (0.90..0.90) | 1,000 | 0.90 |" in text
    assert "| mlserver | 1 | 8 | 900 | 200 | 4.50 (4.50..4.50) |" in text
    assert "| m | raw | 1 | 8 | 0.300 / 110 | 0.100 / 60 | 0.200 / 100 | 1.500 / 400 |" in text
    assert "**kserve**: NOT measured: pip install failed (1):" in text
    assert "**mlserver** (mlserver 1.7.1)" in text


def test_peers_are_named_and_pinned() -> None:
    assert [p.name for p in parse_peers("mlserver, kserve,mlserver")] == ["mlserver", "kserve"]
    with pytest.raises(ValueError, match="known: kserve, mlserver, mlserver-inline"):
        parse_peers("kserve,triton")
    for peer in PEERS.values():
        pins = requirements(peer)
        assert pins[0].startswith(f"{peer.distribution}==") and pins[1].startswith("onnxruntime==")
    assert bench_main(["--peers", "nope", "--output", "unused"]) == 2


def test_a_peer_that_cannot_be_installed_is_reported_with_the_reason(tmp_path: Path) -> None:
    from stablemlp.bench.speed.lineup import install_peers

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # the venv would go below a file: `python -m venv` fails at once
    venvs, failed = install_peers([PEERS["kserve"]], blocker)
    assert venvs == {} and failed["kserve"]["requirements"][0] == "kserve==0.21.0"
    assert failed["kserve"]["error"].startswith("kserve: venv failed")


def test_peer_files_bind_loopback_and_serve_the_onnx_file(tmp_path: Path) -> None:
    """What a peer runs, written without installing it: the glue (it must compile), the
    settings (127.0.0.1, free ports), the command."""
    onnx, venv = tmp_path / "repo" / "m" / "1" / "model.onnx", tmp_path / "venv"
    kserve = write_kserve(tmp_path / "kserve", venv, "m", onnx, 50_001)
    assert kserve[:3] == [
        str(venv / "bin" / "python"),
        "-I",
        str(tmp_path / "kserve" / "peer_kserve.py"),
    ]
    args = dict(zip(kserve[3::2], kserve[4::2], strict=True))
    assert args["--model_name"] == "m" and args["--model-path"] == str(onnx)
    assert args["--grpc_port"] == "50001" and args["--enable_latency_logging"] == "false"
    mlserver = write_peer(PEERS["mlserver-inline"], tmp_path / "mls", venv, "m", onnx, 50_002)
    assert mlserver == [str(venv / "bin" / "mlserver"), "start", str(tmp_path / "mls")]
    settings = json.loads((tmp_path / "mls" / "settings.json").read_text())
    assert settings["host"] == "127.0.0.1" and settings["grpc_port"] == 50_002
    assert settings["parallel_workers"] == 0  # the variant's one setting; mlserver: the default
    write_mlserver(tmp_path / "default", venv, "m", onnx, 50_003)
    assert "parallel_workers" not in json.loads(
        (tmp_path / "default" / "settings.json").read_text()
    )
    ports = {settings[k] for k in ("grpc_port", "http_port", "metrics_port")}
    assert len(ports) == 3 and all(isinstance(p, int) and p > 0 for p in ports)
    model = json.loads((tmp_path / "mls" / "m" / "model-settings.json").read_text())
    assert model == {"name": "m", "implementation": "peer_mlserver.OnnxModel",
                     "parameters": {"uri": str(onnx)}}  # fmt: skip
    for glue in (
        tmp_path / "kserve" / "peer_kserve.py",
        tmp_path / "mls" / "m" / "peer_mlserver.py",
    ):
        compile(glue.read_text(), str(glue), "exec")  # the peer imports it; we only compile it


def test_worker_scaling_counts_and_placement() -> None:
    assert parse_counts("8,1,2,4,2") == [1, 2, 4, 8]
    for bad in ("", "0,1", "one"):
        with pytest.raises(ValueError, match="--workers-scaling"):
            parse_counts(bad)
    servers, load = placement(range(16), [1, 2, 4, 8])
    assert servers == {1: {0}, 2: {0, 1}, 4: {0, 1, 2, 3}, 8: set(range(8))}
    assert load == set(range(8, 16))
    with pytest.raises(ValueError, match="needs more than 2 cores, found 2"):
        placement([0, 1], [1, 2])


# --- integration: a smoke run against real servers ---------------------------------------------


@pytest.fixture(scope="module")
def bench_repository(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's repository plus a 256-wide model and a model with text columns (one or
    two epochs: their weights do not matter)."""
    from stablemlp.bench.quality import penguins_csv

    root = tmp_path_factory.mktemp("bench")
    repository = root / "repo"
    shutil.copytree(model_repository, repository)
    wide, text = root / "wide-run", root / "text-run"
    penguins = ["--csv", str(penguins_csv(root)), "--target", "sex", "--name", TEXT]
    for command in (
        ["train", "--epochs", "1", "--seed", "0", "--no-progress", "--hidden", "256,256,256",
         "--name", WIDE, "--output", str(wide)],
        ["export", str(wide), "--repository", str(repository)],
        ["train", "--epochs", "2", "--no-progress", *penguins, "--output", str(text)],
        ["export", str(text), "--repository", str(repository)],
    ):  # fmt: skip
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
    argv = ["--model-repository", str(bench_repository), "--smoke", "--output", str(out), "--rest"]
    assert bench_main(argv) == 0

    doc = json.loads((out / "bench.json").read_text())
    assert doc["format"] == "stablemlp.bench/1" and doc["smoke"] is True
    assert doc["models"] == {"main": "breast_cancer", "wide": WIDE, "text": TEXT}
    shapes = {(c["model"], c["form"], c["batch"], c["concurrency"]) for c in doc["cells"]}
    for form in ("fp32_contents", "raw_input_contents"):
        for batch, conc in ((1, 1), (1, 8), (1, 32), (64, 8)):
            assert ("breast_cancer", form, batch, conc) in shapes
        assert {(WIDE, form, 1, 1), (WIDE, form, 1, 8)} <= shapes
    assert {(TEXT, "raw_input_contents", 1, 8), (TEXT, "raw_input_contents", 64, 8)} <= shapes
    streams = [c for c in doc["cells"] if c["streams"]]
    assert [(c["streams"], c["concurrency"]) for c in streams] == [(8, 8), (1, 8)]
    for cell in streams:
        assert cell["form"] == "raw_input_contents" and cell["batch"] == 1
        assert cell["vs_unary_transport_floor"]["requests_per_s"] > 0
        assert cell["unary_transport_floor"]["requests_per_s"] > 0
    for cell in doc["cells"]:
        assert cell["ours"]["server_cpu_s_per_1000"] > 0 and "peers" not in cell
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
        (TEXT, 1),
        (TEXT, 64),
    }
    assert all(f["p50_us"] > 0 for f in doc["compute_floor"])
    startup = doc["startup"]
    assert startup["torch_imported"] is False
    assert 0 < startup["seconds_to_serving_median"] < 60 and startup["idle_rss_mb"] > 0
    assert [t["met"] is not None for t in doc["targets"]] == [True] * len(doc["targets"])
    assert doc["perf_analyzer"]["cells"] == []  # a smoke run leaves it out unless asked
    assert doc["perf_analyzer_streaming"]["cells"] == [] and doc["peers"] == {}
    assert doc["command"] == ["stablemlp", "bench", *argv]
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
    assert "## Targets (issues 5 and 14)" in text and "| breast_cancer_wide | raw | 1 | 8 |" in text
    assert "## Streaming lane" in text and "| breast_cancer | raw, 8 streams x 1 | 1 | 8 |" in text
    assert "## Cost: server CPU-seconds per 1,000 requests" in text
    if doc["plot"]:
        assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"


@pytest.mark.slow
def test_stream_load_counts_replies_and_inband_errors(model_repository: Path, server: Any) -> None:
    """The load generator's streaming mode: replies from the transport floor's stream counted in
    the window; our server's in-band failures counted as errors with their message."""
    good = _numbers_request(1, 30, "raw_input_contents")
    bad = _numbers_request(1, 5, "raw_input_contents")
    floor = start_server("transport_floor", floor_server_command(model_repository))
    try:
        with LoadGenerator(1) as generator:

            def spec(address: str, payload: bytes, streams: int) -> LoadSpec:
                return LoadSpec(address, STREAM_METHOD, payload, 4, 1, 0.05, 0.3, 100_000,
                                streams=streams)  # fmt: skip

            answered = generator.run(spec(floor.address, good.SerializeToString(), 2))
            failed = generator.run(spec(server.address, bad.SerializeToString(), 1))
    finally:
        assert floor.stop() == 0
    assert answered.errors == 0 and answered.requests_per_s > 0 and answered.latencies_ns
    assert failed.errors > 0 and not failed.latencies_ns
    assert "shape[1]: got 5, expected 30" in failed.first_error


@pytest.mark.slow
def test_worker_scaling_plumbing_at_one_and_two_workers(
    model_repository: Path, tmp_path: Path
) -> None:
    """--workers-scaling on this machine: the plumbing at 1 and 2 workers (the figures need a
    machine with the cores, scripts/workers_scaling.sh)."""
    argv = ["--workers-scaling", "2,1", "--smoke", "--model-repository", str(model_repository),
            "--output", str(tmp_path)]  # fmt: skip
    assert bench_main(argv) == 0
    doc = json.loads((tmp_path / "scaling.json").read_text())
    assert doc["settings"]["worker_counts"] == [1, 2] and doc["settings"]["pinned"] is None
    shapes = [(c["batch"], c["concurrency"], c["workers"]) for c in doc["cells"]]
    assert shapes == [(1, 64, 1), (1, 64, 2), (64, 16, 1), (64, 16, 2)]
    for cell in doc["cells"]:
        assert cell["figures"]["requests_per_s"] > 0 and cell["figures"]["errors"] == 0
        assert cell["figures"]["server_cpu_s_per_1000"] > 0
    assert doc["cells"][0]["vs_fewest_workers"]["requests_per_s"] == 1.0
    assert "| 64 | 16 | 2 |" in (tmp_path / "scaling.md").read_text()


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
@pytest.mark.skipif(find_wrapper(TRITON_VENV) is None, reason="no perf_analyzer environment")
def test_perf_analyzer_streams_to_our_server(server: Any, tmp_path: Path) -> None:
    """Triton's own client through ModelStreamInfer (it matches replies by request id)."""
    wrapper = find_wrapper(TRITON_VENV)
    assert wrapper is not None
    figures = run_perf_analyzer(wrapper, server.address, "breast_cancer", 1, 2, tmp_path, 300,
                                timeout_s=60, streaming=True)  # fmt: skip
    assert figures is not None and figures["inferences_per_s"] > 0 and figures["p99_us"] > 0


@pytest.mark.slow
def test_the_model_floor_runs_the_model_on_every_request(model_repository: Path) -> None:
    """It answers like the transport floor but counts a session.run per request, in both forms."""
    server = start_server("model_floor", floor_server_command(model_repository, run_model=True))
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
            for form, rows in (("raw_input_contents", 1), ("fp32_contents", 64)):
                request = _numbers_request(rows, 30, form)
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


def _numbers_request(rows: int, width: int, form: str) -> Any:
    from stablemlp.bench.speed.payloads import build_request, make_feeds

    manifest = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, width]}]}
    return build_request("breast_cancer", manifest, make_feeds(manifest, rows), form)


@pytest.mark.parametrize("form", ["raw_input_contents", "fp32_contents"])
def test_payloads_carry_numbers_and_text_both_ways(form: str) -> None:
    """A text model's bench rows: numbers, and text from the vocabulary plus an unseen and a
    missing value; the request decodes back to the same feeds (what the model floor runs)."""
    from stablemlp.bench.speed.payloads import build_request, feeds_of, make_feeds

    manifest = {
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 3]},
                   {"name": "island", "datatype": "BYTES", "shape": [-1, 1]}],
        "columns": [{"name": "island", "kind": "categorical", "categories": ["Biscoe", "Dream"]}],
    }  # fmt: skip
    feeds = make_feeds(manifest, 64)
    assert set(feeds["island"].ravel()) == {"Biscoe", "Dream", "never seen", ""}
    back = feeds_of(build_request("penguins", manifest, feeds, form))
    np.testing.assert_array_equal(back["features"], feeds["features"])
    assert back["island"].tolist() == feeds["island"].tolist()


def test_versus_runs_an_earlier_checkout_as_it_was(tmp_path: Path) -> None:
    from stablemlp.bench.versus import earlier_command

    (tmp_path / "serving").mkdir()
    (tmp_path / "serving" / "__main__.py").write_text("")  # a release before the package
    command, env = earlier_command(tmp_path, Path("repo"))
    assert command[1:5] == ["-P", "-m", "serving", "serve"] and env == {"PYTHONPATH": str(tmp_path)}
    assert earlier_command(ROOT, Path("repo"))[0][3] == "stablemlp"


def test_versus_reads_a_variant_against_this_build_repeat_by_repeat() -> None:
    from stablemlp.bench.versus import CELLS, _cells, _variant_rows

    assert _cells([]) == CELLS
    cell = ("raw", 1, 8)
    assert _cells(["raw,1,8"]) == (cell,)
    rps = {("after", cell): [100.0, 200.0, 300.0], ("nobatch", cell): [110.0, 180.0, 330.0]}
    cpu = {("after", cell): [400.0, 500.0, 600.0], ("nobatch", cell): [360.0, 500.0, 480.0]}
    assert _variant_rows([cell], ["nobatch"], rps, cpu) == [
        ["raw b1 c8", "nobatch", "1.10 (0.90..1.10)", "480", "0.90 (0.80..1.00)"]
    ]


def _versus_argv(model_repository: Path, *extra: str, window_s: str = "0.2") -> list[str]:
    """versus against this checkout as its own "before", one short repeat."""
    return ["--model-repository", str(model_repository), "--before", str(ROOT), "--repeats", "1",
            "--warmup-s", "0.05", "--window-s", window_s, *extra]  # fmt: skip


@pytest.mark.slow
def test_versus_interleaves_two_builds_and_the_floor(
    model_repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from stablemlp.bench.versus import CELLS
    from stablemlp.bench.versus import main as versus_main

    assert versus_main(_versus_argv(model_repository)) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| raw")]
    raw_cells = len([c for c in CELLS if c[0] == "raw"])
    main_rows = [row for row in rows if len(row.split("|")) == 8]
    assert len(main_rows) == raw_cells
    # then the requests each session.run answered, for every server that runs the model
    head = [f"requests per run: {name}" for name in ("before", "after", "model_floor")]
    assert f"| cell | {' | '.join(head)} |" in out
    per_run = [row.split("|")[2:5] for row in rows if len(row.split("|")) == 6]
    assert len(per_run) == raw_cells
    for cells in per_run:
        medians = [float(cell.split()[0]) for cell in cells]  # "1.00 (1.00..1.00)"
        assert all(m >= 1.0 for m in medians) and medians[2] == 1.0  # the model floor: 1 each


# --- unit: issue 25's profile (bench/profile.py) ------------------------------------------------


def test_profile_charges_a_sample_to_its_innermost_layer_of_ours() -> None:
    loop = "thread (7): MainThread;main (stablemlp/cli.py:1);Runner.run (asyncio/runners.py:118)"
    folded = "\n".join([
        f"{loop};unary (stablemlp/serving/grpc/boundary.py:105);"
        "decode (stablemlp/serving/codec.py:196);_any (numpy/core/_methods.py:58) 3",
        f"{loop};unary (stablemlp/serving/grpc/boundary.py:105);"
        "request_of (stablemlp/serving/grpc/wire.py:40) 1",
        f"{loop};reply_of (stablemlp/serving/grpc/wire.py:90) 2",
        f"{loop} 4",
        "thread (8): event_engine;poll (grpc/_cython/x.pyx:1) 9",  # another thread: left out
    ])  # fmt: skip
    shares, total = layer_shares(folded)
    assert total == 10
    assert shares == {
        "codec: decode": 0.3,
        "wire: request read": 0.1,
        "wire: reply write": 0.2,
        TRANSPORT: 0.4,
    }


def test_profile_counts_cpu_per_thread_name_with_the_first_thread_as_main() -> None:
    before = {(10, "python"): 100, (11, "event_engine"): 50, (12, "event_engine"): 5}
    after = {(10, "python"): 400, (11, "event_engine"): 150, (12, "event_engine"): 5,
             (13, "event_engine"): 10}  # fmt: skip
    ticks = os.sysconf("SC_CLK_TCK")
    assert cpu_by_thread(before, after, main_tid=10) == {
        "MainThread": pytest.approx(300 / ticks),
        "event_engine": pytest.approx(110 / ticks),
    }


def test_versus_variant_words_are_environment_then_flags() -> None:
    from stablemlp.bench.versus import split_variant

    flags, env = split_variant("A_B=1 OTEL_X=http://{otlp} --request-log 'a b.jsonl'", "h:9")
    assert env == {"A_B": "1", "OTEL_X": "http://h:9"}
    assert flags == ["--request-log", "a b.jsonl"]
    assert split_variant("--dynamic-batching false", "") == (["--dynamic-batching", "false"], {})


@pytest.mark.slow
def test_versus_measures_auth_and_tracing_variants(
    model_repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 25 point 3: auth on (the load carries the token: a refused call would stop the run)
    and tracing on (spans exported to the run's own OTLP sink), each against the defaults."""
    from stablemlp.bench.versus import main as versus_main

    auth = "auth=STABLEMLP_AUTH_TOKEN=t0"
    tracing = "tracing=OTEL_TRACES_EXPORTER=otlp OTEL_EXPORTER_OTLP_ENDPOINT=http://{otlp}"
    argv = _versus_argv(model_repository, "--cell", "raw,1,8", "--token", "t0",
                        "--variant", auth, "--variant", tracing)  # fmt: skip
    assert versus_main(argv) == 0
    out = capsys.readouterr().out
    assert "| raw b1 c8 | auth |" in out and "| raw b1 c8 | tracing |" in out


def test_versus_stops_when_a_server_refuses_the_load(
    model_repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A variant whose calls fail (here: auth on, no token sent) has no CPU per request to read."""
    from stablemlp.bench.versus import main as versus_main

    argv = _versus_argv(model_repository, "--cell", "raw,1,1",
                        "--variant", "auth=STABLEMLP_AUTH_TOKEN=t0", window_s="0.1")  # fmt: skip
    with pytest.raises(SystemExit, match=r"versus: auth: \d+ calls failed \(UNAUTHENTICATED"):
        versus_main(argv)


def test_versus_reads_stream_cells_against_the_unary_floor() -> None:
    from stablemlp.bench.versus import UNARY_BASE, _cells, _stream_rows

    cell = ("streams8", 1, 8)
    assert _cells(["streams8,1,8", "raw,1,8"]) == (cell, UNARY_BASE)
    for bad in ("streams3,1,8", "streams0,1,8", "json,1,8", "raw,1", "streamsx,1,8"):
        with pytest.raises(SystemExit, match="versus: --cell"):
            _cells([bad])
    rps = {("floor", UNARY_BASE): [100.0, 200.0], ("after", cell): [250.0, 380.0]}
    assert _stream_rows([cell], ["after"], rps) == [
        ["8 stream(s) x 1, b1", "after", "2.20 (1.90..2.50)"]
    ]


@pytest.mark.slow
def test_versus_streams_run_on_every_server(
    model_repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from stablemlp.bench.versus import main as versus_main

    argv = _versus_argv(model_repository, "--cell", "raw,1,8", "--cell", "streams1,1,8")
    assert versus_main(argv) == 0
    out = capsys.readouterr().out
    for server in ("before", "after", "floor", "model_floor"):
        assert f"| 1 stream(s) x 8, b1 | {server} |" in out
