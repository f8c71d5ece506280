"""scripts/gpu_check.py's step 5: the runtime-cuda image, built with podman and run on the GPU.

Skipped, with the reason recorded, where podman is missing or broken, where it cannot reach the GPU
(no CDI specification for nvidia.com/gpu, which the NVIDIA Container Toolkit writes) or where the
base image is missing. Otherwise: build `--target runtime-cuda` from a copy of what the Dockerfile's
`source` stage takes plus the exported repository, run it on a free 127.0.0.1 port with
`--device nvidia.com/gpu=all`, wait for health SERVING, check that ModelConfig says KIND_GPU with
CUDA first and that its answers on the held-out rows match in-process CPU, then remove it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
from gpu_check_serving import ANSI, CheckError, describe, served, wait_serving
from gpu_check_steps import CPU, CUDA, TOLERANCE

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "localhost/stablemlp:gpu-check"
CDI_FOLDERS = (Path("/etc/cdi"), Path("/var/run/cdi"))
GPU_DEVICE = "nvidia.com/gpu=all"
IMAGE_PORT = 8001  # the image's STABLEMLP_PORT
PODMAN_TIMEOUT_S = 60.0
WATCH_S = 5.0  # a health watch at a time, between looks at whether the container still runs


def podman(*args: str, timeout_s: float = PODMAN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout_s)


def _tail(done: subprocess.CompletedProcess[str], lines: int = 5) -> str:
    text = ANSI.sub("", done.stdout + done.stderr)
    return " / ".join(line for line in text.strip().splitlines()[-lines:] if line.strip())


def blocker(base_image: str) -> str:
    """Why the image cannot be built and run on the GPU here; "" when nothing stands in the way."""
    if shutil.which("podman") is None:
        return "podman not found on PATH"
    info = podman("info")
    if info.returncode != 0:
        return f"podman info failed: {_tail(info, 2)}"
    specs = [
        path
        for folder in CDI_FOLDERS
        if folder.is_dir()
        for path in folder.iterdir()
        if path.suffix in {".yaml", ".yml", ".json"}
    ]
    if not any("nvidia.com/gpu" in path.read_text(errors="replace") for path in specs):
        return (
            "podman cannot reach the GPU: no CDI specification for nvidia.com/gpu in /etc/cdi or "
            "/var/run/cdi (NVIDIA Container Toolkit: nvidia-ctk cdi generate "
            "--output=/etc/cdi/nvidia.yaml)"
        )
    if base_image.startswith("localhost/") and podman("image", "exists", base_image).returncode:
        return (
            f"base image {base_image} missing: scripts/container_check.sh makes it with "
            "debootstrap, or pass --base-image"
        )
    return ""


def dockerfile_sources() -> list[str]:
    """What the Dockerfile's `source` stage copies (COPY ... /src/...), read from the Dockerfile."""
    names: list[str] = []
    for line in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and "--from" not in line and words[-1].startswith("/src/"):
            names += [word.rstrip("/") for word in words[1:-1]]
    return names


def build(args: argparse.Namespace, repository: Path) -> float:
    """Builds IMAGE from a fresh context under --work; seconds it took."""
    context = args.work / "image-context"
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir(parents=True)
    for name in [*dockerfile_sources(), "Dockerfile"]:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, context / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, context / name)
    shutil.copytree(repository, context / "model_repository")
    ca = os.environ.get("PIP_CERT", "")  # pip inside the build trusts what pip here trusts
    if not (ca and Path(ca).is_file()):
        ca = str(args.work / "no-ca.pem")
        Path(ca).write_text("", encoding="utf-8")
    started = time.perf_counter()
    settings = [f"BASE_IMAGE={args.base_image}", "MODEL_SOURCE=context"]
    settings += ["MODEL_REPOSITORY=model_repository"]
    command = ["build", "--format", "docker", "--target", "runtime-cuda"]
    command += ["--secret", f"id=pip_ca,src={ca}", "-t", IMAGE]
    command += [word for setting in settings for word in ("--build-arg", setting)]
    done = podman(*command, str(context), timeout_s=args.container_timeout)
    if done.returncode != 0:
        raise CheckError(f"podman build failed: {_tail(done)}")
    return time.perf_counter() - started


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_serving(name: str, address: str, timeout_s: float) -> None:
    """Health SERVING within timeout_s; fails at once when the container has stopped."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return wait_serving(address, min(WATCH_S, max(deadline - time.monotonic(), 0.1)))
        except CheckError:
            state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            if state != "running":
                raise CheckError(f"the container is {state or 'gone'}, not SERVING") from None
            if time.monotonic() >= deadline:
                raise


def run_image(args: argparse.Namespace, run: Any, name: str) -> dict[str, Any]:
    """Runs IMAGE on the GPU; what ModelConfig said and how its answers compare."""
    port = free_port()
    started = time.perf_counter()
    # label=disable: SELinux hosts refuse the CDI device nodes otherwise (NVIDIA's podman guide)
    command = ["run", "-d", "--name", name, "--device", GPU_DEVICE, "--security-opt=label=disable"]
    command += ["-p", f"127.0.0.1:{port}:{IMAGE_PORT}", "-e", "STABLEMLP_METRICS_PORT=-1", IMAGE]
    done = podman(*command)
    if done.returncode != 0:
        raise CheckError(f"podman run failed: {_tail(done)}")
    address = f"127.0.0.1:{port}"
    wait_until_serving(name, address, args.start_timeout)
    serving_s = time.perf_counter() - started
    config = describe(address, run.model)
    got = served(address, run.model, run.heldout)
    want = run.session(CPU).run(["probability", "label"], {config["input"]: run.heldout})
    worst = float(np.max(np.abs(got[0] - want[0].reshape(-1))))
    same = bool(np.array_equal(got[1], want[1].reshape(-1)))
    return {
        "serving_s": round(serving_s, 2),
        **config,
        "max_abs_diff": worst,
        "labels_identical": same,
    }


def check(args: argparse.Namespace, repository: Path, run: Any) -> dict[str, Any]:
    """The report section: status passed | failed | skipped, with the reason or the figures."""
    why = blocker(args.base_image)
    if why:
        return {"status": "skipped", "reason": why, "passed": None, "detail": why}
    build_s = build(args, repository)
    name = f"stablemlp-gpu-check-{os.getpid()}"
    try:
        result = run_image(args, run, name)
    except Exception as err:  # the container's own log says more than the client's error
        logs = _tail(podman("logs", "--tail", "10", name), 10)
        raise CheckError(f"built in {build_s:.0f} s; {err}; container log: {logs}") from None
    finally:
        podman("stop", "-t", "15", name)
        podman("rm", "-f", name)
    size = podman("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout.strip()
    passed = (
        result["kind"] == "KIND_GPU"
        and result["providers"][:1] == [CUDA]
        and result["max_abs_diff"] <= TOLERANCE
        and result["labels_identical"]
    )
    detail = f"built in {build_s:.0f} s ({int(size or 0) / 1e9:.2f} GB); SERVING after "
    detail += f"{result['serving_s']} s; {result['kind']}, {','.join(result['providers'])}; "
    detail += f"held-out rows: max abs diff {result['max_abs_diff']:.2e}, labels "
    detail += "identical" if result["labels_identical"] else "DIFFER"
    return {
        "status": "passed" if passed else "failed",
        "build_s": round(build_s, 1),
        "image_bytes": int(size or 0),
        **result,
        "passed": passed,
        "detail": detail,
    }
