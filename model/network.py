"""The stabilized MLP: Linear -> BatchNorm1d -> ELU blocks with Kaiming init and a sigmoid head."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class MLPConfig:
    """Everything needed to rebuild the network; stored in every checkpoint."""

    in_features: int  # number of raw input features
    hidden: tuple[int, ...] = (64, 32, 16)  # width of each Linear -> BatchNorm1d -> ELU block
    dropout: float = 0.0  # dropout after each block (0 disables it)
    bn_momentum: float = 0.1  # BatchNorm running-statistics momentum (PyTorch's default)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["hidden"] = list(self.hidden)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MLPConfig:
        return cls(
            in_features=int(data["in_features"]),
            hidden=tuple(int(h) for h in data["hidden"]),
            dropout=float(data.get("dropout", 0.0)),
            bn_momentum=float(data.get("bn_momentum", 0.1)),
        )


class Block(nn.Sequential):
    """Linear -> BatchNorm1d -> ELU (-> Dropout).

    The Linear has no bias: BatchNorm subtracts the batch mean (cancelling any bias) and adds its
    own learned shift instead.
    """

    def __init__(self, in_features: int, out_features: int, dropout: float, momentum: float):
        layers: list[nn.Module] = [
            nn.Linear(in_features, out_features, bias=False),
            nn.BatchNorm1d(out_features, momentum=momentum),
            nn.ELU(),
        ]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


class StabilizedMLP(nn.Module):
    """Blocks of Linear -> BatchNorm1d -> ELU, then Linear -> one logit.

    forward() returns logits (training uses BCE-with-logits for numerical stability);
    predict_proba() applies the sigmoid that the exported graph carries.
    """

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        widths = [config.in_features, *config.hidden]
        self.blocks = nn.Sequential(
            *(
                Block(widths[i], widths[i + 1], config.dropout, config.bn_momentum)
                for i in range(len(config.hidden))
            )
        )
        self.head = nn.Linear(widths[-1], 1)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.blocks(x))
        return logits

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward(x))

    def linear_layers(self) -> list[tuple[str, nn.Linear]]:
        """Every Linear in forward order, with a readable name; used by the gradient monitor."""
        return [(name, m) for name, m in self.named_modules() if isinstance(m, nn.Linear)]


def init_weights(model: StabilizedMLP) -> None:
    """Kaiming (He) uniform initialization, the one place weights are initialized.

    Hidden Linears use the ReLU gain sqrt(2): ELU equals ReLU for positive inputs and PyTorch has
    no ELU gain, and He et al. (2015) derive sqrt(2) for rectifiers; BatchNorm right after each
    Linear re-normalizes whatever small mismatch remains. The output Linear feeds a sigmoid, so it
    uses nonlinearity="sigmoid" (gain 1), which keeps initial logits near 0 and probabilities
    near 0.5 instead of saturating the sigmoid.
    """
    for _, layer in model.linear_layers():
        is_head = layer is model.head
        nn.init.kaiming_uniform_(
            layer.weight, mode="fan_in", nonlinearity="sigmoid" if is_head else "relu"
        )
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["Block", "MLPConfig", "StabilizedMLP", "count_parameters", "init_weights"]
