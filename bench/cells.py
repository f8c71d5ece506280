"""The benchmark's grid: the model, content form, batch size, concurrency and lane of each cell."""

from __future__ import annotations

from dataclasses import dataclass, replace

FORMS = ("fp32_contents", "raw_input_contents")
NARROW_SHAPES = ((1, 1), (1, 8), (1, 32), (64, 8))  # (batch, concurrency), issue 5
WIDE_SHAPES = ((1, 1), (1, 8))
# A model with text columns (palmerpenguins' `species`, `island` as BYTES inputs), raw form.
TEXT_SHAPES = ((1, 8), (64, 8))
TEXT_FORM = "raw_input_contents"
# ModelStreamInfer at batch 1 (issue 14): (streams, requests in flight per stream), 8 in all, so
# each is read against the unary cell of the same concurrency.
STREAM_SHAPES = ((8, 1), (1, 8))
STREAM_FORM = "raw_input_contents"
PEER_FORM = "raw_input_contents"  # the peers are measured on the main model's unary raw cells


@dataclass(frozen=True)
class Cell:
    model: str
    form: str  # one of FORMS
    batch: int
    concurrency: int  # requests in flight in all
    streams: int = 0  # 0: unary ModelInfer calls; N: N ModelStreamInfer streams share them

    @property
    def key(self) -> str:
        base = f"{self.model}/{self.form}/b{self.batch}/c{self.concurrency}"
        return f"{base}/stream{self.streams}x{self.depth}" if self.streams else base

    @property
    def depth(self) -> int:
        """Requests in flight on each stream (the concurrency for a unary cell)."""
        return self.concurrency // max(1, self.streams)

    def unary(self) -> Cell:
        """The unary cell of the same model, form, batch and concurrency."""
        return replace(self, streams=0)


def build_grid(model: str, wide_model: str | None, text_model: str | None = None) -> list[Cell]:
    cells = [Cell(model, form, b, c) for form in FORMS for b, c in NARROW_SHAPES]
    if wide_model:
        cells += [Cell(wide_model, form, b, c) for form in FORMS for b, c in WIDE_SHAPES]
    if text_model:  # issue 13: what BYTES decoding and the category lookup cost
        cells += [Cell(text_model, TEXT_FORM, b, c) for b, c in TEXT_SHAPES]
    cells += [Cell(model, STREAM_FORM, 1, s * d, s) for s, d in STREAM_SHAPES]
    return cells


def is_peer_cell(cell: Cell, main_model: str) -> bool:
    return cell.model == main_model and cell.form == PEER_FORM and not cell.streams


__all__ = [
    "FORMS",
    "NARROW_SHAPES",
    "PEER_FORM",
    "STREAM_FORM",
    "STREAM_SHAPES",
    "TEXT_FORM",
    "TEXT_SHAPES",
    "WIDE_SHAPES",
    "Cell",
    "build_grid",
    "is_peer_cell",
]
