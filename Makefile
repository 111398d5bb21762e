# The README's two commands: `make demo` (main job) and `make test` (ruff + pytest).
# Both create .venv on first use and reuse it; torch is pinned to the CPU-installable 2.13.0.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/moelab demo

lint: $(STAMP)
	$(BIN)/ruff check moelab tests

test: lint
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/moelab bench layer --json benchmarks/layer.json

clean:
	rm -rf runs .pytest_cache
