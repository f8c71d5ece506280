"""The listening ports, and the bounds each sets on what clients can make the server hold.

gRPC bounds its side in its core (options below); REST in our guard and connection caps
(rest_boundary.py, rest_connections.py); /metrics is a plain HTTP port of its own. Each failed
bind is an OSError naming the port. Measured by bench/flood.py and bench/rest_flood.py.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import Any

import grpc

from .metrics import Telemetry, serve_metrics
from .rest import RestFront, RestServer, start_rest
from .rest_boundary import Guard
from .rest_connections import Connections
from .settings import Settings

log = logging.getLogger(__name__)
STREAM_WINDOW_BYTES = 16 * 1024  # what each stream may send ahead of the server reading it
# JSON spells a 4-byte float in up to ~24 characters ("-1.1754943508222875e-38,"): REST bodies
# may be this many times the gRPC message limit (the binary extension needs only 1x).
JSON_EXPANSION = 6


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def grpc_server(
    settings: Settings, interceptors: list[Any], message_bytes: int, reuse_port: bool
) -> grpc.aio.Server:
    """gRPC reads a call's whole message before any handler runs, so what a flood can make the
    server hold is bounded here, in gRPC itself: connections x streams per connection x the
    per-stream receive window, plus the calls handled at once x the message size. BDP probing
    would grow the window to megabytes per stream; a fixed 16 KiB costs loopback and LAN clients
    nothing measurable (the window opens as each message is read)."""
    return grpc.aio.server(
        interceptors=interceptors,
        # Calls beyond this get RESOURCE_EXHAUSTED before their handler runs.
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", message_bytes),
            ("grpc.max_send_message_length", message_bytes),
            ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
            ("grpc.max_allowed_incoming_connections", settings.max_connections),
            ("grpc.http2.bdp_probe", 0),
            # Connections that send nothing (no handshake, or no call) give back their slot.
            ("grpc.server_handshake_timeout_ms", int(settings.client_timeout_s * 1000)),
            ("grpc.max_connection_idle_ms", int(settings.client_timeout_s * 1000)),
            ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
            # A taken port must fail, not be silently shared; workers share theirs on purpose.
            ("grpc.so_reuseport", int(reuse_port)),
        ],
    )


def bind_grpc(
    server: grpc.aio.Server, settings: Settings, credentials: grpc.ServerCredentials | None
) -> int:
    """The bound gRPC port (the real one when settings.port is 0)."""
    where = address(settings.host, settings.port)
    try:
        if credentials is None:
            return int(server.add_insecure_port(where))
        return int(server.add_secure_port(where, credentials))
    except RuntimeError as err:  # grpc reports a failed bind this way
        raise OSError(f"cannot listen on {where}: {err}") from None


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


def start_metrics(
    settings: Settings, telemetry: Telemetry
) -> tuple[int | None, Callable[[], None]]:
    if settings.metrics_port < 0:
        return None, lambda: None
    try:
        port, stop = serve_metrics(settings.host, settings.metrics_port, telemetry)
    except OSError as err:
        raise OSError(f"metrics: cannot listen on port {settings.metrics_port}: {err}") from None
    log.info("metrics: http://%s/metrics", address(settings.host, port))
    return port, stop


__all__ = [
    "JSON_EXPANSION",
    "STREAM_WINDOW_BYTES",
    "address",
    "bind_grpc",
    "grpc_server",
    "rest_guard",
    "start_metrics",
    "start_rest_port",
]
