"""Admission control: at most `limit` inference requests queued or running; the rest are refused.

Beyond the limit a request fails fast with RESOURCE_EXHAUSTED instead of waiting in an unbounded
queue, so memory stays bounded (about limit x max_message_bytes of request data) and clients can
back off or go to another replica. The count lives on the event loop thread: no lock.
"""

from __future__ import annotations

import asyncio
import contextlib

from ..errors import ModelUnavailableError, OverloadedError


class Admission:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.inflight = 0  # admitted and not yet answered
        self._closed = False
        self._idle = asyncio.Event()

    @property
    def closed(self) -> bool:
        """Draining: new requests are refused."""
        return self._closed

    def admit(self) -> Admission:
        """`with admission.admit():` holds one of the `limit` places until the block ends."""
        return self

    def __enter__(self) -> None:
        self.enter()

    def __exit__(self, *exc: object) -> None:
        self.leave()

    def enter(self) -> None:
        """Take one of the `limit` places (each `enter` that returns is followed by one `leave`)."""
        if self._closed:
            raise ModelUnavailableError("server shutting down: retry on another replica")
        if self.inflight >= self.limit:
            raise OverloadedError(
                f"server busy: {self.inflight} requests queued or running, the limit is "
                f"{self.limit}; retry with backoff"
            )
        self.inflight += 1

    def leave(self) -> None:
        self.inflight -= 1
        if self._closed and not self.inflight:
            self._idle.set()

    async def drain(self, timeout: float) -> None:
        """Refuse new requests (UNAVAILABLE); wait up to `timeout` s for admitted ones to finish."""
        self._closed = True
        if self.inflight:
            with contextlib.suppress(TimeoutError):  # asyncio.wait_for raises the builtin (3.11+)
                await asyncio.wait_for(self._idle.wait(), timeout)


__all__ = ["Admission"]
