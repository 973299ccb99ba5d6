# resnet-exp: `make run` sets up .venv and runs the default job; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=

# Test processes: one a core, at most 4 (each holds torch and a fork server); a test
# file's tests in one of them (its module-wide fixtures made once).
JOBS   ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))
PY     ?= $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
WHEELS ?=

.PHONY: install run test test-slow lint format tensorboard bench gpu-check reproduce wheelhouse data clean

ifeq ($(strip $(WHEELS)),)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)
else
# No package index: resnet-exp's wheel and its dependencies from the folder `make
# wheelhouse` filled (torch and torchvision already installed, or in the folder: TORCH=1).
$(STAMP): pyproject.toml
	@test -d '$(WHEELS)' || { echo "make: WHEELS=$(WHEELS) is not a folder; make wheelhouse DIR=... fills one" >&2; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-index --find-links '$(WHEELS)' resnet-exp $(if $(wildcard $(WHEELS)/pytest-*.whl),pytest)
	touch $(STAMP)
endif

install: $(STAMP)  ## create .venv and install resnet-exp (editable) with its dev tools; WHEELS=DIR: from that folder, with no package index

run: install  ## the default job (pre-act ResNet-110, CIFAR-10); extra overrides in ARGS="..."
	$(BIN)/resnet-exp $(ARGS)

test: install  ## the quick test suite (CPU, under 5 minutes)
	$(BIN)/pytest -q -n $(JOBS) --dist loadfile

test-slow: install  ## the long checks marked slow: wheel build, torchrun, submitit, depth 1001, real CIFAR-10, torch.compile, the measuring scripts, an offline install and a GPU window rehearsed on the CPU
	$(BIN)/pytest -q -m slow -n $(JOBS) --dist loadfile

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

gpu-check: install  ## on one GPU: the CUDA-only tests, speed and packing tables, versions (OUT=DIR, default outputs/gpu-check/<time>); DRY=1: tiny nets on the CPU
	$(BIN)/python scripts/gpu_check.py $(if $(DRY),--dry) $(if $(OUT),--out '$(OUT)') $(if $(RESNET_EXP_DATA),--data '$(RESNET_EXP_DATA)')

reproduce: install  ## spend BUDGET=9m on the paper's full-recipe runs, continuing the campaign folder OUT=DIR (or CAMPAIGN=DIR; default outputs/campaign); DRY=1: tiny nets on the CPU
	$(BIN)/resnet-exp-reproduce $(if $(DRY),--dry $(if $(BUDGET),--budget $(BUDGET)),--budget $(or $(BUDGET),$(error BUDGET=... is required, e.g. make reproduce BUDGET=9m))) $(if $(or $(OUT),$(CAMPAIGN)),--out '$(or $(OUT),$(CAMPAIGN))') $(if $(RESNET_EXP_DATA),dataset=cifar10 'data.root=$(RESNET_EXP_DATA)' data.download=false) $(ARGS)

wheelhouse:  ## on a machine with a package index: every wheel resnet-exp needs for Python PY=3.12 on linux x86-64 into DIR (default wheelhouse/), without torch (TORCH=1: with it); prints its size
	$(PYTHON) scripts/wheelhouse.py --out '$(or $(DIR),wheelhouse)' --python $(PY) $(if $(TORCH),--torch)

data: install  ## on a machine with internet: CIFAR-10 (DATASETS="cifar10 cifar100") into DIR (default $$RESNET_EXP_DATA, else data/), checked; offline: one line, exit 2
	$(BIN)/resnet-exp-data download $(if $(or $(DIR),$(RESNET_EXP_DATA)),'$(or $(DIR),$(RESNET_EXP_DATA))') --dataset $(or $(DATASETS),cifar10)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache dist build wheelhouse
