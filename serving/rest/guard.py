"""The REST boundary: HTTP statuses for errors.py's statuses, and the checks every request passes
before a handler reads its body (one aiohttp middleware).

In order: the bearer token (the control token for load/unload; health open when asked), a cap on
requests being handled at once (health exempt), and the declared body size (413 at once; a
chunked body is counted as it arrives by aiohttp's `client_max_size`, the same limit). A failure
is answered `{"error": "..."}` with its status and logged once (call_log.py, shared with gRPC);
anything unexpected is 500 with a fixed message. aiohttp's own refusals (no such route, wrong
method, body too large) get the same JSON shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from ..errors import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    INTERNAL,
    OK,
    AuthenticationError,
    ModelUnavailableError,
    OverloadedError,
    clip,
)
from ..observe.call_log import failure, log_failure
from ..tokens import bearer_matches
from .wire import JSON_CONTENT_TYPE, dump_json

# errors.py's statuses as HTTP statuses: Google's API design guide's mapping of the gRPC codes
# (google.rpc.Code), which KServe's and Triton's HTTP fronts follow where they overlap.
HTTP_STATUS = {
    OK: 200,
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "NOT_FOUND": 404,
    "UNAUTHENTICATED": 401,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
    CANCELLED: 499,
    DEADLINE_EXCEEDED: 504,
    INTERNAL: 500,
}
HTTP_NAMES = {
    413: "RESOURCE_EXHAUSTED", 404: "NOT_FOUND", 405: "INVALID_ARGUMENT", 408: DEADLINE_EXCEEDED
}  # fmt: skip
CONTROL_ROUTES = frozenset({"load", "unload"})  # route names that need the control token
HEALTH_ROUTES = frozenset({"live", "ready"})
RETRY_AFTER_S = "1"  # for 429 and 503: come back soon, or go to another replica
DISCARD_S = 1.0  # how long the rest of a refused body is read, so the refusal is not reset away
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, message: str) -> web.Response:
    headers = {}
    if status in (429, 503):
        headers["Retry-After"] = RETRY_AFTER_S
    elif status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="stablemlp"'
    body = dump_json({"error": message})
    return web.Response(status=status, body=body, content_type=JSON_CONTENT_TYPE, headers=headers)


def operation(request: web.Request) -> str:
    """`METHOD /route/{template}` for logs: bounded, whatever path the client sent."""
    route = request.match_info.route
    template = route.resource.canonical if route.resource is not None else clip(request.path)
    return f"{request.method} {template}"


def peer(request: web.Request) -> str:
    address = request.transport.get_extra_info("peername") if request.transport else None
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else ""


@dataclass
class Guard:
    """What every request must pass before its handler runs (aiohttp middleware)."""

    token: bytes | None
    control_token: bytes | None
    exempt_health: bool
    max_body_bytes: int
    max_requests: int  # handled at once, health excepted
    # Bodies (declared lengths; the limit for a chunked one) read or handled at once: what
    # slow or large senders can make the server hold, whatever the count of requests.
    max_bytes_held: int
    body_timeout_s: float  # the whole body within this, or 408 (a slow sender holds a slot)
    on_refused: Callable[[], None] = lambda: None
    active: int = field(default=0, init=False)
    reading: int = field(default=0, init=False)  # of them, still receiving their body
    bytes_held: int = field(default=0, init=False)
    # Shutting down: requests that start now get 503, and every reply closes its connection.
    draining: bool = field(default=False, init=False)
    _idle: asyncio.Event | None = field(default=None, init=False)
    # Per connection (aiohttp's RequestHandler): when it last finished a request, None while it
    # handles one. connections.py closes the ones quiet for too long.
    quiet_since: dict[Any, float | None] = field(default_factory=dict, init=False)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        connection = request.protocol
        self.quiet_since[connection] = None  # busy, however long the request takes
        try:
            response = await self._guarded(request, handler)
            if self.draining:  # the client learns the connection ends (`Connection: close`)
                response.force_close()
            return response
        finally:
            self.quiet_since[connection] = time.monotonic()

    async def drain(self, timeout: float) -> int:
        """Shutting down: requests that start from now on get 503 and `Connection: close`;
        wait up to `timeout` s for those being handled (bodies still arriving included) to be
        answered. Returns how many were still receiving their body then (never admitted)."""
        self.draining = True
        if self.active:
            self._idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
        return self.reading

    async def _guarded(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        name = request.match_info.route.name or ""
        try:
            self._authorize(request, name)
            if name in HEALTH_ROUTES:
                return await handler(request)
            if self.draining:
                await self._discard_body(request)
                raise ModelUnavailableError("server shutting down: retry on another replica")
            held = self._admit(request)
            self.active, self.bytes_held = self.active + 1, self.bytes_held + held
            try:
                self.reading += 1
                try:
                    await self._read_body(request)
                finally:
                    self.reading -= 1
                return await handler(request)
            finally:
                self.active, self.bytes_held = self.active - 1, self.bytes_held - held
                if self._idle is not None and not self.active:
                    self._idle.set()
        except web.HTTPException as err:  # aiohttp's: no route, wrong method, body too large
            return self._refused(request, err)
        except ConnectionError:  # the client went away mid-request: nobody to answer, no bug
            message = "the client closed the connection before its request was answered"
            log_failure(operation(request), CANCELLED, message, peer(request))
            return error_response(HTTP_STATUS[CANCELLED], message)
        except Exception as err:  # the boundary: every failure is mapped, none escapes raw
            status, message = failure(err, operation(request), peer(request))
            return error_response(HTTP_STATUS[status], message)

    def _admit(self, request: web.Request) -> int:
        """The body bytes this request will hold, if it may start now; else refused at once."""
        length = request.content_length
        if length is not None and length > self.max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=self.max_body_bytes, actual_size=length)
        held = (self.max_body_bytes if length is None else length) if request.body_exists else 0
        if self.active >= self.max_requests or self.bytes_held + held > self.max_bytes_held:
            raise OverloadedError(
                f"server busy: {self.active} HTTP requests holding {self.bytes_held} body bytes, "
                f"the limits are {self.max_requests} and {self.max_bytes_held}; retry with backoff"
            )
        return held

    async def _read_body(self, request: web.Request) -> None:
        """The whole body, under the deadline; handlers then get it from aiohttp's cache."""
        if not request.body_exists:
            return
        if request.content.is_eof():  # all of it arrived with the headers: no deadline needed
            await request.read()
            return
        try:
            async with asyncio.timeout(self.body_timeout_s):
                await request.read()
        except TimeoutError:
            raise web.HTTPRequestTimeout() from None

    async def _discard_body(self, request: web.Request) -> None:
        """Read and drop a body about to be refused, DISCARD_S at most: a connection closed with
        unread bytes in it is reset, and the reset can reach the client before the reply."""
        with contextlib.suppress(TimeoutError, ConnectionError, web.HTTPException):
            async with asyncio.timeout(DISCARD_S):
                while await request.content.readany():
                    pass

    def _authorize(self, request: web.Request, name: str) -> None:
        if name in CONTROL_ROUTES:
            token, what = self.control_token, "control token"
        elif name in HEALTH_ROUTES and self.exempt_health:
            return
        else:
            token, what = self.token, "token"
        if token is None:
            return
        values = request.headers.getall("Authorization", [])
        if len(values) == 1 and bearer_matches(values[0], token):
            return
        self.on_refused()
        raise AuthenticationError(f"missing or wrong {what}: send 'Authorization: Bearer <{what}>'")

    def _refused(self, request: web.Request, err: web.HTTPException) -> web.Response:
        if err.status == 413:
            message = (
                f"request body: larger than {self.max_body_bytes} bytes, the limit (send "
                "fewer rows per request, or binary tensor data)"
            )
        elif err.status == 408:
            message = f"request body: not received within {self.body_timeout_s:g} s"
        elif err.status == 404:
            message = f"no such endpoint: {request.method} '{clip(request.path)}'"
        elif err.status == 405:
            message = f"method {clip(request.method)} not allowed on '{clip(request.path)}'"
        else:
            message = clip(err.reason, 200)
        log_failure(operation(request), HTTP_NAMES.get(err.status, str(err.status)), message,
                    peer(request))  # fmt: skip
        return error_response(err.status, message)


def ssl_context(
    cert: Path | None, key: Path | None, client_ca: Path | None
) -> ssl.SSLContext | None:
    """TLS for the REST port with the gRPC port's certificate; a client CA makes it mutual."""
    if cert is None or key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


__all__ = [
    "CONTROL_ROUTES",
    "HEALTH_ROUTES",
    "HTTP_STATUS",
    "RETRY_AFTER_S",
    "Guard",
    "Handler",
    "error_response",
    "operation",
    "peer",
    "ssl_context",
]
