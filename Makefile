# Two commands for a fresh clone: `make test` and `make bench`.
# Both create .venv (if missing), install torch, triton and pycomm with its C++ extension,
# then run the tests or the benchmarks.  Re-running only rebuilds what changed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.pycomm-installed
# torch pin for the default set-up; an environment that already has torch keeps its own.
TORCH_SPEC ?= torch==2.13.0
CSRC   := $(shell find csrc -type f 2>/dev/null)
# With nvcc on the machine, the CUDA transports (csrc/cuda) must compile: PYCOMM_CUDA=1
# makes a compile error fail the install, so CI checks them on machines without a GPU.
# NCCL's headers and library come from the nvidia-nccl wheel unless NCCL is installed.
NVCC   := $(shell command -v nvcc 2>/dev/null)
PYCOMM_CUDA ?= $(if $(NVCC),1,auto)
PYTEST_ARGS ?=
BENCH_ARGS ?= --repeat 3
# `make soak`: the fault battery (tests/collectives/test_faults.py) with SOAK times the soak's
# operations and the other scenarios' trials; by hand, it takes minutes.
SOAK ?= 10

.PHONY: test lint test-torch-suite test-hf bench soak install clean gpu-check gpu-build gpu-test gpu-bench compile-check

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml setup.py $(CSRC)
	$(PY) -m pip install --upgrade "pip>=23" setuptools wheel ninja
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
ifneq ($(NVCC),)
	$(PY) -c "import glob, sys; sys.exit(not any(glob.glob(p + '/nvidia/nccl/include/nccl.h') for p in sys.path))" \
		|| [ -n "$$NCCL_HOME" ] || $(PY) -m pip install "nvidia-nccl-cu12>=2.19"
endif
	PYCOMM_CUDA=$(PYCOMM_CUDA) $(PY) -m pip install --no-build-isolation -e ".[test,lint]"
	@touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff (rules in pyproject.toml) on everything, mypy on the library
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

soak: $(STAMP)
	PYCOMM_SOAK=$(SOAK) $(PY) -m pytest tests/collectives/test_faults.py $(PYTEST_ARGS)

# torch's own distributed test suite, all of it, for pycomm and gloo at world sizes 2 and 3:
# fails if a test passes with gloo and not with pycomm (tests/torch_suite/runner.py).
# `make test` runs a subset of it (tests/torch_suite/test_torch_suite.py).
TORCH_SUITE_ARGS ?=
test-torch-suite: $(STAMP)
	$(PY) tests/torch_suite/runner.py --world-sizes 2 3 $(TORCH_SUITE_ARGS)

# Just the Hugging Face model tests (part of `make test`): eight tiny models, torch fallback and
# Triton kernels in the interpreter.
test-hf: $(STAMP)
	$(PY) -m pytest tests/kernels/test_hf_models.py tests/kernels/test_hf_names.py $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)
	$(PY) -m bench kernels
	$(PY) -m bench hf

# Every Triton kernel config compiled for sm_90 and sm_80 without a GPU (bench/compile_check.py):
# compiles what bench/compile_reports/triton-<version>.json lacks and rewrites it (commit it).
# `make test` checks the committed reports are current.  COMPILE_CHECK_ARGS=--full: every
# dtype and constexpr combination (hours on 2 cores).  Another Triton: COMPILE_PY=/its/python.
COMPILE_PY ?= $(PY)
COMPILE_CHECK_ARGS ?=
compile-check: $(if $(filter $(PY),$(COMPILE_PY)),$(STAMP))
	env -u TRITON_INTERPRET $(COMPILE_PY) -m pycomm.bench.compile_check --update $(COMPILE_CHECK_ARGS)

# On a GPU machine (its own python with torch, triton and nvcc): build, GPU tests, GPU benchmarks,
# each step under 10 minutes: `make gpu-build`, `make gpu-test`, `make gpu-bench`, or all three
# with `make gpu-check`.  Logs, JSON and summary.md go to $$OUT or bench/results/<date>-<gpu>/.
STEP ?= all
gpu-check:
	bash bench/gpu_check.sh $(STEP)
gpu-build gpu-test gpu-bench:
	bash bench/gpu_check.sh $(patsubst gpu-%,%,$@)

clean:
	rm -rf build *.egg-info pycomm/*.so
