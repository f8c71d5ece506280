"""The gRPC boundary: status codes for errors.py's statuses, a lenient request deserializer, and
`rpc`, the one decorator every servicer method (unary or streaming) goes through.

A failure is mapped once, here, and logged once: one line with the RPC, the status, the message
(clipped) and the peer; unexpected errors log their traceback and answer INTERNAL with a fixed
message. Identical failures repeated in a burst are logged a few times, then counted, so a client
cannot flood the log.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from .errors import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    INTERNAL,
    STATUS_NAMES,
    InvalidRequestError,
    clip,
    message_of,
    status_of,
)

log = logging.getLogger(__name__)

# errors.py's status names are the gRPC codes' names.
GRPC_CODES: dict[str, grpc.StatusCode] = {name: grpc.StatusCode[name] for name in STATUS_NAMES}
LOG_MESSAGE_CHARS = 500  # a failure line's message, at most
BURST_LINES = 5  # identical failures logged per window before they are only counted
BURST_WINDOW_S = 10.0
_TRACKED_KINDS = 1024  # distinct failures remembered at once (bounded memory)


class _Bursts:
    """How often each kind of failure was logged in the current window."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, ...], list[float]] = {}  # key -> [window start, lines, extra]

    def admit(self, key: tuple[str, ...]) -> tuple[bool, int]:
        """Whether to log this one, and how many like it went unlogged in the last window."""
        now = time.monotonic()
        entry = self._seen.get(key)
        if entry is None or now - entry[0] > BURST_WINDOW_S:
            if len(self._seen) >= _TRACKED_KINDS:
                self._seen.clear()
            suppressed = int(entry[2]) if entry is not None else 0
            self._seen[key] = [now, 1, 0]
            return True, suppressed
        if entry[1] < BURST_LINES:
            entry[1] += 1
            return True, 0
        entry[2] += 1
        return False, 0


_bursts = _Bursts()


def log_failure(rpc: str, status: str, message: str, peer: str = "") -> None:
    """The one log line of a failed call: RPC, status, message (capped), and who called."""
    text = clip(message, LOG_MESSAGE_CHARS)
    logged, suppressed = _bursts.admit((rpc, status, text[:200]))
    if not logged:
        return
    extra = {"rpc": rpc, "code": status, "peer": clip(peer)}
    more = (
        f" (and {suppressed} more like it in the last {BURST_WINDOW_S:.0f} s)" if suppressed else ""
    )
    origin = f" (from {clip(peer)})" if peer else ""
    log.info("%s failed: %s: %s%s%s", rpc, status, text, origin, more, extra=extra)


def failure(err: BaseException, rpc: str, peer: str = "") -> tuple[str, str]:
    """Status name and client-facing message for `err`, logged once here."""
    status = status_of(err)
    if status != INTERNAL:
        log_failure(rpc, status, str(err), peer)
        return status, str(err)
    logged, suppressed = _bursts.admit((rpc, INTERNAL, type(err).__name__, str(err)[:200]))
    if logged:
        log.error(
            "%s failed unexpectedly%s", rpc,
            f" (and {suppressed} more like it)" if suppressed else "",
            exc_info=err, extra={"rpc": rpc, "code": INTERNAL, "peer": clip(peer)},
        )  # fmt: skip
    return INTERNAL, message_of(err)


def cancelled_status(context: Any) -> str:
    """Why gRPC cancelled a handler: its deadline passed, or the client went away."""
    remaining = context.time_remaining()
    return DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else CANCELLED


class Undecodable:
    """Stands in for a request whose bytes do not parse (see `lenient`); refused by `rpc`."""

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


S = TypeVar("S")
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


Handler = Callable[[S, Any, Any], Awaitable[Any]]

__all__ = [
    "GRPC_CODES",
    "Undecodable",
    "cancelled_status",
    "check_decoded",
    "failure",
    "lenient",
    "log_failure",
    "rpc",
]
