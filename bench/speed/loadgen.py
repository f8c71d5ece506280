"""Closed-loop gRPC or HTTP load from worker processes sharing nothing with the server under test.

Each worker (`python -m stablemlp.bench.speed.loadgen`) runs one asyncio loop with K calls
outstanding on its grpc.aio channel(s) and sends pre-serialized request bytes through a generic
unary-unary call with no (de)serializer, so the client spends as little CPU per request as Python
allows; the same workers drive the transport floor and our server, so their ratio is fair. Streaming
mode keeps S ModelStreamInfer calls open (generic stream-stream, raw bytes) with at most K/S
messages unanswered on each; a reply belongs to the oldest unanswered message (replies come in
order). With protocol "http" the payload is a whole pre-serialized HTTP/1.1 request, written as it
is on K keep-alive connections (one request outstanding on each), and each reply is read by its
Content-Length: no HTTP client library, so REST servers (ours, a peer's) are measured with the same
small client cost. The parent speaks JSON lines on the workers' stdin/stdout. Windows are
absolute CLOCK_MONOTONIC times (system-wide on Linux), so every worker warms up and measures over
the same interval.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import os
import resource
import select
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from ..servers import child_env

START_TIMEOUT_S = 30.0  # a worker imports grpc: well under a second unless the machine is busy
RPC_TIMEOUT_S = 10.0
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]


@dataclass(frozen=True)
class LoadSpec:
    """One measurement: `concurrency` calls outstanding in all, split over `processes` workers."""

    address: str
    method: str  # e.g. /inference.GRPCInferenceService/ModelInfer
    payload: bytes  # a serialized request
    concurrency: int
    processes: int
    warmup_s: float
    window_s: float
    max_requests: int  # per worker; reaching it ends that worker's window early
    connections: int = 1  # TCP connections per worker; its calls are spread over them
    streams: int = 0  # 0: unary calls; S: S streams, concurrency // S messages in flight on each
    protocol: str = "grpc"  # or "http": `payload` is then a whole HTTP/1.1 request
    metadata: tuple[tuple[str, str], ...] = ()  # gRPC metadata on every call (a token)


@dataclass(frozen=True)
class LoadResult:
    latencies_ns: list[int]  # every call that completed inside the window
    requests_per_s: float  # summed over workers, each count over its own window
    errors: int
    first_error: str
    client_cpu_s: float  # user+system of the workers during the window


# --- worker side -----------------------------------------------------------------------------


def inband_error(reply: bytes) -> str:
    """A serialized ModelStreamInferResponse's error_message ('' when none). Field 1 is written
    first when set (tag 0x0a, varint length), so a reply is judged without parsing it."""
    if reply[:1] != b"\x0a":
        return ""
    length, shift, i = 0, 0, 1
    while i < len(reply) and i < 6:  # a varint length: at most 5 bytes for a message this size
        length |= (reply[i] & 0x7F) << shift
        shift, i = shift + 7, i + 1
        if not reply[i - 1] & 0x80:
            break
    return reply[i : i + length].decode("utf-8", "replace") or "empty error_message"


class _Window:
    """One worker's measurement: the clock marks, the cap, and what completed inside them."""

    def __init__(self, order: dict[str, Any]) -> None:
        self.measure_from, self.until = order["measure_from_ns"], order["until_ns"]
        self.cap: int = order["max_requests"]
        self.latencies: list[int] = []
        self.errors, self.first_error, self.last_ns = 0, "", self.until

    def open(self, now_ns: int) -> bool:
        return now_ns < self.until and len(self.latencies) < self.cap

    def done(self, t0: int, t1: int) -> None:
        if self.measure_from <= t1 <= self.until and len(self.latencies) < self.cap:
            self.latencies.append(t1 - t0)
            if len(self.latencies) == self.cap:
                self.last_ns = t1

    def failed(self, text: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or text


async def _unary(call: Any, payload: bytes, w: _Window, metadata: Any) -> None:
    for _ in range(10**9):  # ends on the clock or the cap, whichever comes first
        t0 = time.monotonic_ns()
        if not w.open(t0):
            return
        try:
            await call(payload, timeout=RPC_TIMEOUT_S, metadata=metadata)
        except grpc.aio.AioRpcError as err:
            w.failed(f"{err.code().name}: {err.details()}")
            continue
        w.done(t0, time.monotonic_ns())


async def _write(
    call: Any, payload: bytes, slots: asyncio.Semaphore, sent: Any, w: _Window
) -> None:
    for _ in range(10**9):  # a message whenever a slot is free, until the window closes
        await slots.acquire()
        if not w.open(now := time.monotonic_ns()):
            break
        sent.append(now)
        await call.write(payload)
    await call.done_writing()


async def _stream(open_call: Any, payload: bytes, depth: int, w: _Window, metadata: Any) -> None:
    """One stream at a time with `depth` messages unanswered; a broken stream is counted and
    replaced while the window lasts."""
    for _ in range(10**6):
        if not w.open(time.monotonic_ns()):
            return
        timeout = (w.until - time.monotonic_ns()) / 1e9 + RPC_TIMEOUT_S
        call = open_call(timeout=timeout, metadata=metadata)
        sent: collections.deque[int] = collections.deque()
        slots = asyncio.Semaphore(depth)
        writer = asyncio.ensure_future(_write(call, payload, slots, sent, w))
        try:
            for _ in range(10**9):  # replies until the server ends the stream
                reply = await call.read()
                if reply is grpc.aio.EOF:  # type: ignore[attr-defined]
                    break
                t1, t0 = time.monotonic_ns(), sent.popleft()
                slots.release()
                if error := inband_error(reply):
                    w.failed(error)
                else:
                    w.done(t0, t1)
            await writer
        except grpc.aio.AioRpcError as err:
            writer.cancel()
            w.failed(f"{err.code().name}: {err.details()}")


async def _drive(channels: dict[str, Any], order: dict[str, Any]) -> dict[str, Any]:
    calls = []
    streaming = order["streams"] > 0
    for i in range(order["connections"]):
        key = f"{order['address']}#{i}"
        if key not in channels:
            # A local subchannel pool gives each channel its own TCP connection (a server with
            # several SO_REUSEPORT processes sees them spread); one connection otherwise.
            options = [*_CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
            channels[key] = grpc.aio.insecure_channel(order["address"], options=options)
        await asyncio.wait_for(channels[key].channel_ready(), RPC_TIMEOUT_S)
        make = channels[key].stream_stream if streaming else channels[key].unary_unary
        calls.append(make(order["method"]))  # no serializers: bytes
    payload = base64.b64decode(order["payload"])
    metadata = tuple(map(tuple, order["metadata"])) or None
    w = _Window(order)
    cpu: list[float] = []

    async def cpu_marks() -> None:
        for mark in (w.measure_from, w.until):
            await asyncio.sleep(max(0.0, (mark - time.monotonic_ns()) / 1e9))
            usage = resource.getrusage(resource.RUSAGE_SELF)
            cpu.append(usage.ru_utime + usage.ru_stime)

    marks = asyncio.ensure_future(cpu_marks())
    if streaming:
        depth = order["concurrency"] // order["streams"]
        loops = [
            _stream(calls[i % len(calls)], payload, depth, w, metadata)
            for i in range(order["streams"])
        ]
    else:
        loops = [
            _unary(calls[i % len(calls)], payload, w, metadata) for i in range(order["concurrency"])
        ]
    await asyncio.gather(*loops)
    await marks
    return {
        "latencies_ns": w.latencies,
        "window_ns": max(1, min(w.until, w.last_ns) - w.measure_from),
        "errors": w.errors,
        "first_error": w.first_error,
        "client_cpu_s": cpu[1] - cpu[0],
    }


async def _http_reply(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response (Content-Length framed); its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
        elif name.strip().lower() == b"transfer-encoding":
            raise ValueError("chunked reply: the load generator reads Content-Length replies only")
    await reader.readexactly(length)
    return status


async def _drive_http(order: dict[str, Any]) -> dict[str, Any]:
    host, _, port = order["address"].rpartition(":")
    payload = base64.b64decode(order["payload"])
    measure_from, until, cap = order["measure_from_ns"], order["until_ns"], order["max_requests"]
    latencies: list[int] = []
    state: dict[str, Any] = {"errors": 0, "first_error": "", "last_ns": until}
    cpu: list[float] = []

    async def stream() -> None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host.strip("[]"), int(port)), RPC_TIMEOUT_S
        )
        try:
            for _ in range(10**9):  # ends on the clock or the cap, whichever comes first
                t0 = time.monotonic_ns()
                if t0 >= until or len(latencies) >= cap:
                    return
                writer.write(payload)
                status = await asyncio.wait_for(_http_reply(reader), RPC_TIMEOUT_S)
                t1 = time.monotonic_ns()
                if status != 200:
                    state["errors"] += 1
                    state["first_error"] = state["first_error"] or f"HTTP {status}"
                    continue
                if measure_from <= t1 <= until and len(latencies) < cap:
                    latencies.append(t1 - t0)
                    if len(latencies) == cap:
                        state["last_ns"] = t1
        finally:
            writer.close()

    async def cpu_marks() -> None:
        for mark in (measure_from, until):
            await asyncio.sleep(max(0.0, (mark - time.monotonic_ns()) / 1e9))
            usage = resource.getrusage(resource.RUSAGE_SELF)
            cpu.append(usage.ru_utime + usage.ru_stime)

    marks = asyncio.ensure_future(cpu_marks())
    done = await asyncio.gather(
        *(stream() for _ in range(order["concurrency"])), return_exceptions=True
    )
    await marks
    for outcome in done:  # a connection that broke counts once
        if isinstance(outcome, BaseException):
            state["errors"] += 1
            state["first_error"] = state["first_error"] or repr(outcome)[:200]
    window_ns = max(1, min(until, state["last_ns"]) - measure_from)
    return {
        "latencies_ns": latencies,
        "window_ns": window_ns,
        "errors": state["errors"],
        "first_error": state["first_error"],
        "client_cpu_s": cpu[1] - cpu[0],
    }


def worker_main() -> int:
    """Read one JSON order per stdin line, answer one JSON line; EOF ends the worker."""
    loop = asyncio.new_event_loop()
    channels: dict[str, Any] = {}
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        order = json.loads(line)
        drive = _drive_http(order) if order.get("protocol") == "http" else _drive(channels, order)
        result = loop.run_until_complete(drive)
        print(json.dumps(result), flush=True)
    for channel in channels.values():
        loop.run_until_complete(channel.close())
    loop.close()
    return 0


# --- parent side -----------------------------------------------------------------------------


def _read_line(proc: subprocess.Popen[bytes], deadline: float) -> dict[str, Any]:
    """One JSON line from a worker's unbuffered stdout, or TimeoutError at `deadline`."""
    assert proc.stdout is not None
    fd, data = proc.stdout.fileno(), b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise TimeoutError("load worker did not answer in time")
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            raise RuntimeError(f"load worker exited (code {proc.wait()})")
        data += chunk
    decoded: dict[str, Any] = json.loads(data)
    return decoded


class LoadGenerator:
    """A pool of worker processes, started once and reused for every measurement."""

    def __init__(self, processes: int) -> None:
        command = [sys.executable, "-m", "stablemlp.bench.speed.loadgen"]
        self._procs = [
            subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_env(), bufsize=0
            )
            for _ in range(processes)
        ]
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            for proc in self._procs:
                _read_line(proc, deadline)  # {"ready": true} once grpc is imported
        except BaseException:
            self.close()
            raise

    @property
    def size(self) -> int:
        return len(self._procs)

    def run(
        self, spec: LoadSpec, on_window: Callable[[float, float], None] | None = None
    ) -> LoadResult:
        """Measure once. `on_window(start, end)` (monotonic s) runs in this process meanwhile."""
        units = spec.streams or spec.concurrency  # what is split over the workers
        procs = self._procs[: max(1, min(spec.processes, units, self.size))]
        shares = [units // len(procs) + (i < units % len(procs)) for i in range(len(procs))]
        depth = spec.concurrency // spec.streams if spec.streams else 1
        start_ns = time.monotonic_ns() + 50_000_000  # time for the orders to reach every worker
        measure_from = start_ns + int(spec.warmup_s * 1e9)
        until = measure_from + int(spec.window_s * 1e9)
        for proc, share in zip(procs, shares, strict=True):
            order = {
                "address": spec.address,
                "method": spec.method,
                "payload": base64.b64encode(spec.payload).decode(),
                "concurrency": share * depth,
                "streams": share if spec.streams else 0,
                "measure_from_ns": measure_from,
                "until_ns": until,
                "max_requests": spec.max_requests,
                "connections": max(1, min(spec.connections, share)),
                "protocol": spec.protocol,
                "metadata": [list(pair) for pair in spec.metadata],
            }
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(order).encode() + b"\n")
        if on_window is not None:
            on_window(measure_from / 1e9, until / 1e9)
        deadline = until / 1e9 + RPC_TIMEOUT_S + 5.0
        answers = [_read_line(proc, deadline) for proc in procs]
        latencies = [ns for a in answers for ns in a["latencies_ns"]]
        return LoadResult(
            latencies_ns=latencies,
            requests_per_s=sum(len(a["latencies_ns"]) / (a["window_ns"] / 1e9) for a in answers),
            errors=sum(a["errors"] for a in answers),
            first_error=next((a["first_error"] for a in answers if a["first_error"]), ""),
            client_cpu_s=sum(a["client_cpu_s"] for a in answers),
        )

    def close(self) -> None:
        """EOF on stdin ends each worker; one that does not end in time is killed."""
        for proc in self._procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    raise SystemExit(worker_main())
