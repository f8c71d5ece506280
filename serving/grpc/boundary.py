"""The gRPC boundary: status codes for errors.py's statuses, a lenient request deserializer, and
`rpc`, the one decorator every servicer method (unary or streaming) goes through.

A failure is mapped once, here, and logged once (call_log.py, shared with the REST front): one
line with the RPC, the status, the message (clipped) and the peer; unexpected errors log their
traceback and answer INTERNAL with a fixed message.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from ..errors import CANCELLED, DEADLINE_EXCEEDED, STATUS_NAMES, InvalidRequestError, clip
from ..observe.call_log import failure, log_failure
from ..protowire import WireError

# errors.py's status names are the gRPC codes' names.
GRPC_CODES: dict[str, grpc.StatusCode] = {name: grpc.StatusCode[name] for name in STATUS_NAMES}


def cancelled_status(context: Any) -> str:
    """Why gRPC cancelled a handler: its deadline passed, or the client went away."""
    remaining = context.time_remaining()
    return DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else CANCELLED


class Undecodable:
    """Stands in for a request refused before it was built (see `lenient`); raised by `rpc`."""

    def __init__(self, error: InvalidRequestError) -> None:
        self.error = error

    def check(self) -> None:
        raise self.error


def lenient(
    parse: Callable[[bytes], Any],
    message_type: str,
    bound: Callable[[bytes], None] | None = None,
) -> Callable[[bytes], Any]:
    """A request deserializer that returns `Undecodable` instead of raising, so a garbled message
    gets INVALID_ARGUMENT and one log line, not gRPC's UNKNOWN and a traceback. `bound` looks at
    the bytes first (bounds.py): a message holding more entries than allowed is refused
    before protobuf builds them."""

    def deserialize(data: bytes) -> Any:
        try:
            if bound is not None:
                bound(data)
            return parse(data)
        except (DecodeError, WireError) as err:
            return Undecodable(
                InvalidRequestError(
                    f"request: not a valid {message_type} message ({clip(str(err), 200)})"
                )
            )
        except InvalidRequestError as err:
            return Undecodable(err)

    return deserialize


def check_decoded(request: object) -> None:
    """Raise InvalidRequestError if `request` is the stand-in for bytes that did not parse."""
    if isinstance(request, Undecodable):
        request.check()


F = TypeVar("F", bound=Callable[..., Any])


def rpc(method: F) -> F:
    """Decorator for every servicer method: failures become `context.abort(code, message)`,
    cancellations are logged once. Streaming methods (async generators) are wrapped as such."""
    name = method.__name__
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, requests: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for reply in method(self, requests, context):
                    yield reply
                return
            except asyncio.CancelledError:
                log_failure(name, cancelled_status(context), "cancelled", context.peer())
                raise
            except Exception as err:  # the boundary: every failure is mapped, none escapes raw
                status, message = failure(err, name, context.peer())
            await context.abort(GRPC_CODES[status], message)

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: Any) -> Any:
        try:
            check_decoded(request)
            return await method(self, request, context)
        except asyncio.CancelledError:  # gRPC has answered the client already; say so once
            log_failure(name, cancelled_status(context), "cancelled", context.peer())
            raise
        except Exception as err:  # the boundary: every failure is mapped, none escapes raw
            status, message = failure(err, name, context.peer())
        await context.abort(GRPC_CODES[status], message)
        raise AssertionError("unreachable: context.abort raises")

    return unary  # type: ignore[return-value]


__all__ = [
    "GRPC_CODES",
    "Undecodable",
    "cancelled_status",
    "check_decoded",
    "lenient",
    "rpc",
]
