# The few targets people type. Everything installs into .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# On a machine without an NVIDIA GPU, install the CPU build of torch first so that the
# dependency `torch>=2.6` is already met and no CUDA packages are pulled in. With a GPU,
# pip picks the default (CUDA) build.
CPU_TORCH ?= torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)

.PHONY: install demo test test-fast lint format clean bench-data bench-train bench-scale bench-plan bench-eval gpu-check gpu-wheels

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifneq ($(HAS_GPU),yes)
	$(PY) -m pip install -q "$(CPU_TORCH)"
endif
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

models/tiny/config.json: | install
	$(VENV)/bin/sft-ray tiny-model models/tiny

demo: install models/tiny/config.json
	$(VENV)/bin/sft-ray train --config jobs/configs/demo.yaml

test: install
	$(VENV)/bin/pytest -q --durations=10

# The tests that start no Ray (neither the session's embedded one nor test_jobs' cluster): seconds, not minutes.
test-fast: install
	$(VENV)/bin/pytest -q -m "not ray and not slow"

lint: install
	$(VENV)/bin/ruff check sft_ray jobs tests
	$(VENV)/bin/ruff format --check sft_ray jobs tests

format: install
	$(VENV)/bin/ruff format sft_ray jobs tests
	$(VENV)/bin/ruff check --fix sft_ray jobs tests

clean:
	rm -rf runs models

# Benchmarks (embedded local Ray; run them on an otherwise idle machine). `ARGS=--quick`: a smoke run.

bench-data: install
	$(PY) benchmarks/prepare_bench.py $(ARGS)

bench-train: install
	$(PY) benchmarks/train_bench.py $(ARGS)

# 100k and 1M generated rows, each prepared and trained 3 steps on 2 workers in a fresh process:
# preparation rows/s, driver and per-worker peak RSS, seconds to the first step. `ARGS=--quick`: 2k and 20k.
bench-scale: install
	$(PY) benchmarks/scale_bench.py $(ARGS)

# `sft-ray plan` against measured peak RSS on a 62M-parameter model under fsdp (2 CPU workers), with
# glibc's default allocator and with its mmap threshold fixed.
bench-plan: install
	$(PY) benchmarks/plan_bench.py $(ARGS)

# `sft-ray eval`'s Ray Data pool vs a plain `model.generate` loop on runs/demo (`make demo` first): examples/s, ratio.
bench-eval: install
	$(PY) benchmarks/eval_bench.py $(ARGS)

# The prepared check for a bare CUDA machine (README "GPU check"): installs from wheels/ offline, runs
# the gpu tests and benchmarks/gpu_bench.py. No `install` prerequisite: it runs with the machine's own
# Python there. `GPU_CHECK_DRY_RUN=1`: the CPU rehearsal (lists the wheels, collects the tests, toy benchmarks).
gpu-check:
	bash scripts/gpu_check.sh $(if $(filter 1 true yes,$(GPU_CHECK_DRY_RUN)),--dry-run)

# The cp312 manylinux wheels gpu-check installs there, into wheels/{ray,hf,moto}/ (git-ignored), slimmed.
gpu-wheels: install
	bash scripts/carry_wheels.sh
