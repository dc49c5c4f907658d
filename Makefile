# lmforge: `make demo` and `make test` on a fresh machine. Torch is installed first, as TORCH_SPEC says. From PyPI
# on Linux `torch==2.13.0` is the multi-GB CUDA build (a local CPU wheel, through PIP_FIND_LINKS, wins where one
# is); pick the build explicitly, e.g.
#   make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"     # CPU only
#   make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"   # CUDA 12.8
# A changed TORCH_SPEC reinstalls torch in the existing .venv (it is remembered in .venv/.torch-spec).
PYTHON     ?= python3
VENV       ?= .venv
# the build the venv holds stays unless a TORCH_SPEC is given: `make test` after a CUDA setup keeps the CUDA build
TORCH_SPEC ?= $(shell cat $(VENV)/.torch-spec 2>/dev/null || echo torch==2.13.0)
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

$(STAMP): pyproject.toml Makefile $(VENV)/.torch-spec
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	if [ "$$(cat $(VENV)/.torch-installed 2>/dev/null)" != "$(TORCH_SPEC)" ]; then \
	  $(BIN)/python -m pip install --quiet --force-reinstall $(TORCH_SPEC) && echo "$(TORCH_SPEC)" > $(VENV)/.torch-installed; \
	fi
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# rewritten only when TORCH_SPEC differs from the last one, so that a new spec reruns the setup above
$(VENV)/.torch-spec: FORCE
	@mkdir -p $(VENV)
	@test "$$(cat $@ 2>/dev/null)" = "$(TORCH_SPEC)" || echo "$(TORCH_SPEC)" > $@

FORCE:

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
