#!/usr/bin/env bash
# `make gpu-check`: the GPU check on a machine that may have only torch and Lightning.
# Wheels placed in .whl/ (hydra-core, omegaconf, antlr4, igraph, leidenalg, wandb, pandas, ...) are installed
# into /tmp/site first; the data is read from $ALIGNFEDREC_DATA (e.g. a copy carried to the machine) or
# ../shared/data. Arguments go to `python -m src.gpucheck` (default: --device cuda, all four datasets).
set -euo pipefail
cd "$(dirname "$0")/.."
# PY: the interpreter (default .venv's, else python3); WHEELS: the folder of wheels to install first (default .whl)
if [ -z "${PY:-}" ]; then PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python; fi
WHEELS=${WHEELS:-.whl}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
exec $PY -m src.gpucheck "$@"
