"""Hardening (issue 12) against real servers: model control off by default, readiness that follows
the models, health watchers that all hear a shutdown, names and manifests that cannot hurt, a log
that a client cannot flood."""

from __future__ import annotations

import contextlib
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import (
    MODEL_NAME,
    HeldOutSplit,
    ServerProcess,
    cpu_repository,
    infer_request,
    publish_version,
    wait_until_serving,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stablemlp.protos import grpc_service_pb2 as pb
from stablemlp.protos import grpc_service_pb2_grpc as pb_grpc
from stablemlp.serving.observe.call_log import BURST_LINES

StartServer = Callable[..., contextlib.AbstractContextManager[ServerProcess]]
TIMEOUT = 10.0
SERVING, NOT_SERVING = (health_pb2.HealthCheckResponse.SERVING,
                        health_pb2.HealthCheckResponse.NOT_SERVING)  # fmt: skip
CONTROL_TOKEN = "control-0123"
CONTROL = (("authorization", f"Bearer {CONTROL_TOKEN}"),)


@pytest.fixture
def repo_copy(model_repository: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_repository, tmp_path / "repo"))


def _explicit(start_server: StartServer, repository: Path, *args: str) -> Any:
    return start_server(
        repository, "--model-control-mode", "explicit", *args,
        env={"STABLEMLP_CONTROL_TOKEN": CONTROL_TOKEN},
    )  # fmt: skip


def _status(channel: grpc.Channel, service: str) -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=TIMEOUT).status)


def test_by_default_nobody_can_load_or_unload(
    server: ServerProcess, test_split: HeldOutSplit
) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for call, request in (
            (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=MODEL_NAME)),
            (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="other")),
        ):
            with pytest.raises(grpc.RpcError) as raised:
                call(request, timeout=TIMEOUT)
            assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "model control mode 'none'" in raised.value.details()
            assert "--model-control-mode explicit" in raised.value.details()
        assert stub.ModelInfer(infer_request(test_split.features[:1]), timeout=TIMEOUT).outputs
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=TIMEOUT).ready


def test_explicit_control_needs_its_token_and_readiness_follows_the_models(
    repo_copy: Path, start_server: StartServer, test_split: HeldOutSplit
) -> None:
    (repo_copy / "other").mkdir()  # a second model folder: excluded by --model below
    shutil.copytree(repo_copy / MODEL_NAME / "1", repo_copy / "other" / "1")
    with (
        _explicit(start_server, repo_copy, "--model", MODEL_NAME) as srv,
        grpc.insecure_channel(srv.address) as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        unload = pb.RepositoryModelUnloadRequest(model_name=MODEL_NAME)
        with pytest.raises(grpc.RpcError) as raised:
            stub.RepositoryModelUnload(unload, timeout=TIMEOUT)  # no control token
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as raised:  # --model excluded it: not this server's
            stub.RepositoryModelLoad(
                pb.RepositoryModelLoadRequest(model_name="other"), timeout=TIMEOUT, metadata=CONTROL
            )
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert "serves ['breast_cancer']" in raised.value.details()

        stub.RepositoryModelUnload(unload, timeout=TIMEOUT, metadata=CONTROL)
        assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=TIMEOUT).ready
        for service in ("inference.GRPCInferenceService", MODEL_NAME):  # readiness
            assert _status(channel, service) == NOT_SERVING, service
        assert _status(channel, "") == SERVING  # liveness: no reason to restart the process
        stub.RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(model_name=MODEL_NAME), timeout=60, metadata=CONTROL
        )
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=TIMEOUT).ready
        for service in ("", "inference.GRPCInferenceService", MODEL_NAME):
            assert _status(channel, service) == SERVING, service


def test_health_follows_a_load_whose_call_was_cancelled_by_its_deadline(
    repo_copy: Path, start_server: StartServer
) -> None:
    with (
        _explicit(start_server, repo_copy, "--warmup-runs", "300") as srv,  # a slow load
        grpc.insecure_channel(srv.address) as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.RepositoryModelUnload(
            pb.RepositoryModelUnloadRequest(model_name=MODEL_NAME), timeout=TIMEOUT,
            metadata=CONTROL,
        )  # fmt: skip
        assert _status(channel, MODEL_NAME) == NOT_SERVING
        with pytest.raises(grpc.RpcError) as raised:  # loading (hash, warm-up) takes longer
            stub.RepositoryModelLoad(
                pb.RepositoryModelLoadRequest(model_name=MODEL_NAME), timeout=0.05,
                metadata=CONTROL,
            )  # fmt: skip
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # the load goes on to the end, and health says so afterwards
        wait_until_serving(srv.address, deadline_s=30, service=MODEL_NAME)
        wait_until_serving(srv.address, deadline_s=30, service="inference.GRPCInferenceService")


def test_every_health_watcher_hears_the_shutdown_after_one_leaves(
    model_repository: Path, start_server: StartServer
) -> None:
    """grpcio-health-checking's aio servicer forgot every watcher of a service once one left."""
    with start_server(model_repository, "--grace-period-s", "2") as srv:
        channel = grpc.insecure_channel(srv.address)
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
        leaving = health.Watch(request, timeout=30)
        staying = health.Watch(request, timeout=30)
        assert next(leaving).status == SERVING and next(staying).status == SERVING
        leaving.cancel()
        seen: list[int] = []

        def watch() -> None:
            with contextlib.suppress(grpc.RpcError):
                seen.extend(reply.status for reply in staying)

        thread = threading.Thread(target=watch)
        thread.start()
        srv.process.send_signal(signal.SIGHUP)  # handled as SIGTERM: drain, then exit 0
        assert srv.process.wait(timeout=20) == 0
        thread.join(timeout=10)
        channel.close()
    assert seen[:1] == [NOT_SERVING]
    assert "shutting down: NOT_SERVING" in srv.log()


def test_health_watchers_cannot_take_every_call_slot(
    model_repository: Path, start_server: StartServer, test_split: HeldOutSplit
) -> None:
    """Health needs no token and each Watch holds a call slot for its life: 8 idle watchers took
    all 8 slots of a server started with --max-concurrent-rpcs 8, and inference got nothing."""
    with start_server(model_repository, "--max-concurrent-rpcs", "8") as srv:
        channel = grpc.insecure_channel(srv.address)
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="")
        watches = [health.Watch(request, timeout=30) for _ in range(2)]  # the cap: 8 // 4
        assert [next(w).status for w in watches] == [SERVING, SERVING]
        with pytest.raises(grpc.RpcError) as raised:
            next(health.Watch(request, timeout=30))
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "health Watch: 2 streams open, the limit; use Check" in str(raised.value.details())
        assert health.Check(request, timeout=10).status == SERVING
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ModelInfer(infer_request(test_split.features[:1]), timeout=10).outputs
        watches[0].cancel()
        deadline = time.monotonic() + 10
        while True:  # the slot comes back once the server has seen the cancel (bounded)
            try:
                again = health.Watch(request, timeout=30)
                watches.append(again)
                assert next(again).status == SERVING
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        for watch in watches[1:]:
            watch.cancel()
        channel.close()


def test_a_watcher_hears_a_shutdown_that_comes_while_its_last_reply_is_being_sent() -> None:
    """The race behind a flaky shutdown test: SIGTERM landed while Watch was suspended in the yield
    of SERVING, and on resuming it saw the stop flag and ended the stream (OK, no NOT_SERVING).
    Driven on the servicer itself, so the interleaving is exact rather than left to chance."""
    import asyncio

    from stablemlp.serving.grpc.health import HealthServicer

    async def interleave() -> list[int]:
        health = HealthServicer()
        stream = health.Watch(health_pb2.HealthCheckRequest(service=""), context=None)
        first = await anext(stream)  # the handler is now suspended inside its yield
        health.enter_graceful_shutdown()
        return [first.status] + [reply.status async for reply in stream]

    assert asyncio.run(interleave()) == [SERVING, NOT_SERVING]


def _manifest_edit(text: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        manifest = (folder / "manifest.json").read_text()
        (folder / "manifest.json").write_text(manifest.replace('"threshold": 0.5', text, 1))

    return edit


HOSTILE_MANIFESTS = {
    "infinity": ('"threshold": Infinity', "Infinity is not a number JSON allows"),
    "huge number": ('"threshold": 1e15', "'threshold': got 1000000000000000.0, expected 0..1"),
    "huge version": ('"threshold": 0.5, "version": 1000000000000000000000', "'version'"),
    "deep nesting": ('"threshold": 0.5, "x": ' + "[" * 100_000 + "]" * 100_000, "nested"),
    "not an object": ('"threshold": 0.5, "inputs": 7', "'inputs': got int, expected list"),
}


def test_hostile_manifests_are_refused_with_their_reason_and_stray_folders_ignored(
    repo_copy: Path,
) -> None:
    model = repo_copy / MODEL_NAME
    for name in ("\u00b2", "\uff12", "007", "-3"):  # not ASCII [1-9][0-9]*: not versions
        shutil.copytree(model / "1", model / name)
    for version, (text, _) in enumerate(HOSTILE_MANIFESTS.values(), start=2):
        publish_version(repo_copy, version, edit=_manifest_edit(text))
    repository = cpu_repository(repo_copy, "all")
    with pytest.raises(Exception, match="model 'breast_cancer' version"):
        repository.load_all()  # the first refusal is raised; every version was looked at
    rows = {version: (state, reason) for _, version, state, reason in repository.index()}
    assert rows["1"] == ("READY", "")
    for version, (_, reason) in enumerate(HOSTILE_MANIFESTS.values(), start=2):
        state, why = rows[str(version)]
        assert state == "UNAVAILABLE" and reason in why and len(why) <= 600, (version, why)
    assert set(rows) == {str(v) for v in range(1, len(HOSTILE_MANIFESTS) + 2)}


def test_identical_failures_are_logged_a_few_times_then_counted(
    model_repository: Path, start_server: StartServer, test_split: HeldOutSplit
) -> None:
    with (
        start_server(model_repository, env={"STABLEMLP_AUTH_TOKEN": "s3cret"}) as srv,
        grpc.insecure_channel(srv.address) as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        good = (("authorization", "Bearer s3cret"),)
        for _ in range(40):
            with pytest.raises(grpc.RpcError):
                stub.ModelInfer(
                    infer_request(test_split.features[:1, :3]), timeout=TIMEOUT, metadata=good
                )
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(infer_request(test_split.features[:1]), timeout=TIMEOUT)  # no token
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        log = srv.wait_for_log("ModelInfer failed: UNAUTHENTICATED")
        stats = stub.ModelStatistics(
            pb.ModelStatisticsRequest(name=MODEL_NAME), timeout=TIMEOUT, metadata=good
        )
    assert log.count("shape[1]: got 3, expected 30") == BURST_LINES
    assert stats.model_stats[0].inference_stats.fail.count == 40  # the 35 unlogged still counted
    refused = next(line for line in log.splitlines() if "UNAUTHENTICATED" in line)
    assert "s3cret" not in log and "from ipv4:127.0.0.1:" in refused  # who was refused


MALFORMED_HTTP = (  # each makes aiohttp's parser raise before any handler of ours runs
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\r\n\r\n",  # a TLS hello on the plain port
    b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",  # no Host
)


def test_library_errors_and_distinct_failures_cannot_flood_the_log(
    model_repository: Path, start_server: StartServer, test_split: HeldOutSplit
) -> None:
    """Issue 23.8: 4,000 malformed HTTP requests wrote 2.28 MB of aiohttp tracebacks, and 9,000
    distinct failing calls 9,000 lines. Now aiohttp's (and gRPC's) error records are one line
    each through the burst limiter, and all failure lines together are capped per window."""
    import socket

    from stablemlp.serving.observe.call_log import TOTAL_LINES

    with start_server(model_repository) as srv:
        host, port = srv.rest_url.removeprefix("http://").rsplit(":", 1)
        for i in range(400):
            with socket.create_connection((host, int(port)), timeout=TIMEOUT) as connection:
                connection.sendall(MALFORMED_HTTP[i % len(MALFORMED_HTTP)])
                with contextlib.suppress(OSError):
                    connection.recv(4096)  # aiohttp's 400, then it closes
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for i in range(300):  # every one its own message: "model 'm-0': not found ..."
                with pytest.raises(grpc.RpcError):
                    stub.ModelInfer(infer_request(test_split.features[:1], model_name=f"m-{i}"),
                                    timeout=TIMEOUT)  # fmt: skip
        log = srv.wait_for_log("'m-0'")
    assert "Traceback" not in log
    library = [line for line in log.splitlines() if "aiohttp" in line]
    assert 0 < len(library) <= len(MALFORMED_HTTP) * BURST_LINES, library
    assert all("BadHttp" in line or "InvalidURL" in line for line in library)
    failed = [line for line in log.splitlines() if "failed: NOT_FOUND" in line]
    assert 0 < len(failed) <= TOTAL_LINES


def _fifo(path: Path) -> None:
    import os

    path.unlink()
    os.mkfifo(path)


def test_a_fifo_in_a_version_folder_is_refused_at_once_and_other_versions_load(
    model_repository: Path, tmp_path: Path
) -> None:
    """Issue 23.4: opening a FIFO blocks until a writer comes, so a load that opened one held its
    model's lock and a worker thread for good (and SIGTERM never finished). Now only regular
    files are opened, without blocking, and other versions and models load beside it."""

    repository = Path(shutil.copytree(model_repository, tmp_path / "repo"))
    publish_version(repository, 2, edit=lambda folder: _fifo(folder / "manifest.json"))
    publish_version(repository, 3, edit=lambda folder: _fifo(folder / "model.onnx"))
    served = cpu_repository(repository, policy="all")
    failures: list[BaseException] = []

    def load() -> None:
        try:
            served.load_all()
        except BaseException as err:  # the test reads it below
            failures.append(err)

    loader = threading.Thread(target=load, daemon=True)  # before: blocked in open() for good
    loader.start()
    loader.join(timeout=30)
    assert not loader.is_alive(), "the load is blocked on a FIFO"
    assert len(failures) == 1 and "not a regular file" in str(failures[0])
    reasons = {version: (state, reason) for _, version, state, reason in served.index()}
    assert reasons["1"] == ("READY", "")
    assert reasons["2"] == ("UNAVAILABLE", "manifest.json: not a regular file (a FIFO, device "
                            "or folder)")  # fmt: skip
    assert reasons["3"][1].endswith("model.onnx: not a regular file (a FIFO, device or folder)")


def test_in_explicit_mode_a_fifo_neither_hangs_its_load_nor_holds_up_others(
    repo_copy: Path, start_server: StartServer
) -> None:
    """Issue 23.4, explicit mode: the load of a model with a FIFO held the repository lock for
    good, so every later load, unload and RepositoryIndex timed out. Now the load is refused at
    once, with its reason in the index, and the other model loads and unloads as before."""
    with (
        _explicit(start_server, repo_copy) as srv,
        grpc.insecure_channel(srv.address) as channel,
    ):
        stuck = repo_copy / "stuck" / "1"  # published while the server runs
        shutil.copytree(repo_copy / MODEL_NAME / "1", stuck)
        _fifo(stuck / "manifest.json")
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(3):  # before: the first never returned, the others waited on its lock
            with pytest.raises(grpc.RpcError) as raised:
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="stuck"),
                                         timeout=TIMEOUT, metadata=CONTROL)  # fmt: skip
            assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "manifest.json: not a regular file" in raised.value.details()
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=TIMEOUT)
        reasons = {(m.name, m.version): m.reason for m in index.models}
        assert "not a regular file" in reasons["stuck", "1"]
        unload = pb.RepositoryModelUnloadRequest(model_name=MODEL_NAME)
        stub.RepositoryModelUnload(unload, timeout=TIMEOUT, metadata=CONTROL)
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=MODEL_NAME),
                                 timeout=60, metadata=CONTROL)  # fmt: skip
        ready = pb.ModelReadyRequest(name=MODEL_NAME)
        assert stub.ModelReady(ready, timeout=TIMEOUT).ready
