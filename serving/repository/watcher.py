"""Polls the model repository: new or changed version folders are loaded, checked and swapped in.

The scan and any load run on a worker thread (loading hashes files and warms the model up), so the
event loop keeps answering calls meanwhile; `on_change` then republishes health.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from ..errors import ServingError
from .models import ModelRepository

log = logging.getLogger(__name__)


async def watch_repository(
    repository: ModelRepository, interval_s: float, on_change: Callable[[], Awaitable[None]]
) -> None:
    """Every `interval_s` seconds, reload what changed on disk; runs until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            changed = await asyncio.to_thread(repository.refresh)
        except ServingError as err:  # the folder went away: keep serving, keep looking
            log.warning("repository scan failed: %s; retrying in %.1f s", err, interval_s)
            continue
        except Exception:  # a scan that failed otherwise must not end the polling either
            log.exception("repository scan failed; retrying in %.1f s", interval_s)
            continue
        if changed:
            await on_change()


__all__ = ["watch_repository"]
