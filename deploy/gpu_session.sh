#!/usr/bin/env bash
# The one prepared command for a lent GPU machine (docs/gpu.md): gpu-check first, then the ML-1M and
# Lastfm-2k part of the campaign (issue 34's pending runs) for the minutes left; the runs stored there come back as
# $OUT/runs.tar.gz.
# Prepare here (once): `echo /.whl/ >> .git/info/exclude; echo /.data >> .git/info/exclude;
# ln -s ../shared/data .data` and the wheels of hydra-core omegaconf antlr4-python3-runtime igraph texttable
# leidenalg (docs/gpu.md; the machine has pandas and pyyaml), then call the device tool's run with the files the
# readers use (the tracked tree, these and the wheels must stay within the 64 MiB a call takes; tests/test_gpucheck.py)
#   carry: [".whl", ".data/ml-100k/u.data", ".data/ml-1m/chronological_order.tsv.gz", ".data/ml-1m/pfedrec_loo_split.tsv", ".data/filmtrust/ratings.txt", ".data/lastfm-2k/user_taggedartists.dat"]
#   command: "bash deploy/gpu_session.sh"   (BUDGET_MIN=<minutes for the campaign>, default 5)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
STARTED=$(mktemp)  # what the campaign stores after this comes back
trap 'rm -f "$STARTED"' EXIT
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export ALIGNFEDREC_DATA=${ALIGNFEDREC_DATA:-$PWD/.data} ALIGNFEDREC_CACHE=/tmp/afr-cache PYTHONUNBUFFERED=1
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
rm -f "$OUT/gpu_check.json"  # a report left by an earlier run must not pass for this one
timeout 300 python3 -m src.gpucheck --device cuda --out "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log"
# a check that exited 0 without writing its report checked nothing
[ "${PIPESTATUS[0]}" -eq 0 ] && [ -s "$OUT/gpu_check.json" ] || { echo "gpu-check failed: no campaign on this machine" >&2; exit 1; }
# issue 34's pending runs, cheapest first within each command: fed_itemknn and knn_ica (item 2) and full's seeds
# 1-2 (item 5) on the large datasets, then AlignFedRec's variants with the lineage SGD engine (item 1); two thirds
# of the budget to the first command, the rest to the second
BUDGET=${BUDGET_MIN:-5}
FIRST=$(( (BUDGET * 2 + 2) / 3 ))
C="python3 -m src.campaign --device cuda --jobs 1 --threads 8 --work /tmp/campaign"
$C experiment=table1 dataset=ml-1m,lastfm-2k ablation=fed_itemknn,knn_ica,full --budget-min "$FIRST" 2>&1 \
  | tee "$OUT/campaign.log"
$C experiment=table2 dataset=ml-1m,lastfm-2k ablation=full,no_ica,no_gsa optim=sgd seed=0 \
  --budget-min "$(( BUDGET - FIRST > 1 ? BUDGET - FIRST : 1 ))" 2>&1 | tee -a "$OUT/campaign.log"
# only the runs stored here (a file back from the machine is at most 16 MiB; all of results/runs is more)
find results/runs -newer "$STARTED" -type f -print0 | tar -czf "$OUT/runs.tar.gz" --null -T -
