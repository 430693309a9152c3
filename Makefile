# Two entry points (README Quickstart): `make reproduce` and `make test`; both set up .venv first.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_ID ?= $(shell date +%Y%m%d-%H%M%S)

.PHONY: setup test test-fast reproduce benchmark docs readme check-clean check-export nbtest pytest gpu-check

setup: $(STAMP)

# torch is pinned to the CPU wheel first so that nothing later pulls a CUDA build; torchvision is never installed.
# Debian's chromium drives the browser test of the docs site (tests/test_docs_site.py).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	command -v chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } \
		|| echo "Debian's chromium could not be installed: the browser test of the docs site will be skipped"
	touch $@

# The notebooks must already be clean: nbdev-clean may not change anything git tracks.
check-clean: $(STAMP)
	@before=$$(git status --porcelain); $(BIN)/nbdev-clean; after=$$(git status --porcelain); \
	if [ "$$before" != "$$after" ]; then echo "nbdev-clean changed notebooks: run it and commit"; git status --short; exit 1; fi
	@echo "notebooks clean"

# The package must match the notebooks: nbdev-export may not change anything git tracks.
check-export: $(STAMP)
	@before=$$(git status --porcelain); $(BIN)/nbdev-export; after=$$(git status --porcelain); \
	if [ "$$before" != "$$after" ]; then echo "nbdev-export changed the package: export and commit"; git status --short; exit 1; fi
	@echo "package in sync with notebooks"

# Two tiers: `make test` runs everything; `make test-fast` leaves out notebook cells flagged `#| slow` and tests marked
# slow (multi-process, tiny-paper pipelines, browsers).
nbtest: $(STAMP)
	MPLBACKEND=Agg $(BIN)/nbdev-test --timing $(if $(FAST),,--flags slow)

# Two pytest workers of one thread each keep both cores busy while a test starts a kernel or imports; two workers of two
# threads each oversubscribe the cores (on 2 cores the suite took 20 min 19 s that way, against 14 min 2 s in one worker).
PYTEST_WORKERS ?= 2
pytest: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MPLBACKEND=Agg $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --durations=10 \
		$(if $(FAST),-m 'not slow')

test: check-clean check-export nbtest pytest

test-fast:
	$(MAKE) test FAST=1

# The main job on the mini profile: features, three aligners, the RMSNorm ablation, CoBSAT and a generation example.
reproduce: $(STAMP)
	bash tools/reproduce.sh $(RUN_ID)

# The docs site in _docs/, offline: nbdev processes the notebooks into a Quarto project (_proc/); tools/build_docs.py
# adds the executed notebooks of a `make reproduce` run as results pages (DOCS_RUN=outputs/<run-id>; empty: the newest
# complete run, or none), renders the project with smalldocs and serves KaTeX from the site. Where Quarto exists,
# nbdev-docs builds the same project without the results pages.
DOCS_RUN ?=
docs: $(STAMP)
	$(BIN)/nbdev-proc-nbs
	$(BIN)/python tools/build_docs.py $(if $(DOCS_RUN),--run '$(DOCS_RUN)')

# Feature capture vs plain generate, memory-mapped vs in-memory training, the host memory of loading T5's decoder
# side against the whole model, and of training from webdataset tars of 256 vs 1024 images: prints ratios from one
# run. Run it alone.
benchmark: $(STAMP)
	$(BIN)/python tools/benchmark_features.py
	$(BIN)/python tools/benchmark_t5_load.py
	$(BIN)/python tools/benchmark_streaming.py

# Before anything long on GPUs: each step of the paper path once, with what it measured (versions, the VLM's sampling
# as applied, row semantics, the released aligner, the decoder-only Flan-T5, FLUX, the judges, one CoBSAT block, five
# training steps, a CogVideoX clip, the premise at paper scale), written to outputs/gpu-check/gpu_check.json. On a CPU
# it runs on the tiny-paper profile; on GPUs pass the checkpoints: make gpu-check GPU_CHECK="--aligner PATH --clip-aligner PATH"
GPU_CHECK ?=
gpu-check: $(STAMP)
	$(BIN)/python tools/gpu_check.py $(GPU_CHECK)

# README.md from nbs/index.ipynb, with the figures it shows written to nbs/images/: edit and run the notebook (outputs
# are kept), then this; tests/test_readme.py fails while the two differ.
readme: $(STAMP)
	$(BIN)/python tools/readme.py
