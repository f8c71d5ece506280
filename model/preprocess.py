"""Imputation and standardization as a torch module, so they travel inside the exported graph."""

from __future__ import annotations

import torch
from torch import nn

from .network import StabilizedMLP

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


class Classifier(nn.Module):
    """Raw inputs -> (probability [N,1] float32, label [N,1] int64): the served contract.

    Inputs, in order: the raw numeric block float32 [N, F] (NaN = missing) when the model has
    numeric columns, then the category codes int64 [N, C] when it has text columns (model.lookup
    turns text into codes). An all-numeric model takes the numeric block alone, as it always did.
    """

    def __init__(self, standardize: Standardize | None, net: nn.Module, threshold: float):
        super().__init__()
        self.standardize = standardize
        self.net = net
        self.threshold = float(threshold)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.standardize is not None:
            inputs = (self.standardize(inputs[0]), *inputs[1:])
        probability = torch.sigmoid(self.net(*inputs))
        label = (probability >= self.threshold).to(torch.int64)
        return probability, label


def build_classifier(
    net: StabilizedMLP | nn.Module, mean: torch.Tensor, std: torch.Tensor, threshold: float
) -> Classifier:
    """`net` behind the numeric block's standardization (none without numeric columns)."""
    standardize = Standardize(mean, std) if mean.numel() else None
    return Classifier(standardize, net, threshold)


__all__ = ["STANDARDIZED_LIMIT", "Classifier", "Standardize", "build_classifier"]
