"""Serving errors, and the one table that turns them into gRPC status codes.

    ServingError                    message written for the client (names field, got, expected)
    ├── InvalidRequestError         the request breaks the wire contract   -> INVALID_ARGUMENT
    ├── ModelNotFoundError          no such model or version               -> NOT_FOUND
    ├── ModelUnavailableError       known, but not ready (unloaded/failed) -> UNAVAILABLE
    └── ModelLoadError              a version that cannot be served        -> FAILED_PRECONDITION
        ├── IntegrityError          files differ from manifest.json (sha256, size)
        ├── ContractError           manifest or graph break the model contract
        └── ProviderError           the requested execution provider was not obtained

Anything else is a bug: INTERNAL with a fixed message, the traceback goes to the log.
The exceptions carry no gRPC codes; `STATUS` below is the only place codes are chosen.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error; the server log has the details"


class ServingError(Exception):
    """Base class; `str(err)` is safe to send to clients."""


class InvalidRequestError(ServingError):
    pass


class ModelNotFoundError(ServingError):
    pass


class ModelUnavailableError(ServingError):
    pass


class ModelLoadError(ServingError):
    pass


class IntegrityError(ModelLoadError):
    pass


class ContractError(ModelLoadError):
    pass


class ProviderError(ModelLoadError):
    pass


# The one mapping from domain errors to gRPC status codes; the first matching class wins.
STATUS: tuple[tuple[type[ServingError], grpc.StatusCode], ...] = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (ModelUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (ModelLoadError, grpc.StatusCode.FAILED_PRECONDITION),
)


def status_for(err: Exception, rpc: str) -> tuple[grpc.StatusCode, str]:
    """Code and client-facing message for `err`, logged once here (the RPC boundary)."""
    for cls, code in STATUS:
        if isinstance(err, cls):
            log.info("%s failed: %s: %s", rpc, code.name, err)
            return code, str(err)
    log.error("%s failed unexpectedly", rpc, exc_info=err)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


S = TypeVar("S")
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[S, Req, "grpc.aio.ServicerContext[Any, Any]"], Awaitable[Resp]]


def rpc_boundary(method: Handler[S, Req, Resp]) -> Handler[S, Req, Resp]:
    """Decorator for unary servicer methods: an exception becomes `context.abort(code, message)`."""

    @functools.wraps(method)
    async def wrapper(self: S, request: Req, context: grpc.aio.ServicerContext[Any, Any]) -> Resp:
        try:
            return await method(self, request, context)
        except Exception as err:  # the boundary: every failure is mapped, none escapes raw
            code, message = status_for(err, method.__name__)
        await context.abort(code, message)
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


__all__ = [
    "INTERNAL_MESSAGE",
    "STATUS",
    "ContractError",
    "IntegrityError",
    "InvalidRequestError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelUnavailableError",
    "ProviderError",
    "ServingError",
    "rpc_boundary",
    "status_for",
]
