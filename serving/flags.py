"""`stablemlp serve`'s flags and STABLEMLP_* variables: one per Settings field, and how they fill
it (defaults, overridden by the environment, overridden by flags)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .settings import CONTROL_MODES, DEVICES, EVENT_LOOPS, RUN_INLINE, Settings, env_name

# Triton's flag names, accepted beside ours so its users' scripts and habits carry over. Ours
# already are Triton's for --http-port, --metrics-port and --model-control-mode.
ALIASES: dict[str, tuple[str, ...]] = {
    "models": ("--load-model",),
    "port": ("--grpc-port",),
    "grace_period_s": ("--exit-timeout-secs",),
    "repository_poll_s": ("--repository-poll-secs",),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; unset flags stay absent so env and defaults show through."""
    secrets = [f for f in dataclasses.fields(Settings) if f.metadata["env"]]
    parser.add_argument_group(
        "environment only",
        "; ".join(f"{env_name(f.name)}: {f.metadata['help']}" for f in secrets),
    )
    for f in dataclasses.fields(Settings):
        if f.metadata["env"]:
            continue
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        if f.default is not dataclasses.MISSING:
            default = f"default {f.default}"
        elif f.default_factory is not dataclasses.MISSING:
            default = f"default {f.default_factory()}"
        else:
            default = f"required, or {KSERVE_MOUNT} when it exists (KServe's storageUri)"
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": argparse.SUPPRESS,  # defaults live in Settings, not in argparse
            "help": f"{f.metadata['help']} [env {env_name(f.name)}; {default}]",
        }
        kwargs["metavar"] = f.metadata["metavar"]
        if f.name == "models":
            kwargs["action"] = "append"
            kwargs["help"] = kwargs["help"].replace("default ()", "default: every model")
        else:
            kwargs["type"] = f.metadata["parse"]
        choices = {
            "device": DEVICES,
            "run_inline": RUN_INLINE,
            "model_control_mode": CONTROL_MODES,
            "event_loop": EVENT_LOOPS,
        }
        if f.name in choices:
            kwargs["choices"] = choices[f.name]
        flags = [flag, *ALIASES.get(f.name, ())]
        parser.add_argument(*flags, **kwargs)


# Where a KServe InferenceService mounts its storageUri: served when no repository is named.
KSERVE_MOUNT = Path("/mnt/models")


def load_settings(
    flags: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    kserve_mount: Path = KSERVE_MOUNT,
) -> Settings:
    """Defaults, overridden by STABLEMLP_<FIELD> variables, overridden by flags."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        raw = env.get(env_name(f.name))
        if raw is not None and raw != "":
            try:
                values[f.name] = f.metadata["parse"](raw)
            except ValueError as err:
                raise ValueError(f"{env_name(f.name)}={raw!r}: {err}") from None
    for name, value in flags.items():
        values[name] = tuple(value) if name == "models" else value
    if "model_repository" not in values and kserve_mount.is_dir():
        values["model_repository"] = kserve_mount
    if "model_repository" not in values:
        raise ValueError(
            f"set --model-repository or {env_name('model_repository')} (without either, "
            f"KServe's {kserve_mount} is served when it exists)"
        )
    return Settings(**values)


__all__ = ["ALIASES", "KSERVE_MOUNT", "add_arguments", "load_settings"]
