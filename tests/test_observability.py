"""Observability: /metrics and ModelStatistics tell the same counts; JSON logs, a line a failure."""

from __future__ import annotations

import contextlib
import json
import logging
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import MODEL_NAME, HeldOutSplit, ServerProcess, infer_request
from prometheus_client.parser import text_string_to_metric_families

from stablemlp import cli
from stablemlp.protos import grpc_service_pb2 as pb
from stablemlp.protos import grpc_service_pb2_grpc as pb_grpc

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def server(model_repository: Path, start_server: Callable[..., Any]) -> Iterator[ServerProcess]:
    with start_server(model_repository, env={"STABLEMLP_LOG_FORMAT": "json"}) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def scrape(server: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, from the server's /metrics."""
    with urllib.request.urlopen(server.metrics_url, timeout=TIMEOUT) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _labels(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


def _statistics(stub: pb_grpc.GRPCInferenceServiceStub) -> pb.ModelStatistics:
    request = pb.ModelStatisticsRequest(name=MODEL_NAME, version="1")
    (stats,) = stub.ModelStatistics(request, timeout=TIMEOUT).model_stats
    return stats


def test_metrics_and_model_statistics_count_the_same_calls(
    server: ServerProcess, stub: pb_grpc.GRPCInferenceServiceStub, test_split: HeldOutSplit
) -> None:
    for rows in (1, 1, 3, 8, 8, 8):
        stub.ModelInfer(infer_request(test_split.features[:rows]), timeout=TIMEOUT)
    for bad in (test_split.features[:2, :5], test_split.features[:0]):
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(infer_request(bad), timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(infer_request(test_split.features[:1], model_name="nope"), timeout=TIMEOUT)

    stats, metrics = _statistics(stub), scrape(server)
    v1 = {"model": MODEL_NAME, "version": "1"}
    requests = {
        labels: value
        for (name, labels), value in metrics.items()
        if name == "stablemlp_inference_requests_total"
    }
    assert requests[_labels(**v1, code="OK")] == stats.inference_stats.success.count >= 6
    failed = (
        sum(v for labels, v in requests.items() if ("version", "1") in labels)
        - (requests[_labels(**v1, code="OK")])
    )
    assert failed == stats.inference_stats.fail.count >= 2
    assert requests[_labels(model="", version="", code="NOT_FOUND")] >= 1
    batch = ("stablemlp_inference_batch_size", _labels(**v1))
    assert metrics[(batch[0] + "_sum", batch[1])] == stats.inference_count
    assert metrics[(batch[0] + "_count", batch[1])] == stats.execution_count
    assert metrics[("stablemlp_inference_batch_size_bucket", _labels(**v1, le="1.0"))] >= 2
    queue = ("stablemlp_inference_queue_duration_seconds_count", _labels(**v1))
    assert (
        metrics[queue] == stats.inference_stats.queue.count == stats.inference_stats.success.count
    )
    latency = ("stablemlp_inference_request_duration_seconds_count", _labels(**v1))
    assert metrics[latency] == stats.inference_stats.success.count + failed
    assert metrics[("stablemlp_model_version_ready", _labels(**v1))] == 1
    assert metrics[("stablemlp_models_loaded", ())] == 1
    assert metrics[("stablemlp_inflight_requests", ())] == 0
    assert metrics[("stablemlp_inflight_limit", ())] == 128
    by_size = {b.batch_size: b.compute_infer.count for b in stats.batch_stats}
    assert by_size[8] >= 3 and by_size[1] >= 2 and sum(by_size.values()) == stats.execution_count


def test_the_counts_agree_under_concurrent_calls_too(
    server: ServerProcess, stub: pb_grpc.GRPCInferenceServiceStub, test_split: HeldOutSplit
) -> None:
    """Concurrent calls merge into shared runs: executions and batch sizes count runs (as
    Triton's), requests and rows count calls, and /metrics and ModelStatistics still agree."""
    before = _statistics(stub)
    sizes = [1, 2, 3, 5, 8] * 8
    futures = [
        stub.ModelInfer.future(infer_request(test_split.features[:n]), timeout=TIMEOUT)
        for n in sizes
    ]
    bad = [
        stub.ModelInfer.future(infer_request(test_split.features[:1, :3]), timeout=TIMEOUT)
        for _ in range(4)
    ]
    for future in futures:
        future.result()
    assert all(f.exception() is not None for f in bad)
    stats, metrics = _statistics(stub), scrape(server)
    v1 = {"model": MODEL_NAME, "version": "1"}
    success = stats.inference_stats.success.count
    assert success - before.inference_stats.success.count == len(sizes)
    assert stats.inference_count - before.inference_count == sum(sizes)
    assert stats.inference_stats.fail.count - before.inference_stats.fail.count == len(bad)
    assert metrics[("stablemlp_inference_requests_total", _labels(**v1, code="OK"))] == success
    executions = stats.execution_count
    assert executions - before.execution_count <= len(sizes)
    batch = "stablemlp_inference_batch_size"
    assert metrics[(batch + "_count", _labels(**v1))] == executions
    assert metrics[(batch + "_sum", _labels(**v1))] == stats.inference_count  # every row ran once
    assert sum(b.compute_infer.count for b in stats.batch_stats) == executions
    assert sum(b.batch_size * b.compute_infer.count for b in stats.batch_stats) == (
        stats.inference_count
    )
    queue = ("stablemlp_inference_queue_duration_seconds_count", _labels(**v1))
    assert metrics[queue] == stats.inference_stats.queue.count == success  # per request
    assert metrics[("stablemlp_inflight_requests", ())] == 0


def test_logs_are_json_lines_with_one_line_per_failed_call(
    server: ServerProcess, stub: pb_grpc.GRPCInferenceServiceStub, test_split: HeldOutSplit
) -> None:
    def failures() -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in server.log().splitlines()]
        return [line for line in lines if line.get("code") == "INVALID_ARGUMENT"]

    before = len(failures())
    for _ in range(3):
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(infer_request(test_split.features[:1, :2]), timeout=TIMEOUT)
    server.wait_for_log('"code": "INVALID_ARGUMENT"', before + 3)
    lines = failures()
    assert len(lines) == before + 3  # every line parsed as JSON above; one per failed call
    assert {k: lines[-1][k] for k in ("level", "logger", "rpc", "code")} == {
        "level": "INFO",
        "logger": "stablemlp.serving.observe.call_log",
        "rpc": "ModelInfer",
        "code": "INVALID_ARGUMENT",
    }
    assert "shape[1]: got 2, expected 30" in lines[-1]["message"]
    assert lines[-1]["peer"].startswith("ipv4:127.0.0.1:")


def test_json_formatter_and_log_format_choice(capsys: pytest.CaptureFixture[str]) -> None:
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "a %s\nb", ("\x00",), None)
    record.code = "UNAVAILABLE"
    line = cli.JsonFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert (parsed["message"], parsed["code"], parsed["level"]) == (
        "a \x00\nb",
        "UNAVAILABLE",
        "WARNING",
    )
    for argv in (["--log-format", "xml", "serve"], ["serve", "--log-format=xml"]):
        assert cli.main(argv) == 2
        assert "log format: got 'xml', expected text or json" in capsys.readouterr().err


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("Threads:"))


def test_silent_connections_to_the_metrics_port_are_capped_and_closed(
    server: ServerProcess,
) -> None:
    """Issue 23.7: each connection to /metrics held a thread, with no timeout (2,000 silent
    sockets: 2,016 threads, none closed after 332 s). Now at most METRICS_CONNECTIONS are served
    at once, the rest are closed unread, and a silent one is closed after METRICS_TIMEOUT_S."""
    import socket
    import time
    import urllib.parse

    from stablemlp.serving.observe.telemetry import METRICS_CONNECTIONS, METRICS_TIMEOUT_S

    url = urllib.parse.urlsplit(server.metrics_url)
    pid, before = server.process.pid, _threads(server.process.pid)
    silent = [socket.create_connection((url.hostname, url.port), timeout=5) for _ in range(200)]
    try:
        time.sleep(0.5)  # bounded: lets the server accept them all
        assert _threads(pid) <= before + METRICS_CONNECTIONS, "a thread per connection"
        deadline = time.monotonic() + METRICS_TIMEOUT_S + 10
        closed = 0
        for connection in silent:  # each is closed by the server: recv sees EOF
            connection.settimeout(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ConnectionError):
                closed += connection.recv(1) == b""
        assert closed == len(silent)
    finally:
        for connection in silent:
            connection.close()
    assert ("stablemlp_models_loaded", ()) in scrape(server)  # it scrapes on
