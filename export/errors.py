"""The export package's exceptions, in one tree.

ExportError                 anything that stops a model from being exported or verified
├── FoldError               a BatchNorm that cannot be folded into a preceding Linear
├── ContractError           an artifact breaks the graph contract (names, dtypes, BN left, ...)
├── ParityError             formats disagree beyond the tolerance; carries the report
├── PublishError            the repository could not take a new version
└── VerifyError             a published version fails a check (hash, checker, parity, ...)
"""

from __future__ import annotations


class ExportError(RuntimeError):
    """Base class: exporting or verifying a model failed; the message says what and where."""


class FoldError(ExportError):
    """A BatchNorm layer cannot be folded (no Linear right before it, or no running statistics)."""


class ContractError(ExportError):
    """An exported artifact does not match the graph contract."""


class PublishError(ExportError):
    """No new version could be written to the model repository."""


class VerifyError(ExportError):
    """A published version failed verification."""


__all__ = ["ContractError", "ExportError", "FoldError", "PublishError", "VerifyError"]
