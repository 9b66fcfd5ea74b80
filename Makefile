# AlignFedRec: `make run` sets everything up and runs the default experiment; `make test` runs the tests.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
ARGS    ?=
TEST_WORKERS ?= 2
TORCH   := 2.13.0
EXTRAS  := dev,plots,sweep,flower,launchers

.DEFAULT_GOAL := help
.PHONY: help install run test lint format test-slow bench gpu-check data reproduce reproduce-small certs flower-sim flower-loopback clean docs

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-16s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PY) -m venv $(VENV)

# pip takes torch (the CPU build on this machine's disk: pip reads its config, uv does not); uv then resolves and
# downloads the rest from PyPI in parallel, holding torch where it is (a fresh clone's install here: 35 s against 70 s
# with pip for all, 71 against 131 s with both cores busy); pip does it all where uv cannot be installed or fails
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH)
	($(BIN)/pip install -q uv && $(BIN)/uv pip install -q --python $(BIN)/python -e '.[$(EXTRAS)]' torch==$(TORCH)) \
	  || $(BIN)/pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install torch 2.13.0 (CPU) and the project; no-op when up to date

run: install ## Run the default experiment (ML-100K); extra Hydra overrides via ARGS="dataset=filmtrust ..."
	$(BIN)/python -m src.run $(ARGS)

test: install ## Run the test suite (fast tests, TEST_WORKERS=2 processes of one torch thread each; slow ones with `make test-slow`)
	$(BIN)/python -m compileall -q src tests hydra_plugins  # the test processes import compiled code
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal $(ARGS)

lint: install ## ruff: lint rules and formatting check (configured in pyproject.toml); CI runs it before the tests
	$(BIN)/ruff check src tests hydra_plugins
	$(BIN)/ruff format --check src tests hydra_plugins

format: install ## ruff: fix what the lint rules can fix, then format
	$(BIN)/ruff check --fix src tests hydra_plugins
	$(BIN)/ruff format src tests hydra_plugins

test-slow: install ## Run only the slow tests (long runs on real data)
	$(BIN)/python -m pytest -q -m slow $(ARGS)

# `make bench` = dataset=ml-100k fl.rounds=3; ARGS are passed through, and a dataset= or fl.rounds= in ARGS replaces that default
BENCH_ARGS = $(if $(filter dataset=%,$(ARGS)),,dataset=ml-100k) $(if $(filter fl.rounds=%,$(ARGS)),,fl.rounds=3) $(ARGS)

bench: install ## Time the round phases and the stacked cohort vs the per-client reference (ARGS="ablation=full ..."); writes bench.json
	$(BIN)/python -m src.bench $(strip $(BENCH_ARGS))

# no `install` prerequisite: a lent GPU machine has torch and Lightning only; deploy/gpu_check.sh installs .whl/*.whl
gpu-check: ## Every round path on the GPU against the CPU, per dataset, and full-round timings (ARGS="--datasets ml-100k")
	bash deploy/gpu_check.sh $(ARGS)

data: install ## Print the split summary of every dataset under both protocols
	for d in ml-100k ml-1m filmtrust lastfm-2k; do for p in paper clean; do \
	  $(BIN)/python -m src.data dataset=$$d protocol=$$p || exit 1; done; done

# The campaign of Table 1, Table 2 and the four sweeps with no budget (runs stored in results/runs/, finished
# ones skipped), then the tables, the results page with its curves (results/curves) and the sensitivity plots.
# ARGS go to the campaign (e.g. ARGS="--device cuda" or "dataset=ml-100k").
reproduce: install ## Run every missing run of Table 1, Table 2 and the sweeps into results/runs/, then tables and plots
	$(BIN)/python -m src.campaign experiment=table1 experiment=table2 experiment=sweep_alpha experiment=sweep_beta \
	  experiment=sweep_tau experiment=sweep_sigma $(ARGS)
	$(BIN)/python -m src.report results/runs --table table1 --out results --name table1
	$(BIN)/python -m src.report results/runs --table table2 --out results --name table2
	$(BIN)/python -m src.report results/runs --out results
	$(BIN)/python -m src.report results/runs --update README.md docs/*.md
	for p in alpha beta tau sigma; do \
	  $(BIN)/python -m src.plots sensitivity results/runs/sweep_$$p --param ablation.$$p --out results/sensitivity || exit 1; done

reproduce-small: install ## A one-hour CPU version: baselines on ML-100K and FilmTrust, AlignFedRec ablations on ML-100K, 1 seed
	$(BIN)/python -m src.campaign experiment=small_baselines $(ARGS)
	$(BIN)/python -m src.campaign experiment=small_alignfedrec $(ARGS)
	$(BIN)/python -m src.report results/runs --update docs/reproducing.md
	$(BIN)/python -m src.plots curves results/runs/small_baselines results/runs/small_alignfedrec --out results/small/curves

certs: ## Certificates (CA, SuperLink) and SuperNode keys for the Flower deployment, in certificates/ (NODES=4)
	bash deploy/certificates.sh certificates $(or $(NODES),4)

flower-sim: install ## The Flower app on Flower's simulation runtime (ARGS="dataset=filmtrust flower.supernodes=4 ...")
	$(BIN)/python -m src.flower.simulate $(ARGS)

flower-loopback: install ## A real Flower deployment on 127.0.0.1: SuperLink + NODES SuperNodes, TLS, node keys (run `make certs` first)
	$(BIN)/python -m src.flower.loopback --nodes $(or $(NODES),2) $(ARGS)

clean: ## Remove run outputs (not the virtual environment or the split cache)
	rm -rf outputs multirun lightning_logs wandb .pytest_cache site

docs: install ## Build the documentation site from docs/ (mkdocs-material, --strict: a broken link or page fails)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict
