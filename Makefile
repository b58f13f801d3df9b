# tsopsd: `make demo` and `make test` work on a fresh machine (they install first).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch that lies on disk on these machines; unpinned torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install test test-slow lint demo smoke bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

test-slow: install
	$(BIN)/python -m pytest -q -m "slow"

lint: install
	$(BIN)/ruff check tsopsd tests bench

demo: install
	$(BIN)/tsopsd demo

smoke: install
	$(BIN)/tsopsd demo --out runs/smoke --quick

bench: install
	$(BIN)/pip install -q -e ".[dev,bench]"
	bash bench/compare.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
