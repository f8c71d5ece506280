"""Where a request's server CPU goes: our server and the transport floor under the same load, each
measured clean (CPU per request, per thread), then sampled twice: py-spy (Python frames: which of
our layers) and perf when the machine allows it (native: interpreter, gRPC core, kernel, ONNX
Runtime). Issue 25 point 4.

    python -m stablemlp.bench.profile --model-repository REPO --output bench/results/profile

A sample's layer is its innermost frame in one of our modules (LAYERS); samples with none of ours
are the loop and gRPC's Python/Cython glue, or native work (`transport` when the innermost Python
frame is the event loop's run). A layer's µs per request = the event-loop thread's CPU µs per
request (clean window) x its share of that thread's samples. Sampling slows the server, which is
why the CPU figures come from a window without a sampler.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..files import atomic_write_bytes
from .servers import (
    OUR_SERVER_ENV,
    ServerProcess,
    floor_server_command,
    our_server_command,
    process_tree,
    start_server,
)
from .speed.floors import read_manifests
from .speed.loadgen import LoadGenerator, LoadSpec
from .speed.markdown import table
from .speed.payloads import build_request, make_feeds

METHOD = "/inference.GRPCInferenceService/ModelInfer"
_TICKS = os.sysconf("SC_CLK_TCK")
MAIN_THREAD = "MainThread"
# (layer, files): a sample belongs to the layer of its innermost frame in one of these files (the
# path's tail as py-spy prints it). Order matters only for display.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("bounds check (bytes walk)", ("grpc/bounds.py", "serving/protowire.py")),
    ("grpc front: boundary, servicer", ("grpc/boundary.py", "grpc/servicer.py")),
    (
        "wire: request read",
        ("grpc/wire.py:request_of", "grpc/wire.py:_values", "grpc/wire.py:_packed_fp32"),
    ),
    ("wire: reply write", ("grpc/wire.py",)),
    ("codec: decode", ("serving/codec.py", "serving/datatypes.py")),
    ("dataplane (Inference)", ("serving/dataplane.py",)),
    ("admission", ("runtime/admission.py",)),
    ("repository lookup", ("repository/models.py",)),
    ("scheduler, batcher", ("runtime/scheduler.py", "runtime/batcher.py")),
    (
        "session.run (wrapper and ORT)",
        ("runtime/session.py", "onnxruntime_inference_collection.py"),
    ),
    (
        "telemetry, hook",
        ("observe/telemetry.py", "observe/hook.py", "observe/tracing.py", "observe/request_log.py"),
    ),
    ("floor servicer", ("speed/floors.py:FloorServicer",)),
)
TRANSPORT = "loop and gRPC (native, under the event loop)"
GLUE = "loop and gRPC (Python: asyncio, grpc.aio)"


@dataclass
class Window:
    """One target's timed window: requests answered and CPU seconds by thread name."""

    requests_per_s: float
    seconds: float
    cpu_by_thread: dict[str, float] = field(default_factory=dict)

    @property
    def requests(self) -> float:
        return self.requests_per_s * self.seconds

    def us_per_request(self, threads: Iterable[str] | None = None) -> float:
        names = self.cpu_by_thread if threads is None else threads
        cpu = sum(self.cpu_by_thread.get(n, 0.0) for n in names)
        return cpu / self.requests * 1e6 if self.requests else float("nan")


def thread_ticks(pid: int) -> dict[tuple[int, str], int]:
    """(tid, name) -> utime + stime ticks of every thread of `pid` and its descendants."""
    ticks: dict[tuple[int, str], int] = {}
    for member in process_tree(pid):
        try:
            tids = os.listdir(f"/proc/{member}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{member}/task/{tid}/stat") as stat:
                    text = stat.read()
            except OSError:
                continue
            name = text[text.index("(") + 1 : text.rindex(")")]
            fields = text.rsplit(")", 1)[1].split()
            ticks[(int(tid), name)] = int(fields[11]) + int(fields[12])
    return ticks


def cpu_by_thread(
    before: Mapping[tuple[int, str], int], after: Mapping[tuple[int, str], int], main_tid: int
) -> dict[str, float]:
    """CPU seconds per thread name between two snapshots; the process's first thread (the one
    running the event loop) is MainThread whatever the kernel calls it."""
    seconds: dict[str, float] = collections.defaultdict(float)
    for (tid, name), count in after.items():
        used = count - before.get((tid, name), 0)
        if used > 0:
            seconds[MAIN_THREAD if tid == main_tid else name] += used / _TICKS
    return dict(seconds)


def layer_of(frames: Sequence[str]) -> str:
    """A py-spy stack's layer (frames outermost first, each `function (path:line)`)."""
    for frame in reversed(frames):
        where = frame.rsplit(" (", 1)
        if len(where) != 2:
            continue
        function, path = where[0], where[1].rsplit(":", 1)[0]
        for layer, files in LAYERS:
            for tail in files:
                file, _, name = tail.partition(":")
                if path.endswith(file) and (not name or function.startswith(name)):
                    return layer
    innermost = frames[-1] if frames else ""
    return TRANSPORT if innermost.startswith(("Runner.run", "run (uvloop")) else GLUE


def layer_shares(folded: str, thread: str = MAIN_THREAD) -> tuple[dict[str, float], int]:
    """Each layer's share of `thread`'s samples in py-spy's raw (folded) output, and the count."""
    counts: collections.Counter[str] = collections.Counter()
    for line in folded.splitlines():
        stack, _, number = line.rpartition(" ")
        frames = stack.split(";")
        if not frames or not frames[0].endswith(f": {thread}") or not number.isdigit():
            continue
        counts[layer_of(frames[1:])] += int(number)
    total = sum(counts.values())
    return ({k: v / total for k, v in counts.items()} if total else {}), total


def perf_shares(data: Path) -> dict[str, float]:
    """Share of CPU samples per shared object (perf report --sort dso), for every thread."""
    out = subprocess.run(
        ["perf", "report", "-i", str(data), "--stdio", "--sort", "dso", "--percent-limit", "0.5"],
        capture_output=True,
        text=True,
        check=True,
    )
    shares = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].endswith("%"):
            shares[parts[1]] = float(parts[0][:-1]) / 100
    return shares


def _measure(
    generator: LoadGenerator,
    server: ServerProcess,
    payload: bytes,
    concurrency: int,
    seconds: float,
    sampler: Callable[[int, float], subprocess.Popen[bytes]] | None = None,
) -> Window:
    spec = LoadSpec(server.address, METHOD, payload, concurrency, 1, 1.0, seconds, 10**8)
    marks: list[dict[tuple[int, str], int]] = []

    def on_window(start: float, end: float) -> None:
        time.sleep(max(0.0, start - time.monotonic()))
        marks.append(thread_ticks(server.pid))
        sampling = sampler(server.pid, end - time.monotonic()) if sampler else None
        time.sleep(max(0.0, end - time.monotonic()))
        marks.append(thread_ticks(server.pid))
        if sampling is not None:
            sampling.wait()

    result = generator.run(spec, on_window)
    if result.errors:
        raise RuntimeError(f"{server.name}: {result.errors} failed calls: {result.first_error}")
    return Window(result.requests_per_s, seconds, cpu_by_thread(marks[0], marks[1], server.pid))


def py_spy(out: Path, rate: int) -> Callable[[int, float], subprocess.Popen[bytes]]:
    """py-spy record without pausing the server (--nonblocking), Python frames, per thread."""
    binary = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))

    def start(pid: int, seconds: float) -> subprocess.Popen[bytes]:
        command = [
            binary,
            "record",
            "-p",
            str(pid),
            "-d",
            str(max(1, int(seconds))),
            "-r",
            str(rate),
            "-f",
            "raw",
            "--threads",
            "--nonblocking",
            "-o",
            str(out),
        ]
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    return start


def perf(out: Path) -> Callable[[int, float], subprocess.Popen[bytes]]:
    def start(pid: int, seconds: float) -> subprocess.Popen[bytes]:
        command = [
            "perf",
            "record",
            "-F",
            "999",
            "-p",
            str(pid),
            "-o",
            str(out),
            "--",
            "sleep",
            f"{max(0.5, seconds):.1f}",
        ]
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    return start


def budget(windows: Mapping[str, Window], shares: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The event-loop thread's µs per request by layer, ours against the floor."""
    layers = [name for name, _ in LAYERS] + [GLUE, TRANSPORT]
    main = {name: w.us_per_request([MAIN_THREAD]) for name, w in windows.items()}
    rows = []
    for layer in layers:
        us = {name: main[name] * shares[name].get(layer, 0.0) for name in windows}
        if any(v >= 0.5 for v in us.values()):
            rows.append(
                [
                    layer,
                    f"{us['ours']:.0f}",
                    f"{us['floor']:.0f}",
                    f"{us['ours'] - us['floor']:+.0f}",
                ]
            )
    rows.append(
        [
            "**event-loop thread, all**",
            f"{main['ours']:.0f}",
            f"{main['floor']:.0f}",
            f"{main['ours'] - main['floor']:+.0f}",
        ]
    )
    return table(
        ["layer (innermost frame of ours)", "ours µs/req", "floor µs/req", "difference"], rows
    )


def report(
    args: argparse.Namespace,
    clean: Mapping[str, list[Window]],
    shares: Mapping[str, Mapping[str, float]],
    samples: Mapping[str, int],
    native: Mapping[str, Mapping[str, float]],
) -> str:
    median = {
        name: sorted(ws, key=lambda w: w.us_per_request())[len(ws) // 2]
        for name, ws in clean.items()
    }
    threads = sorted({t for w in median.values() for t in w.cpu_by_thread})
    rows = [
        [
            name,
            f"{w.requests_per_s:,.0f}",
            f"{w.us_per_request():.0f}",
            *(f"{w.us_per_request([t]):.0f}" for t in threads),
        ]
        for name, w in median.items()
    ]
    ratio = median["ours"].us_per_request() / median["floor"].us_per_request()
    lines = [
        f"# Server CPU per request: ours and the transport floor, batch {args.batch}, "
        f"concurrency {args.concurrency}",
        "",
        f"`python -m stablemlp.bench.profile {' '.join(args.argv)}` (bench/profile.py); "
        f"load average at the start {args.load_average}. {args.repeats} clean windows of "
        f"{args.seconds:g} s per server, interleaved; the median window (by CPU per request) "
        f"is shown. Server CPU per request ours / floor: **{ratio:.2f}**.",
        "",
        *table(
            ["server", "req/s", "CPU µs/req, all threads", *(f"{t} µs/req" for t in threads)], rows
        ),
        "",
        "## The event-loop thread by layer (py-spy, Python frames)",
        "",
        f"py-spy samples of the main thread: ours {samples['ours']:,}, floor "
        f"{samples['floor']:,}; a layer's µs = the thread's clean µs/request x its share of "
        "samples. Work in native code is charged to the innermost Python frame that called it "
        "(ONNX Runtime to session.run, upb to whoever parsed or serialized).",
        "",
        *budget(median, shares),
    ]
    if native:
        keys = sorted(
            {k for s in native.values() for k in s}, key=lambda k: -native["ours"].get(k, 0)
        )
        cpu = {name: median[name].us_per_request() for name in native}
        rows = [[k, *(f"{native[n].get(k, 0.0) * cpu[n]:.0f}" for n in native)] for k in keys]
        lines += [
            "",
            "## Every thread by shared object (perf, CPU samples)",
            "",
            *table(["shared object", *(f"{n} µs/req" for n in native)], rows),
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stablemlp.bench.profile", description=__doc__)
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", default="breast_cancer")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=6.0, help="each window")
    parser.add_argument("--repeats", type=int, default=3, help="clean windows per server")
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    parser.add_argument("--server-arg", action="append", default=[], help="for our server")
    parser.add_argument("--output", type=Path, default=Path("bench/results/profile"))
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    args.load_average = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    args.output.mkdir(parents=True, exist_ok=True)
    manifest = read_manifests(args.model_repository)[args.model]
    feeds = make_feeds(manifest, args.batch)
    payload = build_request(args.model, manifest, feeds, "raw_input_contents").SerializeToString()
    commands = {
        "ours": (our_server_command(args.model_repository, args.server_arg), OUR_SERVER_ENV),
        "floor": (floor_server_command(args.model_repository), None),
    }
    servers = {name: start_server(name, cmd, env=env) for name, (cmd, env) in commands.items()}
    clean: dict[str, list[Window]] = {name: [] for name in servers}
    shares, samples, native = {}, {}, {}
    try:
        with LoadGenerator(1) as generator:
            for repeat in range(args.repeats):
                for name in servers if repeat % 2 == 0 else reversed(servers):
                    clean[name].append(
                        _measure(generator, servers[name], payload, args.concurrency, args.seconds)
                    )
            for name, server in servers.items():
                folded = args.output / f"{name}.folded"
                _measure(
                    generator,
                    server,
                    payload,
                    args.concurrency,
                    args.seconds,
                    py_spy(folded, args.rate),
                )
                shares[name], samples[name] = layer_shares(folded.read_text())
                if shutil.which("perf"):
                    data = args.output / f"{name}.perf.data"
                    _measure(generator, server, payload, args.concurrency, args.seconds, perf(data))
                    try:
                        native[name] = perf_shares(data)
                    except subprocess.CalledProcessError:
                        native = {}
                    data.unlink(missing_ok=True)
    finally:
        for server in servers.values():
            server.stop()
    text = report(args, clean, shares, samples, native if len(native) == 2 else {})
    atomic_write_bytes(args.output / "profile.md", text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
