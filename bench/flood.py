"""Flood test (not run in CI; tests/test_flood.py runs a small one): how much memory a burst of
maximum-size calls can make a server hold, and what the callers get.

    python -m stablemlp.bench.flood [--server HOST:PORT --pid PID] [--calls 300] [--channels 10]

Sends `--calls` ModelInfer calls at once over `--channels` connections, each of `--message-bytes`
(default: just under the server's own limit; 4 MiB reproduces the old default), with or without
the bearer token. `--shape` says what fills it: `padding` (the default), 1024 rows of the model's
features padded with an unknown field; or many small entries (`payload` lists them). The
server's resident memory is sampled every 20 ms; reported: the peak (VmHWM), the resident memory
after the flood, the status codes with their counts, how long the first refusal took, and whether a
normal call is answered afterwards. Starts `stablemlp serve` itself unless `--server` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from ..protos import grpc_service_pb2 as pb
from ..serving.manifest import MANIFEST_FILE, Manifest
from .servers import memory_mb, our_server_command, start_server

METHOD = "/inference.GRPCInferenceService/ModelInfer"
ROWS = 1024


# An unknown field (protobuf keeps its bytes as they are): pads a valid call to the size asked.
PAD_FIELD = 15
# How each flood shape fills a message up to the size asked (see `payload`).
SHAPES = ("padding", "parameters", "inputs", "outputs", "input-parameters", "shape", "bytes")


def _field(number: int, data: bytes) -> bytes:
    """One length-delimited field, encoded by hand (the padding has no message type)."""
    tag, length = number << 3 | 2, len(data)
    head = bytearray([tag])
    while length >= 0x80:
        head.append(length & 0x7F | 0x80)
        length >>= 7
    return bytes([*head, length]) + data


def _valid(manifest: Manifest, model: str, rows: int) -> Any:
    request = pb.ModelInferRequest(model_name=model)
    for spec in manifest.inputs:
        request.inputs.add(name=spec.name, datatype=spec.datatype, shape=[rows, spec.width])
        if spec.datatype == "FP32":
            data = np.zeros((rows, spec.width), "<f4").tobytes()
        else:
            data = b"".join(len(b"x").to_bytes(4, "little") + b"x" for _ in range(rows))
        request.raw_input_contents.append(data)
    return request


def payload(repository: Path, model: str, message_bytes: int, shape: str = "padding") -> bytes:
    """A message of about `message_bytes` for `model`, by flood shape: `padding`, a valid
    1024-row call padded with an unknown field; `parameters`, a valid 1-row call packed with
    distinct parameters; `inputs` / `outputs`, empty entries of those lists; `input-parameters`,
    a 1-row call whose input carries the parameters; `shape`, one input with that many
    dimensions; `bytes`, one BYTES input of empty elements."""
    manifest = Manifest.read(repository / model / "1" / MANIFEST_FILE)
    if shape == "padding":
        data: bytes = _valid(manifest, model, ROWS).SerializeToString()
        return data + _field(PAD_FIELD, b"x" * max(0, message_bytes - len(data) - 8))
    request = _valid(manifest, model, 1) if "parameters" in shape else pb.ModelInferRequest()
    request.model_name = model
    each = {"parameters": 13, "input-parameters": 13, "inputs": 2, "outputs": 2, "shape": 1,
            "bytes": 2}[shape]  # fmt: skip
    count = max(0, message_bytes - request.ByteSize() - 64) // each
    if shape == "parameters":
        for i in range(count):
            request.parameters[f"{i:05x}"].bool_param = True
    elif shape == "input-parameters":
        for i in range(count):
            request.inputs[0].parameters[f"{i:05x}"].bool_param = True
    elif shape == "inputs":
        for _ in range(count):
            request.inputs.add()
    elif shape == "outputs":
        for _ in range(count):
            request.outputs.add()
    elif shape == "shape":
        request.inputs.add(name="features", datatype="FP32", shape=[1] * count)
    else:
        tensor = request.inputs.add(name="text", datatype="BYTES", shape=[count, 1])
        tensor.contents.bytes_contents.extend([b""] * count)
    encoded: bytes = request.SerializeToString()
    return encoded


class Sampler:
    """The server's resident memory every 20 ms, on a thread, until stopped."""

    def __init__(self, pid: int) -> None:
        self.pid, self.samples = pid, [memory_mb(pid)["rss_mb"]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.samples.append(memory_mb(self.pid)["rss_mb"])

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(timeout=5)
        return max(self.samples)


async def flood(
    address: str, data: bytes, calls: int, channels: int, token: str, deadline_s: float
) -> dict[str, Any]:
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    options = [("grpc.max_send_message_length", len(data) + 1024),
               ("grpc.use_local_subchannel_pool", 1)]  # fmt: skip  # one connection each
    opened = [grpc.aio.insecure_channel(address, options=options) for _ in range(channels)]
    codes: collections.Counter[str] = collections.Counter()
    first_refusal: list[float] = []
    started = time.monotonic()

    async def one(i: int) -> None:
        call = opened[i % channels].unary_unary(METHOD, None, None)
        try:
            await call(data, timeout=deadline_s, metadata=metadata)
            codes["OK"] += 1
        except grpc.aio.AioRpcError as err:
            codes[err.code().name] += 1
            if err.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
                first_refusal.append(time.monotonic() - started)

    await asyncio.gather(*(one(i) for i in range(calls)))
    elapsed = time.monotonic() - started
    for channel in opened:
        await channel.close(None)
    return {
        "codes": dict(codes),
        "seconds": round(elapsed, 2),
        "first_refusal_s": round(min(first_refusal), 3) if first_refusal else None,
    }


def answers_normally(address: str, repository: Path, model: str, token: str) -> bool:
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(METHOD, None, None)
        request = pb.ModelInferRequest.FromString(payload(repository, model, 0))
        request.ClearField("parameters")
        try:
            call(request.SerializeToString(), timeout=30, metadata=metadata)
        except grpc.RpcError:
            return False
    return True


def run(args: argparse.Namespace, address: str, pid: int, limit: int) -> dict[str, Any]:
    size = args.message_bytes or limit - 1024
    data = payload(args.model_repository, args.model, size, args.shape)
    idle = memory_mb(pid)["rss_mb"]
    sampler = Sampler(pid)
    result = asyncio.run(
        flood(address, data, args.calls, args.channels, args.send_token, args.deadline_s)
    )
    peak = sampler.stop()
    return {
        "shape": args.shape,
        "calls": args.calls,
        "channels": args.channels,
        "message_bytes": len(data),
        "with_token": bool(args.send_token),
        **result,
        "rss_mb_idle": round(idle, 1),
        "rss_mb_peak": round(peak, 1),
        "rss_mb_hwm": round(memory_mb(pid)["peak_rss_mb"], 1),  # since the server started
        "rss_mb_after": round(memory_mb(pid)["rss_mb"], 1),
        "answers_afterwards": answers_normally(
            address, args.model_repository, args.model, args.token
        ),
    }


def message_limit(log: str) -> int:
    """The server's message limit, from its start-up log line."""
    return int(log.split("messages up to ")[1].split()[0])


def publish(report: dict[str, Any], output: Path | None) -> int:
    """Print the report (JSON), also write it to `output`; the exit code."""
    text = json.dumps(report, indent=2)
    print(text)
    if output:
        output.write_text(text + "\n")
    return 0


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stablemlp.bench.flood", description=__doc__)
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", default="breast_cancer")
    parser.add_argument("--server", help="HOST:PORT of a running server (with --pid)")
    parser.add_argument("--pid", type=int, help="its process id, for its memory")
    parser.add_argument("--server-arg", action="append", default=[], help="flag for our server")
    parser.add_argument("--shape", choices=SHAPES, default="padding")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--channels", type=int, default=10)
    parser.add_argument("--message-bytes", type=int, default=0, help="default: the server's limit")
    parser.add_argument("--token", default="", help="the server's token (started with it)")
    parser.add_argument("--send-token", default="", help="the token the flood sends")
    parser.add_argument("--deadline-s", type=float, default=30.0)
    parser.add_argument("--output", type=Path, help="also write the report (JSON) here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.server:
        if args.pid is None or not args.message_bytes:
            raise SystemExit("--server needs --pid and --message-bytes")
        report = run(args, args.server, args.pid, args.message_bytes)
    else:
        env = {"STABLEMLP_AUTH_TOKEN": args.token} if args.token else {}
        command = our_server_command(
            args.model_repository, ["--metrics-port", "-1", *args.server_arg]
        )
        server = start_server("ours", command, env=env, timeout_s=120)
        try:
            report = run(args, server.address, server.pid, message_limit(server.log()))
        finally:
            report["server_exit_code"] = server.stop()
    return publish(report, args.output)


if __name__ == "__main__":
    raise SystemExit(main())
