# fusion-cache: `make test` and `make demo` each set everything up from a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_ROOT ?= data
WEIGHTS ?= imagenet1k_v1
EXTRACT_FLAGS ?=
CACHE ?= data/cifar10-paper.h5
OUT ?= data/runs

.PHONY: install test demo reference killtest clean

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

# Issue 3's reference protocol on three subset draws: linear head, 2 epochs, Adam 1e-3, batch 32, raw features.
reference: install
	for s in 0 1 2; do \
	  $(BIN)/fusion-cache extract --out data/cifar10-paper-s$$s.h5 --seed $$s --data-root $(DATA_ROOT) \
	    --weights $(WEIGHTS) $(EXTRACT_FLAGS) && \
	  $(BIN)/fusion-cache ablate data/cifar10-paper-s$$s.h5 --views late,features.13+features.18,all \
	    --heads linear --seeds 0,1,2 --out data/reference-s$$s || exit 1; \
	done

# Issue 6's goal: 20 SIGKILLs at random moments, each resumed and compared bit for bit.
killtest: install
	$(BIN)/python scripts/killtest.py --kills 20

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
