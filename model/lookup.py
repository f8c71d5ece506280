"""Text -> category codes inside torch, so a torch-only user calls the model on raw text columns.

The exported TorchScript is `torch.jit.script` of these wrappers around the traced coded model.
TorchScript reads the annotations below at run time, which is why this module does without
`from __future__ import annotations` (it would turn them into strings TorchScript cannot resolve).
Text is compared exactly as given: strip surrounding whitespace first, as the server does.
"""

from collections.abc import Sequence

import torch
from torch import nn

from .categories import CategoricalColumn


class TextLookup(nn.Module):
    """One list of N strings per text column -> codes int64 [N, C] (CategoricalColumn.table)."""

    tables: list[dict[str, int]]
    others: list[int]

    def __init__(self, columns: Sequence[CategoricalColumn]):
        super().__init__()
        self.tables = [column.table() for column in columns]
        self.others = [column.other for column in columns]

    def forward(self, text: list[list[str]]) -> torch.Tensor:
        if len(text) != len(self.tables):
            raise ValueError("expected one list of strings per text column")
        rows = len(text[0])
        codes: list[list[int]] = []
        for j in range(len(self.tables)):
            if len(text[j]) != rows:
                raise ValueError("every text column needs the same number of rows")
            table = self.tables[j]
            other = self.others[j]
            codes.append([table.get(value, other) for value in text[j]])
        return torch.tensor(codes, dtype=torch.int64).reshape(len(codes), rows).t().contiguous()


class TextClassifier(nn.Module):
    """(features float32 [N, F] raw, NaN = missing; text: one list of N str per text column, in
    the manifest's order) -> (probability [N, 1] float32, label [N, 1] int64)."""

    def __init__(self, lookup: TextLookup, coded: nn.Module):
        super().__init__()
        self.lookup = lookup
        self.coded = coded

    def forward(
        self, features: torch.Tensor, text: list[list[str]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        codes = self.lookup(text)
        if codes.shape[0] != features.shape[0]:
            raise ValueError("features and text columns differ in their number of rows")
        probability, label = self.coded(features, codes)
        return probability, label


class TextOnlyClassifier(nn.Module):
    """A model without numeric columns: (text: one list of N str per text column) -> (probability
    [N, 1] float32, label [N, 1] int64)."""

    def __init__(self, lookup: TextLookup, coded: nn.Module):
        super().__init__()
        self.lookup = lookup
        self.coded = coded

    def forward(self, text: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        probability, label = self.coded(self.lookup(text))
        return probability, label


def with_lookup(
    coded: nn.Module, columns: Sequence[CategoricalColumn], numeric: bool
) -> TextClassifier | TextOnlyClassifier:
    """`coded` (numbers and codes in) behind a text lookup (numbers and text in)."""
    lookup = TextLookup(columns)
    return TextClassifier(lookup, coded) if numeric else TextOnlyClassifier(lookup, coded)


__all__ = ["TextClassifier", "TextLookup", "TextOnlyClassifier", "with_lookup"]
