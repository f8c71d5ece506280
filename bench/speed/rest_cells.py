"""REST cells: KServe v2 REST servers (ours, or a peer's) beside our gRPC, in one run.

    python -m stablemlp.bench.speed.rest_cells --rest ours=127.0.0.1:8000 \
        [--rest kserve=127.0.0.1:8080] [--grpc ours=127.0.0.1:8001] --model breast_cancer \
        --width 30 [--repeats 3]

`stablemlp bench --rest` runs the same cells against the server it started (and any
`--rest-peer NAME=HOST:PORT`). Each cell is one (batch, concurrency) and one form: `json` (the v2
JSON body, the rows as a flat `data` list) or `binary` (Triton's binary tensor data extension);
gRPC cells send raw_input_contents. Every target is checked to answer a cell's request with the
right shape before any timing, then the targets are measured back to back, their order alternating
per repeat, with bench/speed/loadgen.py's workers (pre-serialized requests, keep-alive connections).
Loopback addresses only.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import socket
import statistics
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..servers import is_loopback
from .grid import METHODS, Timing
from .loadgen import LoadGenerator, LoadSpec
from .markdown import rest_markdown
from .payloads import build_request

log = logging.getLogger(__name__)
METHOD = METHODS[False]  # unary ModelInfer, the gRPC side of the comparison

SHAPES = ((1, 8), (64, 8))  # (batch, concurrency), issue 15
FORMS = ("json", "binary")
CHECK_TIMEOUT_S = 10.0


def http_request(address: str, model: str, input_name: str, rows: np.ndarray, form: str) -> bytes:
    """A whole HTTP/1.1 infer request (headers and body) for `rows`."""
    tensor: dict[str, Any] = {"name": input_name, "datatype": "FP32", "shape": list(rows.shape)}
    extra = ""
    if form == "binary":
        raw = np.ascontiguousarray(rows, "<f4").tobytes()
        tensor["parameters"] = {"binary_data_size": len(raw)}
        doc = {"id": "bench", "inputs": [tensor], "parameters": {"binary_data_output": True}}
        header = json.dumps(doc).encode()
        body = header + raw
        extra = f"Inference-Header-Content-Length: {len(header)}\r\n"
        kind = "application/octet-stream"
    else:
        tensor["data"] = rows.ravel().tolist()
        # An id: KServe's REST (0.21) answers 500 to a request without one.
        body = json.dumps({"id": "bench", "inputs": [tensor]}).encode()
        kind = "application/json"
    head = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {address}\r\n"
            f"Content-Type: {kind}\r\n{extra}Content-Length: {len(body)}\r\n\r\n")  # fmt: skip
    return head.encode() + body


def check_http(address: str, payload: bytes, rows: int) -> None:
    """One request on a plain socket: HTTP 200 and `probability` of shape [rows, 1]."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host.strip("[]"), int(port)), CHECK_TIMEOUT_S) as sock:
        sock.sendall(payload)
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply) < _framed_length(reply):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise AssertionError(f"{address}: {head[:200]!r} {body[:300]!r}")
    headers = dict(
        line.decode().lower().split(": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line
    )
    split = int(headers.get("inference-header-content-length", len(body)))
    outputs = {o["name"]: o for o in json.loads(body[:split])["outputs"]}
    if outputs["probability"]["shape"] != [rows, 1]:
        raise AssertionError(f"{address}: probability shape {outputs['probability']['shape']}")


def _framed_length(reply: bytes) -> int:
    head, _, _ = reply.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(head) + 4 + int(value)
    return 0


def measure(
    generator: LoadGenerator,
    rest: Sequence[tuple[str, str]],  # (name, HOST:PORT)
    grpc_targets: Sequence[tuple[str, str]],
    model: str,
    input_name: str,
    width: int,
    repeats: int,
    warmup_s: float,
    window_s: float,
) -> dict[str, Any]:
    """{cells: [{batch, concurrency, target, protocol, form, requests_per_s (median), runs}]}."""
    plan: list[tuple[int, int, str, str, str, LoadSpec]] = []
    for batch, concurrency in SHAPES:
        rows = np.random.default_rng(0).normal(size=(batch, width)).astype(np.float32)
        for name, address in rest:
            for form in FORMS:
                payload = http_request(address, model, input_name, rows, form)
                check_http(address, payload, batch)
                spec = LoadSpec(address, "", payload, concurrency, 1, warmup_s, window_s,
                                10**6, protocol="http")  # fmt: skip
                plan.append((batch, concurrency, name, "http", form, spec))
        one_input = {"inputs": [{"name": input_name, "datatype": "FP32", "shape": [-1, width]}]}
        request = build_request(
            model, one_input, {input_name: rows}, "raw_input_contents"
        ).SerializeToString()
        for name, address in grpc_targets:
            spec = LoadSpec(address, METHOD, request, concurrency, 1, warmup_s, window_s, 10**6)
            plan.append((batch, concurrency, name, "grpc", "raw", spec))
    runs: dict[int, list[float]] = {i: [] for i in range(len(plan))}
    for repeat in range(repeats):
        order = range(len(plan)) if repeat % 2 == 0 else reversed(range(len(plan)))
        for i in order:
            result = generator.run(plan[i][5])
            if result.errors:
                log.warning("%s: %d errors, first: %s", plan[i][:5], result.errors,
                            result.first_error)  # fmt: skip
            runs[i].append(result.requests_per_s if not result.errors else 0.0)
            log.info("repeat %d %s: %.0f req/s", repeat + 1, plan[i][:5], result.requests_per_s)
    cells = [
        {"batch": b, "concurrency": c, "target": n, "protocol": p, "form": f,
         "requests_per_s": round(statistics.median(runs[i]), 1),
         "runs": [round(r, 1) for r in runs[i]]}
        for i, (b, c, n, p, f, _) in enumerate(plan)
    ]  # fmt: skip
    note = f"{repeats} windows of {window_s} s per cell and target, medians; one load process"
    return {"note": note, "cells": cells}


def rest_cells(
    generator: LoadGenerator,
    peers: Sequence[tuple[str, str]],  # (name or "", HOST:PORT) of other REST servers
    grpc_address: str,
    server_log: str,  # our server's log, with its "rest: http://HOST:PORT/v2" line ("": none)
    model: str,
    manifest: Mapping[str, Any],
    timing: Timing,
) -> dict[str, Any]:
    """`stablemlp bench --rest`: our REST port and the peers' beside our gRPC."""
    found = re.findall(r"rest: http://(\S+?)/v2", server_log)
    targets = [("ours", found[0])] if found else []
    targets += [(name or address, address) for name, address in peers]
    (numeric,) = [spec for spec in manifest["inputs"] if spec["datatype"] == "FP32"]
    input_name, width = str(numeric["name"]), int(numeric["shape"][1])
    return measure(generator, targets, [("ours", grpc_address)], model, input_name, width,
                   timing.repeats, timing.warmup_s, timing.window_s)  # fmt: skip


def _named(text: str) -> tuple[str, str]:
    name, _, address = text.rpartition("=")
    return (name or address), address


def main(argv: list[str] | None = None) -> int:

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rest", action="append", default=[], metavar="NAME=HOST:PORT",
                        help="a REST server to measure (repeat)")  # fmt: skip
    parser.add_argument("--grpc", action="append", default=[], metavar="NAME=HOST:PORT",
                        help="a gRPC server measured in the same run (repeat)")  # fmt: skip
    parser.add_argument("--model", default="breast_cancer")
    parser.add_argument("--input", default="features", help="the FP32 input's name")
    parser.add_argument("--width", type=int, default=30, help="the FP32 input's columns")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup-s", type=float, default=0.5)
    parser.add_argument("--window-s", type=float, default=2.0)
    args = parser.parse_args(argv)
    rest, grpc_targets = [_named(t) for t in args.rest], [_named(t) for t in args.grpc]
    if not rest or not all(is_loopback(a) for _, a in [*rest, *grpc_targets]):
        parser.error("give at least one --rest; loopback addresses only")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with LoadGenerator(1) as generator:
        section = measure(generator, rest, grpc_targets, args.model, args.input, args.width,
                          args.repeats, args.warmup_s, args.window_s)  # fmt: skip
    print(json.dumps(section, indent=1))
    print(rest_markdown(section), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["FORMS", "SHAPES", "check_http", "http_request", "measure", "rest_cells"]
