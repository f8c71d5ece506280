"""`stablemlp diagnose`: the same deep MLP built plain, ReLU + Kaiming and stabilized, measured.

Per variant: per-layer gradient norms at initialization and over SGD steps, activation statistics,
dead units and the loss curve; written as report.json, report.md and PNG plots.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .csvdata import load_dataset
from .data import DataError, feature_stats, split_dataset
from .diagnose_report import table, write_report
from .gradients import gradient_norms
from .preprocess import Standardize
from .variants import RELU, VARIANTS, Probe, Variant, VariantResult, build_variant

log = logging.getLogger(__name__)

# Depth 20 makes the effect unmistakable: the plain sigmoid net's first-layer gradient measures
# ~1e-16 of the head's, far past the 1e-3 threshold, while the defaults run in seconds on 2 cores.
DEFAULT_DEPTH = 20
DEFAULT_WIDTH = 32
DEFAULT_STEPS = 300
BATCH_SIZE = 64
# Plain SGD with momentum: a layer's step is proportional to its gradient, so a vanishing gradient
# shows up as a layer that does not learn. Adam rescales every step and would hide part of that.
LEARNING_RATE = 0.01
MOMENTUM = 0.9


def dead_units(output: torch.Tensor) -> int:
    """Columns (units) of a [rows, units] activation output that are exactly zero on every row."""
    return int((output == 0).all(dim=0).sum())


def probe(variant: Variant, x: torch.Tensor, y: torch.Tensor) -> Probe:
    """Forward and backward on (x, y) in train mode; weights and BatchNorm stats stay as found."""
    net = variant.net
    outputs: list[torch.Tensor] = []
    hooks = [
        module.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach()))
        for _, module in variant.activations
    ]
    saved = {name: b.clone() for name, b in net.named_buffers()}  # train-mode BN updates them
    net.train()
    net.zero_grad(set_to_none=True)
    try:
        torch.autograd.backward(nn.functional.binary_cross_entropy_with_logits(net(x), y))
    finally:
        for hook in hooks:
            hook.remove()
    norms = list(gradient_norms(variant.linears).values())
    net.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, buffer in net.named_buffers():
            buffer.copy_(saved[name])
    return Probe(
        grad_norms=norms,
        act_mean=[float(o.mean()) for o in outputs],
        act_std=[float(o.std()) for o in outputs],
        dead_units=[dead_units(o) for o in outputs],
        units=[o.shape[1] for o in outputs],
    )


def make_batches(rows: int, steps: int, seed: int) -> list[torch.Tensor]:
    """`steps` mini-batch index tensors from seeded reshuffled epochs, shared by every variant."""
    if rows < 2:
        raise ValueError(f"the training split has {rows} row(s); mini-batches need at least 2")
    generator = torch.Generator().manual_seed(seed)
    batches: list[torch.Tensor] = []
    while len(batches) < steps:
        order = torch.randperm(rows, generator=generator)
        # BatchNorm needs more than one row per batch, so a 1-row remainder is dropped.
        batches += [b for b in torch.split(order, BATCH_SIZE) if len(b) > 1]
    return batches[:steps]


def train_steps(
    variant: Variant, x: torch.Tensor, y: torch.Tensor, batches: list[torch.Tensor]
) -> tuple[list[float], list[list[float]], int | None]:
    """SGD over `batches`; returns per-step losses, per-step layer norms, the diverged step."""
    net = variant.net
    optimizer = torch.optim.SGD(net.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    losses: list[float] = []
    step_norms: list[list[float]] = []
    net.train()
    for step, batch in enumerate(batches):
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.binary_cross_entropy_with_logits(net(x[batch]), y[batch])
        torch.autograd.backward(loss)
        norms = list(gradient_norms(variant.linears).values())
        if not math.isfinite(loss.item()) or not all(map(math.isfinite, norms)):
            # An exploding net overflows within a few steps; what came before is the evidence.
            log.warning("%s: loss or gradients not finite at step %d", variant.name, step)
            return losses, step_norms, step
        losses.append(loss.item())
        step_norms.append(norms)
        optimizer.step()
    return losses, step_norms, None


def load_tensors(
    csv: Path | None, target: str | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardized (train x, train y, validation x, validation y); NaN imputed with the mean.

    Only the numeric columns: the comparison is about the network, not the category encoding.
    """
    data = load_dataset(csv, target)
    if not data.feature_names:
        raise DataError("diagnose compares networks on numeric columns; this CSV has none")
    splits = split_dataset(data, seed=seed)
    mean, std = feature_stats(splits.train)
    standardize = Standardize(torch.from_numpy(mean), torch.from_numpy(std))
    tensors = []
    for part in (splits.train, splits.val):
        with torch.no_grad():
            tensors.append(standardize(torch.from_numpy(part.features)))
        tensors.append(torch.from_numpy(part.labels).float().unsqueeze(1))
    return tensors[0], tensors[1], tensors[2], tensors[3]


def diagnose_variant(
    name: str,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    batches: list[torch.Tensor],
    width: int,
    depth: int,
    seed: int = 0,
    init_scale: float = 1.0,
) -> VariantResult:
    """Build one variant from `seed`, probe it, train it on `batches`, probe it again."""
    x, y, x_val, y_val = data
    torch.manual_seed(seed)
    variant = build_variant(name, x.shape[1], width, depth, gain_scale=init_scale)
    init = probe(variant, x, y)
    losses, step_norms, diverged_at = train_steps(variant, x, y, batches)
    final = probe(variant, x, y)
    variant.net.eval()
    with torch.no_grad():
        val_loss = float(nn.functional.binary_cross_entropy_with_logits(variant.net(x_val), y_val))
    layers = [n for n, _ in variant.linears]
    if name == RELU and init_scale != 1.0:
        name = f"{name}_x{init_scale:g}"  # the report must not pass it off as plain Kaiming
    return VariantResult(name, layers, init, final, losses, step_norms, val_loss, diverged_at)


def diagnose(
    depth: int = DEFAULT_DEPTH,
    width: int = DEFAULT_WIDTH,
    steps: int = DEFAULT_STEPS,
    csv: Path | None = None,
    target: str | None = None,
    seed: int = 0,
    init_scale: float = 1.0,
    variants: tuple[str, ...] = VARIANTS,
) -> list[VariantResult]:
    """Every variant on the same data, seed and mini-batches."""
    for label, value in (("depth", depth), ("width", width), ("steps", steps)):
        if value < 1:
            raise ValueError(f"--{label} must be at least 1, got {value}")
    data = load_tensors(csv, target, seed)
    batches = make_batches(len(data[0]), steps, seed)
    results = []
    for name in variants:
        started = time.perf_counter()
        results.append(diagnose_variant(name, data, batches, width, depth, seed, init_scale))
        log.info("%s: %.1f s", name, time.perf_counter() - started)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stablemlp diagnose", description=__doc__)
    parser.add_argument("--depth", type=int, default=DEFAULT_DEPTH, help="hidden layers")
    parser.add_argument("--width", type=int, default=DEFAULT_WIDTH, help="units per layer")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="SGD steps")
    parser.add_argument("--csv", type=Path, help="data CSV (default: built-in breast cancer)")
    parser.add_argument("--target", help="name of the binary target column in --csv")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--init-scale",
        type=float,
        default=1.0,
        help="multiply the ReLU variant's Kaiming weights (e.g. 2 makes it explode)",
    )
    parser.add_argument("--output", type=Path, required=True, help="folder for report and plots")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        results = diagnose(
            args.depth, args.width, args.steps, args.csv, args.target, args.seed, args.init_scale
        )
    except (DataError, ValueError) as err:
        print(f"stablemlp diagnose: error: {err}", file=sys.stderr)
        return 1
    settings = {
        "depth": args.depth,
        "width": args.width,
        "steps": args.steps,
        "batch_size": BATCH_SIZE,
        "optimizer": f"SGD(lr={LEARNING_RATE}, momentum={MOMENTUM})",
        "seed": args.seed,
        "init_scale": args.init_scale,
        "data": str(args.csv.name) if args.csv else "breast_cancer (built-in)",
    }
    write_report(results, settings, args.output)
    print(table(results))
    print(f"report: {args.output / 'report.md'}")
    return 0


__all__ = [
    "DEFAULT_DEPTH",
    "DEFAULT_STEPS",
    "DEFAULT_WIDTH",
    "Probe",
    "VariantResult",
    "dead_units",
    "diagnose",
    "diagnose_variant",
    "main",
    "probe",
]
