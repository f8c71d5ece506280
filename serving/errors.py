"""Serving errors, and the one table that turns them into gRPC status codes.

    ServingError                    message written for the client (names field, got, expected)
    ├── InvalidRequestError         the request breaks the wire contract   -> INVALID_ARGUMENT
    ├── ModelNotFoundError          no such model or version               -> NOT_FOUND
    ├── ModelUnavailableError       known, but not ready (unloaded/failed) -> UNAVAILABLE
    ├── OverloadedError             too many requests in flight or queued  -> RESOURCE_EXHAUSTED
    ├── AuthenticationError         missing or wrong bearer token          -> UNAUTHENTICATED
    └── ModelLoadError              a version that cannot be served        -> FAILED_PRECONDITION
        ├── IntegrityError          files differ from manifest.json (sha256, size)
        ├── ContractError           manifest or graph break the model contract
        └── ProviderError           the requested execution provider was not obtained

Anything else is a bug: INTERNAL with a fixed message, the traceback goes to the log. A handler
cancelled by gRPC (the client's deadline passed, or it hung up) is DEADLINE_EXCEEDED or CANCELLED.
The exceptions carry no gRPC codes; `STATUS` below is the only place codes are chosen. Text that a
client sent is quoted through `clip`, so no message or log line carries it unbounded.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error; the server log has the details"
CLIP_CHARS = 64  # longest client-sent string quoted in a message (model names are shorter)
CLIP_ITEMS = 8  # most list items (shape dims) quoted
LOG_MESSAGE_CHARS = 1000  # a log line's cap, whatever the message


class ServingError(Exception):
    """Base class; `str(err)` is safe to send to clients."""


class InvalidRequestError(ServingError):
    pass


class ModelNotFoundError(ServingError):
    pass


class ModelUnavailableError(ServingError):
    pass


class OverloadedError(ServingError):
    pass


class AuthenticationError(ServingError):
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
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (ModelLoadError, grpc.StatusCode.FAILED_PRECONDITION),
)


def clip(text: str, limit: int = CLIP_CHARS) -> str:
    """Client text made safe to quote: control characters escaped, at most `limit` characters."""
    escaped = text if text.isprintable() else repr(text)[1:-1]
    return escaped if len(escaped) <= limit else f"{escaped[:limit]}... ({len(text)} chars)"


def clip_items(items: Sequence[Any], limit: int = CLIP_ITEMS) -> str:
    """A client-sent list (shape dims) as `[a, b, ...]`, at most `limit` items of it."""
    if len(items) <= limit:
        return str(list(items))
    return f"[{', '.join(map(str, items[:limit]))}, ... ({len(items)} items)]"


class Undecodable:
    """Stands in for a request whose bytes do not parse (see `lenient`); refused at the boundary."""

    def __init__(self, message_type: str, reason: str) -> None:
        self.message_type, self.reason = message_type, reason

    def check(self) -> None:
        raise InvalidRequestError(
            f"request: not a valid {self.message_type} message ({clip(self.reason, 200)})"
        )


def lenient(parse: Callable[[bytes], Any], message_type: str) -> Callable[[bytes], Any]:
    """A request deserializer that returns `Undecodable` instead of raising, so a garbled message
    gets INVALID_ARGUMENT and one log line, not gRPC's UNKNOWN and a traceback."""

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as err:
            return Undecodable(message_type, str(err))

    return deserialize


def check_decoded(request: object) -> None:
    """Raise InvalidRequestError if `request` is the stand-in for bytes that did not parse."""
    if isinstance(request, Undecodable):
        request.check()


def code_for(err: BaseException) -> grpc.StatusCode:
    """The status code of `err`, without logging (for counting)."""
    if isinstance(err, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return next((code for cls, code in STATUS if isinstance(err, cls)), grpc.StatusCode.INTERNAL)


def cancelled_code(context: Any) -> grpc.StatusCode:
    """Why gRPC cancelled a handler: its deadline passed, or the client went away."""
    remaining = context.time_remaining()
    expired = remaining is not None and remaining <= 0
    return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED


def log_failure(rpc: str, code: grpc.StatusCode, message: str, peer: str = "") -> None:
    """The one log line of a failed call: RPC, status, message (capped), and who called."""
    text = message if len(message) <= LOG_MESSAGE_CHARS else message[:LOG_MESSAGE_CHARS] + "..."
    extra = {"rpc": rpc, "code": code.name, "peer": peer}
    log.info("%s failed: %s: %s", rpc, code.name, text, extra=extra)


def status_for(err: Exception, rpc: str, peer: str = "") -> tuple[grpc.StatusCode, str]:
    """Code and client-facing message for `err`, logged once here (the RPC boundary)."""
    code = code_for(err)
    if code != grpc.StatusCode.INTERNAL:
        log_failure(rpc, code, str(err), peer)
        return code, str(err)
    log.error("%s failed unexpectedly", rpc, exc_info=err, extra={"rpc": rpc, "code": code.name})
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
            check_decoded(request)
            return await method(self, request, context)
        except asyncio.CancelledError:  # gRPC has answered the client already; say so once
            log_failure(method.__name__, cancelled_code(context), "cancelled", context.peer())
            raise
        except Exception as err:  # the boundary: every failure is mapped, none escapes raw
            code, message = status_for(err, method.__name__, context.peer())
        await context.abort(code, message)
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


__all__ = [
    "INTERNAL_MESSAGE",
    "STATUS",
    "AuthenticationError",
    "ContractError",
    "IntegrityError",
    "InvalidRequestError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelUnavailableError",
    "OverloadedError",
    "ProviderError",
    "ServingError",
    "Undecodable",
    "cancelled_code",
    "check_decoded",
    "clip",
    "clip_items",
    "code_for",
    "lenient",
    "log_failure",
    "rpc_boundary",
    "status_for",
]
