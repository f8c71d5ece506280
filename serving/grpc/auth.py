"""Who may call: TLS or mutual TLS on the gRPC port, and a bearer token checked in one interceptor.

The tokens (read and compared by tokens.py, in constant time) are never logged.
Repository load/unload need the control token; everything else the inference token; health checks
can stay open for orchestrator probes. A refused call gets UNAUTHENTICATED, logged with the peer;
its payload is not even parsed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from ..errors import AuthenticationError
from ..observe.call_log import failure
from ..tokens import bearer_matches
from .boundary import GRPC_CODES

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
CONTROL_RPCS = ("RepositoryModelLoad", "RepositoryModelUnload")


def server_credentials(
    cert: Path | None, key: Path | None, client_ca: Path | None
) -> grpc.ServerCredentials | None:
    """TLS credentials for the port, requiring client certificates when a client CA is given."""
    if cert is None or key is None:
        return None
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )


def authorized(metadata: Any, token: bytes) -> bool:
    """Exactly one `authorization` entry among `metadata`'s (key, value) pairs, and it is
    `Bearer <token>`."""
    values = [v for k, v in metadata or () if k == "authorization"]
    return len(values) == 1 and bearer_matches(values[0], token)


def _refuse(handler: grpc.RpcMethodHandler[Any, Any], rpc: str, message: str) -> Any:
    """A handler of the same kind as `handler` that only aborts (requests stay unparsed bytes);
    the refusal is logged there, where the caller's address is known."""

    async def abort(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        status, text = failure(AuthenticationError(message), rpc, context.peer())
        await context.abort(GRPC_CODES[status], text)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class TokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Lets a call through only with `authorization: Bearer <token>`: the control token for
    repository load/unload, the inference token for everything else (health may stay open)."""

    def __init__(
        self,
        token: bytes | None,
        control_token: bytes | None,
        exempt_health: bool,
        on_refused: Callable[[], None] = lambda: None,
    ) -> None:
        self._token, self._control, self._on_refused = token, control_token, on_refused
        self._open = (f"/{HEALTH_SERVICE}/",) if exempt_health else ()

    def required(self, method: str) -> tuple[bytes | None, str]:
        """The token `method` needs (None: none), and what to call it in a refusal."""
        if method.rsplit("/", 1)[-1] in CONTROL_RPCS:
            return self._control, "control token"
        if method.startswith(self._open):
            return None, ""
        return self._token, "token"

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        token, what = self.required(method)
        if handler is None or token is None:
            return handler
        values = [
            v for k, v in handler_call_details.invocation_metadata or () if k == "authorization"
        ]
        if len(values) == 1 and bearer_matches(values[0], token):
            return handler
        self._on_refused()
        message = f"missing or wrong {what}: send 'authorization: Bearer <{what}>'"
        refused: grpc.RpcMethodHandler[Any, Any] = _refuse(
            handler, method.rsplit("/", 1)[-1], message
        )
        return refused


def token_interceptors(
    token: bytes | None,
    control_token: bytes | None,
    exempt_health: bool,
    on_refused: Callable[[], None],
) -> list[TokenInterceptor]:
    """The interceptors a server with these tokens needs: none when it has no token at all."""
    if token is None and control_token is None:
        return []
    return [TokenInterceptor(token, control_token, exempt_health, on_refused)]


__all__ = [
    "CONTROL_RPCS",
    "HEALTH_SERVICE",
    "TokenInterceptor",
    "authorized",
    "server_credentials",
    "token_interceptors",
]
