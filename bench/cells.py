"""The benchmark's grid: the model, content form, batch size and concurrency of each cell."""

from __future__ import annotations

from dataclasses import dataclass

FORMS = ("fp32_contents", "raw_input_contents")
NARROW_SHAPES = ((1, 1), (1, 8), (1, 32), (64, 8))  # (batch, concurrency), issue 5
WIDE_SHAPES = ((1, 1), (1, 8))


@dataclass(frozen=True)
class Cell:
    model: str
    form: str  # one of FORMS
    batch: int
    concurrency: int

    @property
    def key(self) -> str:
        return f"{self.model}/{self.form}/b{self.batch}/c{self.concurrency}"


def build_grid(model: str, wide_model: str | None) -> list[Cell]:
    cells = [Cell(model, form, b, c) for form in FORMS for b, c in NARROW_SHAPES]
    if wide_model:
        cells += [Cell(wide_model, form, b, c) for form in FORMS for b, c in WIDE_SHAPES]
    return cells


__all__ = ["FORMS", "NARROW_SHAPES", "WIDE_SHAPES", "Cell", "build_grid"]
