"""A big CSV end to end (issue 22.4): reading it for training, training on it, scoring it with
`stablemlp predict --csv` against a real server; wall time and peak RSS of each step.

    python -m stablemlp.bench.csv_scale                       # 1,000,000 rows x 30 columns
    python -m stablemlp.bench.csv_scale --rows 20000 --epochs 1 --out bench/results/csv.json

The file (written to a temporary folder, removed afterwards unless --keep) holds what downloaded
files hold: a unique customer id, 22 numeric columns with missing cells, an integer count,
5 text columns, a yes/no target. Each step runs in a fresh process that reports its own peak RSS
(VmHWM, Linux), so one step's memory never hides another's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_write_bytes
from .servers import OUR_SERVER_ENV, our_server_command, start_server

NUMERIC = 22
TEXT = {
    "job": 12,
    "region": 5,
    "plan": 4,
    "channel": 6,
    "device": 9,
}  # column -> distinct values
WRITE_ROWS = 50_000


def write_csv(path: Path, rows: int, seed: int = 0) -> int:
    """The 30-column file, `WRITE_ROWS` rows at a time; returns its size in bytes."""
    rng = np.random.default_rng(seed)
    header = ["customer_id", *(f"x{i}" for i in range(NUMERIC)), "visits", *TEXT, "y"]
    weights = rng.normal(size=NUMERIC)
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write(",".join(header) + "\n")
        for start in range(0, rows, WRITE_ROWS):
            n = min(WRITE_ROWS, rows - start)
            x = rng.normal(size=(n, NUMERIC)).astype(np.float32)
            codes = {name: rng.integers(0, k, n) for name, k in TEXT.items()}
            logit = x @ weights / np.sqrt(NUMERIC) + 0.3 * (codes["plan"] - 1.5)
            y = rng.random(n) < 1 / (1 + np.exp(-logit))
            cells = np.char.mod("%.4f", x).astype(object)
            cells[rng.random((n, NUMERIC)) < 0.02] = ""  # missing cells
            visits = rng.poisson(3, n)
            lines = (
                ",".join(
                    (
                        f"C{start + i:08d}",
                        *cells[i],
                        str(visits[i]),
                        *(f"{name}_{codes[name][i]}" for name in TEXT),
                        "yes" if y[i] else "no",
                    )
                )
                for i in range(n)
            )
            out.write("\n".join(lines) + "\n")
    return path.stat().st_size


def _child(kind: str, args: list[str]) -> None:
    """In a fresh process: one step, then its JSON report (seconds, peak RSS) on the last line
    of stderr."""
    started = time.perf_counter()
    report: dict[str, Any] = {}
    if kind == "load":
        from ..model.csvdata import load_dataset

        before, started = _rss_mb("VmRSS"), time.perf_counter()  # after importing torch
        data = load_dataset(Path(args[0]), args[1], progress=False)
        report = {
            "rss_before_mb": before,
            "rows": len(data),
            "numeric": len(data.feature_names),
            "text": len(data.text_names),
            "notes": list(data.notes),
            "bytes": data.features.nbytes + data.text.nbytes + data.labels.nbytes,
        }
    else:
        from ..cli import main

        report["exit"] = main([kind, *args])
    report.update(seconds=round(time.perf_counter() - started, 2), peak_rss_mb=_rss_mb("VmHWM"))
    print(json.dumps(report), file=sys.stderr)


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def step(kind: str, *args: str) -> dict[str, Any]:
    """Run one step in a child process; its report, plus its stderr's last lines."""
    command = [sys.executable, "-m", "stablemlp.bench.csv_scale", "--child", kind, *args]
    done = subprocess.run(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False
    )
    lines = done.stderr.strip().splitlines()
    try:
        report: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}") from None
    report["stderr_tail"] = lines[-3:-1]
    report["command"] = " ".join(["stablemlp", kind, *args]) if kind != "load" else "load_dataset"
    print(f"{kind}: {json.dumps(report)}", flush=True)
    return report


def run(rows: int, epochs: int, batch_size: int, folder: Path) -> dict[str, Any]:
    path = folder / "big.csv"
    started = time.perf_counter()
    size = write_csv(path, rows)
    print(f"wrote {path} ({rows:,} rows x 30 columns, {size / 1e6:.0f} MB) in "
          f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
    report: dict[str, Any] = {"rows": rows, "columns": 30, "file_mb": round(size / 1e6, 1)}
    report["load"] = step("load", str(path), "y")
    run_dir, repository = folder / "run", folder / "repo"
    train = ["--csv", str(path), "--target", "y", "--epochs", str(epochs), "--no-progress"]
    train += ["--batch-size", str(batch_size), "--output", str(run_dir)]
    report["train"] = step("train", *train)
    report["export"] = step("export", str(run_dir), "--repository", str(repository))
    server = start_server("ours", our_server_command(repository), OUR_SERVER_ENV)
    try:
        report["predict"] = step("predict", "--server", server.address, "--csv", str(path))
    finally:
        server.stop()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1024, help="training batch size")
    parser.add_argument("--keep", type=Path, help="write the files here and keep them")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child[0], args.child[1:])
        return 0
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        report = run(args.rows, args.epochs, args.batch_size, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="csv_scale_") as folder:
            report = run(args.rows, args.epochs, args.batch_size, Path(folder))
    if args.out:
        atomic_write_bytes(args.out, json.dumps(report, indent=2).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
