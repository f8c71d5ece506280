"""Self-describing checkpoints: config + weights + column schema + threshold + metrics.

Saved with torch.save but holding only tensors and plain Python values, so loading uses
`weights_only=True` (no pickle code execution). Written atomically: temp file, fsync, rename.
Format /2 adds text columns (vocabularies, encoder config), the target and its positive class;
/3 the numeric encoding (bins, missing indicators). /1 and /2 checkpoints still load.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_write_bytes
from .categories import CategoricalColumn
from .encoding import CategoryEncoder, EncoderConfig, TabularNet
from .network import MLPConfig, StabilizedMLP
from .preprocess import Classifier, NumericEncoding, build_classifier

FORMAT = "stablemlp.checkpoint/3"
READABLE_FORMATS = ("stablemlp.checkpoint/1", "stablemlp.checkpoint/2", FORMAT)
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass(frozen=True)
class FeatureSchema:
    """What a client sends, and what the graph uses to impute, standardize and look up."""

    names: tuple[str, ...]  # the numeric columns, in the order of the `features` input
    means: tuple[float, ...]
    stds: tuple[float, ...]  # already safe: constant columns stored as 1.0
    categorical: tuple[CategoricalColumn, ...] = ()  # the text columns, in input order
    columns: tuple[str, ...] = ()  # every feature column in file order (default: numeric, text)
    target: str = "target"
    positive_class: str = "1"

    def __post_init__(self) -> None:
        if not self.columns:
            text = tuple(c.name for c in self.categorical)
            object.__setattr__(self, "columns", (*self.names, *text))

    @property
    def text_names(self) -> tuple[str, ...]:
        return tuple(column.name for column in self.categorical)

    def describe(self) -> list[dict[str, Any]]:
        """Every column in file order: name, kind, the input tensor that carries it, and its
        statistics (mean/std) or vocabulary (categories in code order, other and missing codes)."""
        numeric = {name: i for i, name in enumerate(self.names)}
        text = {column.name: column for column in self.categorical}
        described: list[dict[str, Any]] = []
        for name in self.columns:
            if name in numeric:
                i = numeric[name]
                stats = {"index": i, "mean": self.means[i], "std": self.stds[i]}
                described.append({"name": name, "kind": "numeric", "input": "features", **stats})
            else:
                entry = text[name].to_dict()
                del entry["counts"]
                described.append({**entry, "input": name})
        return described

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "means": list(self.means),
            "stds": list(self.stds),
            "categorical": [column.to_dict() for column in self.categorical],
            "columns": list(self.columns),
            "target": self.target,
            "positive_class": self.positive_class,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSchema:
        return cls(
            tuple(str(n) for n in data["names"]),
            tuple(float(m) for m in data["means"]),
            tuple(float(s) for s in data["stds"]),
            tuple(CategoricalColumn.from_dict(c) for c in data.get("categorical", [])),
            tuple(str(c) for c in data.get("columns", [])),
            str(data.get("target", "target")),
            str(data.get("positive_class", "1")),
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
    encoder: EncoderConfig | None = None  # set when the schema has text columns
    numeric: NumericEncoding | None = None  # bins and indicators; None: plain standardization

    def build_model(self) -> StabilizedMLP | TabularNet:
        """The trained network in eval mode, rebuilt from the stored config (no flags repeated)."""
        mlp = StabilizedMLP(self.config)
        model: StabilizedMLP | TabularNet = mlp
        if self.encoder is not None:
            model = TabularNet(CategoryEncoder(self.encoder), mlp, len(self.schema.names))
        model.load_state_dict(self.state_dict)
        return model.eval()

    def build_classifier(self) -> Classifier:
        """Raw numbers and codes -> (probability, label): preprocessing + network + threshold."""
        return build_classifier(
            self.build_model(),
            torch.tensor(self.schema.means),
            torch.tensor(self.schema.stds),
            self.threshold,
            self.numeric,
        ).eval()


def save_checkpoint(checkpoint: Checkpoint, path: Path) -> None:
    payload: dict[str, Any] = {
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
    if checkpoint.encoder is not None:
        payload["encoder"] = checkpoint.encoder.to_dict()
    if checkpoint.numeric is not None:
        payload["numeric"] = checkpoint.numeric.to_dict()
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path) -> Checkpoint:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{path}: not a stablemlp checkpoint (format {payload.get('format')!r})")
    encoder, numeric = payload.get("encoder"), payload.get("numeric")
    return Checkpoint(
        config=MLPConfig.from_dict(payload["config"]),
        state_dict=payload["state_dict"],
        schema=FeatureSchema.from_dict(payload["schema"]),
        threshold=float(payload["threshold"]),
        metrics=payload["metrics"],
        model_name=str(payload["model_name"]),
        seed=int(payload["seed"]),
        encoder=EncoderConfig.from_dict(encoder) if encoder is not None else None,
        numeric=NumericEncoding.from_dict(numeric) if numeric is not None else None,
    )


__all__ = [
    "CHECKPOINT_NAME",
    "Checkpoint",
    "FeatureSchema",
    "load_checkpoint",
    "save_checkpoint",
]
