"""The REST port's connections: how many may be open, and how long one may wait on its client.

aiohttp holds what a connection sends (headers being parsed, pipelined requests, a body being read)
in memory and sets no cap on connections or on time before the first request: 200 connections
pipelining large headers took a server to 2.8 GB. gRPC bounds its side in its core
(app.py); here the same bound is kept by the protocol factory aiohttp's server is run behind:

- at most `limit` connections; one beyond them is answered 503 (`Retry-After`) and closed before
  a byte of it is parsed;
- a connection that handles no request for `idle_s` (before its first request, between requests,
  or sending a request's headers slowly) is closed, so connections that send nothing cannot hold
  the slots. A body sent slowly is bounded by the guard's read deadline (guard.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, cast

from aiohttp import web

from .guard import RETRY_AFTER_S
from .wire import JSON_CONTENT_TYPE, dump_json

log = logging.getLogger(__name__)
SWEEP_S = 1.0  # how often quiet connections are looked for: idle_s is met within this


def _refusal(limit: int) -> bytes:
    body = dump_json(
        {"error": f"server busy: {limit} HTTP connections open, the limit; retry with backoff"}
    )
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        f"Content-Type: {JSON_CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n"
        f"Retry-After: {RETRY_AFTER_S}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class _Refuse(asyncio.Protocol):
    """A connection over the limit: one fixed 503, then closed; nothing it sends is read."""

    def __init__(self, reply: bytes) -> None:
        self._reply = reply

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is one, not a subclass
        transport.pause_reading()
        transport.write(self._reply)
        transport.close()  # after the reply is flushed


class Connections:
    """The REST port's protocol factory: aiohttp's server behind a cap and an idle deadline.

    `quiet_since` is the guard's (guard.py): per connection, when it last finished a
    request, None while it handles one; its middleware keeps it, as it runs for every request."""

    def __init__(self, limit: int, idle_s: float, quiet_since: dict[Any, float | None]) -> None:
        self.limit, self.idle_s = limit, idle_s
        self._server: web.Server | None = None
        self._quiet_since = quiet_since
        self._reply = _refusal(limit)
        self._sweeper: asyncio.TimerHandle | None = None

    def serve(self, server: web.Server) -> Connections:
        """The factory to listen with, in front of aiohttp's `server`."""
        self._server = server
        return self

    def __call__(self) -> asyncio.BaseProtocol:
        assert self._server is not None, "serve(server) first"
        if len(self._server.connections) >= self.limit:
            return _Refuse(self._reply)
        handler = self._server()
        # aiohttp parses up to 32 pipelined requests ahead of the one being handled (headers of
        # up to 256 KiB each here): one at a time, it holds at most one read's worth of them.
        # No public knob; RequestHandler has __slots__, so a rename fails loudly, not silently.
        handler._max_msg_queue_size = 1
        handler._msg_queue_resume_size = 0
        self._quiet_since[handler] = time.monotonic()
        if self._sweeper is None:
            self._schedule()
        return handler

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def _schedule(self) -> None:
        self._sweeper = asyncio.get_running_loop().call_later(SWEEP_S, self._sweep)

    def _sweep(self) -> None:
        assert self._server is not None
        open_now = set(self._server.connections)
        for gone in [c for c in self._quiet_since if c not in open_now]:
            del self._quiet_since[gone]
        now = time.monotonic()
        for connection in open_now:  # a TLS one joins once its handshake is done
            self._quiet_since.setdefault(connection, now)
        cutoff = now - self.idle_s
        idle = [c for c, t in self._quiet_since.items() if t is not None and t < cutoff]
        for connection in idle:
            del self._quiet_since[connection]
            connection.force_close()
        if idle:
            log.debug("rest: closed %d connections idle for %.0f s", len(idle), self.idle_s)
        self._schedule()


__all__ = ["Connections"]
