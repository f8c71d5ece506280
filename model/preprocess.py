"""Numbers -> what the MLP reads, as torch modules, so they travel inside the exported graph.

Standardize imputes and standardizes. NumericEncoder adds, on top: a soft clip, the
piecewise-linear encoding of Gorishniy et al., "On Embeddings for Numerical Features in Tabular
Deep Learning" (NeurIPS 2022), and missing-value indicators. Real tables have heavy tails
(incomes, counts) and effects that bend (risk that rises, then saturates): a standardized value
gives the first Linear one slope per feature, the encoding one slope per quantile bin, so a bent
effect costs no depth and a tail moves only its last bin. Imputing with the mean hides that a value
was absent, so columns missing in some training row also get a 0/1 indicator. Every step is a fixed
function of training statistics (no learned parameters): Sub, Div, Clip, Gather, Concat in ONNX.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .network import StabilizedMLP, mean_probability

# Standardized values are clamped to +-STANDARDIZED_LIMIT. A huge finite input (float32 reaches
# 3.4e38) would otherwise become +-inf after (x - mean) / std, and inf - inf in the first Linear
# makes the probability NaN. 100 standard deviations lies far beyond any value the network saw in
# training, so real rows are unchanged, and it keeps every product inside the MLP finite.
STANDARDIZED_LIMIT = 100.0


class Standardize(nn.Module):
    """Replace NaN (missing) with the training mean, then (x - mean) / std, clamped.

    Imputing with the mean means a missing value standardizes to exactly 0, the centre of the
    training distribution. `std` is stored already made safe (constant columns get 1.0).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.detach().clone().float())
        self.register_buffer("std", std.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.where(torch.isnan(x), self.mean, x)
        return ((x - self.mean) / self.std).clamp(-STANDARDIZED_LIMIT, STANDARDIZED_LIMIT)


# Quantile bins per numeric column (fewer for columns with fewer distinct values). Chosen on the
# quality suite (bench/quality.py, seeds 0-1): 16 bins against 8, suite mean 0.8521 vs 0.8506
# (4 members of 64-64), Caravan 0.7315 vs 0.7200; without bins, CreditCard fell from 0.995 to
# 0.970 (one member, seed 0). Capping the bins of a wide table to ~256 in all cost Caravan 0.013.
DEFAULT_BINS = 16
# RealMLP's smooth clip: x / sqrt(1 + (x / c)^2) is ~x near 0 and tends to +-c, so an outlier
# 50 standard deviations out cannot dominate the first Linear's sum.
SOFT_CLIP = 3.0


@dataclass(frozen=True)
class NumericEncoding:
    """Bin edges per numeric column (in standardized units) and which columns get a missing
    indicator; stored in every checkpoint (format /3)."""

    edges: tuple[tuple[float, ...], ...]  # per column: K+1 increasing edges, or () for no bins
    missing: tuple[int, ...] = ()  # indices of columns that were missing in some training row

    @property
    def width(self) -> int:
        """Numbers per row after encoding: value, bins, indicators."""
        bins = sum(max(0, len(e) - 1) for e in self.edges)
        return len(self.edges) + bins + len(self.missing)

    def to_dict(self) -> dict[str, Any]:
        return {"edges": [list(e) for e in self.edges], "missing": list(self.missing)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NumericEncoding:
        edges = tuple(tuple(float(v) for v in e) for e in data["edges"])
        return cls(edges, tuple(int(i) for i in data.get("missing", [])))

    @classmethod
    def learn(
        cls, features: np.ndarray, mean: np.ndarray, std: np.ndarray, bins: int = DEFAULT_BINS
    ) -> NumericEncoding:
        """Quantile edges of the standardized training values, missing-value columns."""
        z = (features.astype(np.float64) - mean) / std
        edges = [_quantile_edges(z[:, j], bins) for j in range(z.shape[1])]
        missing = tuple(int(j) for j in np.flatnonzero(np.isnan(features).any(axis=0)))
        return cls(tuple(edges), missing)


def _quantile_edges(values: np.ndarray, bins: int) -> tuple[float, ...]:
    """Up to `bins` bins of (about) equal training mass; none for columns of <= 2 values."""
    values = np.clip(values[~np.isnan(values)], -STANDARDIZED_LIMIT, STANDARDIZED_LIMIT)
    if bins < 1 or len(np.unique(values)) <= 2:
        return ()
    edges = np.unique(np.quantile(values, np.linspace(0.0, 1.0, bins + 1)).astype(np.float32))
    return tuple(float(e) for e in edges) if len(edges) >= 2 else ()


class NumericEncoder(nn.Module):
    """Raw numbers float32 [N, F] (NaN = missing) -> [N, width]: soft-clipped standardized
    values, then each column's piecewise-linear bins, then the missing indicators."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, encoding: NumericEncoding):
        super().__init__()
        self.standardize = Standardize(mean, std)
        self.encoding = encoding
        k = max((len(e) - 1 for e in encoding.edges), default=0)
        left = torch.zeros(len(encoding.edges), max(k, 1))
        width = torch.ones_like(left)
        used: list[int] = []
        for j, column in enumerate(encoding.edges):
            edges = torch.tensor(column, dtype=torch.float32)
            n = len(column) - 1
            if n > 0:
                left[j, :n] = edges[:-1]
                width[j, :n] = edges[1:] - edges[:-1]
                used.extend(j * left.shape[1] + i for i in range(n))
        self.register_buffer("left", left)
        self.register_buffer("width", width)
        self.register_buffer("used", torch.tensor(used, dtype=torch.int64))
        self.register_buffer("missing", torch.tensor(encoding.missing, dtype=torch.int64))
        # Python flags, not buffer sizes: tracing freezes a branch on a tensor with a warning.
        self.binned, self.indicated = bool(used), bool(encoding.missing)

    left: torch.Tensor
    width: torch.Tensor
    used: torch.Tensor
    missing: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.standardize(x)
        parts = [z / torch.sqrt(1.0 + (z / SOFT_CLIP) ** 2)]
        if self.binned:
            bins = ((z.unsqueeze(2) - self.left) / self.width).clamp(0.0, 1.0)
            parts.append(bins.flatten(1).index_select(1, self.used))
        if self.indicated:
            parts.append(torch.isnan(x.index_select(1, self.missing)).to(x.dtype))
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]


class Classifier(nn.Module):
    """Raw inputs -> (probability [N,1] float32, label [N,1] int64): the served contract.

    Inputs, in order: the raw numeric block float32 [N, F] (NaN = missing) when the model has
    numeric columns, then the category codes int64 [N, C] when it has text columns (model.lookup
    turns text into codes). An all-numeric model takes the numeric block alone, as it always did.
    """

    def __init__(self, standardize: nn.Module | None, net: nn.Module, threshold: float):
        super().__init__()
        self.standardize = standardize
        self.net = net
        self.threshold = float(threshold)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.standardize is not None:
            inputs = (self.standardize(inputs[0]), *inputs[1:])
        probability = mean_probability(self.net(*inputs))
        label = (probability >= self.threshold).to(torch.int64)
        return probability, label


def numeric_block(
    mean: torch.Tensor, std: torch.Tensor, encoding: NumericEncoding | None = None
) -> nn.Module | None:
    """What turns the raw numeric block into the MLP's numeric inputs (None without numbers):
    the NumericEncoder when the model was trained with one, else plain standardization."""
    if not mean.numel():
        return None
    return Standardize(mean, std) if encoding is None else NumericEncoder(mean, std, encoding)


def build_classifier(
    net: StabilizedMLP | nn.Module,
    mean: torch.Tensor,
    std: torch.Tensor,
    threshold: float,
    encoding: NumericEncoding | None = None,
) -> Classifier:
    """`net` behind the numeric block's preprocessing (none without numeric columns)."""
    return Classifier(numeric_block(mean, std, encoding), net, threshold)


__all__ = [
    "DEFAULT_BINS",
    "SOFT_CLIP",
    "STANDARDIZED_LIMIT",
    "Classifier",
    "NumericEncoder",
    "NumericEncoding",
    "Standardize",
    "build_classifier",
    "numeric_block",
]
