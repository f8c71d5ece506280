"""Dynamic batching and where runs happen: merged runs give every request what a lone run gives.

In process: the Batcher on real ONNX Runtime sessions (the exported model, and a model that fails
on some rows). Real servers: results under concurrency, preferred sizes, deadlines, statistics.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import MODEL_NAME, HeldOutSplit, ServerProcess, infer_request, outputs, publish_onnx
from tolerances import PROBABILITY

from stablemlp.protos import grpc_service_pb2 as pb
from stablemlp.protos import grpc_service_pb2_grpc as pb_grpc
from stablemlp.serving.runtime.batcher import Batcher, BatchingOptions, Executed
from stablemlp.serving.runtime.scheduler import Scheduler
from stablemlp.serving.runtime.session import ModelRuntime, RuntimeOptions, inline_rows

StartServer = Callable[..., contextlib.AbstractContextManager[ServerProcess]]
TIMEOUT = 10.0
NAMES = ["probability", "label"]


def _options(run_inline: str = "auto") -> RuntimeOptions:
    return RuntimeOptions("cpu", 1, 1, run_inline=run_inline)  # type: ignore[arg-type]


def _batcher(runtime: ModelRuntime, executor: ThreadPoolExecutor, rows: int) -> Batcher:
    return Batcher(runtime, executor, BatchingOptions(rows, 50_000), asyncio.get_running_loop())


async def _submit_all(batcher: Batcher, parts: list[np.ndarray]) -> list[Executed | BaseException]:
    jobs = [batcher.enqueue({"features": p}, len(p)) for p in parts]
    return list(await asyncio.gather(*jobs, return_exceptions=True))


def test_runtime_runs_answer_as_onnx_runtime_public_run(
    model_repository: Path, test_split: HeldOutSplit
) -> None:
    """On CPU the runtime calls the binding's run (issue 25): the same arrays as the public
    session.run, and a feed missing an input still fails (in ONNX Runtime, not silently)."""
    import onnxruntime as ort

    folder = model_repository / MODEL_NAME / "1"
    runtime = ModelRuntime(folder, _options())
    public = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"features": test_split.features[:5]}
    ours, theirs = runtime.run(feeds, NAMES), public.run(NAMES, feeds)
    for name, expected in zip(NAMES, theirs, strict=True):
        np.testing.assert_array_equal(ours[name], expected)
    with pytest.raises(Exception, match="features"):  # ONNX Runtime's own error type
        runtime.run({}, NAMES)


@pytest.mark.parametrize(
    ("run_inline", "max_rows", "runs"),
    [("auto", 1024, [14, 0, 0, 0]), ("never", 1024, [14, 0, 0, 0]), ("auto", 8, [4, 0, 8, 2])],
)  # merged runs on the event loop or a worker thread; a batch never passes max_batch_size
def test_merged_runs_equal_lone_runs(
    model_repository: Path, test_split: HeldOutSplit, run_inline: str, max_rows: int,
    runs: list[int],
) -> None:  # fmt: skip
    runtime = ModelRuntime(model_repository / MODEL_NAME / "1", _options(run_inline))
    runtime.warm_up(runs=1)
    parts = [test_split.features[i : i + n] for i, n in ((0, 1), (1, 3), (4, 8), (12, 2))]

    async def merged() -> list[Executed | BaseException]:
        with ThreadPoolExecutor(1) as executor:
            return await _submit_all(_batcher(runtime, executor, max_rows), parts)

    results = asyncio.run(merged())
    for part, got in zip(parts, results, strict=True):
        assert isinstance(got, Executed)
        alone = runtime.run({"features": part}, NAMES)
        for name in NAMES:
            np.testing.assert_array_equal(got.results[name], alone[name])
    executed = [r for r in results if isinstance(r, Executed)]
    # each run counted once, by its first request; every request knows its run's size
    assert [r.batch_rows if r.lead else 0 for r in executed] == runs
    assert all(r.started_ns <= r.ended_ns for r in executed)


def test_requests_wait_long_for_company_only_while_batches_merge(
    model_repository: Path, test_split: HeldOutSplit
) -> None:
    """Waiting QUIET_TURNS idle loop turns pays at concurrency 8 (batches merge); where the last
    MERGE_MEMORY batches each ran alone, a request stops after LONE_QUIET_TURNS (no company is
    coming, as at concurrency 1), and one merged batch brings the longer wait back."""
    from stablemlp.serving.runtime import batcher as batching

    runtime = ModelRuntime(model_repository / MODEL_NAME / "1", _options())
    runtime.warm_up(runs=1)
    row = test_split.features[:1]

    async def requests() -> list[int]:
        patience = []
        with ThreadPoolExecutor(1) as executor:
            batcher = _batcher(runtime, executor, 1024)
            patience.append(batcher._patience)  # nothing merged yet
            await _submit_all(batcher, [row, row])  # run together
            patience.append(batcher._patience)
            for _ in range(batching.MERGE_MEMORY):  # one at a time: each runs alone
                await batcher.enqueue({"features": row}, 1)
                patience.append(batcher._patience)
        return patience

    lone, merged = batching.LONE_QUIET_TURNS, batching.QUIET_TURNS
    assert lone < merged
    memory = batching.MERGE_MEMORY
    assert asyncio.run(requests()) == [lone, merged, *[merged] * (memory - 1), lone]


def test_requests_do_not_look_up_the_running_loop(
    model_repository: Path, test_split: HeldOutSplit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncio.get_running_loop() makes a getpid() system call on Python 3.11: the batcher looks
    it up once, when made, not per request (it did three times per request)."""
    runtime = ModelRuntime(model_repository / MODEL_NAME / "1", _options())
    runtime.warm_up(runs=1)
    lookups = 0
    real = asyncio.get_running_loop

    def counting() -> asyncio.AbstractEventLoop:
        nonlocal lookups
        lookups += 1
        return real()

    async def requests() -> None:
        with ThreadPoolExecutor(1) as executor:
            batcher = _batcher(runtime, executor, 1024)
            monkeypatch.setattr(asyncio, "get_running_loop", counting)
            for i in range(4):
                assert batcher.joins() == (i > 0)  # the first one arrives after a long gap
            parts = [test_split.features[i : i + 1] for i in range(4)]
            results = await _submit_all(batcher, parts)
            assert not any(isinstance(r, BaseException) for r in results)

    asyncio.run(requests())
    assert lookups == 0


def test_inline_rows_follow_the_timed_runs() -> None:
    assert inline_rows({1: 7_000, 1024: 300_000}, 100_000) == 1 + 93_000 * 1023 // 293_000
    assert inline_rows({1: 200_000}, 100_000) == 0
    assert inline_rows({1: 5_000, 64: 40_000}, 100_000) == 64  # nothing measured above


def _failing_model(folder: Path) -> Path:
    """Honours the contract; a row whose first feature is not 0..3 makes ONNX Runtime fail
    (GatherElements index out of range), so one bad request can break a merged run."""
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.array([[0.1], [0.4], [0.6], [0.9]], np.float32), "table")
    nodes = [
        helper.make_node("Constant", [], ["starts"], value_ints=[0]),
        helper.make_node("Constant", [], ["ends"], value_ints=[1]),
        helper.make_node("Constant", [], ["axes"], value_ints=[1]),
        helper.make_node("Slice", ["features", "starts", "ends", "axes"], ["first"]),
        helper.make_node("Cast", ["first"], ["index"], to=TensorProto.INT64),
        helper.make_node("GatherElements", ["table", "index"], ["probability"], axis=0),
        helper.make_node("Constant", [], ["half"], value_float=0.5),
        helper.make_node("GreaterOrEqual", ["probability", "half"], ["positive"]),
        helper.make_node("Cast", ["positive"], ["label"], to=TensorProto.INT64),
    ]
    graph = helper.make_graph(
        nodes,
        "failing",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 30])],
        [
            helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch", 1]),
        ],
        [table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return publish_onnx(folder, "failing", model)


@pytest.mark.parametrize("run_inline", ["auto", "never"])
def test_a_request_that_breaks_a_merged_run_fails_alone(tmp_path: Path, run_inline: str) -> None:
    runtime = ModelRuntime(_failing_model(tmp_path), _options(run_inline))
    runtime.warm_up(runs=0)  # all-NaN rows cast to garbage indices: no warm-up here
    parts = [np.zeros((2, 30), np.float32) + v for v in (1.0, 7.0, 3.0)]  # 7: out of range

    async def merged() -> list[Executed | BaseException]:
        with ThreadPoolExecutor(1) as executor:
            return await _submit_all(_batcher(runtime, executor, 8), parts)

    good, bad, other = asyncio.run(merged())
    assert isinstance(bad, Exception) and "GatherElements" in str(bad)
    assert isinstance(good, Executed) and isinstance(other, Executed)
    np.testing.assert_allclose(good.results["probability"], [[0.4], [0.4]])
    np.testing.assert_array_equal(other.results["label"], [[1], [1]])


# ---------------------------------------------------------------- real servers


def _stats(stub: pb_grpc.GRPCInferenceServiceStub) -> pb.ModelStatistics:
    request = pb.ModelStatisticsRequest(name=MODEL_NAME)
    (stats,) = stub.ModelStatistics(request, timeout=TIMEOUT).model_stats
    return stats


@pytest.mark.parametrize("run_inline", ["auto", "never"])
def test_concurrent_requests_merge_and_each_gets_its_rows(
    model_repository: Path, start_server: StartServer, test_split: HeldOutSplit, run_inline: str
) -> None:
    args = ["--dynamic-batching", "true", "--max-queue-delay-us", "20000"]
    args += ["--run-inline", run_inline]
    with (
        start_server(model_repository, *args) as srv,
        grpc.insecure_channel(srv.address) as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        config = stub.ModelConfig(pb.ModelConfigRequest(name=MODEL_NAME), timeout=TIMEOUT).config
        assert config.dynamic_batching.max_queue_delay_microseconds == 20000
        bounds = [(i, i + 1 + i % 5) for i in range(0, 48, 6)]
        futures = [
            stub.ModelInfer.future(infer_request(test_split.features[a:b], raw=a % 12 == 0),
                                   timeout=TIMEOUT)
            for a, b in bounds
        ]  # fmt: skip
        bad = stub.ModelInfer.future(infer_request(test_split.features[:2, :5]), timeout=TIMEOUT)
        for (a, b), future in zip(bounds, futures, strict=True):
            response = future.result()
            if a % 12 == 0:
                got = outputs(response)
            else:
                got = {t.name: t.contents for t in response.outputs}
                got = {
                    "probability": np.array(got["probability"].fp32_contents).reshape(-1, 1),
                    "label": np.array(got["label"].int64_contents).reshape(-1, 1),
                }
            np.testing.assert_allclose(
                got["probability"], test_split.probability[a:b], atol=PROBABILITY
            )
            np.testing.assert_array_equal(got["label"], test_split.label[a:b])
        assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT  # failed alone, at decode
        stats = _stats(stub)
        assert stats.inference_count == sum(b - a for a, b in bounds)
        assert stats.inference_stats.success.count == len(bounds)
        assert stats.execution_count < len(bounds)  # some requests shared a run


def test_preferred_size_runs_without_waiting_and_deadlines_hold(
    model_repository: Path, start_server: StartServer, test_split: HeldOutSplit
) -> None:
    args = ["--dynamic-batching", "true", "--max-queue-delay-us", "30000000"]  # 30 s
    args += ["--preferred-batch-sizes", "4"]
    with (
        start_server(model_repository, *args) as srv,
        grpc.insecure_channel(srv.address) as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        first = stub.ModelInfer(infer_request(test_split.features[:1]), timeout=TIMEOUT)
        assert outputs(first)["label"] == test_split.label[:1]  # isolated: ran at once, alone
        lone = stub.ModelInfer.future(infer_request(test_split.features[:1]), timeout=0.5)
        assert lone.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # waited for company, in vain
        started = time.monotonic()
        four = [
            stub.ModelInfer.future(infer_request(test_split.features[i : i + 1]), timeout=TIMEOUT)
            for i in range(4)
        ]
        for i, future in enumerate(four):
            np.testing.assert_array_equal(
                outputs(future.result())["label"], test_split.label[i : i + 1]
            )
        assert time.monotonic() - started < 5  # 4 rows = a preferred size: no 30 s wait
        stats = _stats(stub)
        assert stats.execution_count == 2 and stats.inference_count == 5  # the lone one never ran
        assert stats.inference_stats.fail.count == 1
    # The lone call is logged once. The client cancels it at its own deadline, which is earlier
    # than the server's (counted from when the request arrived) by the request's transit: the
    # server logs DEADLINE_EXCEEDED when its timer fires first, CANCELLED when the cancel wins
    # (under load it did, about one run in four).
    failed = [line for line in srv.log().splitlines() if "ModelInfer failed:" in line]
    assert len(failed) == 1 and ("DEADLINE_EXCEEDED" in failed[0] or "CANCELLED" in failed[0])


def test_closing_a_versions_scheduler_runs_what_waits_and_stops_merging(
    model_repository: Path, test_split: HeldOutSplit
) -> None:
    """The repository closes a version's scheduler when the version goes (no lifetime by garbage
    collection): a request waiting for company runs at once, later ones run alone."""
    runtime = ModelRuntime(model_repository / MODEL_NAME / "1", _options())
    runtime.warm_up(runs=1)
    rows = test_split.features[:2]

    async def scenario() -> tuple[Executed, Executed, float]:
        with ThreadPoolExecutor(1) as executor:
            loop = asyncio.get_running_loop()
            scheduler = Scheduler(runtime, executor, BatchingOptions(1024, 30_000_000), loop)
            await scheduler.run({"features": rows}, 2)  # isolated: runs at once
            started = time.monotonic()
            waiting = asyncio.ensure_future(scheduler.run({"features": rows}, 2))  # waits 30 s
            await asyncio.sleep(0.05)
            assert not waiting.done()
            scheduler.close()  # as from the repository's thread: thread-safe
            first = await asyncio.wait_for(waiting, 5)
            after = await asyncio.wait_for(scheduler.run({"features": rows}, 2), 5)
            return first, after, time.monotonic() - started

    first, after, seconds = asyncio.run(scenario())
    assert seconds < 5  # not the 30 s queue delay
    for executed in (first, after):
        np.testing.assert_array_equal(executed.results["label"], test_split.label[:2])
        assert executed.lead and executed.batch_rows == 2
