"""Request/response logging, opt-in (`--request-log FILE`, `--request-log-sample RATIO`): one JSON
line per sampled inference, the input for drift checks.

    {"time": "2026-11-30T12:00:00.123456Z", "id": "...", "model": "breast_cancer", "version": "1",
     "protocol": "grpc", "status": "OK", "duration_us": 412, "rows": 2,
     "inputs": {"features": [[17.99, null, ...], ...]},
     "outputs": {"probability": [[0.013], ...], "label": [[0], ...]}}

Bounded: at most MAX_ROWS rows of each tensor (`"truncated": true` says there were more) and text
clipped to MAX_TEXT chars; `null` in an FP32 input is a missing value (NaN). A failed call has
`"error"` (its message, clipped) and no outputs. The event loop only appends references to a
bounded deque; a thread wakes every WRITE_EVERY_S, formats and writes what has gathered, so a slow
or stuck disk never blocks a reply, and a request does not wake a thread (with a queue.Queue woken
per record, the log cost +43-53 us of CPU per call; this way +15-25 us, docs/benchmarks.md).
When the deque is full, records are dropped and counted (a warning says how many, at most every
WARN_EVERY_S). The file is opened in append mode, so a log shipper can tail it.
"""

from __future__ import annotations

import collections
import datetime
import logging
import random
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import orjson

from ..errors import clip

log = logging.getLogger(__name__)

MAX_ROWS = 64  # rows of each tensor written per request (a 1024-row batch logs its first 64)
MAX_TEXT = 256  # characters of each text element
QUEUE_RECORDS = 4096  # records waiting for the writer at most; beyond, dropped and counted
WARN_EVERY_S = 10.0
# How long a record may wait for the writer: lines reach the file within ~this, in one write.
WRITE_EVERY_S = 0.05


class Record(NamedTuple):
    """What the event loop hands over: references only; the writer formats them."""

    started_unix_ns: int
    request_id: str
    model: str
    version: str
    protocol: str
    status: str
    duration_ns: int
    rows: int
    inputs: Mapping[str, np.ndarray] | None
    outputs: Mapping[str, np.ndarray] | None
    error: str


def _rows(array: np.ndarray) -> Any:
    """The first MAX_ROWS rows: numbers stay an array (orjson writes it natively, NaN as null,
    ~3x faster than a list of floats), text becomes clipped strings."""
    head = array[:MAX_ROWS]
    if head.dtype == object:
        return [[clip(str(v), MAX_TEXT) for v in row] for row in head.tolist()]
    return np.ascontiguousarray(head)


def format_record(record: Record) -> bytes:
    """One JSON line for a record."""
    started = datetime.datetime.fromtimestamp(record.started_unix_ns / 1e9, datetime.UTC)
    line: dict[str, Any] = {
        "time": started.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "id": clip(record.request_id, 128),
        "model": clip(record.model),
        "version": clip(record.version),
        "protocol": record.protocol,
        "status": record.status,
        "duration_us": record.duration_ns // 1000,
        "rows": record.rows,
    }
    if record.rows > MAX_ROWS:
        line["truncated"] = True
    if record.inputs is not None:
        line["inputs"] = {name: _rows(array) for name, array in record.inputs.items()}
    if record.outputs is not None:
        line["outputs"] = {name: _rows(array) for name, array in record.outputs.items()}
    if record.error:
        line["error"] = clip(record.error, 500)
    return orjson.dumps(line, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"


class RequestLog:
    """The sampled records of inference calls, written by a thread of its own."""

    def __init__(self, path: Path, sample: float) -> None:
        self.path, self.sample = path, sample
        self.dropped = self.written = 0
        # deque.append and popleft are atomic: the event loop appends, the writer pops, no lock.
        self._pending: collections.deque[Record] = collections.deque()
        self._stop = threading.Event()
        self._warned_at = 0.0
        self._thread = threading.Thread(target=self._write, name="request-log", daemon=True)
        self._thread.start()

    def sampled(self) -> bool:
        return self.sample >= 1.0 or random.random() < self.sample

    def put(self, record: Record) -> None:
        """Keep a record for the writer; never waits (a full deque drops it)."""
        if len(self._pending) < QUEUE_RECORDS:
            self._pending.append(record)
            return
        self.dropped += 1
        now = time.monotonic()
        if now - self._warned_at > WARN_EVERY_S:
            self._warned_at = now
            log.warning("request log %s: writer behind, %d records dropped so far",
                        self.path, self.dropped)  # fmt: skip

    def _write(self) -> None:
        try:
            with self.path.open("ab") as file:  # may block (a FIFO, a hung mount): only here
                stopping = False
                while not stopping:
                    stopping = self._stop.wait(WRITE_EVERY_S)
                    self._drain(file)
        except OSError as err:
            log.error("request log %s: %s; no more requests are logged", self.path, err)

    def _drain(self, file: Any) -> None:
        """Write every record gathered so far, as one write, then flush."""
        pending, lines = self._pending, []
        while pending:
            record = pending.popleft()
            try:
                lines.append(format_record(record))
            except (TypeError, ValueError) as err:  # a value orjson cannot write
                log.warning("request log: record not written: %s", err)
            self.written += 1
        if lines:
            file.write(b"".join(lines))
            file.flush()

    def close(self, timeout_s: float) -> None:
        """Write what is pending (waiting at most `timeout_s`), then stop the writer."""
        self._stop.set()
        self._thread.join(timeout_s)
        if self.dropped:
            log.warning("request log %s: %d records dropped in all", self.path, self.dropped)


__all__ = ["MAX_ROWS", "MAX_TEXT", "Record", "RequestLog", "format_record"]
