"""stablemlp.serving: a KServe v2 / Triton server for exported models, and its client. No torch.

The folders draw the layers, from the bottom: the neutral core here (settings, errors, manifest:
the published contract, datatypes: each v2 datatype once, codec: a version's judgement of a
request's neutral tensors) -> runtime/ (one ONNX Runtime session, batcher, scheduler, admission;
neither grpc nor the protos) -> repository/ (what is loaded, versions, readiness; polling) ->
dataplane (protocol-neutral: admit, resolve, decode, run, count; its hook in observe/) -> the
fronts, grpc/ and rest/, which never import each other: each reads its protocol into neutral
tensors, calls the dataplane and writes the neutral result back (triton builds Triton's config
and statistics messages for both) -> server (assembly, ports, health, signals; workers runs
several processes on one port). Beside them: observe/ (telemetry, call_log, tracing, request
logs), tokens, protowire (protobuf bytes read without building them). Only the fronts, triton and
client/ (talks to a running server) import protobuf. The server and client are imported on first
use.
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
