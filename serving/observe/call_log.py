"""Failed calls, logged once at whichever front answered them (gRPC or REST).

A failure is mapped to its protocol-neutral status (errors.py) and logged in one line with the
operation (an RPC's name, or an HTTP method and route), the status, the message (clipped) and the
peer; unexpected errors log their traceback and answer a fixed message. Identical failures
repeated in a burst are logged a few times, then counted, and all failures together at most
TOTAL_LINES per window, so a client cannot flood the log; aiohttp's and gRPC's own error records
pass the same limiter as one line each (LibraryLines).
"""

from __future__ import annotations

import logging
import time

from ..errors import INTERNAL, clip, message_of, status_of

log = logging.getLogger(__name__)

LOG_MESSAGE_CHARS = 500  # a failure line's message, at most
BURST_LINES = 5  # identical failures logged per window before they are only counted
BURST_WINDOW_S = 10.0
_TRACKED_KINDS = 1024  # distinct failures remembered at once (bounded memory)
TOTAL_LINES = 100  # failure lines per window, all kinds together (each with its own text)


class _Bursts:
    """How often each kind of failure was logged in the current window, and all kinds together:
    distinct failures (every one with its own text) are capped too."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, ...], list[float]] = {}  # key -> [window start, lines, extra]
        self._window = 0.0  # when the window for all kinds began
        self._lines = 0  # lines logged in it, all kinds
        self._dropped = 0  # lines not logged in it for the cap on all kinds
        self._unreported = 0  # dropped in the windows before, not yet said in a line

    def admit(self, key: tuple[str, ...]) -> tuple[bool, int]:
        """Whether to log this one, and how many like it went unlogged in the last window."""
        now = time.monotonic()
        if now - self._window > BURST_WINDOW_S:
            self._window, self._lines = now, 0
            self._unreported, self._dropped = self._unreported + self._dropped, 0
        entry = self._seen.get(key)
        if entry is None or now - entry[0] > BURST_WINDOW_S:
            if len(self._seen) >= _TRACKED_KINDS:
                self._seen.clear()
            suppressed = int(entry[2]) if entry is not None else 0
            self._seen[key] = [now, 1, 0]
            return self._count(), suppressed
        if entry[1] < BURST_LINES:
            entry[1] += 1
            return self._count(), 0
        entry[2] += 1
        return False, 0

    def _count(self) -> bool:
        """One more line in the window for all kinds, if there is room for it."""
        if self._lines >= TOTAL_LINES:
            self._dropped += 1
            return False
        self._lines += 1
        return True

    def unreported(self) -> int:
        """Lines dropped for the cap on all kinds and not said yet; said once, by the caller."""
        count, self._unreported = self._unreported, 0
        return count


_bursts = _Bursts()


def _more(suppressed: int) -> str:
    more = (
        f" (and {suppressed} more like it in the last {BURST_WINDOW_S:.0f} s)" if suppressed else ""
    )
    dropped = _bursts.unreported()
    if dropped:
        window = f"{BURST_WINDOW_S:.0f} s"
        more += f" ({dropped} other failure lines not logged: over {TOTAL_LINES} in {window})"
    return more


def log_failure(rpc: str, status: str, message: str, peer: str = "") -> None:
    """The one log line of a failed call: operation, status, message (capped), and who called."""
    text = clip(message, LOG_MESSAGE_CHARS)
    logged, suppressed = _bursts.admit((rpc, status, text[:200]))
    if not logged:
        return
    extra = {"rpc": rpc, "code": status, "peer": clip(peer)}
    origin = f" (from {clip(peer)})" if peer else ""
    log.info("%s failed: %s: %s%s%s", rpc, status, text, origin, _more(suppressed), extra=extra)


class LibraryLines(logging.Filter):
    """aiohttp's and gRPC's own error records (a malformed HTTP request is one traceback each)
    as one line each, through the same burst limiter as failed calls. Put on the log handler."""

    NAMES = ("aiohttp", "grpc")

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.NAMES) or record.levelno < logging.WARNING:
            return True
        text = clip(record.getMessage(), 200)
        error = record.exc_info[1] if record.exc_info else None
        if error is not None:
            reason = " ".join(str(error).split())  # aiohttp's messages span several lines
            text = f"{text}: {type(error).__name__}: {clip(reason, LOG_MESSAGE_CHARS)}"
        logged, suppressed = _bursts.admit((record.name, type(error).__name__, text[:200]))
        if logged:
            record.msg, record.args = text + _more(suppressed), None
            record.exc_info = record.exc_text = None
        return logged


def failure(err: BaseException, rpc: str, peer: str = "") -> tuple[str, str]:
    """Status name and client-facing message for `err`, logged once here."""
    status = status_of(err)
    if status != INTERNAL:
        log_failure(rpc, status, str(err), peer)
        return status, str(err)
    logged, suppressed = _bursts.admit((rpc, INTERNAL, type(err).__name__, str(err)[:200]))
    if logged:
        log.error(
            "%s failed unexpectedly%s", rpc, _more(suppressed),
            exc_info=err, extra={"rpc": rpc, "code": INTERNAL, "peer": clip(peer)},
        )  # fmt: skip
    return INTERNAL, message_of(err)


__all__ = [
    "BURST_LINES",
    "BURST_WINDOW_S",
    "LOG_MESSAGE_CHARS",
    "TOTAL_LINES",
    "LibraryLines",
    "failure",
    "log_failure",
]
