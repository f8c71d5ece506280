# stablemlp serving image: the KServe v2 server (gRPC 8001, REST 8000) with one model repository
# baked in.
#
#   docker build -t stablemlp .                                      # train + export in the build
#   docker build --build-arg MODEL_SOURCE=context -t stablemlp .     # ./model_repository instead
#   docker build --target runtime-cuda -t stablemlp:cuda .           # onnxruntime-gpu, cuda
#
# Stages: python (base image + venv tooling) -> venv | venv-cuda (serving install, no torch);
# models-train | models-context -> models (the repository); runtime-base -> runtime-cuda, runtime
# (the default target, last). scripts/container_check.sh builds and exercises it with podman.
# No `# syntax=` line on purpose: BuildKit would fetch that frontend from a registry.

# Any Debian-based image with python3 >= 3.11 (or able to apt-get it): a local base works too.
ARG BASE_IMAGE=python:3.11-slim
# train: train on the built-in data and export, in the build (~3 min, a 5.6 GB throwaway stage
# with pip's default torch wheel); context: copy MODEL_REPOSITORY from the build context instead.
# With podman/buildah 1.28 (Debian 12) pass it explicitly (--build-arg MODEL_SOURCE=train): that
# version skips stages named through an ARG's default value.
ARG MODEL_SOURCE=train

FROM ${BASE_IMAGE} AS python
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# python:*-slim has python3 and venv already; a bare Debian base gets them from apt. No package
# versions (DL3008): the base image's tag pins the Debian release, and with it these packages.
# hadolint ignore=DL3008
RUN if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && apt-get clean \
        && rm -rf /var/lib/apt/lists/*; \
    fi
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# What `pip install .` needs, and nothing else of the build context.
FROM scratch AS source
COPY pyproject.toml README.md __init__.py __main__.py cli.py files.py csvfile.py /src/
COPY model/ /src/model/
COPY export/ /src/export/
COPY serving/ /src/serving/
COPY protos/ /src/protos/
COPY bench/ /src/bench/

# ---------------------------------------------------------------------------------------------
# The serving install: the package with its base dependencies only (onnxruntime, grpcio, numpy,
# protobuf, prometheus-client); torch belongs to the `train` extra and is not installed.
# pip_ca is an optional CA bundle secret for builds behind a TLS-intercepting proxy: it is read
# during the RUN only and never lands in a layer. pip and setuptools are dropped from
# the final venv, and so is stablemlp.bench: the wheel carries the benchmarks for those who run
# them (load generators, peer harnesses), a server has no use for them; `stablemlp bench` in the
# image says it is not installed.
FROM python AS venv
COPY --from=source /src /src
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install /src \
    && rm -r /opt/venv/lib/python3*/site-packages/stablemlp/bench \
    && /opt/venv/bin/pip uninstall -y setuptools pip

# onnxruntime-gpu in place of onnxruntime (both provide the `onnxruntime` module, so only one may
# be installed), with pip's CUDA runtime and cuDNN wheels through its `cuda,cudnn` extras.
# 1.31.x is built for CUDA 13 and cuDNN 9: the host needs a driver that supports CUDA 13.
FROM python AS venv-cuda
ARG ONNXRUNTIME_GPU_VERSION=1.31.1
COPY --from=source /src /src
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install /src \
    && /opt/venv/bin/pip uninstall -y onnxruntime \
    && /opt/venv/bin/pip install "onnxruntime-gpu[cuda,cudnn]==${ONNXRUNTIME_GPU_VERSION}" \
    && rm -r /opt/venv/lib/python3*/site-packages/stablemlp/bench \
    && /opt/venv/bin/pip uninstall -y setuptools pip

# ---------------------------------------------------------------------------------------------
# Model repository, way 1 (default): train on the built-in data and export inside the build,
# with the `train` extra in a throwaway venv. TORCH_INDEX_URL picks torch's wheel index: empty
# means pip's default index, whose Linux wheel is the CUDA build (~2.7 GB of wheels); PyTorch's
# CPU-only index serves a ~0.2 GB one. Only /models of this stage reaches the image.
FROM python AS models-train
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
ARG TRAIN_ARGS="--seed 0 --no-progress"
COPY --from=source /src /src
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && python3 -m venv /opt/train \
    && /opt/train/bin/pip install "torch==${TORCH_VERSION}" \
        ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
    && /opt/train/bin/pip install "/src[train]"
# TRAIN_ARGS is split into words on purpose, e.g. "--epochs 50 --seed 1".
# hadolint ignore=SC2086
RUN /opt/train/bin/stablemlp train ${TRAIN_ARGS} --output /tmp/run \
    && /opt/train/bin/stablemlp export /tmp/run --repository /models

# Model repository, way 2: a folder of the build context in Triton's layout
# (REPO/<model>/config.pbtxt, REPO/<model>/<version>/model.onnx, ...), made on the host with
# `stablemlp train --output RUN && stablemlp export RUN --repository model_repository`.
FROM scratch AS models-context
ARG MODEL_REPOSITORY=model_repository
COPY ${MODEL_REPOSITORY}/ /models/

# A stage name chosen by MODEL_SOURCE, not an image: there is no tag to pin (DL3006).
# hadolint ignore=DL3006
FROM models-${MODEL_SOURCE} AS models

# ---------------------------------------------------------------------------------------------
# Runtime: the venv, the model repository (root-owned, so read-only to the server) and a numeric
# non-root user; no torch, compilers or pip. The repository sits at /mnt/models, where KServe mounts
# an InferenceService's storageUri (over it, replacing it) and where the server looks when
# STABLEMLP_MODEL_REPOSITORY is not set. Every server setting is a STABLEMLP_* variable
# (`stablemlp serve --help` lists them); arguments after the image name are extra flags.
FROM python AS runtime-base
RUN groupadd --system --gid 10001 stablemlp \
    && useradd --no-log-init --system --uid 10001 --gid 10001 --no-create-home stablemlp
# An empty, root-owned working directory: a relative path names nothing the server could read
# (without one it is `/`, and ONNX Runtime resolves a graph's relative external data location
# against it; serving/runtime/graph_files.py refuses such graphs before that).
WORKDIR /srv/stablemlp
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    STABLEMLP_HOST=0.0.0.0 \
    STABLEMLP_PORT=8001 \
    STABLEMLP_HTTP_PORT=8000 \
    STABLEMLP_METRICS_PORT=8002 \
    STABLEMLP_DEVICE=cpu \
    STABLEMLP_GRACE_PERIOD_S=5 \
    ORT_DISABLE_TELEMETRY=1
# ORT_DISABLE_TELEMETRY: ONNX Runtime >= 1.29 sends usage telemetry from Linux too and, with no
# writable home, warns on every start. A server should open no connection it was not asked to.
# Triton's ports: REST (KServe v2 over HTTP), gRPC, Prometheus metrics.
EXPOSE 8000 8001 8002
# On SIGTERM the server turns health NOT_SERVING and lets in-flight calls finish for
# STABLEMLP_GRACE_PERIOD_S: stop timeouts (docker stop -t, terminationGracePeriodSeconds) must
# be longer; deploy/ uses 15 s.
STOPSIGNAL SIGTERM
# Asks grpc.health.v1 whether the inference service is SERVING (every model loaded and warmed;
# NOT_SERVING while draining), with the venv's grpcio: nothing is downloaded for it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, grpc; from grpc_health.v1 import health_pb2, health_pb2_grpc; \
        channel = grpc.insecure_channel('127.0.0.1:' + os.environ['STABLEMLP_PORT']); \
        request = health_pb2.HealthCheckRequest(service='inference.GRPCInferenceService'); \
        reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=2); \
        raise SystemExit(reply.status != health_pb2.HealthCheckResponse.SERVING)"]
ENTRYPOINT ["stablemlp", "serve"]

FROM runtime-base AS runtime-cuda
COPY --from=venv-cuda /opt/venv /opt/venv
COPY --from=models /models /mnt/models
# onnxruntime's CUDA provider links libcudart, libcublas, libcudnn... by soname without a RUNPATH:
# register the pip wheels' lib folders with the loader. libcuda.so.1 comes from the host driver
# (NVIDIA container toolkit: docker run --gpus all / podman run --device nvidia.com/gpu=all).
RUN find /opt/venv/lib -path '*/site-packages/nvidia/*' -name lib -type d \
        > /etc/ld.so.conf.d/zz-nvidia-pip.conf \
    && ldconfig
ENV STABLEMLP_DEVICE=cuda
USER 10001:10001

FROM runtime-base AS runtime
COPY --from=venv /opt/venv /opt/venv
COPY --from=models /models /mnt/models
USER 10001:10001
