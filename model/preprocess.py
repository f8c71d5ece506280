"""Imputation and standardization as a torch module, so they travel inside the exported graph."""

from __future__ import annotations

import torch
from torch import nn

from .network import StabilizedMLP


class Standardize(nn.Module):
    """Replace NaN (missing) with the training mean, then (x - mean) / std.

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
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """Raw features -> (probability [N,1] float32, label [N,1] int64): the served contract."""

    def __init__(self, standardize: Standardize, net: nn.Module, threshold: float):
        super().__init__()
        self.standardize = standardize
        self.net = net
        self.threshold = float(threshold)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probability = torch.sigmoid(self.net(self.standardize(x)))
        label = (probability >= self.threshold).to(torch.int64)
        return probability, label


def build_classifier(
    net: StabilizedMLP | nn.Module, mean: torch.Tensor, std: torch.Tensor, threshold: float
) -> Classifier:
    return Classifier(Standardize(mean, std), net, threshold)


__all__ = ["Classifier", "Standardize", "build_classifier"]
