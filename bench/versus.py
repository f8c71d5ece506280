"""Two builds of the server in one run: an earlier checkout's, this one's, and the transport floor,
interleaved repeat by repeat on the same payloads, so a change's speed is judged within one run's
noise (issue 11: the redesign must not cost speed).

    git worktree add ../before <commit>
    python -m stablemlp.bench.versus --model-repository REPO --before ../before [--repeats 7]

The earlier checkout runs as it did then, on its own sources (`python -P -m serving serve` for
releases before the `stablemlp` package, `python -P -m stablemlp serve` after), under this
interpreter. Printed: each build's req/s over the floor's, this one's over the earlier one's
(medians of per-repeat ratios, ranges), server CPU per request, and the requests each session.run
answered (ModelStatistics: rows served / rows per request / runs; above 1 where runs were merged).

`--variant NAME='FLAGS'` adds this build served with FLAGS (a feature on or off, issue 25) to the
same interleaved run, read against this build with its defaults; `--cell raw,1,8` keeps only the
cells named; `--cell streams8,1,8` is ModelStreamInfer on 8 streams (concurrency / 8 messages in
flight on each, raw input), read also against the unary floor's req/s at raw,1,8 (issue 25 point 2:
≥ 2.0 with 8 streams x 1, ≥ 1.6 with 1 stream x 8). Leading VAR=value words of FLAGS are that
server's environment, and `{otlp}` in them is the address of an OTLP trace sink this run starts
(it answers every export, keeps nothing);
`--token T` sends `authorization: Bearer T` on every call to every server, so a variant with auth
on pays only for the check:

    --token t0 --variant "auth=STABLEMLP_AUTH_TOKEN=t0" \
    --variant "tracing=OTEL_TRACES_EXPORTER=otlp OTEL_EXPORTER_OTLP_ENDPOINT=http://{otlp}"
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shlex
import statistics
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..protos import grpc_service_pb2 as pb
from .servers import cpu_seconds, floor_server_command, our_server_command, start_server
from .speed.loadgen import LoadGenerator, LoadSpec
from .speed.markdown import table

METHOD = "/inference.GRPCInferenceService/ModelInfer"
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
UNARY_BASE = ("raw", 1, 8)  # the cell streams are read against (the unary floor's req/s)
BASELINES = ("before", "after", "floor", "model_floor")
CELLS = (("raw", 1, 1), ("raw", 1, 8), ("raw", 64, 8), ("fp32", 1, 1), ("fp32", 1, 8),
         ("fp32", 64, 8))  # fmt: skip


def earlier_command(checkout: Path, repository: Path) -> tuple[list[str], dict[str, str]]:
    """How the earlier checkout serves: its own package layout, its sources first on the path."""
    module = "serving" if (checkout / "serving" / "__main__.py").is_file() else "stablemlp"
    command = [sys.executable, "-P", "-m", module, "serve", "--model-repository", str(repository),
               "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1"]  # fmt: skip
    return command, {"PYTHONPATH": str(checkout)}


def payload(model: str, rows: int, width: int, form: str) -> bytes:
    request = pb.ModelInferRequest(model_name=model, id="bench")
    x = np.random.default_rng(0).normal(size=(rows, width)).astype("<f4")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=list(x.shape))
    if form == "raw":
        request.raw_input_contents.append(x.tobytes())
    else:
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
    return request.SerializeToString()


ENV_WORD = re.compile(r"[A-Z_][A-Z0-9_]*=")


def split_variant(flags: str, otlp: str) -> tuple[list[str], dict[str, str]]:
    """A variant's serve flags and environment (its leading VAR=value words)."""
    words, env = shlex.split(flags.replace("{otlp}", otlp)), {}
    while words and ENV_WORD.match(words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return words, env


@contextlib.contextmanager
def otlp_sink() -> Iterator[str]:
    """An OTLP/gRPC trace collector on 127.0.0.1 that accepts every export and keeps nothing, so
    a tracing variant pays for making and exporting spans, not for a collector's failures."""
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_pb
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as trace_grpc

    class Sink(trace_grpc.TraceServiceServicer):
        def Export(self, request: object, context: object) -> object:
            return trace_pb.ExportTraceServiceResponse()

    server = grpc.server(ThreadPoolExecutor(2))
    trace_grpc.add_TraceServiceServicer_to_server(Sink(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def _range(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}..{max(values):.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stablemlp.bench.versus", description=__doc__)
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--before", type=Path, required=True, help="an earlier checkout")
    parser.add_argument("--model", default="breast_cancer")
    parser.add_argument("--width", type=int, default=30, help="the model's FP32 columns")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup-s", type=float, default=0.5)
    parser.add_argument("--window-s", type=float, default=2.0)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="this build with these serve flags too (repeat)")  # fmt: skip
    parser.add_argument("--cell", action="append", default=[], metavar="FORM,BATCH,CONC",
                        help="only these cells, e.g. raw,1,8 (repeat)")  # fmt: skip
    parser.add_argument("--token", default="", help="send `authorization: Bearer TOKEN`")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        needs_sink = any("{otlp}" in v for v in args.variant)
        otlp = stack.enter_context(otlp_sink()) if needs_sink else ""
        return measure(args, otlp)


def measure(args: argparse.Namespace, otlp: str) -> int:
    cells = _cells(args.cell)
    command, env = earlier_command(args.before, args.model_repository)
    ours = our_server_command(args.model_repository, ["--metrics-port", "-1"])
    floor = floor_server_command(args.model_repository)
    servers = {
        "before": start_server("before", command, env=env),
        "after": start_server("after", ours),
        "floor": start_server("floor", floor),
        # The floor that also runs the model: what the model alone adds to the transport.
        "model_floor": start_server(
            "model_floor", floor_server_command(args.model_repository, run_model=True)
        ),
    }
    for name, _, flags in (v.partition("=") for v in args.variant):
        words, variant_env = split_variant(flags, otlp)
        flagged = our_server_command(args.model_repository, ["--metrics-port", "-1", *words])
        servers[name] = start_server(name, flagged, env=variant_env)
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else ()
    rps: dict[tuple[str, tuple[str, int, int]], list[float]] = {}
    cpu: dict[tuple[str, tuple[str, int, int]], list[float]] = {}
    per_run: dict[tuple[str, tuple[str, int, int]], list[float]] = {}
    try:
        with LoadGenerator(1) as generator:
            for repeat in range(args.repeats):
                for cell in cells:
                    streams = _streams(cell[0])
                    form = "raw" if streams else cell[0]
                    data = payload(args.model, cell[1], args.width, form)
                    names = list(servers) if repeat % 2 == 0 else list(reversed(servers))
                    for name in names:  # back to back, the order alternating per repeat
                        server = servers[name]
                        spec = LoadSpec(server.address, STREAM_METHOD if streams else METHOD,
                                        data, cell[2], 1, args.warmup_s, args.window_s, 10**7,
                                        streams=streams, metadata=metadata)  # fmt: skip
                        counts = run_counts(server.address, args.model, metadata)
                        before = cpu_seconds(server.pid)
                        result = generator.run(spec)
                        used = cpu_seconds(server.pid) - before
                        if result.errors:  # a refused call is cheap: its CPU is no figure
                            raise SystemExit(f"versus: {name}: {result.errors} calls failed"
                                             f" ({result.first_error})")  # fmt: skip
                        calls = result.requests_per_s * (args.warmup_s + args.window_s)
                        rps.setdefault((name, cell), []).append(result.requests_per_s)
                        cpu.setdefault((name, cell), []).append(1e6 * used / max(calls, 1.0))
                        after = run_counts(server.address, args.model, metadata)
                        if counts and after and after[0] > counts[0]:  # the floor runs nothing
                            runs, served = after[0] - counts[0], after[1] - counts[1]
                            per_run.setdefault((name, cell), []).append(served / cell[1] / runs)
    finally:
        for server in servers.values():
            server.stop()
    rows = []
    for cell in cells:
        pair = {n: rps[(n, cell)] for n in servers}
        ratios = [
            [b / f for b, f in zip(pair["before"], pair["floor"], strict=True)],
            [a / f for a, f in zip(pair["after"], pair["floor"], strict=True)],
            [a / b for a, b in zip(pair["after"], pair["before"], strict=True)],
        ]
        costs = " / ".join(f"{statistics.median(cpu[(n, cell)]):.0f}" for n in BASELINES)
        model_cost = [
            a / m for a, m in zip(cpu[("after", cell)], cpu[("model_floor", cell)], strict=True)
        ]
        rows.append(
            [f"{cell[0]} b{cell[1]} c{cell[2]}", *map(_range, ratios), costs, _range(model_cost)]
        )
    head = ["cell", "before / floor", "after / floor", "after / before"]
    cost_head = ["CPU µs/req before / after / floor / model floor", "CPU after / model floor"]
    print("\n".join(table([*head, *cost_head], rows)))
    print()
    print("\n".join(table(["cell", *[f"requests per run: {n}" for n in servers if n != "floor"]],
                           _per_run_rows(cells, list(servers), per_run))))  # fmt: skip
    stream_cells = [c for c in cells if _streams(c[0])]
    if stream_cells and UNARY_BASE in cells:
        print()
        print("\n".join(table(["cell", "server", "req/s / unary floor's raw b1 c8"],
                              _stream_rows(stream_cells, list(servers), rps))))  # fmt: skip
    variants = [n for n in servers if n not in BASELINES]
    if variants:
        print()
        head = ["cell", "variant", "req/s / after's", "CPU µs/req", "CPU / after's"]
        print("\n".join(table(head, _variant_rows(cells, variants, rps, cpu))))
    return 0


Measured = dict[tuple[str, tuple[str, int, int]], list[float]]


def run_counts(
    address: str, model: str, metadata: tuple[tuple[str, str], ...]
) -> tuple[int, int] | None:
    """The model's session runs and rows served so far (ModelStatistics, every version); None if
    the server does not say (it refuses the call: versus then stops on the load's errors)."""
    import grpc

    from ..protos import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            reply = stub.ModelStatistics(
                pb.ModelStatisticsRequest(name=model), timeout=10, metadata=metadata
            )
        except grpc.RpcError:
            return None
    stats = reply.model_stats
    return sum(m.execution_count for m in stats), sum(m.inference_count for m in stats)


def _per_run_rows(
    cells: Sequence[tuple[str, int, int]], servers: Sequence[str], per_run: Measured
) -> list[list[str]]:
    """Requests answered per session.run (merged runs hold several): medians, ranges."""
    rows = []
    for cell in cells:
        row = [f"{cell[0]} b{cell[1]} c{cell[2]}"]
        for name in servers:
            if name != "floor":
                values = per_run.get((name, cell))
                row.append(_range(values) if values else "-")
        rows.append(row)
    return rows


def _streams(form: str) -> int:
    """`streamsS` -> S streams; 0 for a unary form."""
    return int(form.removeprefix("streams")) if form.startswith("streams") else 0


def _stream_rows(
    cells: Sequence[tuple[str, int, int]], servers: Sequence[str], rps: Measured
) -> list[list[str]]:
    """Each server's stream req/s over the unary floor's at raw b1 c8, repeat by repeat."""
    unary = rps[("floor", UNARY_BASE)]
    rows = []
    for cell in cells:
        for name in servers:
            ratio = [s / u for s, u in zip(rps[(name, cell)], unary, strict=True)]
            streams = _streams(cell[0])
            label = f"{streams} stream(s) x {cell[2] // streams}, b{cell[1]}"
            rows.append([label, name, _range(ratio)])
    return rows


def _cells(named: Sequence[str]) -> tuple[tuple[str, int, int], ...]:
    if not named:
        return CELLS
    cells = []
    for text in named:
        try:
            form, batch, concurrency = text.split(",")
            cell = (form, int(batch), int(concurrency))
            streams = _streams(form)
        except ValueError:
            raise SystemExit(f"versus: --cell {text!r}: expected FORM,BATCH,CONCURRENCY") from None
        if form not in ("raw", "fp32") and not (0 < streams <= cell[2] and cell[2] % streams == 0):
            raise SystemExit(
                f"versus: --cell {text!r}: FORM is raw, fp32 or streamsS (S dividing CONCURRENCY)"
            )
        cells.append(cell)
    return tuple(cells)


def _variant_rows(
    cells: Sequence[tuple[str, int, int]], variants: Sequence[str], rps: Measured, cpu: Measured
) -> list[list[str]]:
    """Each variant against this build's defaults, repeat by repeat (medians, ranges)."""
    rows = []
    for cell in cells:
        for name in variants:
            speed = [v / a for v, a in zip(rps[(name, cell)], rps[("after", cell)], strict=True)]
            cost = [v / a for v, a in zip(cpu[(name, cell)], cpu[("after", cell)], strict=True)]
            rows.append([f"{cell[0]} b{cell[1]} c{cell[2]}", name, _range(speed),
                         f"{statistics.median(cpu[(name, cell)]):.0f}", _range(cost)])  # fmt: skip
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
