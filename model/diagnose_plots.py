"""`stablemlp diagnose` plots: gradient norms by layer and over steps, loss, activations (PNG)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..files import atomic_write_bytes
from .variants import VariantResult

COLORS = ("tab:red", "tab:orange", "tab:blue", "tab:green", "tab:purple")
SMOOTHING = 10  # curves over steps: moving average over this many steps (mini-batches are noisy)


def _save(figure: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _positive(values: Sequence[float]) -> list[float]:
    """Log axes cannot show 0; an exactly-zero norm is drawn at the float32 floor instead."""
    return [max(v, 1e-38) for v in values]


def plot_diagnosis(results: Sequence[VariantResult], out: Path) -> list[Path]:
    """grad_norms_init.png, grad_norms_steps.png, loss_curves.png, activations.png."""
    import matplotlib

    matplotlib.use("Agg")  # no display here or in CI; chosen when plotting, not at import
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for color, r in zip(COLORS, results, strict=False):
        layers = range(1, len(r.layers) + 1)
        state, ratio = r.verdict
        label = f"{r.name}: {state}, first/last {ratio:.2g}"
        ax.plot(layers, _positive(r.init.grad_norms), "o-", color=color, ms=3, label=label)
    ax.set(
        xlabel="Linear layer (1 = input side, last = head)",
        ylabel="‖∇W‖₂ at initialization",
        yscale="log",
        title="Gradient norm by layer at initialization (full training batch)",
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small")
    written.append(_save(fig, out / "grad_norms_init.png"))
    plt.close(fig)

    # One shared log axis: the point is how many decades separate the layers of each variant.
    fig, axes = plt.subplots(
        1, len(results), figsize=(4.2 * len(results), 3.8), squeeze=False, sharey=True
    )
    cmap = plt.get_cmap("viridis")
    for ax, r in zip(axes[0], results, strict=True):
        depth = len(r.layers)
        for i in range(depth):
            series = _moving_average([norms[i] for norms in r.step_norms], SMOOTHING)
            series = _positive(series)
            ax.plot(series, color=cmap(i / max(depth - 1, 1)), lw=0.8)
        ax.set(title=f"{r.name} ({r.training_verdict[0]})", xlabel="SGD step", yscale="log")
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel(f"‖∇W‖₂ per layer ({SMOOTHING}-step mean)")
    mappable = ScalarMappable(cmap=cmap, norm=Normalize(1, len(results[0].layers)))
    fig.colorbar(mappable, ax=axes[0].tolist(), label="layer (1 = input side)", pad=0.01)
    written.append(_save(fig, out / "grad_norms_steps.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for color, r in zip(COLORS, results, strict=False):
        ax.plot(r.losses, color=color, alpha=0.2, lw=0.8)
        label = r.name + (
            f" (diverged at step {r.diverged_at})" if r.diverged_at is not None else ""
        )
        ax.plot(_moving_average(r.losses, SMOOTHING), color=color, label=label)
    ax.set(xlabel="SGD step", ylabel="mini-batch BCE loss", yscale="log", title="Training loss")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small")
    written.append(_save(fig, out / "loss_curves.png"))
    plt.close(fig)

    fig, (mean_ax, std_ax, dead_ax) = plt.subplots(1, 3, figsize=(13, 3.8))
    for color, r in zip(COLORS, results, strict=False):
        hidden = range(1, len(r.init.units) + 1)
        mean_ax.plot(hidden, r.init.act_mean, "o-", color=color, ms=3, label=r.name)
        std_ax.plot(hidden, _positive(r.init.act_std), "o-", color=color, ms=3, label=r.name)
        dead = [d / u for d, u in zip(r.final.dead_units, r.final.units, strict=True)]
        dead_ax.plot(hidden, dead, "o-", color=color, ms=3, label=r.name)
    mean_ax.set(xlabel="hidden layer", title="Activation mean at init")
    std_ax.set(xlabel="hidden layer", title="Activation std at init", yscale="log")
    dead_ax.set(xlabel="hidden layer", title="Dead units after training (fraction)")
    for ax in (mean_ax, std_ax, dead_ax):
        ax.grid(True, alpha=0.3)
    mean_ax.legend(fontsize="small")
    written.append(_save(fig, out / "activations.png"))
    plt.close(fig)
    return written


__all__ = ["plot_diagnosis"]
