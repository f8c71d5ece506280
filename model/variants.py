"""The same-depth networks `stablemlp diagnose` compares: plain sigmoid, ReLU + Kaiming, stabilized.

Every variant exposes its Linears (forward order) and its hidden activation modules, so the
diagnosis measures all of them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .network import MLPConfig, StabilizedMLP

# Variant names, in the order the report lists them.
PLAIN = "plain"  # sigmoid, PyTorch's default Linear init, no BatchNorm: the textbook failure
RELU = "relu_kaiming"  # ReLU with Kaiming init, no BatchNorm: keeps the scale, can lose units
STABILIZED = "stabilized"  # model.network.StabilizedMLP: Kaiming + BatchNorm1d + ELU
VARIANTS = (PLAIN, RELU, STABILIZED)
_ACTIVATIONS = (nn.Sigmoid, nn.ReLU, nn.ELU)  # the hidden nonlinearities the variants use


@dataclass
class Variant:
    """One network to diagnose, with handles on what the diagnosis measures."""

    name: str
    net: nn.Module
    linears: list[tuple[str, nn.Linear]]  # every Linear in forward order, the head last
    activations: list[tuple[str, nn.Module]]  # each hidden layer's nonlinearity, forward order


class DeepMLP(nn.Module):
    """Linear (with bias) -> activation, `depth` times, then Linear -> one logit; no BatchNorm."""

    def __init__(self, in_features: int, width: int, depth: int, activation: type[nn.Module]):
        super().__init__()
        widths = [in_features] + [width] * depth
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(widths[i], widths[i + 1]), activation()]
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.blocks(x))
        return logits


def _kaiming(net: DeepMLP, gain_scale: float) -> None:
    """Kaiming-normal hidden weights (ReLU gain sqrt(2), He et al. 2015) times `gain_scale`.

    gain_scale 1 preserves the activation variance layer to layer; a larger one multiplies it by
    gain_scale**2 per layer, which is how the tests build an exploding network on purpose.
    """
    for module in net.blocks:
        if isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            module.weight.data.mul_(gain_scale)
            nn.init.zeros_(module.bias)


def build_variant(
    name: str, in_features: int, width: int, depth: int, gain_scale: float = 1.0
) -> Variant:
    """Build one variant by name; call torch.manual_seed first so every variant starts alike."""
    if depth < 1 or width < 1:
        raise ValueError(f"depth and width must be >= 1, got depth={depth}, width={width}")
    net: nn.Module
    if name == STABILIZED:
        net = StabilizedMLP(MLPConfig(in_features=in_features, hidden=(width,) * depth))
    elif name == PLAIN:
        net = DeepMLP(in_features, width, depth, nn.Sigmoid)  # keeps nn.Linear's default init
    elif name == RELU:
        net = DeepMLP(in_features, width, depth, nn.ReLU)
        _kaiming(net, gain_scale)
    else:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    modules = list(net.named_modules())
    linears = [(n, m) for n, m in modules if isinstance(m, nn.Linear)]
    acts: list[tuple[str, nn.Module]] = [(n, m) for n, m in modules if isinstance(m, _ACTIVATIONS)]
    return Variant(name, net, linears, acts)


__all__ = ["PLAIN", "RELU", "STABILIZED", "VARIANTS", "DeepMLP", "Variant", "build_variant"]
