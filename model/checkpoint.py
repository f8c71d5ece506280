"""Self-describing checkpoints: config + weights + feature schema + threshold + metrics.

Saved with torch.save but holding only tensors and plain Python values, so loading uses
`weights_only=True` (no pickle code execution). Written atomically: temp file, fsync, rename.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .network import MLPConfig, StabilizedMLP
from .preprocess import Classifier, build_classifier

FORMAT = "stablemlp.checkpoint/1"
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass(frozen=True)
class FeatureSchema:
    """What a client must send, and the statistics the graph uses to impute and standardize."""

    names: tuple[str, ...]
    means: tuple[float, ...]
    stds: tuple[float, ...]  # already safe: constant columns stored as 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "means": list(self.means), "stds": list(self.stds)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSchema:
        return cls(
            tuple(str(n) for n in data["names"]),
            tuple(float(m) for m in data["means"]),
            tuple(float(s) for s in data["stds"]),
        )


@dataclass
class Checkpoint:
    config: MLPConfig
    state_dict: dict[str, torch.Tensor]
    schema: FeatureSchema
    threshold: float
    metrics: dict[str, Any]
    model_name: str
    seed: int

    def build_model(self) -> StabilizedMLP:
        """The trained network in eval mode, rebuilt from the stored config (no flags repeated)."""
        model = StabilizedMLP(self.config)
        model.load_state_dict(self.state_dict)
        return model.eval()

    def build_classifier(self) -> Classifier:
        """Raw features -> (probability, label): preprocessing + network + threshold, eval mode."""
        return build_classifier(
            self.build_model(),
            torch.tensor(self.schema.means),
            torch.tensor(self.schema.stds),
            self.threshold,
        ).eval()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, then rename over it: readers see old or new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are read by other users (containers)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(checkpoint: Checkpoint, path: Path) -> None:
    payload = {
        "format": FORMAT,
        "config": checkpoint.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in checkpoint.state_dict.items()},
        "schema": checkpoint.schema.to_dict(),
        "threshold": float(checkpoint.threshold),
        "metrics": checkpoint.metrics,
        "model_name": checkpoint.model_name,
        "seed": int(checkpoint.seed),
        "torch_version": str(torch.__version__),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path) -> Checkpoint:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a stablemlp checkpoint (format {payload.get('format')!r})")
    return Checkpoint(
        config=MLPConfig.from_dict(payload["config"]),
        state_dict=payload["state_dict"],
        schema=FeatureSchema.from_dict(payload["schema"]),
        threshold=float(payload["threshold"]),
        metrics=payload["metrics"],
        model_name=str(payload["model_name"]),
        seed=int(payload["seed"]),
    )


__all__ = [
    "CHECKPOINT_NAME",
    "Checkpoint",
    "FeatureSchema",
    "atomic_write_bytes",
    "load_checkpoint",
    "save_checkpoint",
]
