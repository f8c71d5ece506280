# stablemlp — one place for the project's commands. `make run` is the main job, `make test` the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on this disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH := torch==2.13.0
RUN_DIR ?= runs/breast_cancer
REPOSITORY ?= model_repository
MODEL ?= breast_cancer
HOST ?= 127.0.0.1
PORT ?= 8001

.PHONY: install install-cuda run train export verify serve smoke lint typecheck protos protos-check triton-venv test test-kernels container-check gpu-check clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[train,dev]'
	touch $@

install: $(BIN)/.installed

# Serving on a GPU: onnxruntime and onnxruntime-gpu cannot share an environment.
install-cuda: install
	$(BIN)/pip uninstall -y -q onnxruntime
	$(BIN)/pip install -q onnxruntime-gpu

# The main job on the built-in data set: train -> export -> verify -> serve.
run: train export verify serve

train: install
	$(BIN)/stablemlp train --output $(RUN_DIR)

export: install
	$(BIN)/stablemlp export $(RUN_DIR) --repository $(REPOSITORY) --model $(MODEL)

verify: install
	$(BIN)/stablemlp verify $(REPOSITORY) --model $(MODEL)

serve: install
	$(BIN)/stablemlp serve --model-repository $(REPOSITORY) --host $(HOST) --port $(PORT)

# The export script end to end on a small budget (CI runs it).
smoke: install
	rm -rf .smoke
	$(BIN)/stablemlp train --epochs 5 --output .smoke/run --no-progress
	$(BIN)/stablemlp export .smoke/run --repository .smoke/repo
	$(BIN)/stablemlp verify .smoke/repo
	rm -rf .smoke

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile
	$(BIN)/shellcheck scripts/*.sh .ci/run

# mypy names modules by folder, so it checks a view of the checkout named `stablemlp` (a symlink
# under build/): the same module names as the installed package.
typecheck: install
	mkdir -p build/typecheck && ln -sfn ../.. build/typecheck/stablemlp
	cd build/typecheck && ../../$(BIN)/mypy --config-file ../../pyproject.toml \
		-p stablemlp.model -p stablemlp.export -p stablemlp.serving -p stablemlp.bench \
		-m stablemlp.cli -m stablemlp.files -m stablemlp.csvfile

protos: install
	PYTHON=$(BIN)/python bash scripts/gen_protos.sh

protos-check: install
	PYTHON=$(BIN)/python bash scripts/check_protos.sh

# tritonclient + perf_analyzer in their own venv: they need protobuf < 7 and register the same
# inference.* message names as our stubs, so they cannot share our process.
triton-venv:
	bash scripts/setup_triton_venv.sh .venv-triton

test: install lint typecheck protos-check triton-venv
	$(BIN)/pytest -q

# The numeric test modules again under each of torch's CPU kernel levels (ATEN_CPU_CAPABILITY; a
# level the processor lacks falls back to the best it has), so a tolerance that holds only for this
# machine's kernels fails here, not on a user's processor. pytest's header names the level in use.
NUMERIC_TESTS := tests/test_export.py tests/test_model.py tests/test_categorical.py \
	tests/test_tabular.py tests/test_diagnose.py
test-kernels: install
	for level in default avx2 avx512; do \
		ATEN_CPU_CAPABILITY=$$level $(BIN)/pytest $(NUMERIC_TESTS) || exit 1; \
	done

# Build the CPU image with podman from a debootstrap base, run it, check it, remove it.
container-check: install
	bash scripts/container_check.sh

# The CUDA provider proven on an NVIDIA GPU: its own venv (.venv-gpu, onnxruntime-gpu with pip's
# CUDA/cuDNN wheels), train, export, serve, compare and measure; bench/results/gpu/gpu_check.*.
gpu-check:
	PYTHON=$(PYTHON) bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) .smoke runs $(REPOSITORY) .pytest_cache .mypy_cache .ruff_cache
