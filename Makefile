# AlignFedRec: `make run` sets everything up and runs the default experiment; `make test` runs the tests.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
ARGS    ?=

.DEFAULT_GOAL := help
.PHONY: help install run test test-slow bench data clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-12s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,plots,sweep]'
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install torch 2.13.0 (CPU) and the project; no-op when up to date

run: install ## Run the default experiment (ML-100K); extra Hydra overrides via ARGS="dataset=filmtrust ..."
	$(BIN)/python -m src.run $(ARGS)

test: install ## Run the test suite (fast tests; slow ones with `make test-slow`)
	$(BIN)/python -m pytest -q $(ARGS)

test-slow: install ## Run only the slow tests (long runs on real data)
	$(BIN)/python -m pytest -q -m slow $(ARGS)

# `make bench` = dataset=ml-100k fl.rounds=3; ARGS are passed through, and a dataset= or fl.rounds= in ARGS replaces that default
BENCH_ARGS = $(if $(filter dataset=%,$(ARGS)),,dataset=ml-100k) $(if $(filter fl.rounds=%,$(ARGS)),,fl.rounds=3) $(ARGS)

bench: install ## Time the round phases and the stacked cohort vs the per-client reference (ARGS="ablation=full ..."); writes bench.json
	$(BIN)/python -m src.bench $(strip $(BENCH_ARGS))

data: install ## Print the split summary of every dataset under both protocols
	for d in ml-100k ml-1m filmtrust lastfm-2k; do for p in paper clean; do \
	  $(BIN)/python -m src.data dataset=$$d protocol=$$p || exit 1; done; done

clean: ## Remove run outputs (not the virtual environment or the split cache)
	rm -rf outputs multirun lightning_logs wandb .pytest_cache
