#!/usr/bin/env bash
# Prove the CUDA execution provider on a real NVIDIA GPU, from a fresh clone:
#
#   scripts/gpu_check.sh [DRIVER OPTIONS]        (or `make gpu-check`)
#
# 1. a venv of its own ($GPU_VENV, default .venv-gpu) with the CPU build of torch (training only),
#    this package with its train extra, and onnxruntime-gpu with pip's CUDA and cuDNN wheels
#    (`onnxruntime-gpu[cuda,cudnn]`) at the version the Dockerfile pins (ONNXRUNTIME_GPU_VERSION);
#    onnxruntime and onnxruntime-gpu provide the same module, so the CPU wheel is removed first;
# 2. then one Python driver, scripts/gpu_check.py --device-kind cuda: train briefly, export, serve
#    with --device cuda, parity against the CPU provider, throughput on CUDA and CPU, the refusal
#    and fallback checks, the runtime-cuda image where podman can reach the GPU. It writes
#    bench/results/gpu/gpu_check.json and .md, and exits non-zero when a check fails.
#
# Options after the script name go to the driver (`python scripts/gpu_check.py --help`); a later
# `--device-kind cpu` runs the CPU-only mode. The venv is reused while a stamp of what was
# installed still matches. Needs only the package registries; pip's own variables apply, e.g.
# PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR to install from a folder of wheels.
# Settings: PYTHON (interpreter for the venv, default python3), GPU_VENV, GPU_VENV_ARGS (extra
# `python -m venv` flags: --system-site-packages reuses an image's torch and CUDA wheels),
# ORT_GPU_VERSION (default: the Dockerfile's), TORCH_SPEC (default torch==2.13.0), TORCH_INDEX_URL
# (empty: pip's configured index; PyPI's Linux torch is the CUDA build, PyTorch's CPU index
# serves the CPU one).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
GPU_VENV="${GPU_VENV:-.venv-gpu}"
read -r -a VENV_ARGS <<<"${GPU_VENV_ARGS:-}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"
ORT_GPU_VERSION="${ORT_GPU_VERSION:-$(sed -n 's/^ARG ONNXRUNTIME_GPU_VERSION=//p' Dockerfile)}"
PY="$GPU_VENV/bin/python"
STAMP="$GPU_VENV/.stablemlp-gpu-check-stamp"

log() { printf '[gpu-check] %s\n' "$*" >&2; }

[[ -n "$ORT_GPU_VERSION" ]] || { log "no ARG ONNXRUNTIME_GPU_VERSION in Dockerfile"; exit 1; }

wanted="$(printf '%s\n' "$("$PYTHON" -V 2>&1)" "${VENV_ARGS[*]}" "$TORCH_SPEC" "$TORCH_INDEX_URL" \
  "onnxruntime-gpu[cuda,cudnn]==$ORT_GPU_VERSION" "$(cksum <pyproject.toml)")"
if [[ -x "$PY" && -f "$STAMP" && "$(cat "$STAMP")" == "$wanted" ]]; then
  log "venv $GPU_VENV: up to date"
else
  install_start=$SECONDS
  rm -f "$STAMP"
  [[ -x "$PY" ]] || "$PYTHON" -m venv "${VENV_ARGS[@]}" "$GPU_VENV"
  "$PY" -m pip install -q "$TORCH_SPEC" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  "$PY" -m pip install -q -e '.[train]'
  # Both wheels own the `onnxruntime` folder: removing one after the other is installed would
  # take the other's files with it, so both go and onnxruntime-gpu comes back alone.
  "$PY" -m pip uninstall -y -q onnxruntime onnxruntime-gpu
  "$PY" -m pip install -q "onnxruntime-gpu[cuda,cudnn]==$ORT_GPU_VERSION"
  printf '%s\n' "$wanted" >"$STAMP"
  log "venv $GPU_VENV: installed in $((SECONDS - install_start)) s"
fi
"$PY" -c 'import onnxruntime as ort
print("[gpu-check] onnxruntime", ort.__version__, ort.get_available_providers())' >&2

# exec: the driver gets the signals itself and stops every server it started.
exec "$PY" scripts/gpu_check.py --device-kind cuda "$@"
