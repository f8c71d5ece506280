"""Triton's version policies: which of a model's published versions are loaded and served."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class VersionPolicy:
    """Triton's version policies: `latest:N` (the N highest), `all`, or `specific:1,3`."""

    kind: Literal["latest", "all", "specific"] = "latest"
    count: int = 1  # for `latest`
    versions: tuple[int, ...] = ()  # for `specific`

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        kind, _, arg = text.strip().partition(":")
        try:
            if kind == "latest":
                return cls("latest", count=int(arg or "1"))
            if kind == "all" and not arg:
                return cls("all")
            if kind == "specific":
                return cls("specific", versions=tuple(sorted({int(v) for v in arg.split(",")})))
        except ValueError:
            pass
        raise ValueError(f"version policy {text!r}: expected latest[:N], all or specific:V1,V2")

    def select(self, available: Sequence[int]) -> list[int]:
        """The versions this policy loads out of those present, highest first."""
        ordered = sorted(available, reverse=True)
        if self.kind == "latest":
            return ordered[: self.count]
        if self.kind == "all":
            return ordered
        return [v for v in ordered if v in self.versions]

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest:{self.count}"
        return "all" if self.kind == "all" else "specific:" + ",".join(map(str, self.versions))


__all__ = ["VersionPolicy"]
