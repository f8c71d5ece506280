"""Who may call: TLS or mutual TLS on the gRPC port, and a bearer token checked in one interceptor.

The token comes from STABLEMLP_AUTH_TOKEN or a file (never a flag, so `ps` cannot show it), is
compared in constant time (hmac.compare_digest), and is never logged. Health checks can stay open
for orchestrator probes. A refused call gets UNAUTHENTICATED through errors.py's table; its payload
is not even parsed.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from .errors import AuthenticationError, status_for

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
Handler = "grpc.RpcMethodHandler[Any, Any]"
SCHEME = "bearer "  # RFC 6750; the scheme name is case-insensitive (RFC 7235)


def read_token(token: str, token_file: Path | None) -> bytes | None:
    """The configured token, or None for no token auth; an empty one is a mistake, not 'off'."""
    if token_file is not None:
        token = token_file.read_text(encoding="utf-8")
    elif not token:
        return None
    token = token.strip()
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        where = token_file or "STABLEMLP_AUTH_TOKEN"
        raise ValueError(f"auth token from {where}: expected one word of printable characters")
    return token.encode()


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


def _refuse(handler: grpc.RpcMethodHandler[Any, Any], code: grpc.StatusCode, message: str) -> Any:
    """A handler of the same kind as `handler` that only aborts (requests stay unparsed bytes)."""

    async def abort(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class TokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Lets a call through only with `authorization: Bearer <token>` (or to an open service)."""

    def __init__(
        self, token: bytes, exempt_health: bool, on_refused: Callable[[], None] = lambda: None
    ) -> None:
        self._token, self._on_refused = token, on_refused
        self._open = (f"/{HEALTH_SERVICE}/",) if exempt_health else ()

    def authorized(self, metadata: Any) -> bool:
        """Exactly one `authorization: Bearer <token>` entry, and the token matches."""
        values = [v for k, v in metadata or () if k == "authorization"]
        if len(values) != 1 or not isinstance(values[0], str):
            return False
        scheme, presented = values[0][: len(SCHEME)], values[0][len(SCHEME) :]
        return scheme.lower() == SCHEME and hmac.compare_digest(
            presented.encode(errors="surrogateescape"), self._token
        )

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(self._open):
            return handler
        if self.authorized(handler_call_details.invocation_metadata):
            return handler
        self._on_refused()
        rpc = method.rsplit("/", 1)[-1]
        code, message = status_for(
            AuthenticationError("missing or wrong token: send 'authorization: Bearer <token>'"),
            rpc,
        )
        refused: grpc.RpcMethodHandler[Any, Any] = _refuse(handler, code, message)
        return refused


__all__ = ["HEALTH_SERVICE", "TokenInterceptor", "read_token", "server_credentials"]
