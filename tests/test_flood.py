"""Memory is bounded before admission (issue 12.1): a flood of maximum-size calls from many
connections gets refusals at once, the server's memory stays within a bound, and it serves on."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import MODEL_NAME, ServerProcess

from stablemlp.bench import flood

StartServer = Callable[..., contextlib.AbstractContextManager[ServerProcess]]
LIMITS = ["--max-connections", "16", "--max-concurrent-rpcs", "16", "--max-streams-per-connection",
          "8", "--max-inflight", "8"]  # fmt: skip
GROWTH_MB = 150  # what the flood may add to the idle server's memory, far under a 512 MiB limit


def _args(repository: Path, **values: object) -> argparse.Namespace:
    defaults = {"model_repository": repository, "model": MODEL_NAME, "calls": 400, "channels": 40,
                "message_bytes": 0, "token": "", "send_token": "", "deadline_s": 30.0,
                "shape": "padding"}  # fmt: skip
    return argparse.Namespace(**{**defaults, **values})


def test_a_flood_of_maximum_size_calls_is_refused_early_and_memory_stays_bounded(
    model_repository: Path, start_server: StartServer
) -> None:
    with start_server(model_repository, *LIMITS) as srv:
        limit = flood.message_limit(srv.log())
        assert limit < 300_000  # sized to the model (1024 x 30 x 4 B + headroom), not 4 MiB
        pid = srv.process.pid
        report = flood.run(_args(model_repository), srv.address, pid, limit)
        assert set(report["codes"]) <= {"OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "CANCELLED"}
        refused = report["codes"].get("RESOURCE_EXHAUSTED", 0) + report["codes"].get(
            "UNAVAILABLE", 0
        )
        assert refused > 0 and report["codes"].get("OK", 0) > 0, report
        assert report["rss_mb_peak"] - report["rss_mb_idle"] < GROWTH_MB, report
        assert report["answers_afterwards"]
        too_big = flood.run(
            _args(model_repository, calls=20, channels=4, message_bytes=4_190_000),
            srv.address, pid, limit,
        )  # fmt: skip
        assert too_big["codes"] == {"RESOURCE_EXHAUSTED": 20}
        assert too_big["answers_afterwards"]


BOUNDED = {
    "parameters": "parameters: got more than 64 entries",
    "input-parameters": "inputs[0].parameters: got more than 64 entries",
    "inputs": "inputs: got more than 1024 entries",
    "outputs": "outputs: got more than 1024 entries",
    "shape": "inputs[0].shape: got more than 32 dimensions",
    "bytes": "inputs[0].contents: got more than",
}
ENTRY_GROWTH_MB = 40  # a message's worth of entries, held by no call (measured: under 15 MB)


def test_messages_packed_with_entries_are_refused_before_they_are_built(
    model_repository: Path, start_server: StartServer
) -> None:
    """Issue 23.2: a message under the size limit packed with tiny entries (94k empty inputs,
    23k distinct parameters) was built whole before anything looked at it: valid ones were served
    holding it (RSS 578-694 MB at 300 calls), invalid ones cost ~194 ms of the event loop each.
    Now each is refused from its bytes, and the event loop stays free for other clients."""
    import time

    import grpc

    with start_server(model_repository, "--max-concurrent-rpcs", "64") as srv:
        limit, pid = flood.message_limit(srv.log()), srv.process.pid
        for shape, message in BOUNDED.items():
            report = flood.run(
                _args(model_repository, calls=100, channels=10, shape=shape),
                srv.address,
                pid,
                limit,
            )
            assert report["codes"] == {"INVALID_ARGUMENT": 100}, (shape, report)
            assert report["rss_mb_peak"] - report["rss_mb_idle"] < ENTRY_GROWTH_MB, report
            assert report["answers_afterwards"]
            srv.wait_for_log(message)
        data = flood.payload(model_repository, MODEL_NAME, limit - 1024, "inputs")
        with grpc.insecure_channel(srv.address) as channel:
            call = channel.unary_unary(flood.METHOD, None, None)
            took = []
            for _ in range(5):
                started = time.perf_counter()
                try:
                    call(data, timeout=30)
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
                took.append(time.perf_counter() - started)
        assert sorted(took)[2] < 0.05, took  # before: 0.19-0.6 s each, on the event loop


def test_a_client_with_64_calls_on_one_connection_is_never_refused_a_stream(
    server: ServerProcess, test_split: Any
) -> None:
    """The soak found it: with 64 streams allowed per connection, an asyncio client keeping 64
    calls in flight on one connection (each reissued as soon as it ends) got RST_STREAM
    (UNAVAILABLE) now and then, as gRPC frees a finished stream's slot a moment after the client
    sees it end (134 of 23,495 calls in 8 s). The default leaves twice that room."""
    import asyncio
    import collections

    import grpc
    from conftest import infer_request

    from stablemlp.protos import grpc_service_pb2_grpc as pb_grpc

    request = infer_request(test_split.features[:1])

    async def run() -> collections.Counter[str]:
        codes: collections.Counter[str] = collections.Counter()
        async with grpc.aio.insecure_channel(server.address) as channel:  # one connection
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def caller() -> None:
                for _ in range(60):  # bounded: 64 callers x 60 calls
                    try:
                        await stub.ModelInfer(request, timeout=30)
                        codes["OK"] += 1
                    except grpc.aio.AioRpcError as err:
                        codes[err.code().name] += 1

            await asyncio.gather(*(caller() for _ in range(64)))
        return codes

    assert asyncio.run(run()) == {"OK": 64 * 60}


REST_LIMITS = [*LIMITS, "--client-timeout-s", "2"]


def _rest_args(repository: Path, attack: str, body_bytes: int, **values: object) -> Any:
    from stablemlp.bench import rest_flood

    argv = ["--model-repository", str(repository), "--model", MODEL_NAME, "--attack", attack,
            "--body-bytes", str(body_bytes), "--deadline-s", "20"]  # fmt: skip
    for name, value in values.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return rest_flood.parser().parse_args(argv)


def test_rest_floods_are_refused_early_and_memory_stays_bounded(
    model_repository: Path, start_server: StartServer
) -> None:
    """REST had no cap on connections, pipelined requests or bodies held: 200 connections
    pipelining large headers took a server to 2.8 GB, 3,000 maximum bodies to 4.2 GB."""
    from stablemlp.bench import rest_flood

    with start_server(model_repository, *REST_LIMITS) as srv:
        port = int(srv.rest_url.rsplit(":", 1)[1])
        limit = flood.message_limit(srv.log())
        body_bytes = limit * rest_flood.JSON_EXPANSION
        pid = srv.process.pid
        headers = rest_flood.run(
            _rest_args(model_repository, "headers", body_bytes, connections=40, hold_s=3),
            port, pid,
        )  # fmt: skip
        outcomes = headers["outcomes"]
        assert outcomes.get("HTTP/1.1 200 OK", 0) == 16, headers  # 16 connections, the limit
        assert set(outcomes) <= {"HTTP/1.1 200 OK", "HTTP/1.1 503 Service Unavailable",
                                 "BrokenPipeError", "ConnectionResetError"}, headers  # fmt: skip
        # Maximum bodies sent at full speed: how many overlap depends on timing; each is read,
        # refused for the bytes held, or refused for the connections open, nothing else.
        bodies = rest_flood.run(
            _rest_args(model_repository, "bodies", body_bytes, connections=40), port, pid
        )
        assert "HTTP/1.1 400 Bad Request" in bodies["outcomes"], bodies  # the padding: no inputs
        refused = {"HTTP/1.1 429 Too Many Requests", "HTTP/1.1 503 Service Unavailable",
                   "BrokenPipeError", "ConnectionResetError"}  # fmt: skip
        assert set(bodies["outcomes"]) <= {"HTTP/1.1 400 Bad Request", *refused}, bodies
        # Held bodies overlap for sure: 16 calls' worth of message bytes is 2 bodies of 6 each.
        slow = rest_flood.run(
            _rest_args(model_repository, "slow", body_bytes, connections=8, hold_s=3), port, pid
        )
        assert slow["outcomes"] == {"HTTP/1.1 429 Too Many Requests": 6,
                                    "HTTP/1.1 408 Request Timeout": 2}, slow  # fmt: skip
        assert "not received within 2 s" in srv.log()
        for report in (headers, bodies, slow):
            assert report["rss_mb_peak"] - report["rss_mb_idle"] < GROWTH_MB, report
            assert report["answers_after_s"] is not None, report  # its slots freed in ~2 s


def test_rest_connections_that_send_nothing_are_closed(
    model_repository: Path, start_server: StartServer
) -> None:
    """With connections capped, ones that never send a request would hold the slots for good."""
    with start_server(model_repository, *REST_LIMITS) as srv:
        port = int(srv.rest_url.rsplit(":", 1)[1])
        args = _rest_args(model_repository, "idle", 1, connections=20)
        report = rest_flood_run(args, port, srv.process.pid)
        closed = [o for o in report["outcomes"] if o.startswith("closed after")]
        assert closed and all(int(o.split()[2]) <= 4 for o in closed), report  # 2 s + a sweep
        assert report["answers_after_s"] is not None, report


def rest_flood_run(args: Any, port: int, pid: int) -> dict[str, Any]:
    from stablemlp.bench import rest_flood

    return rest_flood.run(args, port, pid)


def test_silent_grpc_connections_give_back_their_slots(
    model_repository: Path, start_server: StartServer
) -> None:
    """With connections capped, 128 sockets that never sent a byte took the gRPC port down for
    every client, for good. Now each is closed after --client-timeout-s."""
    import socket
    import time

    import grpc

    from stablemlp.protos import grpc_service_pb2 as pb
    from stablemlp.protos import grpc_service_pb2_grpc as pb_grpc

    args = ["--max-connections", "4", "--client-timeout-s", "2"]
    with start_server(model_repository, *args) as srv:
        host, port = srv.address.rsplit(":", 1)
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
        opened = time.monotonic()
        silent = [socket.create_connection((host, int(port)), timeout=10) for _ in range(4)]
        silent[0].sendall(preface)  # one says hello (HTTP/2 preface and SETTINGS), then nothing

        def ready() -> grpc.StatusCode:
            with grpc.insecure_channel(srv.address) as channel:
                try:
                    pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(
                        pb.ServerReadyRequest(), timeout=5
                    )
                except grpc.RpcError as err:
                    return err.code()  # type: ignore[no-any-return]
            return grpc.StatusCode.OK

        try:
            for sock in silent:  # the server closes each: recv sees the end (bounded: timeout)
                while sock.recv(65536):
                    pass
            held = time.monotonic() - opened
            assert 1.5 < held < 10, held  # closed for being silent 2 s, not at once
            assert ready() == grpc.StatusCode.OK
        finally:
            for sock in silent:
                sock.close()
