# fusion-cache: `make test` and `make demo` each set everything up from a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_ROOT ?= data/cifar10
WEIGHTS ?= imagenet1k_v1
EXTRACT_FLAGS ?=
CACHE ?= data/cifar10-paper.h5
OUT ?= data/runs

.PHONY: install test docs demo reference reproduce reproduce-full results bench killtest mutants clean

install: $(BIN)/fusion-cache

$(BIN)/fusion-cache: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

# Two pytest workers (pytest-xdist; a third was slower on 2 cores); the suite builds the docs site with --strict too (tests/test_docs.py).
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=25

# The docs site: docs/cli.md and docs/index.md regenerated from Click's help and the README, then built into site/.
docs: install
	$(BIN)/python scripts/docs.py
	$(BIN)/python -m mkdocs build --strict -d site
	@echo "The site is in site/index.html (or: $(BIN)/python -m mkdocs serve)"

# A tour in about a minute on images that ship with scikit-learn (its 1,797 8x8 handwritten digits, written as a
# folder of class folders): extract every tap, then the report (linear head, one seed). The only download is the
# backbone's weights (after `make install`'s packages); `make demo WEIGHTS=path.pth` needs no network once installed.
demo: install
	$(BIN)/python scripts/demo_data.py data/demo-digits
	$(BIN)/fusion-cache extract --data-root data/demo-digits --out data/demo-digits.h5 --weights $(WEIGHTS) $(EXTRACT_FLAGS)
	$(BIN)/fusion-cache report data/demo-digits.h5 --out data/demo-report --heads linear --seeds 0 --no-pair-search --force
	@echo "The report is in data/demo-report/report.md"

# The case study's protocol on three subset draws: linear head, 2 epochs, Adam 1e-3, batch 32, raw features.
reference: install
	for s in 0 1 2; do \
	  $(BIN)/fusion-cache extract --dataset cifar10 --out data/cifar10-paper-s$$s.h5 --seed $$s --data-root $(DATA_ROOT) \
	    --weights $(WEIGHTS) $(EXTRACT_FLAGS) && \
	  $(BIN)/fusion-cache ablate data/cifar10-paper-s$$s.h5 --views late,features.13+features.18,all \
	    --heads linear --seeds 0,1,2 --out data/reference-s$$s || exit 1; \
	done

# The case study's subset (5000 / 1000), extract + report (the case study's and the tuned protocol, five figures).
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

# The results page: every number and figure on docs/results.md and the README's table, regenerated in one run.
# Reports go to docs/results/; then scripts/pages.py writes docs/results.md and the README's results table.
# The cross-backbone curve downloads BACKBONES' weights; `make results BACKBONES=` leaves it out (offline).
BACKBONES ?= resnet50 convnext_tiny timm:vit_small_patch16_224
RESULTS := docs/results
results: install
	$(BIN)/fusion-cache extract --dataset cifar10 --out data/cifar10-paper.h5 --data-root $(DATA_ROOT) --weights $(WEIGHTS) $(EXTRACT_FLAGS)
	$(BIN)/fusion-cache report data/cifar10-paper.h5 --out $(RESULTS)/paper --data-root $(DATA_ROOT) --force
	$(BIN)/fusion-cache report data/cifar10-paper.h5 --layer-curve --views early,late,fused,all --heads linear \
	  --seeds 0,1,2 --out $(RESULTS)/layer-curve --force
	$(BIN)/fusion-cache extract --dataset cifar10 --out data/cifar10-full-avgmax.h5 --train-size all --test-size all \
	  --pool avgmax --data-root $(DATA_ROOT) --weights $(WEIGHTS) $(EXTRACT_FLAGS)
	$(BIN)/fusion-cache report data/cifar10-full-avgmax.h5 --out $(RESULTS)/full \
	  --views early,late,fused,all --heads linear --seeds 0,1,2 --data-root $(DATA_ROOT) --force
	@if [ -n "$(strip $(BACKBONES))" ]; then \
	  caches=data/cifar10-paper.h5; \
	  for b in $(BACKBONES); do \
	    c=data/cifar10-paper-$$(echo $$b | tr ':/' '--').h5; \
	    case $$b in *vit*|*deit*) size=;; *) size="--image-size 128";; esac; \
	    $(BIN)/fusion-cache extract --dataset cifar10 --backbone $$b $$size --out $$c --data-root $(DATA_ROOT) \
	      $(EXTRACT_FLAGS) || exit 1; \
	    caches="$$caches $$c"; \
	  done; \
	  $(BIN)/fusion-cache report $$caches --views early,late,fused --heads linear --out $(RESULTS)/backbones --force; \
	else rm -rf $(RESULTS)/backbones; fi
	$(BIN)/python scripts/pages.py results
	$(BIN)/python scripts/docs.py

# Every figure a ratio of two measurements from one run, into data/bench.json; then the tuned report against its
# extraction on full CIFAR-10, in turns; then docs/benchmarks.md from that JSON, naming the machine.
# head_vs_logreg needs the full all-blocks cache (FULL_CACHE, made by `make reproduce-full FULL_POOL=avg`).
FULL_CACHE ?= data/cifar10-full-avg.h5
BENCH_FLAGS ?= $(EXTRACT_FLAGS)
bench: install
	$(BIN)/python scripts/bench.py --data-root $(DATA_ROOT) --weights $(WEIGHTS) $(BENCH_FLAGS) \
	  $(if $(wildcard $(FULL_CACHE)),--full-cache $(FULL_CACHE),) --out data/bench.json
	$(BIN)/python scripts/bench.py --only-tuned-report --data-root $(DATA_ROOT) --weights $(WEIGHTS) $(BENCH_FLAGS) \
	  --out data/bench.json
	$(BIN)/python scripts/pages.py benchmarks data/bench.json

# 20 SIGKILLs at random moments, each resumed and compared bit for bit.
killtest: install
	$(BIN)/python scripts/killtest.py --kills 20

# Every deliberate bug in scripts/mutants.py, applied alone to a scratch copy, must fail its tests.
mutants: install
	$(BIN)/python scripts/mutants.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
