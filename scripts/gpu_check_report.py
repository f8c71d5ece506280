"""scripts/gpu_check.py's report: the machine's facts, then gpu_check.json and gpu_check.md.

Nothing machine-specific beyond what the report is for (GPU, driver, CPU model, versions):
absolute paths in recorded text are cut down to their last part before anything is written.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
FACT_TIMEOUT_S = 30.0
# An absolute path of two or more parts (not "<venv>/...", not inside a URL): kept to its tail.
_PATH = re.compile(r"(?<![\w.>~/:])/(?:[^\s/:'\"(),]+/)+")


def scrub(value: Any, named: dict[str, str]) -> Any:
    """`value` with known folders named (`<repo>`, `<venv>`, ...) and other paths cut short."""
    if isinstance(value, dict):
        return {key: scrub(item, named) for key, item in value.items()}
    if isinstance(value, list):
        return [scrub(item, named) for item in value]
    if not isinstance(value, str):
        return value
    for folder, name in sorted(named.items(), key=lambda kv: -len(kv[0])):
        value = value.replace(folder, name)
    return _PATH.sub(".../", value)


def known_folders(work: Path) -> dict[str, str]:
    return {
        str(work.resolve()): "<work>",
        str(ROOT): "<repo>",
        sys.prefix: "<venv>",
        tempfile.gettempdir(): "<tmp>",
        str(Path.home()): "~",
    }


def _command(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=FACT_TIMEOUT_S)
    if done.returncode != 0:
        raise OSError(f"{args[0]} exited {done.returncode}: {(done.stderr or done.stdout)[-300:]}")
    return done.stdout


def gpu_facts() -> dict[str, Any]:
    """nvidia-smi's view: each GPU's name, driver, memory; the CUDA version the driver supports."""
    if shutil.which("nvidia-smi") is None:
        return {"error": "nvidia-smi not found: no NVIDIA driver on this machine"}
    try:
        query = _command(
            "nvidia-smi",
            "--query-gpu=name,driver_version,memory.total",
            "--format=csv,noheader",
        )
        banner = _command("nvidia-smi")
    except (OSError, subprocess.TimeoutExpired) as err:
        return {"error": f"nvidia-smi: {err}"}
    gpus = []
    for line in query.strip().splitlines():
        name, driver, memory = (part.strip() for part in line.split(",", 2))
        gpus.append({"name": name, "driver": driver, "memory": memory})
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", banner)
    return {"gpus": gpus, "driver_cuda_version": cuda.group(1) if cuda else "unknown"}


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def software_facts() -> dict[str, Any]:
    """onnxruntime (which wheel, its providers), pip's CUDA/cuDNN wheels, torch, Python."""
    nvidia = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] or ""
        if name.lower().startswith("nvidia-"):
            nvidia[name] = dist.version
    wheels = {name: _version(name) for name in ("onnxruntime", "onnxruntime-gpu")}
    return {
        "onnxruntime": ort.__version__,
        "onnxruntime_wheels": {name: v for name, v in wheels.items() if v},
        "available_providers": ort.get_available_providers(),
        "cuda_wheels": dict(sorted(nvidia.items())),
        "torch": _version("torch"),
        "stablemlp": _version("stablemlp"),
        "python": platform.python_version(),
    }


def cpu_facts() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as stream:  # Linux only
        for line in stream:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"model": model, "cores": os.cpu_count(), "platform": platform.platform()}


# --- gpu_check.md ----------------------------------------------------------------------------
def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return [*lines, ""]


def verdict(passed: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "skipped"}[passed]


def _figure(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _throughput_rows(cells: list[dict[str, Any]]) -> list[list[Any]]:
    cpu = {
        (c["where"], c["batch"], c["concurrency"]): c["rows_per_s"]
        for c in cells
        if c["provider"] == "CPUExecutionProvider"
    }
    rows = []
    for c in cells:
        key = (c["where"], c["batch"], c["concurrency"])
        on_cpu = c["provider"] == "CPUExecutionProvider"
        shown = "" if on_cpu or key not in cpu else f"{c['rows_per_s'] / cpu[key]:.2f}"
        p50 = f"{c['p50_ms']:.3f}" if "p50_ms" in c else ""
        rows.append(
            [
                c["where"],
                c["provider"].removesuffix("ExecutionProvider"),
                c["batch"],
                c["concurrency"],
                c["requests_per_call"],
                _figure(c["calls_per_s"]),
                _figure(c["rows_per_s"]),
                p50,
                shown,
            ]
        )
    return rows


def markdown(report: dict[str, Any]) -> str:
    gpu, soft = report["machine"]["gpu"], report["software"]
    names = ", ".join(g["name"] for g in gpu.get("gpus", [])) or gpu.get("error", "none")
    lines = [
        f"# GPU check ({report['mode']} mode): {verdict(report['passed'])}",
        "",
        f"{report['started_utc']}, {report['wall_s']:.0f} s: `{report['command']}`",
        "",
    ]
    if report["mode"] == "cpu":
        lines += [f"> {report['note']}", ""]
    lines += ["## Machine", ""]
    lines += _table(
        ["GPU", "driver", "CUDA (driver)", "CPU", "onnxruntime", "providers available"],
        [
            [
                names,
                ", ".join(g["driver"] for g in gpu.get("gpus", [])),
                gpu.get("driver_cuda_version", ""),
                report["machine"]["cpu"]["model"],
                " ".join(f"{k} {v}" for k, v in soft["onnxruntime_wheels"].items()),
                ", ".join(soft["available_providers"]),
            ]
        ],
    )
    if soft["cuda_wheels"]:
        wheels = ", ".join(f"{k} {v}" for k, v in soft["cuda_wheels"].items())
        lines += [f"CUDA/cuDNN wheels: {wheels}.", ""]
    lines += ["## Checks", ""]
    lines += _table(
        ["check", "result", "detail"],
        [
            [c["name"], verdict(c["passed"]), c["detail"].replace("|", "/")]
            for c in report["checks"]
        ],
    )
    parity = report.get("parity", {})
    if parity.get("cases"):
        lines += [f"## Parity: {parity['subject']} (tolerance {parity['tolerance']:g})", ""]
        lines += _table(
            ["rows", "count", "requests", "against", "max abs diff", "labels"],
            [
                [
                    c["rows"],
                    c["count"],
                    c["requests"],
                    c["against"],
                    f"{c['max_abs_diff']:.2e}",
                    "identical" if c["labels_identical"] else "DIFFER",
                ]
                for c in parity["cases"]
            ],
        )
    cells = report.get("throughput", {}).get("cells", [])
    if cells:
        threads = report["throughput"]["intra_op_threads"]
        lines += ["## Throughput", ""]
        lines += [
            f"Each cell {report['throughput']['seconds_per_cell']} s at most, after warm-up calls;"
            f" ONNX Runtime intra-op threads: {threads}, in-process and in the servers. A served"
            " call of more rows than max_batch_size is sent as requests of max_batch_size rows.",
            "",
        ]
        lines += _table(
            [
                "where",
                "provider",
                "batch",
                "concurrency",
                "requests/call",
                "calls/s",
                "rows/s",
                "p50 ms",
                "CUDA / CPU rows/s",
            ],
            _throughput_rows(cells),
        )
    starts = report.get("startup", [])
    if starts:
        lines += ["## Start-up (process start to ready line / to health SERVING)", ""]
        lines += _table(
            ["server", "ready line s", "SERVING s"],
            [[s["server"], f"{s['ready_s']:.2f}", f"{s['serving_s']:.2f}"] for s in starts],
        )
    container = report.get("container", {})
    status = container.get("status") or ("failed" if "passed" in container else "not run")
    said = container.get("reason") or container.get("detail", "")
    lines += ["## Container (runtime-cuda image)", "", f"{status}: {said}"]
    return "\n".join([*lines, ""])


def write(report: dict[str, Any], output: Path) -> tuple[Path, Path]:
    output.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output / "gpu_check.json", output / "gpu_check.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(markdown(report), encoding="utf-8")
    return json_path, md_path
