"""Serving errors, in one tree, with the protocol-neutral status each stands for.

    ServingError                    message written for the client (names field, got, expected)
    ├── InvalidRequestError         the request breaks the wire contract   -> INVALID_ARGUMENT
    ├── ModelNotFoundError          no such model or version               -> NOT_FOUND
    ├── ModelUnavailableError       known, but not ready (unloaded/failed) -> UNAVAILABLE
    ├── OverloadedError             too many requests in flight or queued  -> RESOURCE_EXHAUSTED
    ├── AuthenticationError         missing or wrong bearer token          -> UNAUTHENTICATED
    ├── ControlDisabledError        repository control off in this mode    -> FAILED_PRECONDITION
    └── ModelLoadError              a version that cannot be served        -> FAILED_PRECONDITION
        ├── IntegrityError          files differ from manifest.json (sha256, size)
        ├── ContractError           manifest or graph break the model contract
        └── ProviderError           the requested execution provider was not obtained

Anything else is a bug: INTERNAL with a fixed message, the traceback goes to the log. A call
cancelled by its client or its deadline is CANCELLED or DEADLINE_EXCEEDED. The status names are
the KServe v2 / Triton ones (the gRPC codes'); each front maps them to its protocol (gRPC codes in
grpc/boundary.py, HTTP statuses in the REST front), so no exception here knows a protocol. Text a
client sent is quoted through `clip`, so no message or log line carries it unbounded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

INTERNAL_MESSAGE = "internal error; the server log has the details"
CLIP_CHARS = 64  # longest client-sent string quoted in a message (model names are shorter)
CLIP_ITEMS = 8  # most list items (shape dims) quoted

OK = "OK"
INTERNAL = "INTERNAL"
CANCELLED = "CANCELLED"
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"


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


class ControlDisabledError(ServingError):
    pass


class ModelLoadError(ServingError):
    pass


class IntegrityError(ModelLoadError):
    pass


class ContractError(ModelLoadError):
    pass


class ProviderError(ModelLoadError):
    pass


# The one mapping from domain errors to statuses; the first matching class wins.
STATUS: tuple[tuple[type[ServingError], str], ...] = (
    (InvalidRequestError, "INVALID_ARGUMENT"),
    (ModelNotFoundError, "NOT_FOUND"),
    (ModelUnavailableError, "UNAVAILABLE"),
    (OverloadedError, "RESOURCE_EXHAUSTED"),
    (AuthenticationError, "UNAUTHENTICATED"),
    (ControlDisabledError, "FAILED_PRECONDITION"),
    (ModelLoadError, "FAILED_PRECONDITION"),
)
STATUS_NAMES = (OK, CANCELLED, DEADLINE_EXCEEDED, INTERNAL, *dict.fromkeys(n for _, n in STATUS))


def status_of(err: BaseException) -> str:
    """The status name of a failure other than a cancellation (INTERNAL for anything unknown)."""
    return next((name for cls, name in STATUS if isinstance(err, cls)), INTERNAL)


def message_of(err: BaseException) -> str:
    """What the client is told: a ServingError's own words, otherwise the fixed message."""
    return str(err) if isinstance(err, ServingError) else INTERNAL_MESSAGE


def clip(text: str, limit: int = CLIP_CHARS) -> str:
    """Client text made safe to quote: control characters escaped, at most `limit` characters."""
    head = text[: limit + 1]  # escaping first could cost time and memory in the whole text
    escaped = head if head.isprintable() else repr(head)[1:-1]
    return (
        escaped
        if len(text) <= limit and len(escaped) <= limit
        else (f"{escaped[:limit]}... ({len(text)} chars)")
    )


def clip_items(items: Sequence[Any], limit: int = CLIP_ITEMS) -> str:
    """A client-sent list (shape dims) as `[a, b, ...]`, at most `limit` items of it."""
    if len(items) <= limit:
        return str(list(items))
    return f"[{', '.join(map(str, items[:limit]))}, ... ({len(items)} items)]"


__all__ = [
    "CANCELLED",
    "DEADLINE_EXCEEDED",
    "INTERNAL",
    "INTERNAL_MESSAGE",
    "OK",
    "STATUS",
    "STATUS_NAMES",
    "AuthenticationError",
    "ContractError",
    "ControlDisabledError",
    "IntegrityError",
    "InvalidRequestError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelUnavailableError",
    "OverloadedError",
    "ProviderError",
    "ServingError",
    "clip",
    "clip_items",
    "message_of",
    "status_of",
]
