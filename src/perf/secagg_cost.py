"""`python -m src.perf.secagg_cost [overrides] [--out PATH]`: what SecAgg+ costs against plain uploads, side by side.

One client per node, as deployed (`data.max_users` clients, default 32, each its own SuperNode), on the in-process
grid (`src/flower/inprocess.py`: the deployment's server and client code without sockets), `fl.rounds` rounds
(default 10, as `src.audit`) of the configured method:

- plain: the sparse encoded uploads (`flower/upload_bytes`);
- secagg: every round through SecAgg+ (`flower.secagg=true`): one dense masked vector of m(m-1)/2 pairs per client;
- secagg one-shot: the upload in round 1 only (`ablation.upload_round=1`, methods that have the key), the way to
  pay the dense vector once.

For each: bytes per client per round and over the run, seconds per round, the selection metric at the best round.
Then the membership audit (`src/analysis/audit.py`: row sums, row degrees and distance from S_g of the upload against
the client's training items) on what the server holds of each client after the last round: its upload (plain) and
its masked vector (SecAgg+). Prints a table; writes the figures as JSON and the table as markdown (default
results/secagg/<dataset>_<ablation>.json and .md).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from omegaconf import DictConfig

from src.analysis.audit import auc, membership_scores, training_items
from src.analysis.privacy_tables import secagg_report_markdown
from src.cli.config import ConfigError, load_config, method_keys, validate
from src.comm.secure_sum import SecureLayout
from src.data.dataset import load
from src.flower.inprocess import InProcessGrid, flower_task
from src.flower.secagg import VECTOR_RECORD, SecAggSettings, secure_sum
from src.flower.server_app import serve
from src.methods.base import build_method
from src.runtime.checks import check_output_file
from src.runtime.device import resolve_device
from src.runtime.results import atomic_write_text, best_round, publish_report, select_key

DEFAULTS = ["data.max_users=32", "fl.rounds=10", "logger=csv"]


def run(cfg: DictConfig, work: Path) -> tuple[dict[str, Any], InProcessGrid]:
    """One Flower run of `cfg` over one node per client; its history's cost figures and the grid (nodes' state)."""
    n = int(cfg.data.max_users)
    grid = InProcessGrid(cfg, n)
    tic = time.perf_counter()
    history = serve(grid, cfg, work)["history"]
    wall = time.perf_counter() - tic
    rounds = len(history)
    plain = sum(r.get("flower/upload_bytes", 0.0) for r in history)
    masked = sum(r.get("flower/secagg_bytes", 0.0) for r in history)
    best = best_round(history, select_key(cfg)) or {}
    return {
        "rounds": rounds,
        "clients": n,
        "bytes_per_client_run": (plain + masked) / n,
        "bytes_per_client_round": (plain + masked) / n / rounds,
        "s_per_round": sum(r["time/round"] for r in history) / rounds,
        "secagg_s_per_round": sum(r.get("time/secagg", 0.0) for r in history) / rounds,
        "wall_s": wall,
        "select": select_key(cfg),
        "best": best.get(select_key(cfg)),
    }, grid


def audit_masked(grid: InProcessGrid, cfg: DictConfig, layout: SecureLayout) -> dict[str, dict[str, float]]:
    """The membership audit's per-client AUC (mean and std over the clients, per feature of
    `membership_scores`, against S_g = the round's mean upload) on the nodes' last kept vectors (what a plain
    server reads) and on the masked vectors SecAgg+ delivers to the server for the same vectors."""
    data, nodes = load(cfg), sorted(grid.contexts)
    result = secure_sum(grid, nodes, int(cfg.fl.rounds) + 1, layout, SecAggSettings.from_cfg(cfg.flower), True)
    if result.total is None:
        raise RuntimeError("SecAgg+ halted in the audit round")
    upper, _, count = layout.unpack(result.total)
    global_sim = (upper + upper.T) / max(count, 1)
    aucs: dict[str, dict[str, list[float]]] = {"upload": {}, "masked": {}}
    for rep in result.masked:
        node = rep.metadata.src_node_id
        truth = training_items(data, node - 100)  # node 100 + p holds client p
        own = grid.contexts[node].state[VECTOR_RECORD].to_numpy_ndarrays()[0]
        held = bytes_to_ndarray(rep.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS][1])
        for name, vec in (("upload", own), ("masked", held.astype(np.float64))):
            for feature, scores in membership_scores(layout.pair_matrix(vec), global_sim).items():
                aucs[name].setdefault(feature, []).append(auc(scores, truth))
    return {
        name: {f: float(np.mean(v)) for f, v in feats.items()}
        | {f"{f}_std": float(np.std(v)) for f, v in feats.items()}
        for name, feats in aucs.items()
    }


def measure(overrides: list[str]) -> dict[str, Any]:
    """The three runs and the audit for `overrides` (one client per node)."""
    base = [*DEFAULTS, *overrides]
    cfg = load_config(base)
    validate(cfg)
    data = load(cfg)
    method = build_method(cfg, resolve_device("cpu"))
    if not method.uploads_similarity:
        raise ConfigError(
            f"ablation={cfg.ablation.name} sends no similarity upload; expected a similarity-sharing method"
        )
    layout = SecureLayout(data.n_items, method.holder_counts())
    variants = {"plain": [], "secagg": ["flower.secagg=true"]}
    if "upload_round" in {f.name for f in fields(method_keys(cfg))}:
        variants["secagg one-shot"] = ["flower.secagg=true", "ablation.upload_round=1"]
    report: dict[str, Any] = {
        "dataset": cfg.dataset.name,
        "ablation": cfg.ablation.name,
        "overrides": base,
        "items": data.n_items,
        "pairs": layout.pairs,
        "masked_bytes_per_client_upload": layout.masked_bytes(),
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp, flower_task():
        for name, extra in variants.items():
            vcfg = load_config([*base, *extra])
            report["runs"][name], grid = run(vcfg, Path(tmp) / name.replace(" ", "_"))
            if name == "secagg":
                report["audit"] = audit_masked(grid, vcfg, layout)
    plain = report["runs"]["plain"]
    for r in report["runs"].values():
        r["bytes_vs_plain"] = r["bytes_per_client_run"] / plain["bytes_per_client_run"]
        r["time_vs_plain"] = r["s_per_round"] / plain["s_per_round"]
    return report


def main(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m src.perf.secagg_cost", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default=None, help="the JSON report (default results/secagg/<dataset>_<ablation>.json)"
    )
    args, overrides = parser.parse_known_args(argv)
    if args.out is not None:
        check_output_file("--out", args.out)
    report = measure(overrides)
    out = args.out or f"results/secagg/{report['dataset']}_{report['ablation']}.json"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    publish_report(out, report, secagg_report_markdown(report))
    atomic_write_text(Path(out).with_suffix(".md"), secagg_report_markdown(report) + "\n")
    return report


if __name__ == "__main__":
    import sys

    from src.runtime.errors import reported

    with reported():
        main(sys.argv[1:])
