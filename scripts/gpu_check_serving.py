"""scripts/gpu_check.py's side of the wire: `stablemlp serve` processes and bounded load loops.

Servers are started through the CLI on 127.0.0.1 port 0 and spoken to over the KServe v2 gRPC
protocol and the client API only; each wait has a deadline, each load loop a count and a time limit.
"""

from __future__ import annotations

import collections
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stablemlp.protos import grpc_service_pb2 as pb
from stablemlp.protos import grpc_service_pb2_grpc as pb_grpc
from stablemlp.serving.client import predict

READINESS = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
READY = re.compile(r"ready: listening on (\S+)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # ONNX Runtime colours its own warnings
ORT_ERROR = re.compile(r"(?:\[ONNXRuntimeError\] : \d+ : \w+ : |EP Error )(.+)$")
ORT_LINE = re.compile(r"(.{1,400})$")  # any other error line: its end
RPC_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
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
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service=READINESS)
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            request, timeout=timeout_s, wait_for_ready=True
        )
        try:
            for reply in watch:  # one message per status change; the deadline bounds it
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError as err:
            raise CheckError(f"{address}: health not SERVING: {err.code().name}") from None
        finally:
            watch.cancel()
    raise CheckError(f"{address}: health stream ended before SERVING")


class Server:
    """`stablemlp serve --device DEVICE` on 127.0.0.1:0; its stdout and stderr kept line by line."""

    def __init__(self, repository: Path, device: str, extra: list[str], env: dict[str, str]):
        self.device = device
        command = [sys.executable, "-m", "stablemlp", "serve", "--model-repository"]
        command += [str(repository), "--host", "127.0.0.1", "--port", "0", "--device", device]
        command += ["--metrics-port", "-1", "--http-port", "-1", *extra]
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            command,
            env=child_env({"STABLEMLP_LOG_LEVEL": "INFO", **env}),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.ready_s = 0.0  # process start to the "ready: listening on" line
        self.serving_s = 0.0  # process start to health SERVING
        self._address: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for line in iter(self.process.stdout.readline, ""):
            self.lines.append(ANSI.sub("", line.rstrip("\n")))
            match = READY.search(line)
            if match:
                self.ready_s = time.perf_counter() - self.started
                self._address.put(match.group(1).rstrip('",'))
        self._address.put("")  # EOF: the process ended

    def wait_ready(self, timeout_s: float) -> str:
        """The address it listens on; "" when the process ended without getting there."""
        try:
            return self._address.get(timeout=timeout_s)
        except queue.Empty:
            wait = f"{timeout_s:.0f} s"
            raise CheckError(f"serve --device {self.device}: no ready line in {wait}") from None

    def wait_serving(self, address: str, timeout_s: float) -> float:
        """Seconds from process start until health reports the inference service SERVING."""
        wait_serving(address, timeout_s)
        self.serving_s = time.perf_counter() - self.started
        return self.serving_s

    def reason(self) -> str:
        """Its own one-line reason for stopping ("stablemlp serve: ..."), else its last line."""
        said = [line for line in self.lines if line.startswith("stablemlp serve:")]
        return (said or [line for line in self.lines if line.strip()] or ["(no output)"])[-1]

    def onnxruntime_errors(self) -> list[str]:
        """ONNX Runtime's own error messages (why a provider did not load, say), shortened."""
        found = [line for line in self.lines if "[E:onnxruntime" in line or "EP Error" in line]
        return [(ORT_ERROR.search(line) or ORT_LINE.search(line)).group(1) for line in found]

    def stop(self) -> int:
        """SIGTERM (a graceful stop), then SIGKILL after STOP_TIMEOUT_S; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=STOP_TIMEOUT_S)


class Fleet:
    """Every server one run starts, so that all of them are stopped on the way out."""

    def __init__(self, repository: Path, extra: list[str], start_timeout_s: float) -> None:
        self.repository, self.extra, self.start_timeout_s = repository, extra, start_timeout_s
        self.servers: list[Server] = []

    def spawn(self, device: str, env: dict[str, str] | None = None) -> Server:
        server = Server(self.repository, device, self.extra, env or {})
        self.servers.append(server)
        return server

    def serving(self, device: str, env: dict[str, str] | None = None) -> tuple[Server, str]:
        """A server that must start: (it, its address) once health says SERVING."""
        server = self.spawn(device, env)
        address = server.wait_ready(self.start_timeout_s)
        if not address:
            server.stop()
            said = server.onnxruntime_errors()
            why = f"; ONNX Runtime: {said[-1]}" if said else ""
            raise CheckError(f"serve --device {device} did not start: {server.reason()}{why}")
        server.wait_serving(address, self.start_timeout_s)
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
