"""The same-depth networks `stablemlp diagnose` compares (plain sigmoid, ReLU + Kaiming,
stabilized) and what is measured of each (`Probe`, `VariantResult`).

Every variant exposes its Linears (forward order) and its hidden activation modules, so the
diagnosis measures all of them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .gradients import verdict
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


@dataclass
class Probe:
    """One full-batch forward/backward: gradient norm per Linear, statistics per hidden layer."""

    grad_norms: list[float]  # every Linear, forward order, head last
    act_mean: list[float]  # mean of each hidden layer's activation output
    act_std: list[float]
    dead_units: list[int]  # units whose output is exactly 0 on every row
    units: list[int]  # width of each hidden layer

    @property
    def dead_fraction(self) -> float:
        return sum(self.dead_units) / max(sum(self.units), 1)


@dataclass
class VariantResult:
    """Everything measured for one variant; `verdict` and `ratio` judge the gradients at init."""

    name: str
    layers: list[str]
    init: Probe
    final: Probe
    losses: list[float]  # mini-batch loss per step
    step_norms: list[list[float]]  # [step][layer], the same layer order as `layers`
    val_loss: float  # validation loss after training, eval mode
    diverged_at: int | None  # step whose loss or gradient became NaN/Inf, if any

    @property
    def verdict(self) -> tuple[str, float]:
        return verdict(dict(zip(self.layers, self.init.grad_norms, strict=True)))

    @property
    def training_verdict(self) -> tuple[str, float]:
        """The verdict on each layer's median gradient norm over the training steps."""
        if not self.step_norms:
            return self.verdict
        medians = torch.tensor(self.step_norms).median(dim=0).values.tolist()
        return verdict(dict(zip(self.layers, medians, strict=True)))


__all__ = [
    "PLAIN",
    "RELU",
    "STABILIZED",
    "VARIANTS",
    "DeepMLP",
    "Probe",
    "Variant",
    "VariantResult",
    "build_variant",
]
