# fusion-cache: `make test` and `make demo` each set everything up from a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_ROOT ?= data
WEIGHTS ?= imagenet1k_v1
EXTRACT_FLAGS ?=
CACHE ?= data/cifar10-paper.h5
OUT ?= data/runs

.PHONY: install test demo reference reproduce reproduce-full bench killtest mutants clean

install: $(BIN)/fusion-cache

$(BIN)/fusion-cache: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/fusion-cache extract --dataset cifar10 --out $(CACHE) --data-root $(DATA_ROOT) --weights $(WEIGHTS) $(EXTRACT_FLAGS)
	$(BIN)/fusion-cache fit $(CACHE) --head linear --features fused

# Issue 3's reference protocol on three subset draws: linear head, 2 epochs, Adam 1e-3, batch 32, raw features.
reference: install
	for s in 0 1 2; do \
	  $(BIN)/fusion-cache extract --dataset cifar10 --out data/cifar10-paper-s$$s.h5 --seed $$s --data-root $(DATA_ROOT) \
	    --weights $(WEIGHTS) $(EXTRACT_FLAGS) && \
	  $(BIN)/fusion-cache ablate data/cifar10-paper-s$$s.h5 --views late,features.13+features.18,all \
	    --heads linear --seeds 0,1,2 --out data/reference-s$$s || exit 1; \
	done

# Issue 4: the case study's subset (5000 / 1000), extract + report (paper and tuned protocols, five figures).
reproduce: install
	$(BIN)/fusion-cache extract --dataset cifar10 --out data/cifar10-paper.h5 --data-root $(DATA_ROOT) --weights $(WEIGHTS) $(EXTRACT_FLAGS)
	$(BIN)/fusion-cache report data/cifar10-paper.h5 --out data/report-paper --data-root $(DATA_ROOT)

# All 50,000 / 10,000 images; tuned rows for early, late, fused, all and the best early+late pair, 3 seeds.
# FULL_POOL=avgmax caches average and max pooling of every tap; FULL_HEADS adds logreg (about 1 min a fit on 2 cores).
FULL_POOL ?= avgmax
FULL_HEADS ?= linear
reproduce-full: install
	$(BIN)/fusion-cache extract --dataset cifar10 --out data/cifar10-full-$(FULL_POOL).h5 --train-size all --test-size all \
	  --pool $(FULL_POOL) --data-root $(DATA_ROOT) --weights $(WEIGHTS) $(EXTRACT_FLAGS)
	$(BIN)/fusion-cache report data/cifar10-full-$(FULL_POOL).h5 --out data/report-full-$(FULL_POOL) \
	  --views early,late,fused,all --heads $(FULL_HEADS) --seeds 0,1,2 --data-root $(DATA_ROOT)

# Issue 5: every figure a ratio of two measurements from this one run; writes data/bench.json. Then issue 24's
# tuned_report_vs_extract: full CIFAR-10 extracted and reported, in turns (about 10 more minutes).
# head_vs_logreg needs the full all-blocks cache (FULL_CACHE, made by `make reproduce-full FULL_POOL=avg`).
FULL_CACHE ?= data/cifar10-full-avg.h5
BENCH_FLAGS ?= $(EXTRACT_FLAGS)
bench: install
	$(BIN)/python scripts/bench.py --data-root $(DATA_ROOT) --weights $(WEIGHTS) $(BENCH_FLAGS) \
	  $(if $(wildcard $(FULL_CACHE)),--full-cache $(FULL_CACHE),) --out data/bench.json
	$(BIN)/python scripts/bench.py --only-tuned-report --data-root $(DATA_ROOT) --weights $(WEIGHTS) $(BENCH_FLAGS) \
	  --out data/bench.json

# Issue 6's goal: 20 SIGKILLs at random moments, each resumed and compared bit for bit.
killtest: install
	$(BIN)/python scripts/killtest.py --kills 20

# Issue 26: every deliberate bug in scripts/mutants.py, applied alone to a scratch copy, must fail its tests.
mutants: install
	$(BIN)/python scripts/mutants.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
