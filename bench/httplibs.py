"""Which HTTP library the REST front runs on, decided by measurement (issue 15).

    python -m stablemlp.bench.httplibs --model-onnx REPO/MODEL/1/model.onnx [--repeats 3]

Each candidate serves the same v2 JSON infer on the asyncio loop of a (idle) grpc.aio server, as the
REST front must: the JSON body is parsed, the rows become an FP32 array, the real model runs inline,
the reply is built and encoded, so JSON encode and decode are in the figures. Candidates: aiohttp's
server, uvicorn (httptools parser) with a bare ASGI app, and uvicorn with Starlette (what KServe's
REST uses, less FastAPI's validation), each with the standard library's json and with orjson. The
load is bench/speed/loadgen.py's HTTP client (pre-serialized requests, keep-alive, a separate
process); candidates are measured back to back, their order alternating per repeat. Libraries that
are not installed are skipped; the choice is not re-made at run time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .servers import child_env
from .speed.loadgen import LoadGenerator, LoadSpec

CANDIDATES = ("aiohttp", "uvicorn-asgi", "uvicorn-starlette")
JSON_LIBS = ("json", "orjson")
SHAPES = ((1, 8), (64, 8))  # (batch, concurrency)
PATH = "/v2/models/m/infer"


def _codecs(name: str) -> tuple[Callable[[bytes], Any], Callable[[Any], bytes]]:
    if name == "orjson":
        import orjson

        return orjson.loads, orjson.dumps
    return json.loads, lambda doc: json.dumps(doc, separators=(",", ":")).encode()


def _handler(model: Path, json_lib: str) -> Callable[[bytes], bytes]:
    """The per-request work every candidate does: JSON in, the model run, JSON out."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    loads, dumps = _codecs(json_lib)

    def infer(body: bytes) -> bytes:
        doc = loads(body)
        tensor = doc["inputs"][0]
        rows = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        probability, label = session.run(["probability", "label"], {tensor["name"]: rows})
        outputs = [
            {"name": "probability", "datatype": "FP32", "shape": list(probability.shape),
             "data": probability.ravel().tolist()},
            {"name": "label", "datatype": "INT64", "shape": list(label.shape),
             "data": label.ravel().tolist()},
        ]  # fmt: skip
        return dumps({"model_name": "m", "model_version": "1", "outputs": outputs})

    return infer


async def _serve(library: str, infer: Callable[[bytes], bytes]) -> None:
    import grpc

    grpc_server = grpc.aio.server()
    grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()  # the loop the REST front shares
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose proto says TCP (an
    # accepted socket inherits proto 0 otherwise, and Nagle + delayed ACKs cost 40 ms a reply).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    print(f"ready {sock.getsockname()[1]}", flush=True)
    if library == "aiohttp":
        from aiohttp import web

        async def handle(request: web.Request) -> web.Response:
            return web.Response(body=infer(await request.read()), content_type="application/json")

        web_app = web.Application()
        web_app.router.add_post(PATH, handle)
        runner = web.AppRunner(web_app, access_log=None)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        await asyncio.Event().wait()
    import uvicorn

    if library == "uvicorn-starlette":
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import Response
        from starlette.routing import Route

        async def endpoint(request: Request) -> Response:
            return Response(infer(await request.body()), media_type="application/json")

        app: Any = Starlette(routes=[Route(PATH, endpoint, methods=["POST"])])
    else:

        async def asgi(scope: Any, receive: Any, send: Any) -> None:
            body, more = b"", True
            while more:
                message = await receive()
                body += message.get("body", b"")
                more = message.get("more_body", False)
            out = infer(body)
            headers = [(b"content-type", b"application/json"),
                       (b"content-length", str(len(out)).encode())]  # fmt: skip
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": out})

        app = asgi

    config = uvicorn.Config(app, http="httptools", lifespan="off", access_log=False,
                            log_level="warning")  # fmt: skip
    await uvicorn.Server(config).serve(sockets=[sock])


def _request(batch: int) -> bytes:
    rows = np.random.default_rng(0).normal(size=(batch, 30)).astype(np.float32)
    doc = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [batch, 30],
                       "data": rows.ravel().tolist()}]}  # fmt: skip
    body = json.dumps(doc).encode()
    head = f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    return head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body


def _start(library: str, json_lib: str, model: Path) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "stablemlp.bench.httplibs", "--serve", library,
               "--json", json_lib, "--model-onnx", str(model)]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=child_env())
    assert proc.stdout is not None
    line = proc.stdout.readline()  # bounded: the child prints it or exits (EOF)
    if not line.startswith("ready "):
        proc.kill()
        raise RuntimeError(f"{library}/{json_lib} did not start")
    return proc, f"127.0.0.1:{line.split()[1]}"


def compare(model: Path, repeats: int, window_s: float) -> dict[str, dict[str, float]]:
    """candidate/json -> b{batch}c{concurrency} -> median req/s over the repeats."""
    found = []
    for library in CANDIDATES:
        module = "aiohttp" if library == "aiohttp" else library.split("-")[-1]
        for json_lib in JSON_LIBS:
            try:
                __import__(module if module != "asgi" else "uvicorn")
                __import__(json_lib)
            except ImportError:
                continue
            found.append((library, json_lib))
    servers = {pair: _start(*pair, model) for pair in found}
    runs: dict[str, dict[str, list[float]]] = {f"{a}/{b}": {} for a, b in found}
    try:
        with LoadGenerator(1) as generator:
            for repeat in range(repeats):
                order = found if repeat % 2 == 0 else found[::-1]
                for batch, concurrency in SHAPES:
                    payload = _request(batch)
                    for pair in order:
                        spec = LoadSpec(servers[pair][1], "", payload, concurrency, 1, 0.5,
                                        window_s, 10**6, protocol="http")  # fmt: skip
                        result = generator.run(spec)
                        key = f"b{batch}c{concurrency}"
                        runs[f"{pair[0]}/{pair[1]}"].setdefault(key, []).append(
                            result.requests_per_s if not result.errors else 0.0
                        )
                        print(f"repeat {repeat + 1} {pair} {key}: {result.requests_per_s:.0f} "
                              f"req/s ({result.errors} errors)", file=sys.stderr)  # fmt: skip
    finally:
        for proc, _ in servers.values():
            proc.kill()
            proc.wait(timeout=10)
    return {
        name: {key: round(statistics.median(v), 1) for key, v in cells.items()}
        for name, cells in runs.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-onnx", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window-s", type=float, default=2.0)
    parser.add_argument("--serve", choices=CANDIDATES, help=argparse.SUPPRESS)
    parser.add_argument("--json", choices=JSON_LIBS, default="json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(_serve(args.serve, _handler(args.model_onnx, args.json)))
        return 0
    print(json.dumps(compare(args.model_onnx, args.repeats, args.window_s), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
