"""Dynamic batching, as Triton's dynamic batcher: concurrent requests merged into one session.run.

A request joins its version's pending batch; the batch runs when its rows reach a preferred size
(or the largest one, or would pass `max_batch_size`), or when its first request has waited
`max_queue_delay_us`, or, for delays under 2 ms, as soon as the event loop has gone idle (no
other request can be on its way). Rows are concatenated per input, run once (on the event loop or
a worker thread, as runtime.inline_rows says for the merged size) and each request gets a view of
its rows. An isolated request, one arriving more than a delay after the previous one, does not
wait at all (`joins`): at low load batching costs nothing.

Failures stay per request: a request that fails to decode never joins a batch, and if a merged run
raises, each of its requests is run again alone, so only the one whose rows break the model fails.
A request whose deadline passes while queued is dropped before the run; a merged run on a worker
thread is terminated only once every request in it has gone. Each request gets back its rows and
the timing of the run it rode in (`Executed`); counting is the caller's business. The repository
makes one batcher per loaded version and closes it when the version goes: what is pending still
runs, and later requests run alone.

Measured on 2 cores (1-row requests of the 30-feature MLP, gRPC transport on the same machine):
at concurrency 8 merged runs gave ~15% more requests/s than running each alone, since one
ONNX Runtime call costs ~30 us however few rows it has; at concurrency 1 latency was unchanged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .session import ModelRuntime

Results = dict[str, np.ndarray]
_TIMER_SLACK_S = 0.002  # how late an asyncio timer may fire: epoll's 1 ms, plus scheduling
# An event-loop turn with nothing to do took 2-4 us here. A gRPC request reaches the loop through
# gRPC's poller thread, so the next one of concurrency 8 often comes after several idle turns:
# waiting 4 idle turns, the batches of 1-row requests at concurrency 8 held 1.1 requests, waiting
# 16 they held 2.8 (2.3 at 64 rows) and the server's CPU per request fell 17% (15%), its req/s rose
# 18% (issue 25, measured on 2 cores). Where recent batches all ran alone (concurrency 1 on a fast
# machine) no company is coming, and a request waits the 4 turns that tell it so.
QUIET_TURNS = 16  # while merging pays: one of the last MERGE_MEMORY batches merged requests
LONE_QUIET_TURNS = 4
MERGE_MEMORY = 4
QUIET_TURN_S = 5e-6


class Executed(NamedTuple):
    """A request's outputs and the session.run they came from."""

    results: Results
    started_ns: int  # perf_counter_ns when the run began
    ended_ns: int  # and ended
    batch_rows: int  # rows of that run (the request's own, or a merged batch's)
    lead: bool  # the first request of its run: the one that counts the execution (as Triton)


@dataclass(frozen=True)
class BatchingOptions:
    max_batch_size: int  # most rows in one merged run (Triton: the model's max_batch_size)
    max_queue_delay_us: int  # longest a request waits for others to join it
    preferred_batch_sizes: tuple[int, ...] = ()  # run as soon as the rows reach one of these


class _Item:
    __slots__ = ("future", "inputs", "rows")

    def __init__(
        self, inputs: Mapping[str, np.ndarray], rows: int, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.inputs, self.rows = inputs, rows
        self.future: asyncio.Future[Executed] = loop.create_future()


class Batcher:
    """The pending batch of one model version; lives on the event loop thread (no locks)."""

    def __init__(
        self,
        runtime: ModelRuntime,
        executor: Executor,
        options: BatchingOptions,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        # The loop is kept, not looked up: asyncio.get_running_loop() costs a getpid() system
        # call per use on Python 3.11 (three per request here).
        self._loop = loop
        self._runtime, self._executor = runtime, executor
        self._closed = False
        self._max = options.max_batch_size
        self._delay_s = options.max_queue_delay_us / 1e6
        self._preferred = frozenset(options.preferred_batch_sizes)
        self._run_at = min(max(options.preferred_batch_sizes, default=self._max), self._max)
        self._pending: list[_Item] = []
        self._rows = 0
        self._timer: asyncio.Handle | None = None
        self._deadline = 0.0  # loop.time() at which the pending batch runs
        self._last_arrival = -1e9  # loop.time() of the latest request (see `joins`)
        self._short = self._delay_s <= _TIMER_SLACK_S  # waited by turning the loop: may end early
        self._quiet, self._last_turn = 0, (0.0, 0)  # idle loop turns in a row; the last one
        self._patience = LONE_QUIET_TURNS  # idle turns that end a wait (see QUIET_TURNS)
        self._since_merged = MERGE_MEMORY  # batches run since the last one that merged requests
        self._tasks: set[asyncio.Task[None]] = set()  # merged runs on worker threads

    def joins(self) -> bool:
        """Whether a request arriving now should wait for company: only if one is pending, or
        the previous request arrived less than a delay ago. An isolated request (low load, or
        concurrency 1) runs at once, alone, as without batching."""
        if self._closed:
            return False
        now = self._loop.time()
        recent, self._last_arrival = now - self._last_arrival < self._delay_s, now
        return recent or bool(self._pending)

    def close(self) -> None:
        """The version is going: run what is pending now; later requests run alone (`joins`).
        Call on the event loop thread."""
        self._closed = True
        self._flush()

    def enqueue(self, inputs: Mapping[str, np.ndarray], rows: int) -> asyncio.Future[Executed]:
        """The future of every output for these rows, once the batch they joined has run (done
        already if they ran at once). A caller that gives the future up (its deadline passed, its
        client left) cancels it and hands it to `withdraw`."""
        if self._rows + rows > self._max:
            self._flush()
        item = _Item(inputs, rows, self._loop)
        self._pending.append(item)
        self._rows += rows
        if self._rows >= self._run_at or self._rows in self._preferred:
            self._flush()
        elif self._timer is None:
            self._deadline = self._loop.time() + self._delay_s
            self._wait()
        return item.future

    def withdraw(self, future: asyncio.Future[Executed]) -> None:
        """A request given up while queued (its future cancelled, so it does not run): the rows it
        no longer needs must not fill a preferred size."""
        for item in self._pending:
            if item.future is future:
                self._pending.remove(item)
                self._rows -= item.rows
                return

    def _wait(self) -> None:
        """Run the batch at its deadline, or once the event loop has gone quiet.

        asyncio's timers fire up to ~1 ms late (epoll counts milliseconds), so a delay under
        `_TIMER_SLACK_S` is waited by going round the event loop, serving other requests
        meanwhile. Those turns also show when waiting is pointless: a few turns in a row that
        found nothing to do (each shorter than `QUIET_TURN_S`, no new request) mean no other
        request is on its way, so the batch runs then; under load the loop is never that idle."""
        loop = self._loop
        now = loop.time()
        remaining = self._deadline - now
        if remaining > _TIMER_SLACK_S:
            self._timer = loop.call_later(remaining - _TIMER_SLACK_S, self._wait)
            return
        last = self._last_turn
        quiet = now - last[0] < QUIET_TURN_S and last[1] == len(self._pending)
        self._quiet = self._quiet + 1 if quiet and self._short else 0
        self._last_turn = (now, len(self._pending))
        if remaining <= 0 or self._quiet >= self._patience:
            self._flush()
        else:
            self._timer = loop.call_soon(self._wait)

    def _flush(self) -> None:
        self._quiet, self._last_turn = 0, (0.0, 0)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        items = [item for item in self._pending if not item.future.done()]  # cancelled: dropped
        self._pending, self._rows = [], 0
        rows = sum(item.rows for item in items)
        if not items:
            return
        self._since_merged = 0 if len(items) > 1 else self._since_merged + 1
        self._patience = QUIET_TURNS if self._since_merged < MERGE_MEMORY else LONE_QUIET_TURNS
        if rows <= self._runtime.inline_rows:
            self._run_inline(items, rows)
        else:
            task = asyncio.ensure_future(self._run_on_worker(items, rows))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _run_inline(self, items: list[_Item], rows: int) -> None:
        runtime = self._runtime
        started = time.perf_counter_ns()
        try:
            results = runtime.run(_merge(items), runtime.output_names)
        except Exception as err:
            if len(items) == 1:
                items[0].future.set_exception(err)
                return
            for item in items:  # one of them broke the run: find which, alone
                self._run_inline([item], item.rows)
            return
        _deliver(items, rows, started, results)

    async def _run_on_worker(self, items: list[_Item], rows: int) -> None:
        runtime = self._runtime
        run = asyncio.ensure_future(
            runtime.run_in(self._executor, _merge(items), runtime.output_names)
        )

        def abandon(_: object) -> None:
            if all(item.future.cancelled() for item in items):
                run.cancel()  # queued: never starts; running: told to terminate

        for item in items:
            item.future.add_done_callback(abandon)
        try:
            started, results = await run
        except asyncio.CancelledError:
            return  # every request in it has gone
        except Exception as err:
            if len(items) == 1:
                if not items[0].future.done():
                    items[0].future.set_exception(err)
                return
            for item in items:
                if not item.future.done():
                    await self._run_on_worker([item], item.rows)
            return
        _deliver(items, rows, started, results)


def _merge(items: list[_Item]) -> Mapping[str, np.ndarray]:
    if len(items) == 1:
        return items[0].inputs
    return {name: np.concatenate([item.inputs[name] for item in items]) for name in items[0].inputs}


def _deliver(items: list[_Item], rows: int, started: int, results: Results) -> None:
    """Each request's rows (views, no copies) and the run's timing."""
    ended = time.perf_counter_ns()
    offset = 0
    for i, item in enumerate(items):
        if not item.future.done():
            if len(items) > 1:
                end = offset + item.rows
                mine = {k: v[offset:end] for k, v in results.items()}
            else:
                mine = results
            item.future.set_result(Executed(mine, started, ended, rows, i == 0))
        offset += item.rows


__all__ = ["Batcher", "BatchingOptions", "Executed", "Results"]
