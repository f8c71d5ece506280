"""stablemlp serving: a KServe v2 / Triton gRPC server for exported models, and its client.

Layers, in reading order: settings -> codec (plan: its per-version fast path) -> manifest ->
runtime -> versions -> repository -> scheduler (batcher) -> servicer -> server (errors.py maps
failures to status codes). Beside them: metrics (counts behind ModelStatistics and /metrics),
limits (admission), auth (TLS, tokens), watcher (repository polling), workers (several processes
on one port). client.py talks to a running server. No torch here.
"""

from .client import Security, predict
from .errors import (
    AuthenticationError,
    ContractError,
    IntegrityError,
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
    ModelUnavailableError,
    OverloadedError,
    ProviderError,
    ServingError,
)
from .server import build_server, main, serve
from .settings import Settings, VersionPolicy, load_settings

__all__ = [
    "AuthenticationError",
    "ContractError",
    "IntegrityError",
    "InvalidRequestError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelUnavailableError",
    "OverloadedError",
    "ProviderError",
    "Security",
    "ServingError",
    "Settings",
    "VersionPolicy",
    "build_server",
    "load_settings",
    "main",
    "predict",
    "serve",
]
