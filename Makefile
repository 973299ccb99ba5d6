# resnet-exp: `make run` sets up .venv and runs the default job; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=

.PHONY: install run test test-slow lint format tensorboard bench gpu-check reproduce clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install resnet-exp (editable) with its dev tools

run: install  ## the default job (pre-act ResNet-110, CIFAR-10); extra overrides in ARGS="..."
	$(BIN)/resnet-exp $(ARGS)

test: install  ## the quick test suite (CPU, under 5 minutes)
	$(BIN)/pytest -q

test-slow: install  ## the long checks marked slow: wheel build, torchrun, submitit, depth 1001, real CIFAR-10, torch.compile, the measuring scripts
	$(BIN)/pytest -q -m slow

lint: install
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

format: install
	$(BIN)/ruff format src tests scripts
	$(BIN)/ruff check --fix src tests scripts

tensorboard: install  ## curves of every run under outputs/
	$(BIN)/tensorboard --logdir outputs

bench: install  ## speed and memory vs a textbook PyTorch loop, and packed runs (CPU presets; BENCH_ARGS="--preset gpu" PACK_ARGS="--preset gpu" on a GPU; Hydra overrides in BENCH_ARGS too)
	$(BIN)/python scripts/benchmark.py $(or $(BENCH_ARGS),--preset cpu) $(if $(RESNET_EXP_DATA),dataset=cifar10 data.download=false)
	$(BIN)/python scripts/benchmark_packing.py $(or $(PACK_ARGS),--preset cpu) --data $(or $(RESNET_EXP_DATA),synthetic)

gpu-check: install  ## on one GPU: the CUDA-only tests, speed and packing tables, versions (outputs/gpu-check/); DRY=1: tiny nets on the CPU
	$(BIN)/python scripts/gpu_check.py $(if $(DRY),--dry) $(if $(RESNET_EXP_DATA),--data $(RESNET_EXP_DATA))

reproduce: install  ## spend BUDGET=9m on the paper's full-recipe runs, continuing CAMPAIGN=DIR (default outputs/campaign); DRY=1: tiny nets on the CPU
	$(BIN)/resnet-exp-reproduce $(if $(DRY),--dry $(if $(BUDGET),--budget $(BUDGET)),--budget $(or $(BUDGET),$(error BUDGET=... is required, e.g. make reproduce BUDGET=9m))) $(if $(CAMPAIGN),--campaign $(CAMPAIGN)) $(if $(RESNET_EXP_DATA),dataset=cifar10 data.root=$(RESNET_EXP_DATA) data.download=false) $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache dist build
