"""Where each request's session.run happens: on the event loop, on a worker thread, or in a batch.

One scheduler per loaded version, made and closed by the repository. A request that runs alone
(batching off, or an isolated request: batcher.py) runs on the event loop when its rows are within
the version's `inline_rows` (timed at load: a run that costs less than a thread hop, which blocks
the loop no longer than `inline_threshold_us`), otherwise on the worker pool, where a deadline can
stop it queued or mid-run. Inline runs cannot be interrupted, which is why only short ones are kept
inline (`--run-inline always` lifts that guard). Every run returns its timing (`Executed`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from concurrent.futures import Executor

import numpy as np

from .batcher import Batcher, BatchingOptions, Executed
from .session import ModelRuntime

Pending = asyncio.Future[Executed]  # a started request's outputs, to come


class Scheduler:
    def __init__(
        self,
        runtime: ModelRuntime,
        executor: Executor,
        batching: BatchingOptions | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.runtime, self._executor, self._loop = runtime, executor, loop
        self._batcher = Batcher(runtime, executor, batching, loop) if batching else None

    async def run(self, inputs: Mapping[str, np.ndarray], rows: int) -> Executed:
        """Every output of the version for these rows, and when and how it ran."""
        started = self.start(inputs, rows)
        if isinstance(started, Executed):
            return started
        try:
            return await started
        except asyncio.CancelledError:  # its deadline passed, or its client left
            self.withdraw(started)
            raise

    def start(self, inputs: Mapping[str, np.ndarray], rows: int) -> Executed | Pending:
        """`run` without a coroutine, for a caller that keeps many requests going (a stream): the
        outputs at once if they ran now, else their future, which a caller that gives it up
        hands to `withdraw`."""
        batcher = self._batcher
        if batcher is not None and batcher.joins():
            return batcher.enqueue(inputs, rows)
        if rows <= self.runtime.inline_rows:
            return self._run_inline(inputs, rows)
        return asyncio.ensure_future(self._run_on_worker(inputs, rows))

    def withdraw(self, pending: Pending) -> None:
        """A started request given up: dropped if queued, told to stop if running."""
        pending.cancel()
        if self._batcher is not None:
            self._batcher.withdraw(pending)

    def _run_inline(self, inputs: Mapping[str, np.ndarray], rows: int) -> Executed:
        runtime = self.runtime
        started = time.perf_counter_ns()
        results = runtime.run(inputs, runtime.output_names)
        return Executed(results, started, time.perf_counter_ns(), rows, True)

    async def _run_on_worker(self, inputs: Mapping[str, np.ndarray], rows: int) -> Executed:
        runtime = self.runtime
        started, results = await runtime.run_in(self._executor, inputs, runtime.output_names)
        return Executed(results, started, time.perf_counter_ns(), rows, True)

    def close(self) -> None:
        """The version is going: its pending batch runs now, later requests run alone. Safe from
        any thread (the repository swaps versions on a worker thread)."""
        if self._batcher is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._batcher.close)


__all__ = ["Pending", "Scheduler"]
