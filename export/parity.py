"""Parity proof: every exported stage gives the reference's probabilities and labels.

A stage is anything that maps a batch of raw inputs to (probability [N,1], label [N,1]): the eval
model, the folded model, the loaded TorchScript, an ONNX Runtime session. A batch is a dict of
input name -> array (export.rows), or for an all-numeric model just the float32 [N, F] array. A
failed check raises ParityError carrying the full report, so callers print the numbers and
publish nothing.
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
from .rows import BATCH_SIZES, Batch, Feeds, random_batches, rows_of

# Max abs difference allowed on probabilities between any stage and the reference; labels must be
# identical. Float32 reassociation after folding moves probabilities by ~1e-7; 1e-5 leaves 100x
# headroom yet catches any real weight or preprocessing change.
TOLERANCE = 1e-5
# Relative differences divide by max(|reference|, REL_FLOOR), so probabilities near 0 do not
# turn a 1e-9 absolute wobble into a huge relative figure. Reported only, not gated.
REL_FLOOR = 1e-6

Outputs = tuple[NDArray[Any], NDArray[Any]]
Runner = Callable[[Feeds], Outputs]


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


def torch_runner(
    module: nn.Module | torch.jit.ScriptModule, text_columns: Sequence[str] = ()
) -> Runner:
    """A stage from an eval-mode module (plain or TorchScript) returning (probability, label).

    It is called with the features tensor (when the batch has one), then, for `text_columns`,
    one list of str per column (model.lookup's TextClassifier).
    """

    def run(feeds: Feeds) -> Outputs:
        args: list[Any] = []
        if INPUT_NAME in feeds:
            args.append(torch.from_numpy(feeds[INPUT_NAME]))
        if text_columns:
            args.append([[str(v) for v in feeds[name][:, 0]] for name in text_columns])
        with torch.no_grad():
            probability, label = module(*args)
        return probability.numpy(), label.numpy()

    return run


def onnxruntime_runner(model: bytes) -> Runner:
    """A stage from a serialized ONNX model, run by ONNX Runtime on the CPU."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])

    def run(feeds: Feeds) -> Outputs:
        probability, label = session.run(None, dict(feeds))
        return np.asarray(probability), np.asarray(label)

    return run


def as_feeds(batch: Batch | Feeds) -> dict[str, NDArray[Any]]:
    """The batch as input name -> array; a bare array is the `features` input."""
    feeds = {INPUT_NAME: batch} if isinstance(batch, np.ndarray) else dict(batch)
    if INPUT_NAME in feeds:
        feeds[INPUT_NAME] = np.ascontiguousarray(feeds[INPUT_NAME], dtype=np.float32)
    return feeds


def compare(
    reference: tuple[str, Runner],
    stages: Mapping[str, Runner],
    batches: Mapping[str, Batch | Feeds],
    tolerance: float = TOLERANCE,
) -> ParityReport:
    """Run every stage on every batch and compare it with the reference (no raising)."""
    ref_name, ref_run = reference
    rows = []
    for batch_name, batch in batches.items():
        feeds = as_feeds(batch)
        expected = ref_run(feeds)
        for stage, run in stages.items():
            rows.append(_compare_one(batch_name, rows_of(feeds), stage, expected, run(feeds)))
    return ParityReport(ref_name, tolerance, tuple(rows))


def check_parity(
    reference: tuple[str, Runner],
    stages: Mapping[str, Runner],
    batches: Mapping[str, Batch | Feeds],
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
    "as_feeds",
    "check_parity",
    "compare",
    "onnxruntime_runner",
    "random_batches",
    "torch_runner",
]
