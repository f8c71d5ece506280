"""Server processes under test: start, wait for health SERVING, read CPU and memory, stop.

Both our server and the transport floor log "ready: listening on HOST:PORT" once bound (port 0
picks a free one); grpc.health.v1 is then polled with a deadline. CPU and RSS come from
/proc/<pid> (Linux), so the benchmark needs no extra dependency.
"""

from __future__ import annotations

import contextlib
import glob
import ipaddress
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 60.0  # import + load + warm-up on a busy 2-core machine
STOP_TIMEOUT_S = 20.0
_READY = re.compile(r"ready: listening on (\S+)")
_TICKS = os.sysconf("SC_CLK_TCK")


def child_env() -> dict[str, str]:
    """The environment for our child processes (same interpreter, so the same installed
    `stablemlp`), with INFO logging."""
    return {**os.environ, "STABLEMLP_LOG_LEVEL": "INFO"}


# Our server's defaults, except ports: its Prometheus endpoint (on, as in production) takes any
# free port instead of Triton's fixed 8002, which another server on the machine may hold.
OUR_SERVER_ENV = {"STABLEMLP_METRICS_PORT": "0"}


def our_server_command(repository: Path, extra: Sequence[str] = ()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "stablemlp",
        "serve",
        "--model-repository",
        str(repository),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--http-port",  # REST on a free port too (Triton's 8000 may be taken)
        "0",
        *extra,
    ]


def floor_server_command(repository: Path, run_model: bool = False) -> list[str]:
    """The transport floor, or with `run_model` the model floor (bench/floors.py)."""
    command = [
        sys.executable,
        "-m",
        "stablemlp.bench.floors",
        "--model-repository",
        str(repository),
    ]
    return [*command, "--run-model"] if run_model else command


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants (a `--workers N` supervisor and its server processes)."""
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        for task in glob.glob(f"/proc/{current}/task/*/children"):
            with contextlib.suppress(OSError), open(task) as children:
                pending.extend(int(child) for child in children.read().split())
    return tree


def split_cores() -> tuple[set[int], set[int]]:
    """This process's usable cores halved: (the servers', the load generators')."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise RuntimeError(f"--pin needs at least 2 usable cores, found {len(cores)}")
    half = len(cores) // 2
    return set(cores[:half]), set(cores[half:])


def pin(pid: int, cores: set[int]) -> None:
    """Bind every thread of `pid` and its descendants to `cores`; threads made later inherit."""
    for member in process_tree(pid):
        for task in glob.glob(f"/proc/{member}/task/*"):
            with contextlib.suppress(OSError):  # a thread that has just ended
                os.sched_setaffinity(int(task.rsplit("/", 1)[1]), cores)


def pin_servers(server_pids: Sequence[int], stack: contextlib.ExitStack) -> dict[str, list[int]]:
    """Servers on one half of the cores; this thread, and so the load processes and
    perf_analyzer it starts from now on, on the other (until the run ends)."""
    server_cores, load_cores = split_cores()
    for pid in server_pids:
        pin(pid, server_cores)
    stack.callback(os.sched_setaffinity, 0, os.sched_getaffinity(0))
    os.sched_setaffinity(0, load_cores)
    return {"server_cores": sorted(server_cores), "load_cores": sorted(load_cores)}


def cpu_seconds(pid: int) -> float:
    """utime + stime so far of every thread of `pid` and its descendants (/proc stat 14, 15)."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{member}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / _TICKS


def memory_mb(pid: int) -> dict[str, float]:
    """Resident set now (VmRSS) and at its peak (VmHWM), in MB (10^6 bytes), summed over `pid`
    and its descendants."""
    found = {"VmRSS": 0.0, "VmHWM": 0.0}
    for member in process_tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{member}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in found:
                    found[key] += int(value.split()[0]) * 1024 / 1e6
    return {"rss_mb": found["VmRSS"], "peak_rss_mb": found["VmHWM"]}


def wait_until_serving(address: str, deadline: float) -> None:
    """Poll grpc.health.v1 Check("") until SERVING; TimeoutError at `deadline` (monotonic)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(10_000):  # bounded; each call waits for the channel, not a sleep
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(), timeout=remaining, wait_for_ready=True
                )
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                continue
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
    raise TimeoutError(f"{address}: health not SERVING in time")


def _drain(stream: IO[str], lines: list[str], ready: queue.Queue[str]) -> None:
    for line in iter(stream.readline, ""):
        lines.append(line)
        match = _READY.search(line)
        if match:
            ready.put(match.group(1))
    ready.put("")  # EOF: the process ended


@dataclass
class ServerProcess:
    """A running server; `seconds_to_serving` runs from just before Popen to health SERVING."""

    name: str
    process: subprocess.Popen[str]
    address: str
    seconds_to_serving: float
    lines: list[str]

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=STOP_TIMEOUT_S)


def start_server(
    name: str,
    command: list[str],
    env: Mapping[str, str] | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> ServerProcess:
    """Start `command` (environment: child_env() plus `env`) and wait until it serves."""
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        env={**child_env(), **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    ready: queue.Queue[str] = queue.Queue()
    assert process.stderr is not None
    threading.Thread(target=_drain, args=(process.stderr, lines, ready), daemon=True).start()
    server = ServerProcess(name, process, "", 0.0, lines)
    try:
        server.address = ready.get(timeout=timeout_s)
        if not server.address:
            raise RuntimeError(f"{name} exited before it was ready")
        wait_until_serving(server.address, started + timeout_s)
    except (queue.Empty, RuntimeError, TimeoutError) as err:
        server.stop()
        raise RuntimeError(
            f"{name} did not become ready ({err}):\n{server.log()[-4000:]}"
        ) from None
    server.seconds_to_serving = time.monotonic() - started
    return server


@dataclass(frozen=True)
class ImportTiming:
    seconds: float  # `import stablemlp.serving.server`, fresh interpreter, its start excluded
    interpreter_seconds: float  # `python -c pass`, for scale
    torch_imported: bool


def measure_import(timeout_s: float = 60.0) -> ImportTiming:
    """Time the serving path's imports in a fresh interpreter and check torch stays out."""
    code = (
        "import sys, time; t = time.perf_counter(); import stablemlp.serving.server; "
        "print(time.perf_counter() - t, 'torch' in sys.modules)"
    )
    run = [sys.executable, "-c", code]
    out = subprocess.run(run, env=child_env(), capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"importing serving.server failed:\n{out.stderr[-2000:]}")
    seconds, torch_flag = out.stdout.split()
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "pass"], env=child_env(), check=True, timeout=timeout_s)
    return ImportTiming(float(seconds), time.monotonic() - started, torch_flag == "True")


def is_loopback(address: str) -> bool:
    """HOST:PORT on this machine only: the benchmark never sends load elsewhere."""
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


__all__ = [
    "OUR_SERVER_ENV",
    "ImportTiming",
    "ServerProcess",
    "cpu_seconds",
    "floor_server_command",
    "is_loopback",
    "measure_import",
    "memory_mb",
    "our_server_command",
    "pin",
    "pin_servers",
    "process_tree",
    "split_cores",
    "start_server",
    "wait_until_serving",
]
