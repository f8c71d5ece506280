"""Memory is bounded before admission (issue 12.1): a flood of maximum-size calls from many
connections gets refusals at once, the server's memory stays within a bound, and it serves on."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from pathlib import Path

from conftest import MODEL_NAME, ServerProcess

from stablemlp.bench import flood

StartServer = Callable[..., contextlib.AbstractContextManager[ServerProcess]]
LIMITS = ["--max-connections", "16", "--max-concurrent-rpcs", "16", "--max-streams-per-connection",
          "8", "--max-inflight", "8"]  # fmt: skip
GROWTH_MB = 150  # what the flood may add to the idle server's memory, far under a 512 MiB limit


def _args(repository: Path, **values: object) -> argparse.Namespace:
    defaults = {"model_repository": repository, "model": MODEL_NAME, "calls": 400, "channels": 40,
                "message_bytes": 0, "token": "", "send_token": "", "deadline_s": 30.0}  # fmt: skip
    return argparse.Namespace(**{**defaults, **values})


def test_a_flood_of_maximum_size_calls_is_refused_early_and_memory_stays_bounded(
    model_repository: Path, start_server: StartServer
) -> None:
    with start_server(model_repository, *LIMITS) as srv:
        limit = int(srv.log().split("messages up to ")[1].split()[0])
        assert limit < 300_000  # sized to the model (1024 x 30 x 4 B + headroom), not 4 MiB
        pid = srv.process.pid
        report = flood.run(_args(model_repository), srv.address, pid, limit)
        assert set(report["codes"]) <= {"OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "CANCELLED"}
        refused = report["codes"].get("RESOURCE_EXHAUSTED", 0) + report["codes"].get(
            "UNAVAILABLE", 0
        )
        assert refused > 0 and report["codes"].get("OK", 0) > 0, report
        assert report["rss_mb_peak"] - report["rss_mb_idle"] < GROWTH_MB, report
        assert report["answers_afterwards"]
        too_big = flood.run(
            _args(model_repository, calls=20, channels=4, message_bytes=4_190_000),
            srv.address, pid, limit,
        )  # fmt: skip
        assert too_big["codes"] == {"RESOURCE_EXHAUSTED": 20}
        assert too_big["answers_afterwards"]
