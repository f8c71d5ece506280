"""/metrics of `stablemlp serve --workers N`: every worker's metrics on the one port the manifests
scrape (--metrics-port), each sample labelled `worker="1".."N"`.

Each worker serves its own /metrics on a private port (metrics_port + index, or any free one) and
tells the supervisor which; a scrape of the supervisor's port reads them all at that moment (a
worker that is restarting is left out of that scrape) and merges them by metric family.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Callable, Iterator

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

SCRAPE_TIMEOUT_S = 2.0  # per worker; a scrape waits for each in turn

Sources = Callable[[], list[tuple[str, str]]]  # (worker label, its /metrics URL)


class WorkerMetrics(Collector):
    def __init__(self, sources: Sources) -> None:
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for worker, url in self._sources():
            try:
                with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as reply:
                    text = reply.read().decode()
            except OSError:  # restarting, or gone: this scrape goes without it
                continue
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                for sample in family.samples:
                    merged.add_sample(
                        sample.name, {**sample.labels, "worker": worker}, sample.value,
                        sample.timestamp,
                    )  # fmt: skip
        yield from families.values()


__all__ = ["WorkerMetrics"]
