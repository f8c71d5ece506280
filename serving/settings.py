"""Serving settings: one frozen dataclass, filled from defaults, then STABLEMLP_* env, then flags
(`load_settings`, below `add_arguments`, which gives each field its flag).

Each field's `help` metadata is its user-facing documentation (`stablemlp serve --help` prints it
with the environment variable); the `#` comment above the field says why its default is what it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .repository.policy import VersionPolicy

ControlMode = Literal["none", "poll", "explicit"]
CONTROL_MODES = ("none", "poll", "explicit")

ENV_PREFIX = "STABLEMLP_"
DEVICES = ("cpu", "cuda", "auto")
Device = Literal["cpu", "cuda", "auto"]
RUN_INLINE = ("auto", "always", "never")
EVENT_LOOPS = ("auto", "uvloop", "asyncio")
EventLoop = Literal["auto", "uvloop", "asyncio"]
RunInline = Literal["auto", "always", "never"]


def available_cores() -> int:
    """CPUs this process may run on (cgroup/taskset affinity), not the host's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity (macOS)
        return max(1, os.cpu_count() or 1)


def _models(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _sizes(text: str) -> tuple[int, ...]:
    return tuple(sorted({int(size) for size in text.split(",") if size.strip()}))


def _bool(text: str) -> bool:
    if text.strip().lower() in {"1", "true", "yes", "on"}:
        return True
    if text.strip().lower() in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"got {text!r}, expected true or false")


def _meta(
    help_text: str,
    parse: Callable[[str], Any],
    metavar: str,
    flag: str | None = None,
    env_only: bool = False,
) -> dict[str, Any]:
    return {"help": help_text, "parse": parse, "metavar": metavar, "flag": flag, "env": env_only}


@dataclass(frozen=True)
class Settings:
    # Required, as in Triton, except under KServe: its storageUri is mounted at /mnt/models,
    # which flags.load_settings serves when no repository is named.
    model_repository: Path = field(
        metadata=_meta("folder laid out as DIR/<model>/<version>/model.onnx", Path, "DIR")
    )
    # Empty = every model found, like Triton's default model-control mode.
    models: tuple[str, ...] = field(
        default=(),
        metadata=_meta(
            "serve only this model (repeat the flag; env: comma-separated); Triton's "
            "--load-model is accepted too",
            _models,
            "NAME",
            "--model",
        ),
    )
    # Triton's modes. `none` by default: a server exposed in a cluster must not let any caller
    # unload its model; `poll` rescans the repository; `explicit` takes load/unload RPCs, each
    # needing the control token.
    model_control_mode: ControlMode = field(
        default="none",
        metadata=_meta(
            "none (models fixed at start), poll (rescan the repository every "
            "--repository-poll-s), explicit (load/unload over the API, with the control token)",
            str,
            "{none,poll,explicit}",
        ),
    )
    # Triton's default policy: only the newest version of each model.
    version_policy: VersionPolicy = field(
        default=VersionPolicy(),
        metadata=_meta("latest[:N] | all | specific:V1,V2", VersionPolicy.parse, "POLICY"),
    )
    # All interfaces, so the server is reachable from outside a container.
    host: str = field(default="0.0.0.0", metadata=_meta("interface to bind", str, "HOST"))
    # Triton's gRPC port, so stock clients' defaults work; 0 picks a free port (tests).
    port: int = field(default=8001, metadata=_meta("gRPC port (0 = any free port)", int, "PORT"))
    # Triton's HTTP port (KServe's default protocol is REST): stock clients' defaults find it.
    http_port: int = field(
        default=8000,
        metadata=_meta(
            "KServe v2 REST port, beside gRPC in the same process (0 = any free port, -1 = off)",
            int,
            "PORT",
        ),
    )
    # CPU is explicit and predictable; `auto` warns when it falls back.
    device: Device = field(
        default="cpu",
        metadata=_meta(
            "execution provider: cpu, cuda (or refuse to start), auto", str, "{cpu,cuda,auto}"
        ),
    )
    # First GPU, as CUDA numbers them.
    cuda_device_id: int = field(default=0, metadata=_meta("CUDA device ordinal", int, "ID"))
    # 0 leaves ONNX Runtime's arena unbounded (its own default).
    cuda_memory_limit: int = field(
        default=0, metadata=_meta("CUDA arena limit in bytes (0 = none)", int, "BYTES")
    )
    # The cores go to concurrent requests (inference_workers), not inside one: a 1024-row batch
    # of this MLP takes well under a millisecond on one core, and intra-op threads that spin
    # between runs compete with the workers (measured on 2 cores: 1 thread x 2 workers served
    # ~35% more single-row requests/s than 2 x 2).
    intra_op_threads: int = field(
        default=1, metadata=_meta("ONNX Runtime intra-op threads", int, "N")
    )
    # The graph is a chain of small ops; parallel branches would gain nothing.
    inter_op_threads: int = field(
        default=1, metadata=_meta("ONNX Runtime inter-op threads", int, "N")
    )
    # One session.run in flight per core this process may use (os.sched_getaffinity).
    inference_workers: int = field(
        default_factory=available_cores, metadata=_meta("concurrent session.run calls", int, "N")
    )
    # A cap on the manifest's own max_batch_size, up to which parity was proven (1024).
    max_batch_size: int = field(
        default=1024, metadata=_meta("most rows per request (at most the model's)", int, "ROWS")
    )
    # 0: sized to the largest request the loaded models take (1024 rows x 30 FP32 = 120 KiB for
    # the built-in model) plus 64 KiB of headroom, not gRPC's 4 MiB: every message is read
    # whole before admission, so this times the concurrency caps below bounds memory.
    max_message_bytes: int = field(
        default=0,
        metadata=_meta(
            "largest gRPC message accepted/sent (0 = sized to the models)", int, "BYTES"
        ),
    )
    # 4x the largest concurrency benchmarked (32); request data held stays under
    # max_inflight x max_message_bytes. Beyond it: RESOURCE_EXHAUSTED at once, no queue growth.
    max_inflight: int = field(
        default=128, metadata=_meta("most inference requests queued or running", int, "N")
    )
    # gRPC reads a call's message before any handler runs: these bound how much it holds at
    # once, whatever clients send (grpc_server). Excess calls get RESOURCE_EXHAUSTED, excess
    # connections UNAVAILABLE, both at once. Measured with bench/flood.py: peak RSS ~260 MB
    # under 2,000 maximum-size calls from 200 connections (README); a long-lived stream (health
    # Watch, ModelStreamInfer) holds one call for its life.
    max_concurrent_rpcs: int = field(
        default=128, metadata=_meta("most calls (any RPC, streams too) handled at once", int, "N")
    )
    # Per port: gRPC refuses in its core (UNAVAILABLE), REST with a 503 (rest/connections.py).
    max_connections: int = field(
        default=128, metadata=_meta("most client connections open at once, per port", int, "N")
    )
    # A connection that sends nothing would hold one of the max_connections for good: 128 silent
    # sockets from one client took the gRPC port down for everyone. gRPC closes an idle one with
    # GOAWAY (a client's channel reconnects on its next call); nginx's client_header_timeout and
    # client_body_timeout are 60 s.
    client_timeout_s: float = field(
        default=30.0,
        metadata=_meta(
            "seconds a connection may wait on its client: with no call in flight it is closed "
            "(both ports); a REST body not received within it gets 408",
            float,
            "SECONDS",
        ),
    )
    # A client's calls on one connection beyond this are refused (RST_STREAM, UNAVAILABLE); gRPC
    # frees a finished stream's slot a moment after the client sees it end, so a client running
    # N calls on one connection needs headroom over N: twice the highest concurrency clients
    # here use (64, the soak). 128 x 128 connections x a 16 KiB window bounds what waits unread.
    max_streams_per_connection: int = field(
        default=128, metadata=_meta("HTTP/2 streams (calls) one connection may open", int, "N")
    )
    # New versions show up within seconds; a scan is a few stat() calls per version folder.
    repository_poll_s: float = field(
        default=5.0,
        metadata=_meta("seconds between repository scans (--model-control-mode poll)", float, "S"),
    )
    # Triton's metrics port, so existing scrape configs work.
    metrics_port: int = field(
        default=8002,
        metadata=_meta("Prometheus /metrics port (0 = any free port, -1 = off)", int, "PORT"),
    )
    # TLS is off unless a certificate is given (a mesh or ingress often terminates it instead).
    tls_cert: Path | None = field(
        default=None, metadata=_meta("PEM server certificate (chain): serve TLS", Path, "FILE")
    )
    tls_key: Path | None = field(
        default=None, metadata=_meta("PEM private key of --tls-cert", Path, "FILE")
    )
    tls_client_ca: Path | None = field(
        default=None,
        metadata=_meta("PEM CA bundle: require client certificates it signed (mTLS)", Path, "FILE"),
    )
    # A secret never goes on a command line (ps, shell history): a file, or the variable below.
    auth_token_file: Path | None = field(
        default=None,
        metadata=_meta("file with the token clients send as 'authorization: Bearer'", Path, "FILE"),
    )
    auth_token: str = field(
        default="",
        repr=False,
        metadata=_meta("the bearer token itself (environment only)", str, "TOKEN", env_only=True),
    )
    # Load/unload over the API (explicit mode) takes its own token, so inference credentials
    # cannot change what is served.
    control_token_file: Path | None = field(
        default=None,
        metadata=_meta("file with the token RepositoryModelLoad/Unload need", Path, "FILE"),
    )
    control_token: str = field(
        default="",
        repr=False,
        metadata=_meta("the control token itself (environment only)", str, "TOKEN", env_only=True),
    )
    # Orchestrators probe grpc.health.v1 without credentials (kubelet's gRPC probe sends none).
    auth_exempt_health: bool = field(
        default=True,
        metadata=_meta("health checks need no token", _bool, "{true,false}"),
    )
    # Off: a request log holds what clients sent; it is asked for, with a place to put it.
    request_log: Path | None = field(
        default=None,
        metadata=_meta(
            "append one JSON line per inference (inputs, outputs, status) to FILE", Path, "FILE"
        ),
    )
    # Every call when a log is asked for; lower it where traffic is heavy.
    request_log_sample: float = field(
        default=1.0,
        metadata=_meta("fraction of inferences written to --request-log (0..1)", float, "RATIO"),
    )
    # A thread hop (submit, wake a worker, take the GIL back) costs ~50-90 us of a 2-core
    # machine; a 1-row run of the served MLP ~7 us. So runs timed at load under the threshold
    # stay on the event loop (measured: +25% single-row requests/s at concurrency 1, +45% at 8).
    run_inline: RunInline = field(
        default="auto",
        metadata=_meta(
            "session.run on the event loop: auto (if timed at load under --inline-threshold-us),"
            " always, never (always on the inference worker threads)",
            str,
            "{auto,always,never}",
        ),
    )
    # 1 ms: under load a hop costs more than the wait (measured on 2 cores: the worker and the
    # event loop trade the GIL, +100-150 us of CPU per request), so merged batches of 64-row
    # requests stay inline: +8% req/s at batch 64, +15% at 256, CPU/request -20% at 1024 rows.
    inline_threshold_us: float = field(
        default=1000.0, metadata=_meta("longest run kept on the event loop (auto)", float, "US")
    )
    # On: measured on 2 cores, 1-row requests at concurrency 8 got ~15% more throughput (merged
    # runs share ONNX Runtime's per-run cost) and isolated requests skip it (runtime/batcher.py).
    dynamic_batching: bool = field(
        default=True,
        metadata=_meta(
            "merge concurrent requests into one session.run (Triton's dynamic batcher)",
            _bool,
            "{true,false}",
        ),
    )
    # Measured at concurrency 8: 200 us merged too few, 300 and 500 did as well as each other,
    # 1000 starved the loop. Below 2 ms the wait ends early once the event loop goes idle.
    max_queue_delay_us: int = field(
        default=300, metadata=_meta("batching: longest a request waits for others", int, "US")
    )
    preferred_batch_sizes: tuple[int, ...] = field(
        default=(),
        metadata=_meta("batching: rows that start a run at once (comma-separated)", _sizes, "N,N"),
    )
    # uvloop where installed (the base install has it on Linux and macOS): measured on 2 cores,
    # +5-15% unary req/s at concurrency 8 and +30% on 8 streams against asyncio's own loop, as
    # the event loop turns once per gRPC callback.
    event_loop: EventLoop = field(
        default="auto",
        metadata=_meta("auto (uvloop if installed), uvloop, asyncio", str, "{auto,uvloop,asyncio}"),
    )
    # One process per replica; more share the port through SO_REUSEPORT (Linux).
    workers: int = field(
        default=1,
        metadata=_meta(
            "server processes on one port; each takes --inference-workers / N threads", int, "N"
        ),
    )
    # A worker that dies is restarted after a back-off; past this many deaths a minute the
    # supervisor gives up and exits 1, leaving it to the orchestrator (a crash loop is not
    # healed by retrying here).
    worker_restarts: int = field(
        default=5, metadata=_meta("worker restarts allowed per minute (--workers)", int, "N")
    )
    # Two passes: the first allocates ONNX Runtime's buffers, the second proves they are reused.
    warmup_runs: int = field(default=2, metadata=_meta("warm-up runs per batch size", int, "N"))
    # Kubernetes sends SIGKILL 30 s after SIGTERM by default; finish in-flight calls well before.
    grace_period_s: float = field(
        default=5.0, metadata=_meta("seconds in-flight calls get on shutdown", float, "SECONDS")
    )

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device: got {self.device!r}, expected one of {', '.join(DEVICES)}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: got {self.port}, expected 0..65535")
        positive = (
            "intra_op_threads",
            "inter_op_threads",
            "inference_workers",
            "max_batch_size",
            "max_inflight",
            "max_concurrent_rpcs",
            "max_connections",
            "max_streams_per_connection",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: got {getattr(self, name)}, expected >= 1")
        if self.run_inline not in RUN_INLINE:
            raise ValueError(f"run_inline: got {self.run_inline!r}, expected auto, always or never")
        if self.workers < 1 or self.max_queue_delay_us < 0 or self.inline_threshold_us < 0:
            raise ValueError("workers must be >= 1; max_queue_delay_us, inline_threshold_us >= 0")
        if self.worker_restarts < 0:
            raise ValueError(f"worker_restarts: got {self.worker_restarts}, expected >= 0")
        if any(not 1 <= size <= self.max_batch_size for size in self.preferred_batch_sizes):
            raise ValueError(
                f"preferred_batch_sizes: got {list(self.preferred_batch_sizes)}, "
                f"expected each in 1..{self.max_batch_size}"
            )
        if self.cuda_device_id < 0 or self.cuda_memory_limit < 0 or self.warmup_runs < 0:
            raise ValueError("cuda_device_id, cuda_memory_limit and warmup_runs must be >= 0")
        if not self.client_timeout_s > 0:
            raise ValueError(f"client_timeout_s: got {self.client_timeout_s}, expected > 0")
        if self.grace_period_s < 0 or self.repository_poll_s < 0:
            raise ValueError("grace_period_s and repository_poll_s must be >= 0")
        for name in ("metrics_port", "http_port"):
            if not -1 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name}: got {getattr(self, name)}, expected -1..65535")
        if not 0.0 <= self.request_log_sample <= 1.0:
            raise ValueError(f"request_log_sample: got {self.request_log_sample}, expected 0..1")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key: got one, expected both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca: needs tls_cert and tls_key (mTLS is TLS first)")
        if self.auth_token and self.auth_token_file is not None:
            raise ValueError(f"set {env_name('auth_token')} or auth_token_file, not both")
        if self.control_token and self.control_token_file is not None:
            raise ValueError(f"set {env_name('control_token')} or control_token_file, not both")
        if self.event_loop not in EVENT_LOOPS:
            raise ValueError(
                f"event_loop: got {self.event_loop!r}, expected auto, uvloop or asyncio"
            )
        if self.model_control_mode not in CONTROL_MODES:
            raise ValueError(
                f"model_control_mode: got {self.model_control_mode!r}, expected none, poll or "
                "explicit"
            )
        if self.model_control_mode == "explicit" and self.workers > 1:
            raise ValueError(
                f"model_control_mode explicit: got workers {self.workers}, expected 1 (a load or "
                "unload would reach the one worker that took the call; poll mode has every "
                "worker scan the repository)"
            )
        has_control_token = bool(self.control_token) or self.control_token_file is not None
        if self.model_control_mode == "explicit" and not has_control_token:
            raise ValueError(
                "model_control_mode explicit: needs a control token (--control-token-file or "
                f"{env_name('control_token')}); load/unload then need 'authorization: Bearer "
                "<control token>'"
            )
        if self.max_message_bytes < 0:
            raise ValueError(f"max_message_bytes: got {self.max_message_bytes}, expected >= 0")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


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


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


__all__ = [
    "ALIASES",
    "CONTROL_MODES",
    "DEVICES",
    "ENV_PREFIX",
    "EVENT_LOOPS",
    "KSERVE_MOUNT",
    "RUN_INLINE",
    "ControlMode",
    "Device",
    "EventLoop",
    "RunInline",
    "Settings",
    "VersionPolicy",
    "add_arguments",
    "address",
    "available_cores",
    "env_name",
    "load_settings",
]
