"""The `stablemlp` console script: one entry point, a subcommand per job, each in its own module.

Subcommand modules are imported only when chosen, so `serve` and `predict` never import torch.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

# name -> ("module:function", one-line help). Each function is `main(argv) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("model.cli:main", "train the stabilized MLP on the built-in data or a CSV"),
    "export": ("export.cli:export_main", "fold BatchNorm, export ONNX + TorchScript, publish"),
    "verify": ("export.cli:verify_main", "re-check a published model version (hashes, parity)"),
    "diagnose": ("model.diagnose:main", "compare gradient health of plain vs stabilized deep MLPs"),
    "serve": ("serving.server:main", "serve a model repository over KServe v2 gRPC"),
    "predict": ("serving.client:main", "send rows to a running server and print predictions"),
    "bench": ("bench.cli:main", "measure serving throughput/latency against floors"),
}

# Extras a subcommand needs beyond the serving base install.
_NEEDS_TRAIN_EXTRA = {"train", "export", "verify", "diagnose"}


def _usage() -> str:
    lines = ["usage: stablemlp COMMAND [options]   (stablemlp COMMAND --help for details)", ""]
    lines += [f"  {name:<9} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def _load(target: str) -> Callable[[list[str]], int]:
    module_name, func_name = target.split(":")
    func: Callable[[list[str]], int] = getattr(importlib.import_module(module_name), func_name)
    return func


def configure_logging() -> None:
    """Configured once, here; STABLEMLP_LOG_LEVEL sets the level."""
    level = os.environ.get("STABLEMLP_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help"}:
        print(_usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"stablemlp: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    configure_logging()
    try:
        func = _load(COMMANDS[command][0])
    except ModuleNotFoundError as err:
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


__all__ = ["COMMANDS", "configure_logging", "main"]
