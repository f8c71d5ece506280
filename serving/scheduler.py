"""Where each request's session.run happens: on the event loop, on a worker thread, or in a batch.

A request that runs alone (batching off, or an isolated request: batcher.py) runs on the event
loop when its rows are within the version's `inline_rows` (timed at load: a run that costs less
than a thread hop, which blocks the loop no longer than `inline_threshold_us`), otherwise on the
worker pool, where a deadline can stop it queued or mid-run. Inline runs cannot be interrupted,
which is why only short ones are kept inline (`--run-inline always` lifts that guard).
"""

from __future__ import annotations

import time
import weakref
from concurrent.futures import Executor

from .batcher import Batcher, BatchingOptions, Results
from .codec import DecodedRequest
from .metrics import Call
from .runtime import ModelRuntime


class Scheduler:
    def __init__(self, executor: Executor, batching: BatchingOptions | None) -> None:
        self.executor, self.batching = executor, batching
        # One batcher per loaded version; it goes when the version is unloaded and unused.
        self._batchers: weakref.WeakKeyDictionary[ModelRuntime, Batcher] = (
            weakref.WeakKeyDictionary()
        )

    async def run(self, runtime: ModelRuntime, decoded: DecodedRequest, call: Call) -> Results:
        """Every output of `runtime` for the decoded rows; the run's timing lands in `call`."""
        if self.batching is not None:
            batcher = self._batcher(runtime)
            if batcher.joins():
                return await batcher.submit(runtime, decoded.inputs, decoded.rows, call)
        call.batch_rows = decoded.rows
        if decoded.rows <= runtime.inline_rows:
            call.run_start = time.perf_counter_ns()
            results = runtime.run(decoded.inputs, runtime.output_names)
        else:
            call.run_start, results = await runtime.run_in(
                self.executor, decoded.inputs, runtime.output_names
            )
        call.run_end = time.perf_counter_ns()
        return results

    def _batcher(self, runtime: ModelRuntime) -> Batcher:
        batcher = self._batchers.get(runtime)
        if batcher is None:
            assert self.batching is not None
            batcher = self._batchers[runtime] = Batcher(self.executor, self.batching)
        return batcher


__all__ = ["Scheduler"]
