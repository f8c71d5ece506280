"""scripts/gpu_check.py's side of the wire: `stablemlp serve` processes and bounded load loops.

Servers are started through the CLI on 127.0.0.1 port 0 by the harness tests and bench share
(stablemlp.bench.servers) and spoken to over the KServe v2 gRPC protocol and the client API only;
each wait has a deadline, each load loop a count and a time limit.
"""

from __future__ import annotations

import collections
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from stablemlp.bench.servers import ServerProcess, serve_command, spawn_server, wait_until_serving
from stablemlp.protos import grpc_service_pb2 as pb
from stablemlp.protos import grpc_service_pb2_grpc as pb_grpc
from stablemlp.serving.client import predict

READINESS = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # ONNX Runtime and podman colour their output
ORT_ERROR = re.compile(r"(?:\[ONNXRuntimeError\] : \d+ : \w+ : |EP Error )(.+)$")
ORT_LINE = re.compile(r"(.{1,400})$")  # any other error line: its end
RPC_TIMEOUT_S = 30.0
WARMUP_CALLS = 3


class CheckError(RuntimeError):
    """A check failed or could not run; the message says which and why."""


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment less any STABLEMLP_* setting (flags say what the check means),
    plus `extra`."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith("STABLEMLP_")}
    return {**kept, **extra}


def wait_serving(address: str, timeout_s: float) -> None:
    """Returns once grpc.health.v1 reports the inference service SERVING; bounded by timeout_s."""
    try:
        wait_until_serving(address, timeout_s, READINESS)
    except TimeoutError as err:
        raise CheckError(str(err)) from None


def wait_ready(server: ServerProcess, timeout_s: float) -> str:
    """The address it listens on; "" when the process ended without getting there."""
    try:
        return server.wait_ready(timeout_s)
    except TimeoutError as err:
        raise CheckError(str(err)) from None


def stop_reason(server: ServerProcess) -> str:
    """Its own one-line reason for stopping ("stablemlp serve: ..."), else its last line."""
    lines = [line.strip() for line in server.lines]
    said = [line for line in lines if line.startswith("stablemlp serve:")]
    return (said or [line for line in lines if line] or ["(no output)"])[-1]


def onnxruntime_errors(server: ServerProcess) -> list[str]:
    """ONNX Runtime's own error messages (why a provider did not load, say), shortened."""
    found = [line for line in server.lines if "[E:onnxruntime" in line or "EP Error" in line]
    return [(ORT_ERROR.search(line) or ORT_LINE.search(line)).group(1) for line in found]


class Fleet:
    """Every server one run starts (`stablemlp serve --device DEVICE` on 127.0.0.1:0, through the
    shared harness), so that all of them are stopped on the way out."""

    def __init__(self, repository: Path, extra: list[str], start_timeout_s: float) -> None:
        self.repository, self.extra, self.start_timeout_s = repository, extra, start_timeout_s
        self.servers: list[ServerProcess] = []

    def spawn(self, device: str, env: dict[str, str] | None = None) -> ServerProcess:
        flags = ["--device", device, "--metrics-port", "-1", "--http-port", "-1", *self.extra]
        command = serve_command(self.repository, *flags)
        base = child_env({"STABLEMLP_LOG_LEVEL": "INFO"})
        server = spawn_server(f"serve --device {device}", command, env, base_env=base)
        self.servers.append(server)
        return server

    def serving(self, device: str, env: dict[str, str] | None = None) -> tuple[ServerProcess, str]:
        """A server that must start: (it, its address) once health says SERVING."""
        server = self.spawn(device, env)
        address = wait_ready(server, self.start_timeout_s)
        if not address:
            server.stop()
            said = onnxruntime_errors(server)
            why = f"; ONNX Runtime: {said[-1]}" if said else ""
            raise CheckError(f"serve --device {device} did not start: {stop_reason(server)}{why}")
        wait_serving(address, self.start_timeout_s)
        server.seconds_to_serving = time.monotonic() - server.started
        return server, address

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()


def stub_for(channel: grpc.Channel) -> Any:
    return pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


def describe(address: str, model: str) -> dict[str, Any]:
    """What ModelConfig says: instance kind, providers in order, max_batch_size, the input."""
    with grpc.insecure_channel(address) as channel:
        request = pb.ModelConfigRequest(name=model)
        config = stub_for(channel).ModelConfig(request, timeout=RPC_TIMEOUT_S).config
    group = config.instance_group[0]
    kind = group.DESCRIPTOR.fields_by_name["kind"].enum_type.values_by_number[group.kind].name
    providers = config.parameters["providers"].string_value
    return {
        "kind": kind,
        "providers": [name.strip() for name in providers.split(",") if name.strip()],
        "max_batch_size": int(config.max_batch_size),
        "input": config.input[0].name,
    }


def served(address: str, model: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probability, label) per row, through the client (which splits at max_batch_size)."""
    answers = predict(address, rows, model=model, timeout=RPC_TIMEOUT_S)
    probability = np.array([p for p, _ in answers], dtype=np.float32)
    return probability, np.array([label for _, label in answers], dtype=np.int64)


def chunk_requests(model: str, config: dict[str, Any], rows: np.ndarray) -> list[Any]:
    """One call of len(rows) rows as the client sends it: requests of max_batch_size rows."""
    step = max(1, config["max_batch_size"])
    requests = []
    for start in range(0, len(rows), step):
        chunk = np.ascontiguousarray(rows[start : start + step], dtype="<f4")
        request = pb.ModelInferRequest(model_name=model)
        request.inputs.add(name=config["input"], datatype="FP32", shape=chunk.shape)
        request.raw_input_contents.append(chunk.tobytes())
        requests.append(request)
    return requests


def timed(step: Callable[[], object], seconds: float, limit: int) -> dict[str, float]:
    """Calls `step` until `seconds` pass or `limit` calls are done, after a few warm-up calls."""
    for _ in range(WARMUP_CALLS):
        step()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < limit and time.perf_counter() - start < seconds:
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    elapsed = time.perf_counter() - start
    return {
        "calls": len(times),
        "seconds": round(elapsed, 3),
        "calls_per_s": len(times) / elapsed,
        "p50_ms": float(np.median(times)) * 1e3,
    }


def sequential(stub: Any, requests: list[Any]) -> Callable[[], object]:
    """One call: its requests one after the other, as client.predict sends them."""
    return lambda: [stub.ModelInfer(request, timeout=RPC_TIMEOUT_S) for request in requests]


def windowed(stub: Any, requests: list[Any], concurrency: int, seconds: float, limit: int) -> dict:
    """`concurrency` requests kept in flight on one channel; bounded in time and in calls."""
    for request in requests[:WARMUP_CALLS]:
        stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)
    pending: collections.deque[Any] = collections.deque()
    sent = done = 0
    start = time.perf_counter()
    while True:
        while (
            len(pending) < concurrency
            and sent < limit * len(requests)
            and time.perf_counter() - start < seconds
        ):
            call = stub.ModelInfer.future(requests[sent % len(requests)], timeout=RPC_TIMEOUT_S)
            pending.append(call)
            sent += 1
        if not pending:
            break
        pending.popleft().result()  # an error reply raises grpc.RpcError
        done += 1
    elapsed = time.perf_counter() - start
    calls = done / len(requests)
    return {"calls": round(calls, 2), "seconds": round(elapsed, 3), "calls_per_s": calls / elapsed}
