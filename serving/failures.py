"""Failed calls, logged once at whichever front answered them (gRPC or REST).

A failure is mapped to its protocol-neutral status (errors.py) and logged in one line with the
operation (an RPC's name, or an HTTP method and route), the status, the message (clipped) and the
peer; unexpected errors log their traceback and answer a fixed message. Identical failures
repeated in a burst are logged a few times, then counted, so a client cannot flood the log.
"""

from __future__ import annotations

import logging
import time

from .errors import INTERNAL, clip, message_of, status_of

log = logging.getLogger(__name__)

LOG_MESSAGE_CHARS = 500  # a failure line's message, at most
BURST_LINES = 5  # identical failures logged per window before they are only counted
BURST_WINDOW_S = 10.0
_TRACKED_KINDS = 1024  # distinct failures remembered at once (bounded memory)


class _Bursts:
    """How often each kind of failure was logged in the current window."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, ...], list[float]] = {}  # key -> [window start, lines, extra]

    def admit(self, key: tuple[str, ...]) -> tuple[bool, int]:
        """Whether to log this one, and how many like it went unlogged in the last window."""
        now = time.monotonic()
        entry = self._seen.get(key)
        if entry is None or now - entry[0] > BURST_WINDOW_S:
            if len(self._seen) >= _TRACKED_KINDS:
                self._seen.clear()
            suppressed = int(entry[2]) if entry is not None else 0
            self._seen[key] = [now, 1, 0]
            return True, suppressed
        if entry[1] < BURST_LINES:
            entry[1] += 1
            return True, 0
        entry[2] += 1
        return False, 0


_bursts = _Bursts()


def log_failure(rpc: str, status: str, message: str, peer: str = "") -> None:
    """The one log line of a failed call: operation, status, message (capped), and who called."""
    text = clip(message, LOG_MESSAGE_CHARS)
    logged, suppressed = _bursts.admit((rpc, status, text[:200]))
    if not logged:
        return
    extra = {"rpc": rpc, "code": status, "peer": clip(peer)}
    more = (
        f" (and {suppressed} more like it in the last {BURST_WINDOW_S:.0f} s)" if suppressed else ""
    )
    origin = f" (from {clip(peer)})" if peer else ""
    log.info("%s failed: %s: %s%s%s", rpc, status, text, origin, more, extra=extra)


def failure(err: BaseException, rpc: str, peer: str = "") -> tuple[str, str]:
    """Status name and client-facing message for `err`, logged once here."""
    status = status_of(err)
    if status != INTERNAL:
        log_failure(rpc, status, str(err), peer)
        return status, str(err)
    logged, suppressed = _bursts.admit((rpc, INTERNAL, type(err).__name__, str(err)[:200]))
    if logged:
        log.error(
            "%s failed unexpectedly%s", rpc,
            f" (and {suppressed} more like it)" if suppressed else "",
            exc_info=err, extra={"rpc": rpc, "code": INTERNAL, "peer": clip(peer)},
        )  # fmt: skip
    return INTERNAL, message_of(err)


__all__ = ["BURST_LINES", "BURST_WINDOW_S", "LOG_MESSAGE_CHARS", "failure", "log_failure"]
