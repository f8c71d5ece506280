"""Parity proof: every exported stage gives the reference's probabilities and labels.

A stage is anything that maps a float32 [N, F] batch to (probability [N,1], label [N,1]): the eval
model, the folded model, the loaded TorchScript, an ONNX Runtime session. A failed check raises
ParityError carrying the full report, so callers print the numbers and publish nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from numpy.typing import NDArray
from torch import nn

from .errors import ExportError
from .formats import INPUT_NAME

# Max abs difference allowed on probabilities between any stage and the reference; labels must be
# identical. Float32 reassociation after folding moves probabilities by ~1e-7; 1e-5 leaves 100x
# headroom yet catches any real weight or preprocessing change.
TOLERANCE = 1e-5
# Batch sizes probed beyond the test split: a single row, an odd size, a large one.
BATCH_SIZES = (1, 7, 1024)
# Relative differences divide by max(|reference|, REL_FLOOR), so probabilities near 0 do not
# turn a 1e-9 absolute wobble into a huge relative figure. Reported only, not gated.
REL_FLOOR = 1e-6

Batch = NDArray[np.float32]
Outputs = tuple[NDArray[Any], NDArray[Any]]
Runner = Callable[[Batch], Outputs]


@dataclass(frozen=True)
class ParityRow:
    """One stage compared with the reference on one batch."""

    batch: str
    rows: int
    stage: str
    max_abs_diff: float
    max_rel_diff: float
    labels_identical: bool


@dataclass(frozen=True)
class ParityReport:
    reference: str
    tolerance: float
    rows: tuple[ParityRow, ...]

    def failures(self) -> list[ParityRow]:
        # `not <=` also fails a NaN difference.
        return [
            r for r in self.rows if not (r.max_abs_diff <= self.tolerance) or not r.labels_identical
        ]

    @property
    def passed(self) -> bool:
        return not self.failures()

    def max_abs_diff(self) -> dict[str, float]:
        return _worst(self.rows, "max_abs_diff")

    def max_rel_diff(self) -> dict[str, float]:
        return _worst(self.rows, "max_rel_diff")

    def summary(self) -> dict[str, Any]:
        """The manifest's "parity" entry."""
        return {
            "reference": self.reference,
            "max_abs_diff": self.max_abs_diff(),
            "max_rel_diff": self.max_rel_diff(),
            "tolerance": self.tolerance,
            "labels_identical": all(r.labels_identical for r in self.rows),
            "batches": {r.batch: r.rows for r in self.rows},
            "passed": self.passed,
        }

    def to_dict(self) -> dict[str, Any]:
        """parity.json: the summary plus every row."""
        return {**self.summary(), "rows": [asdict(r) for r in self.rows]}

    def table(self) -> str:
        lines = [
            f"{'batch':<12} {'rows':>5}  {'stage':<12} {'max_abs_diff':>12} "
            f"{'max_rel_diff':>12}  labels"
        ]
        for r in self.rows:
            labels = "same" if r.labels_identical else "DIFFER"
            lines.append(
                f"{r.batch:<12} {r.rows:>5}  {r.stage:<12} {r.max_abs_diff:>12.3e} "
                f"{r.max_rel_diff:>12.3e}  {labels}"
            )
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(
            f"reference: {self.reference}; tolerance {self.tolerance:g} on probabilities "
            f"(max abs diff), labels identical: {verdict}"
        )
        return "\n".join(lines)


class ParityError(ExportError):
    """Stages disagree beyond the tolerance; `.report` holds every figure."""

    def __init__(self, report: ParityReport):
        worst = ", ".join(
            f"{r.stage} on {r.batch}: max abs diff {r.max_abs_diff:.3e}"
            + ("" if r.labels_identical else ", labels differ")
            for r in report.failures()
        )
        super().__init__(f"parity failed (tolerance {report.tolerance:g}): {worst}")
        self.report = report


def torch_runner(module: nn.Module | torch.jit.ScriptModule) -> Runner:
    """A stage from an eval-mode module (plain or TorchScript) returning (probability, label)."""

    def run(batch: Batch) -> Outputs:
        with torch.no_grad():
            probability, label = module(torch.from_numpy(batch))
        return probability.numpy(), label.numpy()

    return run


def onnxruntime_runner(model: bytes) -> Runner:
    """A stage from a serialized ONNX model, run by ONNX Runtime on the CPU."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])

    def run(batch: Batch) -> Outputs:
        probability, label = session.run(None, {INPUT_NAME: batch})
        return np.asarray(probability), np.asarray(label)

    return run


def random_batches(
    means: Sequence[float],
    stds: Sequence[float],
    seed: int,
    sizes: Sequence[int] = BATCH_SIZES,
) -> dict[str, Batch]:
    """Rows drawn from N(mean, std) per feature, with NaNs (missing values) in some rows.

    Even-indexed rows lose about a fifth of their features (at least one); the last row of any
    batch larger than 2 is entirely missing, which exercises the imputation of every column.
    """
    rng = np.random.default_rng(seed)
    mean = np.asarray(means, dtype=np.float64)
    std = np.asarray(stds, dtype=np.float64)
    batches: dict[str, Batch] = {}
    for size in sizes:
        rows = mean + std * rng.standard_normal((size, mean.size))
        for index in range(0, size, 2):
            missing = rng.random(mean.size) < 0.2
            missing[rng.integers(mean.size)] = True
            rows[index, missing] = np.nan
        if size > 2:
            rows[-1, :] = np.nan
        batches[f"random_{size}"] = rows.astype(np.float32)
    return batches


def compare(
    reference: tuple[str, Runner],
    stages: Mapping[str, Runner],
    batches: Mapping[str, Batch],
    tolerance: float = TOLERANCE,
) -> ParityReport:
    """Run every stage on every batch and compare it with the reference (no raising)."""
    ref_name, ref_run = reference
    rows = []
    for batch_name, batch in batches.items():
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        expected = ref_run(batch)
        for stage, run in stages.items():
            rows.append(_compare_one(batch_name, len(batch), stage, expected, run(batch)))
    return ParityReport(ref_name, tolerance, tuple(rows))


def check_parity(
    reference: tuple[str, Runner],
    stages: Mapping[str, Runner],
    batches: Mapping[str, Batch],
    tolerance: float = TOLERANCE,
) -> ParityReport:
    """compare(), then raise ParityError with the numbers unless every row passed."""
    report = compare(reference, stages, batches, tolerance)
    if not report.passed:
        raise ParityError(report)
    return report


def _compare_one(
    batch: str, rows: int, stage: str, expected: Outputs, actual: Outputs
) -> ParityRow:
    (ref_prob, ref_label), (prob, label) = expected, actual
    if (
        ref_prob.shape != prob.shape
        or ref_label.shape != label.shape
        or ref_label.dtype != label.dtype
    ):
        return ParityRow(batch, rows, stage, float("inf"), float("inf"), False)
    ref64 = ref_prob.astype(np.float64)
    diff = np.abs(prob.astype(np.float64) - ref64)
    rel = diff / np.maximum(np.abs(ref64), REL_FLOOR)
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float(rel.max()) if rel.size else 0.0
    return ParityRow(batch, rows, stage, max_abs, max_rel, bool(np.array_equal(ref_label, label)))


def _worst(rows: Sequence[ParityRow], field: str) -> dict[str, float]:
    worst: dict[str, float] = {}
    for r in rows:
        value = float(getattr(r, field))
        worst[r.stage] = max(worst.get(r.stage, 0.0), value)
    return worst


__all__ = [
    "BATCH_SIZES",
    "REL_FLOOR",
    "TOLERANCE",
    "ParityError",
    "ParityReport",
    "ParityRow",
    "Runner",
    "check_parity",
    "compare",
    "onnxruntime_runner",
    "random_batches",
    "torch_runner",
]
