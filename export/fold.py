"""Fold eval-mode BatchNorm into the Linear before it, so exported graphs carry no BatchNorm.

In eval mode BatchNorm is the affine map y = (x - running_mean) / sqrt(running_var + eps) * gamma
+ beta, so Linear -> BatchNorm equals one Linear with rescaled weights and a new bias. torch's own
helper (torch.nn.utils.fusion.fuse_linear_bn_eval) does the arithmetic; it also handles our
bias=False Linears, treating the missing bias as zeros and returning a Linear that has one.
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_linear_bn_eval

from .errors import FoldError


def batchnorm_layers(model: nn.Module) -> list[str]:
    """Qualified names of every BatchNorm (1d/2d/3d) left in `model`."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
    ]


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A new eval-mode copy of `model` with each BatchNorm folded into the Linear before it.

    The input is left untouched (deep copy, mode unchanged). The fold uses BatchNorm's running
    statistics, i.e. eval-mode semantics, whatever mode `model` is in. A BatchNorm that does not
    directly follow a Linear inside an nn.Sequential raises FoldError instead of being skipped.
    """
    folded = copy.deepcopy(model).eval()
    for parent_name, parent in folded.named_modules():
        if isinstance(parent, nn.Sequential):
            _fold_sequential(parent_name, parent)
    left = batchnorm_layers(folded)
    if left:
        raise FoldError(f"BatchNorm not preceded by a Linear, cannot fold: {', '.join(left)}")
    return folded


def _fold_sequential(parent_name: str, seq: nn.Sequential) -> None:
    """Replace each (Linear, BatchNorm) pair in `seq` by (fused Linear, Identity), in place."""
    # Identity keeps the child indices (and so state-dict names) stable; exporters drop it.
    for index in range(1, len(seq)):
        linear, bn = seq[index - 1], seq[index]
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not isinstance(linear, nn.Linear):
            continue
        where = f"{parent_name}.{index}" if parent_name else str(index)
        if bn.running_mean is None or bn.running_var is None:
            raise FoldError(f"BatchNorm {where} tracks no running statistics, cannot fold")
        if not bn.affine:
            raise FoldError(f"BatchNorm {where} has affine=False, which the fusion helper rejects")
        seq[index - 1] = fuse_linear_bn_eval(linear, bn)
        seq[index] = nn.Identity()


__all__ = ["batchnorm_layers", "fold_batchnorm"]
