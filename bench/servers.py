"""The server harness that tests, bench and scripts share: start a server process, read the port
it bound, wait for health SERVING, stop it; every wait bounded. Also its CPU and memory.

Our server and the benchmark's floors log "ready: listening on HOST:PORT" once bound (port 0 picks
a free one); grpc.health.v1 is then watched until SERVING, within the same deadline. CPU and RSS
come from /proc/<pid> (Linux), so the harness needs no extra dependency.
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
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 60.0  # import + load + warm-up on a busy 2-core machine
STOP_TIMEOUT_S = 20.0
LOG_POLL_S = 0.01  # wait_for_log re-reads the lines the reader thread appends
_READY = re.compile(r"ready: listening on (\S+)")
_REST = re.compile(r"rest: (https?://\S+?)/v2")
_METRICS = re.compile(r"metrics: (http://\S+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # ONNX Runtime colours its own warnings
_TICKS = os.sysconf("SC_CLK_TCK")


class ServerStartError(RuntimeError):
    """A server ended, or missed its deadline, before health said SERVING; the message ends with
    the tail of its log."""


def child_env() -> dict[str, str]:
    """The environment for our child processes (same interpreter, so the same installed
    `stablemlp`), with INFO logging."""
    return {**os.environ, "STABLEMLP_LOG_LEVEL": "INFO"}


# Our server's defaults, except ports: its Prometheus endpoint (on, as in production) takes any
# free port instead of Triton's fixed 8002, which another server on the machine may hold.
OUR_SERVER_ENV = {"STABLEMLP_METRICS_PORT": "0"}


def serve_command(repository: Path, *flags: str) -> list[str]:
    """`python -m stablemlp serve` on `repository`, gRPC on 127.0.0.1 and a free port, `flags`."""
    command = [sys.executable, "-m", "stablemlp", "serve", "--model-repository", str(repository)]
    return [*command, "--host", "127.0.0.1", "--port", "0", *flags]


def our_server_command(repository: Path, extra: Sequence[str] = ()) -> list[str]:
    """Our server as the benchmark runs it: REST on a free port too (Triton's 8000 may be
    taken)."""
    return serve_command(repository, "--http-port", "0", *extra)


def floor_server_command(repository: Path, run_model: bool = False) -> list[str]:
    """The transport floor, or with `run_model` the model floor (bench/speed/floors.py)."""
    command = [
        sys.executable,
        "-m",
        "stablemlp.bench.speed.floors",
        "--model-repository",
        str(repository),
    ]
    return [*command, "--run-model"] if run_model else command


def channel_to(address: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    """A plaintext channel, or a TLS one that checks the server's certificate for `localhost`
    (the harness's servers listen on 127.0.0.1)."""
    if credentials is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(
        address, credentials, options=[("grpc.ssl_target_name_override", "localhost")]
    )


def wait_until_serving(
    address: str,
    deadline_s: float,
    service: str = "",
    *,
    credentials: grpc.ChannelCredentials | None = None,
    metadata: tuple[tuple[str, str], ...] = (),
) -> None:
    """Watch grpc.health.v1 until `service` is SERVING; TimeoutError after `deadline_s`."""
    with channel_to(address, credentials) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=service),
            timeout=deadline_s,
            wait_for_ready=True,
            metadata=metadata or None,
        )
        try:
            for response in watch:  # one message per status change; the deadline bounds it
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError as err:
            raise TimeoutError(f"{address}: health '{service}' not SERVING: {err.code()}") from err
        finally:
            watch.cancel()
    raise TimeoutError(f"{address}: health stream for '{service}' ended before SERVING")


@dataclass
class ServerProcess:
    """A server subprocess and its output (stdout and stderr, line by line, colours removed)."""

    name: str
    process: subprocess.Popen[str]
    started: float  # time.monotonic() just before Popen
    lines: list[str] = field(default_factory=list)
    address: str = ""  # HOST:PORT from its ready line
    seconds_to_ready: float = 0.0  # start to the ready line
    seconds_to_serving: float = 0.0  # start to health SERVING
    _ready: queue.Queue[str] = field(default_factory=queue.Queue, repr=False)
    _reader: threading.Thread | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return "".join(self.lines)

    def read_output(self) -> None:
        """The reader thread's loop: keep every line, note the ready line's address."""
        assert self.process.stdout is not None
        for line in iter(self.process.stdout.readline, ""):
            self.lines.append(_ANSI.sub("", line))
            match = _READY.search(line)
            if match:
                self.seconds_to_ready = time.monotonic() - self.started
                self._ready.put(match.group(1).rstrip('",'))  # also inside a JSON log line
        self._ready.put("")  # EOF: the process ended

    def wait_ready(self, timeout_s: float) -> str:
        """The address from its ready line; "" when the process ended first. TimeoutError when
        neither happens within `timeout_s`."""
        try:
            self.address = self._ready.get(timeout=max(timeout_s, 0.0))
        except queue.Empty:
            raise TimeoutError(f"{self.name}: no ready line in {timeout_s:.0f} s") from None
        return self.address

    def wait_for_log(self, text: str, count: int = 1, deadline_s: float = 10.0) -> str:
        """The log once `text` occurs in it `count` times (lines arrive after the replies do)."""
        deadline = time.monotonic() + deadline_s
        while self.log().count(text) < count:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{text!r} not {count}x in the log:\n{self.log()}")
            time.sleep(LOG_POLL_S)  # polling the reader thread's list, bounded by the deadline
        return self.log()

    def _logged_url(self, pattern: re.Pattern[str], what: str) -> str:
        found = pattern.findall(self.log())
        if not found:
            raise LookupError(f"no {what} line in the server log")
        return str(found[0]).rstrip('",')

    @property
    def rest_url(self) -> str:
        """The REST front's base URL, e.g. http://127.0.0.1:PORT (no trailing /v2)."""
        return self._logged_url(_REST, "REST")

    @property
    def metrics_url(self) -> str:
        return self._logged_url(_METRICS, "metrics")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM (a graceful stop), SIGKILL after `timeout_s`; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(timeout=timeout_s)
        # The reader may still be behind the exited process by a pipe's worth of lines: the log
        # is complete only once it reached the end (bounded: the pipe closes with the process).
        if self._reader is not None:
            self._reader.join(timeout_s)
        return code


def spawn_server(
    name: str,
    command: Sequence[str],
    env: Mapping[str, str] | None = None,
    *,
    base_env: Mapping[str, str] | None = None,
) -> ServerProcess:
    """Start `command` (environment: `base_env`, child_env() by default, plus `env`) with a
    thread reading its output; it does not wait."""
    started = time.monotonic()
    process = subprocess.Popen(
        list(command),
        env={**(child_env() if base_env is None else base_env), **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server = ServerProcess(name, process, started)
    server._reader = threading.Thread(target=server.read_output, daemon=True)
    server._reader.start()
    return server


def start_server(
    name: str,
    command: Sequence[str],
    env: Mapping[str, str] | None = None,
    timeout_s: float = START_TIMEOUT_S,
    *,
    base_env: Mapping[str, str] | None = None,
    service: str = "",
    credentials: grpc.ChannelCredentials | None = None,
    metadata: tuple[tuple[str, str], ...] = (),
) -> ServerProcess:
    """Start `command` and wait, within `timeout_s` in all, until health says `service` is
    SERVING (`credentials` and `metadata` for that call); ServerStartError, with the server
    stopped, when it does not."""
    server = spawn_server(name, command, env, base_env=base_env)
    deadline = server.started + timeout_s
    try:
        if not server.wait_ready(deadline - time.monotonic()):
            raise ServerStartError(f"{name} exited (code {server.process.wait(STOP_TIMEOUT_S)})")
        wait_until_serving(
            server.address,
            max(deadline - time.monotonic(), 0.1),
            service,
            credentials=credentials,
            metadata=metadata,
        )
    except (ServerStartError, TimeoutError, subprocess.TimeoutExpired) as err:
        server.stop()
        raise ServerStartError(
            f"{name} did not become ready ({err}):\n{server.log()[-4000:]}"
        ) from None
    server.seconds_to_serving = time.monotonic() - server.started
    return server


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
    "START_TIMEOUT_S",
    "STOP_TIMEOUT_S",
    "ImportTiming",
    "ServerProcess",
    "ServerStartError",
    "channel_to",
    "child_env",
    "cpu_seconds",
    "floor_server_command",
    "is_loopback",
    "measure_import",
    "memory_mb",
    "our_server_command",
    "pin",
    "pin_servers",
    "process_tree",
    "serve_command",
    "spawn_server",
    "split_cores",
    "start_server",
    "wait_until_serving",
]
