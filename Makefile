# fusion-cache: `make test` and `make demo` each set everything up from a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_ROOT ?= data
WEIGHTS ?= imagenet1k_v1
EXTRACT_FLAGS ?=
CACHE ?= data/cifar10-paper.h5
OUT ?= data/runs

.PHONY: install test demo clean

install: $(BIN)/fusion-cache

$(BIN)/fusion-cache: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/fusion-cache extract --out $(CACHE) --data-root $(DATA_ROOT) --weights $(WEIGHTS) $(EXTRACT_FLAGS)
	$(BIN)/fusion-cache fit $(CACHE) --head linear --features fused

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
