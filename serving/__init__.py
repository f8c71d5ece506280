"""stablemlp.serving: a KServe v2 / Triton server for exported models, and its client. No torch.

Layers, in reading order: settings -> manifest (the published contract) -> runtime (one ONNX
Runtime session; graph_files refuses a model.onnx that names a file) and codec (a version's wire
decode/encode) -> scheduler (batcher) -> versions -> repository (what is loaded; readiness) ->
dataplane (protocol-neutral: admit, resolve, decode, run, encode, count; its optional hook,
observe.py: tracing and request_log) -> the fronts: servicer (gRPC; grpc_boundary maps failures,
request_bounds bounds a request's entries before it is built, replies builds Triton's messages)
and rest (KServe v2 over HTTP; rest_wire reads and writes its tensors, rest_boundary checks and
maps, rest_connections caps connections, openapi documents) -> ports (each port and its bounds)
-> server (assembly, health, signals). Beside them: errors (the exception tree), failures (the one
log line of a failed call), metrics, limits (admission), auth (TLS, tokens), protowire (protobuf
bytes read without building them), watcher (polling), workers (several processes on one port;
worker_metrics merges their /metrics). client.py talks to a running server. The server and client
are imported on first use.
"""

from typing import Any

from .errors import (
    AuthenticationError,
    ContractError,
    ControlDisabledError,
    IntegrityError,
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
    ModelUnavailableError,
    OverloadedError,
    ProviderError,
    ServingError,
)
from .manifest import Manifest, TensorSpec
from .repository.policy import VersionPolicy
from .settings import Settings, load_settings

_LAZY = {"build_server": "server", "main": "server", "serve": "server", "predict": "client.calls",
         "Security": "client.calls"}  # fmt: skip


def __getattr__(name: str) -> Any:
    """The server and client, imported when first asked for (they pull in gRPC and ONNX
    Runtime; the manifest and errors are needed without them, by export)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AuthenticationError",
    "ContractError",
    "ControlDisabledError",
    "IntegrityError",
    "InvalidRequestError",
    "Manifest",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelUnavailableError",
    "OverloadedError",
    "ProviderError",
    "Security",
    "ServingError",
    "Settings",
    "TensorSpec",
    "VersionPolicy",
    "build_server",
    "load_settings",
    "main",
    "predict",
    "serve",
]
