# lmforge: `make demo` and `make test` on a fresh machine. Torch is installed first, pinned (a bare
# `torch` requirement would pull a multi-GB CUDA build); override for a GPU box, e.g.
#   make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON     ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV       ?= .venv
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.lmforge-installed
PYTEST_ARGS ?=

# Offline by default: nothing downloads at run time; W&B logs locally.
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false
# DeepSpeed JIT-builds its CPU comm op on first use; one build folder per venv, so that two checkouts on one
# machine do not rebuild it for each other on every launch (~40 s of both cores each time)
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: setup demo test quick bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The whole chain on the built-in corpus, on CPU (configs/pipelines/demo.yaml): tokenize, pretrain the ~5 M-parameter
# demo model on 2 ranks with ZeRO-2, fine-tune it on both built-in tasks beside the same architecture from random
# init, distill the classifier into a half-depth student beside the same student trained without the teacher,
# export the student; it ends with one table of the results and where each artifact is. Rerunning skips what is
# finished, one line per stage.
demo: setup
	$(BIN)/lmforge run configs/pipelines/demo.yaml

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The unit tests (every test that launches a stage or a CLI is marked slow by tests/conftest.py): under a
# minute, for iterating; `make test` runs them all.
quick: setup
	$(BIN)/python -m pytest -m "not slow" -q $(PYTEST_ARGS)

# CPU benchmarks, one after another (each keeps both cores busy). bench/train.py measures throughput and the
# ZeRO memory table; bench/memory.py the chunked loss and the ZeRO-3 start-up (~7 min, ~7 GB RSS). GPU figures
# need a GPU: `python bench/gpu.py` there (it refuses on a machine without one).
bench: setup
	$(BIN)/python bench/tokenize.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/finetune.py
	$(BIN)/python bench/finetune_why.py --longer 800 --heads --seeds 3
	$(BIN)/python bench/distill.py
	$(BIN)/python bench/reliability.py

lint: setup
	$(BIN)/ruff check lmforge pretrain finetune distill bench tests

clean:
	rm -rf runs bench/work .pytest_cache
