"""stablemlp export: fold BatchNorm, write TorchScript + ONNX, prove parity, publish, verify.

Errors: the tree is drawn in export.errors; parity.ParityError (an ExportError) carries a report.
"""

from .cli import export_main, export_run, verify_main
from .documents import MAX_BATCH_SIZE, Release
from .errors import ContractError, ExportError, FoldError, PublishError, VerifyError
from .fold import batchnorm_layers, fold_batchnorm
from .formats import OPSET, check_onnx, load_torchscript, to_onnx, to_torchscript
from .front import attach_text_front
from .parity import TOLERANCE, ParityError, ParityReport, ParityRow, check_parity, compare
from .publish import next_version, publish, publish_version, versions
from .rows import parity_feeds
from .verify import Verified, verify_version

__all__ = [
    "MAX_BATCH_SIZE",
    "OPSET",
    "TOLERANCE",
    "ContractError",
    "ExportError",
    "FoldError",
    "ParityError",
    "ParityReport",
    "ParityRow",
    "PublishError",
    "Release",
    "Verified",
    "VerifyError",
    "attach_text_front",
    "batchnorm_layers",
    "check_onnx",
    "check_parity",
    "compare",
    "export_main",
    "export_run",
    "fold_batchnorm",
    "load_torchscript",
    "next_version",
    "parity_feeds",
    "publish",
    "publish_version",
    "to_onnx",
    "to_torchscript",
    "verify_main",
    "verify_version",
    "versions",
]
