# The README's two commands: `make demo` (main job) and `make test` (ruff + pytest).
# Both create .venv on first use and reuse it. torch is pinned to the CPU-installable 2.13.0 by
# constraints-cpu.txt; on a CUDA machine `make install CONSTRAINTS=` (and PY= a python that has torch, with
# VENV_FLAGS=--system-site-packages) keeps the installed CUDA torch, since pyproject.toml asks for torch>=2.8.
PY ?= python3
CONSTRAINTS ?= constraints-cpu.txt
VENV_FLAGS ?=
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint install clean bench

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/moelab demo

lint: $(STAMP)
	$(BIN)/ruff check moelab tests
	$(BIN)/ruff format --check moelab tests
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest tests

# The inner loop: everything but the end-to-end tests marked `slow` (CI runs `make test`, all of them).
test-fast: lint
	$(BIN)/python -m pytest tests -m "not slow and not cuda"

bench: $(STAMP)
	$(BIN)/moelab bench layer --json benchmarks/layer.json

clean:
	rm -rf runs .pytest_cache
