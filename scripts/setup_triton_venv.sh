#!/usr/bin/env bash
# Build the separate environment that holds the stock Triton clients for tests/test_interop.py.
#
#   scripts/setup_triton_venv.sh [VENV]   (default .venv-triton; relative to the repository root)
#
# Why a separate environment: tritonclient bundles its own stubs for the same `inference.*` message
# names as protos/, so the two cannot share one process (protobuf's descriptor pool rejects the
# second registration). perf_analyzer ships inside the tritonclient wheel (the PyPI package
# `perf-analyzer` is an empty placeholder); the binary links libb64.so.0d (Debian `libb64-0d`) and
# libcudart.so.12 (pip's nvidia-cuda-runtime-cu12) even for CPU-only runs. It is run through the
# wrapper VENV/bin/stablemlp-perf-analyzer, which sets LD_LIBRARY_PATH to the venv's CUDA runtime.
#
# Idempotent: a stamp file records what was installed; a second run only re-checks.
# Interpreter for the venv: $PYTHON (default python3). Needs root or sudo only if libb64 is missing.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${1:-.venv-triton}"
PYTHON="${PYTHON:-python3}"
# tritonclient 2.41.0 declares no protobuf requirement but imports it; its bundled stubs are old
# gencode, tested here with protobuf 6.33.
REQUIREMENTS=("tritonclient[all]==2.41.0" "protobuf<7" "nvidia-cuda-runtime-cu12")
STAMP="$VENV/.stablemlp-triton-stamp"
WRAPPER="$VENV/bin/stablemlp-perf-analyzer"

install_libb64() {
  if ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d'; then
    return
  fi
  local sudo=()
  if [[ "$(id -u)" -ne 0 ]]; then
    sudo=(sudo)
  fi
  export DEBIAN_FRONTEND=noninteractive
  # Only refresh the package lists when the package is not installable from the current ones.
  if ! "${sudo[@]}" apt-get install -y -q --no-install-recommends libb64-0d; then
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q --no-install-recommends libb64-0d
  fi
}

install_venv() {
  local wanted
  wanted="$(printf '%s\n' "${REQUIREMENTS[@]}")"
  if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$wanted" && -x "$WRAPPER" ]]; then
    return
  fi
  if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q "${REQUIREMENTS[@]}"

  local cudart
  cudart="$("$VENV/bin/python" -c \
    'import nvidia.cuda_runtime as m, os; print(os.path.join(list(m.__path__)[0], "lib"))')"
  cat > "$WRAPPER" <<WRAP
#!/usr/bin/env bash
# Written by scripts/setup_triton_venv.sh: perf_analyzer with the venv's CUDA runtime on the path.
export LD_LIBRARY_PATH="$cudart\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$(cd "$VENV/bin" && pwd)/perf_analyzer" "\$@"
WRAP
  chmod +x "$WRAPPER"
  printf '%s\n' "$wanted" > "$STAMP"
}

install_libb64
install_venv

"$VENV/bin/python" -c 'import tritonclient.grpc, google.protobuf as p; print("tritonclient ok, protobuf", p.__version__)'
"$WRAPPER" --version
echo "perf_analyzer: $WRAPPER"
