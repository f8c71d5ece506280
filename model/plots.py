"""Training-curve and gradient-norm plots (PNG), written atomically."""

from __future__ import annotations

import io
from pathlib import Path

from ..files import atomic_write_bytes
from .train import History


def _save(figure: object, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")  # type: ignore[attr-defined]
    atomic_write_bytes(path, buffer.getvalue())


def plot_training(history: History, out_dir: Path) -> list[Path]:
    """training_curves.png (loss, validation AUC) and gradient_norms.png (per layer, log scale)."""
    import matplotlib

    matplotlib.use("Agg")  # no display here or in CI; chosen when plotting, not at import
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) for r in history.epochs]
    fig, (loss_ax, auc_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    loss_ax.plot(epochs, [r["train_loss"] for r in history.epochs], label="train")
    loss_ax.plot(epochs, [r["val_loss"] for r in history.epochs], label="validation")
    loss_ax.axvline(history.best_epoch, color="grey", linestyle=":", label="best epoch")
    loss_ax.set(xlabel="epoch", ylabel="BCE loss", title="Loss")
    loss_ax.legend()
    auc_ax.plot(epochs, [r["val_roc_auc"] for r in history.epochs], color="tab:green")
    auc_ax.set(xlabel="epoch", ylabel="ROC AUC", title="Validation ROC AUC")
    curves = out_dir / "training_curves.png"
    _save(fig, curves)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    names = list(history.grad_norms[0]) if history.grad_norms else []
    for name in names:
        ax.plot(epochs, [n[name] for n in history.grad_norms], label=name)
    ax.set(xlabel="epoch", ylabel="mean ‖∇W‖₂", yscale="log", title="Per-layer gradient norms")
    ax.legend(fontsize="small")
    grads = out_dir / "gradient_norms.png"
    _save(fig, grads)
    plt.close(fig)
    return [curves, grads]


__all__ = ["plot_training"]
