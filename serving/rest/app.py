"""The REST front: the KServe v2 / Open Inference Protocol over HTTP, with Triton's extensions.

Runs on the gRPC server's asyncio loop (aiohttp, chosen by measurement: bench/httplibs.py) and
calls the same dataplane, so admission, batching, version pinning, statistics and metrics are
shared. Each handler turns its request into a dataplane call and the answer into JSON; the guard
(guard.py) checks tokens and sizes first and maps every failure. Triton's ModelConfig and
ModelStatistics are triton.py's documents as they are (the gRPC front parses the same documents
into its messages).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..dataplane import DataPlane
from ..errors import CANCELLED, InvalidRequestError, clip
from ..manifest import PLATFORM, TensorSpec
from ..repository.policy import VersionPolicy
from ..runtime.batcher import BatchingOptions
from ..settings import Settings, address
from ..triton import model_config, model_statistics
from .connections import Connections
from .guard import Guard
from .openapi import openapi_document
from .wire import (
    BINARY_CONTENT_TYPE,
    JSON_CONTENT_TYPE,
    dump_json,
    load_json,
    parse_infer,
    reply_of,
    request_of,
)

log = logging.getLogger(__name__)
PROTOCOL = "http"  # what traces and request logs say these calls came over
HEADER_LENGTH = "Inference-Header-Content-Length"  # Triton's binary tensor data extension
MODEL = "/v2/models/{name}"
VERSION = "/v2/models/{name}/versions/{version}"
OPENAPI_PATH = "/v2/openapi.json"
# (method, path, handler method, route name): the guard knows the health and control routes by name.
ROUTES = [
    ("GET", "/v2/health/live", "live", "live"),
    ("GET", "/v2/health/ready", "ready", "ready"),
    ("GET", "/v2", "server_metadata", ""),
    ("GET", OPENAPI_PATH, "openapi", ""),
    ("GET", "/v2/models/stats", "statistics", ""),
    ("POST", "/v2/repository/index", "index", ""),
    ("POST", "/v2/repository/models/{name}/load", "load", "load"),
    ("POST", "/v2/repository/models/{name}/unload", "unload", "unload"),
] + [
    (method, base + suffix, handler, "")
    for base in (MODEL, VERSION)
    for method, suffix, handler in (
        ("GET", "", "model_metadata"),
        ("GET", "/ready", "model_ready"),
        ("GET", "/config", "config"),
        ("GET", "/stats", "statistics"),
        ("POST", "/infer", "infer"),
    )
]


def _json(document: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=dump_json(document), content_type=JSON_CONTENT_TYPE)


def _tensors(specs: tuple[TensorSpec, ...]) -> list[dict[str, Any]]:
    return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]


class RestFront:
    def __init__(
        self,
        dataplane: DataPlane,
        guard: Guard,
        *,
        version_policy: VersionPolicy,
        batching: BatchingOptions | None,
        server_version: str,
        extensions: tuple[str, ...],
    ) -> None:
        self._dataplane, self.guard = dataplane, guard
        self._policy, self._batching = version_policy, batching
        self._metadata = {"name": "stablemlp", "version": server_version, "extensions": extensions}

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[self.guard.middleware],
            client_max_size=self.guard.max_body_bytes,
            # aiohttp's defaults, said here: header lines and fields bounded before routing.
            handler_args={"max_line_size": 8190, "max_field_size": 8190, "max_headers": 32},
        )
        for method, path, handler, name in ROUTES:
            app.router.add_route(method, path, getattr(self, handler), name=name or None)
        return app

    async def live(self, request: web.Request) -> web.Response:
        return _json({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = self._dataplane.server_ready()
        return _json({"ready": ready}, 200 if ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        providers = "providers=" + ",".join(self._dataplane.repository.providers())
        extensions = [*self._metadata["extensions"], providers]
        return _json({**self._metadata, "extensions": extensions})

    async def openapi(self, request: web.Request) -> web.Response:
        return _json(openapi_document(str(self._metadata["version"])))

    async def model_metadata(self, request: web.Request) -> web.Response:
        facts = self._dataplane.metadata(*_model(request))
        return _json({
            "name": facts.name, "versions": facts.versions, "platform": PLATFORM,
            "inputs": _tensors(facts.manifest.inputs), "outputs": _tensors(facts.manifest.outputs),
        })  # fmt: skip

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        ready = self._dataplane.model_ready(name, version)
        return _json({"name": name, "ready": ready}, 200 if ready else 503)

    async def config(self, request: web.Request) -> web.Response:
        loaded = self._dataplane.resolve(*_model(request))
        return _json(model_config(loaded, self._policy, self._batching))

    async def statistics(self, request: web.Request) -> web.Response:
        rows = self._dataplane.statistics(*_model(request))
        return _json({"model_stats": [model_statistics(*row) for row in rows]})

    async def index(self, request: web.Request) -> web.Response:
        body = await _body_object(request)
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidRequestError(f"ready: got {clip(repr(ready))}, expected true or false")
        rows = await self._dataplane.index(ready)
        keys = ("name", "version", "state", "reason")
        return _json([dict(zip(keys, row, strict=True)) for row in rows])

    async def load(self, request: web.Request) -> web.Response:
        parameters = (await _body_object(request)).get("parameters") or {}
        if parameters:  # Triton's `config` / `file:` overrides: files come from disk only
            keys = sorted(parameters)[:4] if isinstance(parameters, dict) else parameters
            raise InvalidRequestError(
                f"parameters: got {clip(str(keys))}, expected none (models load from the "
                "repository folder only)"
            )
        await self._dataplane.load(request.match_info["name"])
        return _json({})

    async def unload(self, request: web.Request) -> web.Response:
        await _body_object(request)
        await self._dataplane.unload(request.match_info["name"])
        return _json({})

    async def infer(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        header = request.headers.get(HEADER_LENGTH)
        # ASCII digits only: int() would also take "1_1_3", "+113" and other scripts' digits.
        if header is not None and not (header.isascii() and header.isdigit()):
            raise InvalidRequestError(
                f"{HEADER_LENGTH}: got '{clip(header)}', expected a byte count (ASCII digits)"
            )
        header_length = None if header is None else int(header)
        inference = parse_infer(await request.read(), header_length)
        async with self._dataplane.infer(
            name, version, request_of(inference), PROTOCOL, _cancelled, request.headers.items
        ) as inferred:
            reply = reply_of(inference, inferred)
        if reply.header_length is None:
            return web.Response(body=reply.body, content_type=JSON_CONTENT_TYPE)
        return web.Response(
            body=reply.body,
            content_type=BINARY_CONTENT_TYPE,
            headers={HEADER_LENGTH: str(reply.header_length)},
        )


def _model(request: web.Request) -> tuple[str, str]:
    return request.match_info.get("name", ""), request.match_info.get("version", "")


def _cancelled() -> str:
    return CANCELLED  # HTTP has no deadline: a cancelled handler's client went away


async def _body_object(request: web.Request) -> dict[str, Any]:
    """An optional JSON object body (repository endpoints): empty means `{}`."""
    data = await request.read()
    if not data.strip():
        return {}
    document = load_json(data)
    if not isinstance(document, dict):
        raise InvalidRequestError("request: expected a JSON object")
    return document


async def start_rest(
    front: RestFront,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    reuse_port: bool,
    grace_s: float,
    connections: Connections,
) -> tuple[RestServer, int]:
    """Bind and start the REST port behind `connections`; returns what stops it, and the port."""
    app = front.app()
    # A refused request's unsent body is drained 2 s at most, not aiohttp's 10 s: until then it
    # keeps one of the connections.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=grace_s, lingering_time=2.0)
    await runner.setup()
    assert runner.server is not None
    factory = connections.serve(runner.server)
    # A TLS handshake counts as waiting on the client too (asyncio's default allows 60 s).
    handshake_s = connections.idle_s if ssl_context else None
    try:  # what aiohttp's TCPSite does, with the capped factory in front of its server
        listener = await asyncio.get_running_loop().create_server(
            factory, host, port, ssl=ssl_context, backlog=128, reuse_port=reuse_port or None,
            ssl_handshake_timeout=handshake_s,
        )  # fmt: skip
    except OSError as err:
        await runner.cleanup()
        raise OSError(f"REST: cannot listen on port {port}: {err}") from None
    bound = int(listener.sockets[0].getsockname()[1])
    return RestServer(runner, listener, connections, front.guard), bound


MIN_CUT_S = 0.05  # what a request still running at the end of the grace period is given
# Connections accepted a moment before the port closed send their request within milliseconds
# (loopback or LAN): waited for this long, so none is closed with its first request on the way.
# Idle keep-alive connections hold the shutdown up this long at most.
SETTLE_S, SETTLE_STEP_S = 0.5, 0.02


@dataclass(frozen=True)
class RestServer:
    runner: web.AppRunner
    listener: asyncio.Server
    connections: Connections
    guard: Guard


async def drain_rest(rest: RestServer, timeout: float) -> int:
    """Take no new connection (a client sees it refused, knowing nothing was sent; behind a
    Service the pod left the endpoints before SIGTERM: deploy/'s preStop). On open ones, new
    requests get 503 and `Connection: close` while those being handled (a body still arriving
    too) are answered, for `timeout` s at most; connections accepted a moment before get as
    long as SETTLE_S to send their request (and be answered) before idle ones are closed.
    aiohttp's own shutdown drops whatever arrives once it begins (a body's rest included), so
    it only comes after this. Returns the requests still receiving their body at the end."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    rest.listener.close()  # before any reply says `Connection: close`: no reconnects to reset
    receiving = await rest.guard.drain(timeout)
    server = rest.runner.server
    settled = min(deadline, loop.time() + SETTLE_S)
    while server is not None and any(server.connections) and loop.time() < settled:
        await asyncio.sleep(SETTLE_STEP_S)  # bounded by `settled`
    return receiving


async def stop_rest(rest: RestServer, timeout: float) -> None:
    """Close the connections: idle ones at once, any still handling a request after `timeout`
    s cut (drain_rest first lets them finish)."""
    rest.listener.close()
    rest.connections.close()
    if rest.runner.server is not None:
        rest.runner.server.pre_shutdown()
        # aiohttp reads a timeout of 0 as none at all: a request left would be waited for.
        await asyncio.shield(rest.runner.server.shutdown(max(timeout, MIN_CUT_S)))
    await asyncio.shield(rest.runner.cleanup())


# JSON spells a 4-byte float in up to ~24 characters ("-1.1754943508222875e-38,"): REST bodies
# may be this many times the gRPC message limit (the binary extension needs only 1x).
JSON_EXPANSION = 6


def rest_guard(
    settings: Settings,
    token: bytes | None,
    control: bytes | None,
    message_bytes: int,
    on_refused: Callable[[], None],
) -> Guard:
    """The REST front's checks, with the gRPC port's bounds: bodies up to JSON_EXPANSION x the
    message limit, and at most the bytes gRPC's calls at once may hold (messages x size)."""
    return Guard(
        token, control, settings.auth_exempt_health, message_bytes * JSON_EXPANSION,
        settings.max_concurrent_rpcs, message_bytes * settings.max_concurrent_rpcs,
        settings.client_timeout_s, on_refused,
    )  # fmt: skip


async def start_rest_port(
    settings: Settings,
    front: RestFront,
    guard: Guard,
    tls: ssl.SSLContext | None,
    reuse_port: bool,
) -> tuple[RestServer, int]:
    """Bind the REST port behind its connection caps; returns what stops it, and the port."""
    connections = Connections(settings.max_connections, settings.client_timeout_s,
                              guard.quiet_since)  # fmt: skip
    rest = await start_rest(front, settings.host, settings.http_port, tls, reuse_port,
                            settings.grace_period_s, connections)  # fmt: skip
    log.info("rest: %s://%s/v2", "https" if tls else "http", address(settings.host, rest[1]))
    return rest


__all__ = [
    "HEADER_LENGTH",
    "JSON_EXPANSION",
    "OPENAPI_PATH",
    "ROUTES",
    "RestFront",
    "RestServer",
    "drain_rest",
    "rest_guard",
    "start_rest",
    "start_rest_port",
    "stop_rest",
]
