"""stablemlp: a gradient-stabilized tabular MLP, trained, exported and served.

Subpackages, in pipeline order: `stablemlp.model` (network, data, training), `stablemlp.export`
(BatchNorm folding, ONNX + TorchScript, parity, publishing), `stablemlp.serving` (the KServe v2
server over ONNX Runtime, and its client), `stablemlp.protos` (generated stubs), `stablemlp.bench`.
`stablemlp.cli` is the console script. Importing this package imports nothing else (no torch):
`stablemlp.StableMLPClassifier` (the scikit-learn estimator, needs the [train] extra) is imported
on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["StableMLPClassifier"]


def __getattr__(name: str) -> Any:
    # PEP 562: serving installs have no torch, so the estimator is imported only when asked for.
    if name == "StableMLPClassifier":
        from .model.estimator import StableMLPClassifier

        return StableMLPClassifier
    raise AttributeError(f"module 'stablemlp' has no attribute {name!r}")
