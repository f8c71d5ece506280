"""`stablemlp export RUN_DIR --repository REPO` and `stablemlp verify REPO`.

export: checkpoint -> fold BatchNorm -> TorchScript + ONNX -> parity proof -> new repository
version. Nothing is written unless every stage agrees with the eval model.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from ..model.checkpoint import CHECKPOINT_NAME, Checkpoint, load_checkpoint
from ..model.cli import TEST_SPLIT_NAME
from ..model.lookup import with_lookup
from ..model.preprocess import build_classifier
from .documents import Release
from .errors import ExportError
from .fold import fold_batchnorm
from .formats import load_torchscript, to_onnx, to_torchscript
from .front import attach_text_front
from .parity import ParityError, ParityReport, check_parity, onnxruntime_runner, torch_runner
from .publish import check_model_name, publish
from .rows import Feeds, parity_feeds, random_batches, split_feeds
from .verify import select, verify_version

log = logging.getLogger(__name__)

# Rows drawn from the feature statistics when the run folder has no saved test split.
FALLBACK_ROWS = 256
# At most this many held-out rows enter the parity proof: four runners over 200k rows (a
# million-row CSV's validation split) held 2.2 GB; 10,000 real rows prove the same.
PARITY_ROWS = 10_000


def parity_batches(
    checkpoint: Checkpoint, heldout: tuple[NDArray[Any], NDArray[Any], list[str]] | None
) -> dict[str, Feeds]:
    """The held-out rows (raw: NaNs, text as read) plus random batches of 1, 7 and 1024 rows
    (text with unseen values and missing markers) and a batch of extreme finite values; without
    held-out rows, FALLBACK_ROWS random rows in their place."""
    schema = checkpoint.schema
    batches = parity_feeds(schema.means, schema.stds, schema.categorical, seed=checkpoint.seed)
    if heldout is not None:
        features, text, names = heldout
        features, text = features[:PARITY_ROWS], text[:PARITY_ROWS]
        if features.ndim != 2 or features.shape[1] != len(schema.names):
            raise ExportError(f"held-out rows {features.shape} do not match the checkpoint")
        if names != [*schema.text_names]:
            raise ExportError(f"held-out text columns {names} do not match the checkpoint")
        return {"test": split_feeds(features, text, names), **batches}
    fallback = parity_feeds(
        schema.means, schema.stds, schema.categorical, checkpoint.seed + 1, (FALLBACK_ROWS,)
    )
    return {f"random_{FALLBACK_ROWS}": fallback[f"random_{FALLBACK_ROWS}"], **batches}


def read_heldout(run_dir: Path) -> tuple[NDArray[Any], NDArray[Any], list[str]] | None:
    """The held-out rows `stablemlp train` saved in RUN_DIR, or None (with a warning)."""
    path = run_dir / TEST_SPLIT_NAME
    if not path.is_file():
        log.warning("%s not found: parity uses %d random rows instead", path, FALLBACK_ROWS)
        return None
    with np.load(path, allow_pickle=False) as saved:
        features = np.asarray(saved["features"], dtype=np.float32)
        text = saved["text"] if "text" in saved else np.empty((len(features), 0), dtype=str)
        names = [str(n) for n in saved["text_names"]] if "text_names" in saved else []
    return features, text, names


def build_release(checkpoint: Checkpoint, name: str, batches: dict[str, Feeds]) -> Release:
    """Fold, export both formats, and prove parity; raises ParityError with the numbers."""
    schema = checkpoint.schema
    mean, std = torch.tensor(schema.means), torch.tensor(schema.stds)
    net = checkpoint.build_model()
    threshold, encoding = checkpoint.threshold, checkpoint.numeric
    reference = build_classifier(net, mean, std, threshold, encoding).eval()
    folded = build_classifier(fold_batchnorm(net), mean, std, threshold, encoding).eval()
    example = _example(checkpoint)
    columns, text = schema.categorical, schema.text_names
    torchscript = to_torchscript(folded, example, columns)
    onnx_model = to_onnx(folded, example)
    if columns:
        onnx_model = attach_text_front(onnx_model, columns)
    numeric = bool(schema.names)
    raw = (lambda m: with_lookup(m, columns, numeric)) if columns else (lambda m: m)
    report = check_parity(
        ("eval", torch_runner(raw(reference), text)),
        {
            "folded": torch_runner(raw(folded), text),
            "torchscript": torch_runner(load_torchscript(torchscript), text),
            "onnxruntime": onnxruntime_runner(onnx_model.SerializeToString()),
        },
        batches,
    )
    return Release(
        model_name=name,
        feature_names=schema.names,
        feature_means=schema.means,
        feature_stds=schema.stds,
        threshold=checkpoint.threshold,
        metrics=checkpoint.metrics,
        onnx_model=onnx_model,
        torchscript=torchscript,
        parity=report,
        columns=tuple(schema.describe()),
        target=schema.target,
        positive_class=schema.positive_class,
        encoding=checkpoint.encoder.kind if checkpoint.encoder is not None else "",
    )


def _example(checkpoint: Checkpoint) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """4 rows to trace and export on (torch.export would specialize a batch dimension of 1):
    the numeric block, and with text columns the codes, every code below its column's slots."""
    schema = checkpoint.schema
    numeric = torch.from_numpy(random_batches(schema.means, schema.stds, 0, (4,))["random_4"])
    if not schema.categorical:
        return numeric
    slots = torch.tensor([column.slots for column in schema.categorical])
    codes = torch.arange(4).unsqueeze(1) % slots
    return (numeric, codes) if schema.names else (codes,)


def read_checkpoint(path: Path) -> Checkpoint:
    """load_checkpoint with its failures turned into one-line ExportErrors."""
    if not path.is_file():
        raise ExportError(f"{path}: no checkpoint (write one with `stablemlp train --output DIR`)")
    try:
        return load_checkpoint(path)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, KeyError) as err:
        first = (str(err).splitlines() or [""])[0][:120]  # torch's messages run to paragraphs
        raise ExportError(
            f"{path}: not a readable stablemlp checkpoint ({type(err).__name__}: {first})"
        ) from err


def export_checkpoint(
    checkpoint: Checkpoint,
    heldout: tuple[NDArray[Any], NDArray[Any], list[str]] | None,
    repository: Path,
    model_name: str | None = None,
) -> tuple[Path, ParityReport]:
    """Publish `checkpoint` as a new version of REPO/<model>; returns (dir, parity report)."""
    name = check_model_name(model_name or checkpoint.model_name)
    if not 0.0 <= checkpoint.threshold <= 1.0:  # also NaN: serving refuses such a version
        raise ExportError(
            f"threshold {checkpoint.threshold!r}: expected a probability in [0, 1] (retrain with "
            "--threshold)"
        )
    release = build_release(checkpoint, name, parity_batches(checkpoint, heldout))
    return publish(repository, release), release.parity


def export_run(
    run_dir: Path, repository: Path, model_name: str | None = None
) -> tuple[Path, ParityReport]:
    """Export RUN_DIR/checkpoint.pt into a new version of REPO/<model>; returns (dir, report)."""
    checkpoint = read_checkpoint(run_dir / CHECKPOINT_NAME)
    return export_checkpoint(checkpoint, read_heldout(run_dir), repository, model_name)


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stablemlp export",
        description="Fold BatchNorm, write TorchScript (model.pt) and ONNX (model.onnx) with the "
        "preprocessing inside, prove parity (eval = folded = TorchScript = ONNX Runtime on the "
        "saved test split and on batches of 1, 7 and 1024 rows with NaNs), then publish "
        "REPOSITORY/<model>/<next version>/. Nothing is written if any check fails.",
    )
    parser.add_argument("run_dir", type=Path, help="folder written by `stablemlp train`")
    parser.add_argument("--repository", type=Path, required=True, help="model repository root")
    parser.add_argument("--model", help="model name (default: the checkpoint's)")
    return parser


def verify_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stablemlp verify",
        description="Re-check published versions: sha256 of every file against manifest.json, "
        "ONNX checker, no BatchNorm node, TorchScript loads, ONNX Runtime vs TorchScript parity "
        "on random rows (feature statistics from the ONNX metadata, some NaN) in batches of "
        "1, 7 and 1024.",
    )
    parser.add_argument("repository", type=Path, help="model repository root")
    parser.add_argument("--model", help="only this model (default: every model)")
    parser.add_argument("--version", type=int, help="this version (default: the newest)")
    return parser


def export_main(argv: list[str] | None = None) -> int:
    args = export_parser().parse_args(argv)
    try:
        version_dir, report = export_run(args.run_dir, args.repository, args.model)
    except ParityError as err:
        print(err.report.table())
        return _fail("export", err)
    except (ExportError, OSError) as err:
        return _fail("export", err)
    print(report.table())
    sizes = ", ".join(f"{p.name} {p.stat().st_size:,} B" for p in sorted(version_dir.iterdir()))
    print(f"published {version_dir} ({sizes})")
    return 0


def verify_main(argv: list[str] | None = None) -> int:
    args = verify_parser().parse_args(argv)
    try:
        targets = select(args.repository, args.model, args.version)
    except ExportError as err:
        return _fail("verify", err)
    failed = 0
    for name, version in targets:
        try:
            verified = verify_version(args.repository, name, version)
        except ParityError as err:
            print(err.report.table())
            failed += _fail("verify", f"{name}/{version}: {err}")
            continue
        except (ExportError, OSError, RuntimeError) as err:  # RuntimeError: ORT load errors
            failed += _fail("verify", f"{name}/{version}: {err}")
            continue
        worst = max(verified.parity.max_abs_diff().values())
        print(
            f"OK {name}/{version}: {verified.files} sha256 match, onnx checker, no BatchNorm, "
            f"TorchScript loads, ORT vs TorchScript max abs diff {worst:.2e} "
            f"(tolerance {verified.parity.tolerance:g}), labels identical"
        )
    return 1 if failed else 0


def _fail(command: str, err: object) -> int:
    log.debug("%s failed", command, exc_info=True)  # the traceback, at STABLEMLP_LOG_LEVEL=DEBUG
    print(f"stablemlp {command}: error: {err}", file=sys.stderr)
    return 1


__all__ = [
    "FALLBACK_ROWS",
    "PARITY_ROWS",
    "build_release",
    "export_checkpoint",
    "export_main",
    "export_parser",
    "export_run",
    "parity_batches",
    "read_checkpoint",
    "verify_main",
    "verify_parser",
]
