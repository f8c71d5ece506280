"""What `stablemlp diagnose` writes: report.json, report.md, the PNG plots and a terminal table."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..files import atomic_write_bytes
from .diagnose_plots import plot_diagnosis
from .gradients import EXPLODING_NORM, EXPLODING_RATIO, VANISHING_RATIO
from .variants import VariantResult

FORMAT = "stablemlp.diagnose/1"
REPORT_POINTS = 60  # per-step gradient norms kept in report.json (every k-th step); plots use all
FINAL_LOSS_STEPS = 10  # "final loss" = mean mini-batch loss over the last this-many steps


def _num(value: float | None) -> float | None:
    """JSON has no NaN/Inf: non-finite numbers become null; others keep 4 significant digits."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.4g}")


def _nums(values: Sequence[float]) -> list[float | None]:
    return [_num(v) for v in values]


def final_loss(result: VariantResult) -> float:
    tail = result.losses[-FINAL_LOSS_STEPS:]
    return sum(tail) / len(tail) if tail else math.nan


def variant_json(result: VariantResult) -> dict[str, Any]:
    """One variant's entry: the issue's fields first, the detail after."""
    state, ratio = result.verdict
    train_state, train_ratio = result.training_verdict
    every = max(1, len(result.step_norms) // REPORT_POINTS)
    sampled = list(range(0, len(result.step_norms), every))
    return {
        "name": result.name,
        "layers": result.layers,
        "grad_norms": _nums(result.init.grad_norms),
        "ratio": _num(ratio),
        "verdict": state,
        "dead_fraction": _num(result.final.dead_fraction),
        "dead_fraction_init": _num(result.init.dead_fraction),
        "training": {
            "ratio_median": _num(train_ratio),
            "verdict": train_state,
            "final_loss": _num(final_loss(result)),
            "val_loss": _num(result.val_loss),
            "diverged_at_step": result.diverged_at,
            "loss": _nums(result.losses),
            "grad_norm_steps": sampled,
            "grad_norms": [_nums(result.step_norms[i]) for i in sampled],
        },
        "activations": {
            stage: {
                "mean": _nums(p.act_mean),
                "std": _nums(p.act_std),
                "dead_units": p.dead_units,
                "units": p.units,
            }
            for stage, p in (("init", result.init), ("final", result.final))
        },
    }


def _row(result: VariantResult) -> list[str]:
    state, ratio = result.verdict
    train_state, train_ratio = result.training_verdict
    diverged = result.diverged_at is not None  # a diverged net's losses mean nothing
    return [
        result.name,
        f"{ratio:.3g}",
        state,
        f"{train_ratio:.3g}",
        train_state,
        f"{result.init.dead_fraction:.1%} → {result.final.dead_fraction:.1%}",
        f"diverged at step {result.diverged_at}" if diverged else f"{final_loss(result):.4f}",
        "n/a" if diverged else f"{result.val_loss:.4f}",
    ]


HEADER = [
    "variant",
    "first/last ratio (init)",
    "verdict (init)",
    "median ratio (training)",
    "verdict (training)",
    "dead units (init → end)",
    "final train loss",
    "val loss",
]


def markdown(results: Sequence[VariantResult], settings: dict[str, Any], plots: list[Path]) -> str:
    """report.md: settings, thresholds, the summary table, per-layer norms and the plots."""
    lines = ["# Gradient diagnosis", ""]
    lines += [", ".join(f"{k}: `{v}`" for k, v in settings.items()), ""]
    lines += [
        f"Ratio = gradient norm of the first Linear / that of the head. Verdict: `vanishing` below "
        f"{VANISHING_RATIO:g}, `exploding` above {EXPLODING_RATIO:g} or when any layer's norm "
        f"exceeds {EXPLODING_NORM:g}, else `healthy`. Dead unit: output exactly 0 on every "
        "training row.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + " --- |" * len(HEADER),
    ]
    lines += ["| " + " | ".join(_row(r)) + " |" for r in results]
    lines += ["", "## Gradient norm per layer at initialization", ""]
    lines += ["| layer | " + " | ".join(r.name for r in results) + " |"]
    lines += ["|" + " --- |" * (len(results) + 1)]
    for i, layer in enumerate(results[0].layers):
        cells = [f"{r.init.grad_norms[i]:.3g}" for r in results]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    lines += ["", "## Plots", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(results: Sequence[VariantResult], settings: dict[str, Any], out: Path) -> None:
    """report.json, report.md and the plots, each written atomically into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_diagnosis(results, out)
    report = {
        "format": FORMAT,
        "settings": settings,
        "thresholds": {
            "ratio": "first Linear gradient norm / head gradient norm",
            "vanishing_ratio": VANISHING_RATIO,
            "exploding_ratio": EXPLODING_RATIO,
            "exploding_norm": EXPLODING_NORM,
        },
        "variants": [variant_json(r) for r in results],
        "plots": [p.name for p in plots],
    }
    atomic_write_bytes(out / "report.json", json.dumps(report, indent=1).encode())
    atomic_write_bytes(out / "report.md", markdown(results, settings, plots).encode())


def table(results: Sequence[VariantResult]) -> str:
    """The summary table for the terminal, columns padded to line up."""
    rows = [HEADER, *(_row(r) for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


__all__ = ["FORMAT", "final_loss", "markdown", "table", "variant_json", "write_report"]
