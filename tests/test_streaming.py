"""ModelStreamInfer: many requests in flight on one stream, answered in order, batched, failures
answered in-band with the stream kept open; an idle stream never holds up a shutdown."""

from __future__ import annotations

import contextlib
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
from conftest import MODEL_NAME, HeldOutSplit, ServerProcess, infer_request, outputs
from tolerances import PROBABILITY

from stablemlp.protos import grpc_service_pb2 as pb
from stablemlp.protos import grpc_service_pb2_grpc as pb_grpc
from stablemlp.serving.grpc.streams import STREAM_WINDOW

StartServer = Callable[..., contextlib.AbstractContextManager[ServerProcess]]
TIMEOUT = 20.0


def _requests(rows: np.ndarray, bad: set[int]) -> list[pb.ModelInferRequest]:
    requests = []
    for i in range(len(rows)):
        part = rows[i : i + 1, :5] if i in bad else rows[i : i + 1]
        requests.append(infer_request(part, raw=i % 2 == 0, id=f"r{i}"))
    return requests


def test_one_stream_many_in_flight_in_order_batched_and_failures_in_band(
    model_repository: Path, start_server: StartServer, test_split: HeldOutSplit
) -> None:
    rows, bad = test_split.features[:24], {5, 17}
    # A queue delay long enough for this test's client (one thread) to send more before it ends.
    with (
        start_server(model_repository, "--max-queue-delay-us", "20000") as srv,
        grpc.insecure_channel(srv.address) as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        before = stub.ModelStatistics(pb.ModelStatisticsRequest(name=MODEL_NAME), timeout=TIMEOUT)
        replies = list(stub.ModelStreamInfer(iter(_requests(rows, bad)), timeout=TIMEOUT))
        after = stub.ModelStatistics(pb.ModelStatisticsRequest(name=MODEL_NAME), timeout=TIMEOUT)
    assert [r.infer_response.id for r in replies] == [f"r{i}" for i in range(24)]  # in order
    for i, reply in enumerate(replies):
        if i in bad:
            assert "shape[1]: got 5, expected 30" in reply.error_message
            continue
        assert not reply.error_message
        got = outputs(reply.infer_response)
        np.testing.assert_allclose(
            got["probability"], test_split.probability[i : i + 1], atol=PROBABILITY
        )
        np.testing.assert_array_equal(got["label"], test_split.label[i : i + 1])
    (old,), (new,) = before.model_stats, after.model_stats
    served = new.inference_stats.success.count - old.inference_stats.success.count
    runs = new.execution_count - old.execution_count
    assert served == 22 and runs < served  # requests of one stream shared session runs


def test_a_stream_stays_open_across_failures_and_answers_as_it_goes(
    server: ServerProcess, test_split: HeldOutSplit
) -> None:
    """The client sends the next request only after the previous answer: one at a time."""
    outbox: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()

    def requests() -> Iterator[pb.ModelInferRequest]:
        while (request := outbox.get(timeout=TIMEOUT)) is not None:
            yield request

    with grpc.insecure_channel(server.address) as channel:
        stream = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
            requests(), timeout=TIMEOUT
        )
        for i, request in enumerate(_requests(test_split.features[:6], {1, 2})):
            outbox.put(request)
            reply = next(stream)
            assert reply.infer_response.id == f"r{i}"
            assert bool(reply.error_message) == (i in (1, 2))
        outbox.put(None)
        assert list(stream) == []


def test_shutdown_with_an_idle_stream_open_does_not_wait_out_the_grace(
    model_repository: Path, start_server: StartServer, test_split: HeldOutSplit
) -> None:
    outbox: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
    ended: list[grpc.StatusCode] = []

    def requests() -> Iterator[pb.ModelInferRequest]:
        while (request := outbox.get(timeout=60)) is not None:
            yield request

    with start_server(model_repository, "--grace-period-s", "20") as srv:
        channel = grpc.insecure_channel(srv.address)
        stream = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests(), timeout=60)
        outbox.put(infer_request(test_split.features[:1], id="only"))
        assert next(stream).infer_response.id == "only"  # then the stream idles

        def finish() -> None:
            with contextlib.suppress(grpc.RpcError):
                list(stream)
            ended.append(stream.code())

        watcher = threading.Thread(target=finish)
        watcher.start()
        started = time.monotonic()
        srv.process.send_signal(signal.SIGTERM)
        assert srv.process.wait(timeout=15) == 0
        assert time.monotonic() - started < 10  # not the 20 s grace
        watcher.join(timeout=10)
        outbox.put(None)
        channel.close()
    assert ended and ended[0] in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE)
    log = srv.log()
    assert "Traceback" not in log and "CancelledError" not in log


def test_more_requests_than_the_stream_window_are_all_answered_in_order(
    server: ServerProcess, test_split: HeldOutSplit
) -> None:
    """Past STREAM_WINDOW unanswered requests the server stops reading the stream until it has
    answered one; a client that sends everything at once is still answered, in order."""
    count = 3 * STREAM_WINDOW
    requests = [
        infer_request(test_split.features[i % 24 : i % 24 + 1], id=f"w{i}") for i in range(count)
    ]
    with grpc.insecure_channel(server.address) as channel:
        replies = list(
            pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
                iter(requests), timeout=TIMEOUT
            )
        )
    assert [r.infer_response.id for r in replies] == [f"w{i}" for i in range(count)]
    assert not any(r.error_message for r in replies)
    for i, reply in enumerate(replies):
        np.testing.assert_allclose(
            outputs(reply.infer_response)["probability"],
            test_split.probability[i % 24 : i % 24 + 1],
            atol=PROBABILITY,
        )


def _statistics(channel: grpc.Channel) -> pb.ModelStatistics:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    reply = stub.ModelStatistics(pb.ModelStatisticsRequest(name=MODEL_NAME), timeout=TIMEOUT)
    return reply.model_stats[0]


def test_a_client_leaving_a_stream_drops_its_queued_requests_and_counts_them_cancelled(
    model_repository: Path, start_server: StartServer, test_split: HeldOutSplit
) -> None:
    """Requests still waiting in a batch when their stream goes are withdrawn: they never run,
    each is counted once as failed (cancelled), and the server goes on answering."""
    delay_s = 2.0  # the batch the queued requests wait in would run then
    outbox: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()

    def requests() -> Iterator[pb.ModelInferRequest]:
        while (request := outbox.get(timeout=TIMEOUT)) is not None:
            yield request

    rows = test_split.features
    with (
        start_server(model_repository, "--max-queue-delay-us", str(int(delay_s * 1e6))) as srv,
        grpc.insecure_channel(srv.address) as channel,
    ):
        before = _statistics(channel)
        stream = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
            requests(), timeout=TIMEOUT
        )
        outbox.put(infer_request(rows[:1], id="lone"))  # isolated: runs at once, alone
        assert next(stream).infer_response.id == "lone"
        for i in range(4):  # these arrive right after it: they wait for company, up to delay_s
            outbox.put(infer_request(rows[i + 1 : i + 2], id=f"queued{i}"))
        time.sleep(0.3)  # they reach the server's batch
        stream.cancel()
        time.sleep(delay_s + 0.5)  # past the batch's deadline: a withdrawn request would run now
        after = _statistics(channel)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        alive = stub.ModelInfer(infer_request(rows[:1], id="after"), timeout=TIMEOUT)
    outbox.put(None)
    assert alive.id == "after"
    success = after.inference_stats.success.count - before.inference_stats.success.count
    failed = after.inference_stats.fail.count - before.inference_stats.fail.count
    assert (success, failed) == (1, 4)
    assert after.execution_count - before.execution_count == 1  # the queued four never ran
    assert "Traceback" not in srv.log()
