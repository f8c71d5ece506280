"""Tracing and request logs (issue 15): OpenTelemetry spans with the SDK's in-memory exporter on an
in-process server, request logs from real servers, and a stuck log file that blocks no reply."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import HeldOutSplit, ServerProcess, infer_request, outputs
from rest_client import MODEL_NAME, call, infer_body
from tolerances import PROBABILITY

from stablemlp.protos import grpc_service_pb2_grpc as pb_grpc
from stablemlp.serving.observe.request_log import MAX_ROWS
from stablemlp.serving.observe.tracing import tracing_requested
from stablemlp.serving.server import build_server
from stablemlp.serving.settings import load_settings

StartServer = Callable[..., contextlib.AbstractContextManager[ServerProcess]]
INFER = f"/v2/models/{MODEL_NAME}/infer"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
START_S = 60.0


@contextlib.contextmanager
def in_process_server(repository: Path, provider: Any) -> Iterator[tuple[str, str]]:
    """build_server on a loop of its own thread; yields (gRPC address, REST base URL)."""
    settings = load_settings(
        {"model_repository": repository, "host": "127.0.0.1", "port": 0, "http_port": 0,
         "metrics_port": -1, "warmup_runs": 1, "device": "cpu"}, env={},
    )  # fmt: skip
    ready: dict[str, Any] = {}
    started = threading.Event()

    async def main() -> None:
        try:
            built = await build_server(settings, tracer_provider=provider)
            await built.server.start()
        except BaseException as err:
            ready["error"] = err
            started.set()
            raise
        stop = ready["stop"] = asyncio.Event()
        ready["loop"], ready["ports"] = asyncio.get_running_loop(), (built.port, built.http_port)
        started.set()
        await stop.wait()
        await built.stop(1.0)

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(START_S) and "error" not in ready, ready.get("error")
    grpc_port, http_port = ready["ports"]
    try:
        yield f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
    finally:
        ready["loop"].call_soon_threadsafe(ready["stop"].set)
        thread.join(START_S)


def test_each_inference_is_a_span_under_the_callers_trace(
    model_repository: Path, test_split: HeldOutSplit
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    rows = test_split.features[:3]
    with in_process_server(model_repository, provider) as (address, rest_url):
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            reply = stub.ModelInfer(infer_request(rows), metadata=(("traceparent", PARENT),))
            np.testing.assert_array_equal(outputs(reply)["label"], test_split.label[:3])
        assert call(rest_url, "POST", INFER, infer_body(rows),
                    headers={"traceparent": PARENT}).status == 200  # fmt: skip
        assert call(rest_url, "POST", "/v2/models/nope/infer", infer_body(rows)).status == 404
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.name.endswith(" infer")]
    assert sorted(s.name for s in roots) == ["grpc infer", "http infer", "http infer"]
    for root in roots[:2]:  # the two calls that carried a traceparent
        assert format(root.context.trace_id, "032x") == TRACE_ID
        assert format(root.parent.span_id, "016x") == "00f067aa0ba902b7"
        assert root.attributes["stablemlp.model.name"] == MODEL_NAME
        assert root.attributes["stablemlp.model.version"] == "1"
        assert root.attributes["stablemlp.rows"] == 3
        assert root.status.is_ok
        children = [s for s in spans if s.parent and s.parent.span_id == root.context.span_id]
        assert [c.name for c in sorted(children, key=lambda c: c.start_time)] == [
            "decode", "queue", "run", "encode"
        ]  # fmt: skip
        for child in children:
            assert root.start_time <= child.start_time <= child.end_time <= root.end_time
    failed = roots[2]
    assert failed.parent is None  # no traceparent sent: a new trace
    assert failed.attributes["stablemlp.status"] == "NOT_FOUND" and not failed.status.is_ok


def test_tracing_is_off_unless_the_environment_asks() -> None:
    assert not tracing_requested({})
    assert not tracing_requested({"OTEL_TRACES_EXPORTER": "none"})
    assert tracing_requested({"OTEL_TRACES_EXPORTER": "console"})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert not tracing_requested(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_SDK_DISABLED": "true"}
    )


def test_console_exporter_prints_spans_from_a_real_server(
    model_repository: Path, start_server: StartServer, test_split: HeldOutSplit
) -> None:
    env = {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "stablemlp-test"}
    with start_server(model_repository, env=env) as srv:
        headers = {"traceparent": PARENT}
        reply = call(srv.rest_url, "POST", INFER, infer_body(test_split.features[:1]),
                     headers=headers)  # fmt: skip
        assert reply.status == 200
        srv.stop()
    log = srv.log()
    assert "tracing: OpenTelemetry spans per inference" in log


def test_request_log_writes_one_line_per_sampled_inference(
    model_repository: Path, start_server: StartServer, test_split: HeldOutSplit, tmp_path: Path
) -> None:
    path = tmp_path / "requests.jsonl"
    big = np.tile(test_split.features, (3, 1))[: MAX_ROWS + 6]
    with start_server(model_repository, "--request-log", str(path)) as srv:
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            stub.ModelInfer(infer_request(test_split.features[:2], id="g-1"))
        assert call(srv.rest_url, "POST", INFER, infer_body(big, id="r-big")).status == 200
        bad = infer_body(test_split.features[:1], id="r-bad")
        bad["inputs"][0]["shape"] = [1, 29]
        assert call(srv.rest_url, "POST", INFER, bad).status == 400
        assert srv.stop() == 0  # the queue is written before exit
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    by_id = {line["id"]: line for line in lines}
    assert set(by_id) == {"g-1", "r-big", "r-bad"}
    grpc_line = by_id["g-1"]
    assert (grpc_line["protocol"], grpc_line["status"], grpc_line["model"]) == (
        "grpc", "OK", MODEL_NAME
    )  # fmt: skip
    assert grpc_line["version"] == "1" and grpc_line["rows"] == 2
    features = np.array(grpc_line["inputs"]["features"], dtype=np.float64)  # null -> nan
    np.testing.assert_array_equal(np.isnan(features), np.isnan(test_split.features[:2]))
    np.testing.assert_allclose(
        np.array(grpc_line["outputs"]["probability"]),
        test_split.probability[:2],
        rtol=0,
        atol=PROBABILITY,
    )
    assert grpc_line["time"].endswith("Z") and grpc_line["duration_us"] > 0
    big_line = by_id["r-big"]
    assert big_line["protocol"] == "http" and big_line["truncated"] is True
    assert big_line["rows"] == MAX_ROWS + 6 and len(big_line["inputs"]["features"]) == MAX_ROWS
    failed = by_id["r-bad"]
    assert failed["status"] == "INVALID_ARGUMENT" and "got 29, expected 30" in failed["error"]
    assert "outputs" not in failed


def test_request_log_sampling_zero_writes_nothing(
    model_repository: Path, start_server: StartServer, test_split: HeldOutSplit, tmp_path: Path
) -> None:
    path = tmp_path / "none.jsonl"
    args = ["--request-log", str(path), "--request-log-sample", "0"]
    with start_server(model_repository, *args) as srv:
        for _ in range(5):
            assert (
                call(srv.rest_url, "POST", INFER, infer_body(test_split.features[:1])).status == 200
            )
    assert path.read_text() == ""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a FIFO")
def test_a_stuck_request_log_blocks_no_reply(
    model_repository: Path, start_server: StartServer, test_split: HeldOutSplit, tmp_path: Path
) -> None:
    """A FIFO nobody reads: opening it blocks the writer thread for good, as a hung disk would."""
    fifo = tmp_path / "stuck"
    os.mkfifo(fifo)
    with start_server(model_repository, "--request-log", str(fifo)) as srv:
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(50):
                stub.ModelInfer(infer_request(test_split.features[:1]), timeout=5)
        assert srv.stop() == 0


def test_an_unreachable_collector_does_not_hold_the_shutdown(
    model_repository: Path, start_server: StartServer, test_split: HeldOutSplit
) -> None:
    """OTLP to a closed local port: the exporter retries for up to 30 s on its own; the server
    still stops within its grace period, dropping what it could not export."""
    import time

    with socket_closed() as port:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"}
        with start_server(model_repository, "--grace-period-s", "1", env=env) as srv:
            for _ in range(5):
                call(srv.rest_url, "POST", INFER, infer_body(test_split.features[:1]))
            started = time.monotonic()
            assert srv.stop() == 0
            assert time.monotonic() - started < 6.0  # 1 s grace, plus interpreter exit


@contextlib.contextmanager
def socket_closed() -> Iterator[int]:
    """A local port nothing listens on (bound, never listening, for the test's length)."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


def _record(request_id: str) -> Any:
    from stablemlp.serving.observe.request_log import Record

    rows = np.zeros((1, 2), dtype=np.float32)
    return Record(0, request_id, "m", "1", "grpc", "OK", 1000, 1, {"x": rows}, {"y": rows}, "")


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_request_log_lines_reach_the_file_while_the_server_runs(tmp_path: Path) -> None:
    """The writer wakes on its own (no per-record notify): lines appear within its period, in
    the order they came, without waiting for a shutdown."""
    import time

    from stablemlp.serving.observe.request_log import WRITE_EVERY_S, RequestLog

    path = tmp_path / "live.jsonl"
    request_log = RequestLog(path, 1.0)
    try:
        for i in range(3):
            request_log.put(_record(f"r{i}"))
        deadline = time.monotonic() + 40 * WRITE_EVERY_S  # generous: a loaded CI machine
        while time.monotonic() < deadline and _lines(path) < 3:  # the writer opens the file
            time.sleep(WRITE_EVERY_S / 5)
        assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == [
            "r0", "r1", "r2"
        ]  # fmt: skip
    finally:
        request_log.close(5.0)
    assert request_log.written == 3 and request_log.dropped == 0


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a FIFO")
def test_request_log_holds_at_most_its_bound_and_counts_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A writer stuck opening its file (a FIFO nobody reads): records past the bound are dropped
    and counted, never queued without limit, and close() returns within its timeout."""
    import time

    from stablemlp.serving.observe import request_log as module

    monkeypatch.setattr(module, "QUEUE_RECORDS", 4)
    fifo = tmp_path / "stuck"
    os.mkfifo(fifo)
    request_log = module.RequestLog(fifo, 1.0)
    for i in range(10):
        request_log.put(_record(f"r{i}"))
    assert (len(request_log._pending), request_log.dropped) == (4, 6)
    assert "writer behind, 1 records dropped so far" in caplog.text
    started = time.monotonic()
    request_log.close(0.2)
    assert time.monotonic() - started < 2.0
    with open(fifo, "rb", opener=lambda p, f: os.open(p, f | os.O_NONBLOCK)):
        pass  # lets the stuck writer's open return, so its thread ends with the test
