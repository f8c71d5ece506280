"""The `stablemlp` console script: one entry point, a subcommand per job, each in its own module.

Subcommand modules are imported only when chosen, so `serve` and `predict` never import torch.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence

# name -> ("module:function", one-line help). Each function is `main(argv) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("stablemlp.model.cli:main", "train the stabilized MLP on the built-in data or a CSV"),
    "export": (
        "stablemlp.export.cli:export_main",
        "fold BatchNorm, export ONNX + TorchScript, publish",
    ),
    "verify": (
        "stablemlp.export.cli:verify_main",
        "re-check a published model version (hashes, parity)",
    ),
    "diagnose": (
        "stablemlp.model.diagnose:main",
        "compare gradient health of plain vs stabilized deep MLPs",
    ),
    "serve": ("stablemlp.serving.server:main", "serve a model repository over KServe v2 gRPC"),
    "predict": (
        "stablemlp.serving.client.cli:main",
        "send rows to a running server and print predictions",
    ),
    "bench": (
        "stablemlp.bench.cli:main",
        "measure serving against floors; `bench quality`: the model against baselines",
    ),
}

# Extras a subcommand needs beyond the serving base install.
_NEEDS_TRAIN_EXTRA = {"train", "export", "verify", "diagnose"}


def _usage() -> str:
    lines = [
        "usage: stablemlp COMMAND [options] [--log-format text|json]"
        "   (stablemlp COMMAND --help for details)",
        "",
    ]
    lines += [f"  {name:<9} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def _load(target: str) -> Callable[[list[str]], int]:
    module_name, func_name = target.split(":")
    func: Callable[[list[str]], int] = getattr(importlib.import_module(module_name), func_name)
    return func


LOG_FORMATS = ("text", "json")
_LOG_FIELDS = ("rpc", "code", "peer")  # `extra=` of a failed call's line (call_log.py)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and a failed call's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update({k: getattr(record, k) for k in _LOG_FIELDS if hasattr(record, k)})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=True)  # ASCII: no client byte can break the line


def configure_logging(log_format: str | None = None) -> None:
    """Configured once, here; STABLEMLP_LOG_LEVEL sets the level, STABLEMLP_LOG_FORMAT (or
    `stablemlp --log-format`) text or json lines."""
    level = os.environ.get("STABLEMLP_LOG_LEVEL", "INFO").upper()
    log_format = log_format or os.environ.get("STABLEMLP_LOG_FORMAT", "text").lower()
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format: got {log_format!r}, expected text or json")
    from .serving.observe.call_log import LibraryLines  # light: errors and the limiter only

    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(LibraryLines())  # aiohttp's and gRPC's error records: one line, limited
    logging.basicConfig(level=level, handlers=[handler])


def _pop_log_format(args: list[str]) -> tuple[list[str], str | None]:
    """`--log-format X` / `--log-format=X` anywhere (before or after the command) is ours."""
    for i, arg in enumerate(args):
        if arg.startswith("--log-format="):
            return args[:i] + args[i + 1 :], arg.partition("=")[2]
        if arg == "--log-format" and i + 1 < len(args):
            return args[:i] + args[i + 2 :], args[i + 1]
    return args, None


def main(argv: Sequence[str] | None = None) -> int:
    args, log_format = _pop_log_format(list(sys.argv[1:] if argv is None else argv))
    if not args or args[0] in {"-h", "--help"}:
        print(_usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"stablemlp: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        configure_logging(log_format)
    except ValueError as err:
        print(f"stablemlp: {err}", file=sys.stderr)
        return 2
    try:
        func = _load(COMMANDS[command][0])
    except ModuleNotFoundError as err:
        if command == "bench" and (err.name or "").startswith("stablemlp.bench"):
            # The serving image leaves stablemlp.bench out (Dockerfile): no load generators.
            print(
                "stablemlp bench: error: the benchmarks are not installed here (the serving image "
                "leaves them out); from a checkout: pip install '.[bench]'",
                file=sys.stderr,
            )
            return 2
        if (
            command in _NEEDS_TRAIN_EXTRA
            and err.name
            and err.name.split(".")[0]
            in {
                "torch",
                "onnx",
                "onnxscript",
                "sklearn",
                "tqdm",
                "matplotlib",
            }
        ):
            print(
                f"stablemlp {command}: needs the training extra ({err.name} is missing): "
                "pip install 'stablemlp[train]'",
                file=sys.stderr,
            )
            return 2
        raise
    return func(rest)


__all__ = ["COMMANDS", "LOG_FORMATS", "JsonFormatter", "configure_logging", "main"]
