"""REST flood test (not run in CI; tests/test_flood.py runs small ones): how much memory hostile
HTTP/1.1 clients can make a server hold on its REST port, and what they get.

    python -m stablemlp.bench.rest_flood --model-repository REPO [--attack A] [--connections N]

Attacks, each from `--connections` raw sockets at once (no HTTP library in the way):
- `headers`: pipelines `--requests` GETs, each with the most header bytes the server takes
  (31 fields of 8,100 bytes), reading nothing for `--hold-s` s; then reads the first reply;
- `bodies`: one POST infer each with a body of the REST limit (message limit x 6);
- `slow`: headers and all but the last bytes of a maximum body, then nothing for `--hold-s` s;
- `idle`: connects and sends nothing; reports how long the server kept the connection open.
The server's resident memory is sampled every 20 ms; reported: idle, peak and after, the first
status line each connection got (or what happened instead), and how soon the server answers a
normal REST inference afterwards. Starts `stablemlp serve` itself unless `--server` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from ..serving.rest.app import JSON_EXPANSION  # the REST body limit over the gRPC message limit
from .flood import Sampler, message_limit, publish
from .servers import memory_mb, our_server_command, start_server

ATTACKS = ("headers", "bodies", "slow", "idle")
HEADER_FIELDS, FIELD_BYTES = 31, 8100  # under the server's 32 fields of 8,190 bytes
INFER = "/v2/models/{model}/infer"


def _head(method: str, path: str, extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: flood\r\n{extra}".encode()


def _first_line(data: bytes) -> str:
    return data.split(b"\r\n", 1)[0].decode("latin-1")[:40] or "closed"


async def _one(port: int, attack: str, args: argparse.Namespace) -> str:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    except (OSError, TimeoutError) as err:
        return f"connect: {type(err).__name__}"
    started = time.monotonic()
    path = INFER.format(model=args.model)
    try:
        if attack == "headers":
            fields = "".join(f"X-Pad-{k}: {'a' * FIELD_BYTES}\r\n" for k in range(HEADER_FIELDS))
            writer.write(_head("GET", "/v2/health/live", fields + "\r\n") * args.requests)
            await asyncio.sleep(args.hold_s)
        elif attack in ("bodies", "slow"):
            size = args.body_bytes
            length = f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
            body = b"{" + b" " * (size - 2) + b"}"
            writer.write(_head("POST", path, length) + (body if attack == "bodies" else body[:-8]))
            if attack == "slow":
                await asyncio.sleep(args.hold_s)
        line = await asyncio.wait_for(reader.readline(), args.deadline_s)
        if attack == "idle":
            return f"closed after {time.monotonic() - started:.0f} s" if not line else "answered"
        return _first_line(line)
    except (OSError, TimeoutError) as err:
        return type(err).__name__
    finally:
        writer.close()


async def flood(port: int, attack: str, args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    outcomes = await asyncio.gather(*(_one(port, attack, args) for _ in range(args.connections)))
    return {
        "outcomes": dict(collections.Counter(outcomes).most_common()),
        "seconds": round(time.monotonic() - started, 2),
    }


def answers_normally(port: int, model: str, width: int, within_s: float = 10.0) -> float | None:
    """Seconds until a normal inference is answered after the flood (the flood's connections
    are let go over up to 2 s, the server's lingering close); None if not within `within_s`."""
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, width],
                        "data": [0.0] * width}]}  # fmt: skip
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{INFER.format(model=model)}", data=json.dumps(body).encode()
    )
    started = time.monotonic()
    while time.monotonic() - started < within_s:
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                if reply.status == 200:
                    return round(time.monotonic() - started, 2)
        except OSError:  # 503 while the flood's connections close; refused
            time.sleep(0.1)
    return None


def run(args: argparse.Namespace, port: int, pid: int) -> dict[str, Any]:
    idle = memory_mb(pid)["rss_mb"]
    sampler = Sampler(pid)
    result = asyncio.run(flood(port, args.attack, args))
    peak = sampler.stop()
    return {
        "attack": args.attack,
        "connections": args.connections,
        **result,
        "rss_mb_idle": round(idle, 1),
        "rss_mb_peak": round(peak, 1),
        "rss_mb_after": round(memory_mb(pid)["rss_mb"], 1),
        "answers_after_s": answers_normally(port, args.model, args.width),
    }


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stablemlp.bench.rest_flood", description=__doc__
    )
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", default="breast_cancer")
    parser.add_argument("--width", type=int, default=30, help="the model's feature count")
    parser.add_argument("--server", type=int, help="REST port of a running server (with --pid)")
    parser.add_argument("--pid", type=int, help="its process id, for its memory")
    parser.add_argument("--server-arg", action="append", default=[], help="flag for our server")
    parser.add_argument("--attack", choices=ATTACKS, default="headers")
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--requests", type=int, default=40, help="pipelined (headers)")
    parser.add_argument("--hold-s", type=float, default=8.0)
    parser.add_argument("--body-bytes", type=int, default=0, help="default: the server's limit")
    parser.add_argument("--deadline-s", type=float, default=60.0)
    parser.add_argument("--output", type=Path, help="also write the report (JSON) here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    report: dict[str, Any] = {}
    if args.server:
        if args.pid is None or not args.body_bytes:
            raise SystemExit("--server needs --pid and --body-bytes")
        report = run(args, args.server, args.pid)
    else:
        command = our_server_command(
            args.model_repository, ["--metrics-port", "-1", *args.server_arg]
        )
        server = start_server("ours", command, timeout_s=120)
        try:
            log = server.log()
            args.body_bytes = args.body_bytes or message_limit(log) * JSON_EXPANSION
            port = int(log.split("rest: http://")[1].split("/v2")[0].rsplit(":", 1)[1])
            report = run(args, port, server.pid)
        finally:
            report["server_exit_code"] = server.stop()
    return publish(report, args.output)


if __name__ == "__main__":
    raise SystemExit(main())
