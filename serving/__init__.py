"""stablemlp serving: a KServe v2 / Triton gRPC server for exported models, and its client.

Layers, in reading order: settings -> codec -> runtime -> repository -> servicer -> server
(errors.py maps failures to status codes); client.py talks to a running server. No torch here.
"""

from .client import predict
from .errors import (
    ContractError,
    IntegrityError,
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
    ModelUnavailableError,
    ProviderError,
    ServingError,
)
from .server import build_server, main, serve
from .settings import Settings, VersionPolicy, load_settings

__all__ = [
    "ContractError",
    "IntegrityError",
    "InvalidRequestError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelUnavailableError",
    "ProviderError",
    "ServingError",
    "Settings",
    "VersionPolicy",
    "build_server",
    "load_settings",
    "main",
    "predict",
    "serve",
]
