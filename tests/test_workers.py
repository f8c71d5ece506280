"""`stablemlp serve --workers N`: several real server processes on one port, one supervisor."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ROOT, HeldOutSplit, ServerProcess, infer_request, outputs
from tolerances import PROBABILITY

from stablemlp.protos import grpc_service_pb2_grpc as pb_grpc
from stablemlp.serving import server as server_module
from stablemlp.serving.settings import load_settings
from stablemlp.serving.workers import reserve_port, worker_settings

StartServer = Callable[..., contextlib.AbstractContextManager[ServerProcess]]
TIMEOUT = 10.0
_WORKER = re.compile(r"worker (\d)/2 \(pid (\d+)\): serving on (\S+)")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_two_workers_share_a_port_answer_and_stop_cleanly(
    model_repository: Path, start_server: StartServer, test_split: HeldOutSplit
) -> None:
    with start_server(model_repository, "--workers", "2") as srv:
        log = srv.wait_for_log("serving on", count=2)
        workers = {int(i): (int(pid), address) for i, pid, address in _WORKER.findall(log)}
        assert set(workers) == {1, 2} and {a for _, a in workers.values()} == {srv.address}
        # A /metrics per worker, and the supervisor's with all of theirs, labelled by worker.
        assert len(re.findall(r"metrics: (http://\S+)", log)) == 3
        scraped = urllib.request.urlopen(srv.metrics_url, timeout=TIMEOUT).read().decode()
        assert 'worker="1"' in scraped and 'worker="2"' in scraped
        assert "stablemlp_models_loaded" in scraped
        rest = json.loads(urllib.request.urlopen(srv.rest_url + "/v2/health/ready").read())
        assert rest == {"ready": True}  # the REST port is shared too
        rows = test_split.features[:5]
        options = [("grpc.use_local_subchannel_pool", 1)]  # a connection per channel
        for _ in range(8):  # connections land on either worker; every one answers the same
            with grpc.insecure_channel(srv.address, options=options) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                got = outputs(stub.ModelInfer(infer_request(rows), timeout=TIMEOUT))
            np.testing.assert_allclose(
                got["probability"], test_split.probability[:5], atol=PROBABILITY
            )
            np.testing.assert_array_equal(got["label"], test_split.label[:5])
        assert srv.stop() == 0
        assert all(_gone(pid) for pid, _ in workers.values())
        assert "stopped: workers exited with [0, 0]" in srv.log()


def test_a_killed_worker_is_noticed_every_time_and_restarted_then_the_server_gives_up(
    model_repository: Path, start_server: StartServer, test_split: HeldOutSplit
) -> None:
    """Issue 12.7: SIGKILL a worker, three times in a row (no join() on a healthy one may hide
    it); each death is logged and repaired while the other worker serves on. Past
    --worker-restarts deaths a minute the supervisor stops the server with exit code 1."""
    rows = test_split.features[:3]
    with start_server(model_repository, "--workers", "2", "--worker-restarts", "3") as srv:
        for trial in range(1, 4):
            log = srv.wait_for_log("serving on", count=1 + trial)
            pids = [int(pid) for _, pid, _ in _WORKER.findall(log)]
            victim = pids[-1] if trial > 1 else pids[0]  # the newest one after the first
            os.kill(victim, signal.SIGKILL)
            srv.wait_for_log(f"exited with -{int(signal.SIGKILL)}", count=trial, deadline_s=15)
            srv.wait_for_log("restarted", count=trial, deadline_s=60)
            with grpc.insecure_channel(srv.address) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                got = outputs(stub.ModelInfer(infer_request(rows), timeout=TIMEOUT))
            np.testing.assert_array_equal(got["label"], test_split.label[:3])
            assert _gone(victim)
        pids = [int(pid) for _, pid, _ in _WORKER.findall(srv.log())]
        os.kill(pids[-1], signal.SIGKILL)  # the fourth death in a minute: beyond the limit
        assert srv.process.wait(timeout=30) == 1
    log = srv.log()
    assert "4 worker deaths within 60 s: stopping the server" in log
    assert all(_gone(pid) for pid in pids)


def test_a_port_in_use_fails_before_any_worker_starts(model_repository: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["--model-repository", str(model_repository), "--host", "127.0.0.1"]
        argv += ["--port", str(port), "--workers", "2", "--metrics-port", "-1", "--http-port", "0"]
        assert server_module.main(argv) == 1
        with pytest.raises(OSError):
            reserve_port("127.0.0.1", port)


def test_workers_that_cannot_start_make_the_supervisor_exit_nonzero(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "stablemlp", "serve", "--model-repository", str(tmp_path)]
    command += ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--workers", "2"]
    command += ["--http-port", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "worker 1/2: cannot start: model repository" in done.stderr or (
        "worker 2/2: cannot start: model repository" in done.stderr
    ), done.stderr
    assert "exited before it served; stopping" in done.stderr
    assert re.search(r"workers exited with \[(1, -15|-15, 1|1, 1)\]", done.stderr), done.stderr


def test_each_worker_gets_its_share_of_threads_and_its_own_metrics_port() -> None:
    settings = load_settings(
        {"model_repository": Path("m"), "workers": 2, "inference_workers": 4, "metrics_port": 9100}
    )
    shares = [worker_settings(settings, i, 8001, 8000) for i in range(2)]
    assert [s.metrics_port for s in shares] == [9101, 9102]  # the supervisor's is 9100
    assert {s.http_port for s in shares} == {8000}
    assert {(s.workers, s.port, s.inference_workers) for s in shares} == {(1, 8001, 2)}
    for metrics in (0, -1):  # any free port each, or none: unchanged
        one = worker_settings(load_settings({"model_repository": Path("m"), "workers": 2,
                                             "metrics_port": metrics}), 1, 8001)  # fmt: skip
        assert one.metrics_port == metrics and one.inference_workers >= 1


def test_explicit_model_control_is_refused_with_several_workers() -> None:
    """A RepositoryModelLoad reaches the one worker that took the call: the others would go on
    answering without the model, so clients would see it appear and vanish call by call."""
    with pytest.raises(ValueError, match="model_control_mode explicit: got workers 2, expected 1"):
        explicit = {"model_control_mode": "explicit", "control_token": "t0123456789"}
        load_settings({"model_repository": Path("m"), "workers": 2, **explicit})
    assert (
        load_settings(
            {"model_repository": Path("m"), "workers": 2, "model_control_mode": "poll"}
        ).workers
        == 2
    )
