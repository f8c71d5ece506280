"""One ModelStreamInfer call: each request started as it arrives, the replies written in order.

The reader starts a message's inference at once (admitted, decoded, handed to its scheduler)
without a coroutine of its own, so the messages of one stream batch with each other and with other
calls; the writer answers the oldest one as soon as its run is done. It replaced a task, a queue
entry and a semaphore per message (issue 25: with the batcher's longer patience, 8 streams went
from 1.33x to 1.47x the unary floor's req/s; bench/results/cpu/round3.md). At most STREAM_WINDOW
of a stream's requests are unanswered; beyond, the stream is not read (HTTP/2 flow control then
holds the client back): bounded memory per stream. A failed request gets an error_message (and
its id); the stream stays open.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

from ...protos import grpc_service_pb2 as pb
from ..dataplane import Inference
from ..observe.call_log import failure
from ..runtime.batcher import Executed
from ..runtime.scheduler import Pending
from .boundary import Undecodable, check_decoded
from .wire import reply_of

# Requests of one stream running at once: room for them to batch, bounded memory per stream.
STREAM_WINDOW = 64
METHOD = "ModelStreamInfer"


class _Started(NamedTuple):
    request: Any  # pb.ModelInferRequest, or Undecodable
    inference: Inference | None  # None: refused before it started (`refusal` is its reply)
    outcome: Executed | Pending | None
    refusal: pb.ModelStreamInferResponse | None = None


class StreamCall:
    """The reader (`read`, a task) and the writer (`replies`, the call's response iterator) of
    one stream, sharing the started requests in arrival order."""

    def __init__(self, infer: Callable[[Any], Inference], context: Any) -> None:
        self._infer, self._context = infer, context
        self._started: deque[_Started] = deque()
        self._loop = asyncio.get_running_loop()
        self._arrived: asyncio.Future[None] | None = None  # the writer waits for a request
        self._room: asyncio.Future[None] | None = None  # the reader waits for the window
        self._reading = True

    async def read(self, requests: AsyncIterator[Any]) -> None:
        """Start each request as it arrives, at most STREAM_WINDOW unanswered; at the end of the
        stream, or when cancelled (the server is stopping), take no more: those started are
        still answered."""
        started = self._started
        try:
            async for request in requests:
                if len(started) >= STREAM_WINDOW:
                    self._room = self._loop.create_future()
                    await self._room
                started.append(self._start(request))
                self._wake_writer()
        except asyncio.CancelledError:
            pass
        finally:
            self._reading = False
            self._wake_writer()

    async def replies(self) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """One reply per request, in request order, each as soon as its run is done."""
        started = self._started
        while True:
            if not started:
                if not self._reading:
                    return
                self._arrived = self._loop.create_future()
                await self._arrived
                continue
            head = started[0]
            outcome = head.outcome
            if head.inference is None or outcome is None:
                started.popleft()
                assert head.refusal is not None
                reply = head.refusal
            else:
                try:  # a cancellation (the call is going) leaves the head to `abandon`
                    executed = outcome if isinstance(outcome, Executed) else await outcome
                except Exception as err:
                    started.popleft()
                    head.inference.close(err)
                    reply = self._failed(head.request, err)
                else:
                    started.popleft()
                    reply = self._answer(head.request, head.inference, executed)
            room = self._room
            if room is not None and not room.done():
                room.set_result(None)
            yield reply

    def abandon(self) -> None:
        """The call is over (the client went away): every unanswered request is dropped."""
        while self._started:
            _, inference, outcome, _ = self._started.popleft()
            if inference is None:
                continue
            if isinstance(outcome, asyncio.Future):
                inference.abandon(outcome)
            else:  # it ran, but its reply will not be read
                inference.close(asyncio.CancelledError())

    def _start(self, request: Any) -> _Started:
        try:
            check_decoded(request)
            inference = self._infer(request)
            outcome = inference.start()
        except Exception as err:  # refused (and counted) before it ran: answered in-band
            return _Started(request, None, None, self._failed(request, err))
        return _Started(request, inference, outcome)

    def _answer(
        self, request: pb.ModelInferRequest, inference: Inference, executed: Executed
    ) -> pb.ModelStreamInferResponse:
        try:
            reply = pb.ModelStreamInferResponse()
            reply_of(request, inference.ran(executed), reply.infer_response)  # in place: no copy
        except Exception as err:
            inference.close(err)
            return self._failed(request, err)
        inference.close(None)
        return reply

    def _failed(self, request: Any, err: Exception) -> pb.ModelStreamInferResponse:
        """One message's failure, answered in-band (and logged once, as every failure)."""
        reply = pb.ModelStreamInferResponse(
            error_message=failure(err, METHOD, self._context.peer())[1]
        )
        if not isinstance(request, Undecodable):
            reply.infer_response.id = request.id  # which request failed
        return reply

    def _wake_writer(self) -> None:
        arrived = self._arrived
        if arrived is not None and not arrived.done():
            arrived.set_result(None)


__all__ = ["STREAM_WINDOW", "StreamCall"]
