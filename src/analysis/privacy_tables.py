"""Docs tables of user-level DP (this project's `private_itemknn`; docs/communication-privacy.md), generated blocks of
`src.report --update`: accuracy against epsilon over seeds (`userdp:<dataset>`, the stored
`experiment=private_epsilon` runs) and the audits at each epsilon (`userdp_audit`, results/audit/user_dp/*.json)."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from src.analysis.runs import cell, config_value, load_runs, mean_std
from src.runtime.errors import UserError

EXPERIMENT = "private_epsilon"
AUDITS = "audit/user_dp"  # under results/


def target_epsilon(config: dict) -> float:
    """A run's `privacy.target_epsilon` (inf when none: the clipped uploads without noise)."""
    value = config_value(config, "privacy.target_epsilon")
    return math.inf if value in ("-", "None") else float(value)


def seed_cell(values: list[float | None]) -> str:
    """Mean ± std over the seeds that measured it, in percent; `-` when none did."""
    return cell(*mean_std([v for v in values if v is not None]))


def userdp_markdown(root: Path, dataset: str) -> str:
    """`userdp:<dataset>`: test metrics at the best validation round against the target epsilon (mean ± std over the
    seeds), the epsilon the accountant reports for the run and the noise multiplier it calibrated."""
    runs = load_runs([root / EXPERIMENT / dataset])
    if not runs:
        raise UserError(f"no stored {EXPERIMENT} run for {dataset} under {root}; expected experiment={EXPERIMENT}")
    groups: dict[float, list[dict]] = defaultdict(list)
    for run in runs:
        groups[target_epsilon(run["config"])].append(run)
    head = (
        "| epsilon (target) | epsilon (spent) | noise multiplier | seeds | sampled hit@10 | sampled ndcg@10 "
        "| full-ranking hit@10 | full-ranking ndcg@10 |"
    )
    lines = [head, "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for eps in sorted(groups):
        group = groups[eps]
        privacy = [run["privacy"] for run in group]
        spent = [p.get("user_epsilon") for p in privacy]
        z = statistics.mean(p.get("user_noise_multiplier", 0.0) for p in privacy)
        tests = [run["test_at_best"] for run in group]
        lines.append(
            f"| {'none' if math.isinf(eps) else f'{eps:g}'} "
            f"| {'-' if None in spent else f'{max(spent):.3f}'} | {z:.3f} | {len(group)} | "
            + " | ".join(seed_cell([t.get(k) for t in tests]) for k in ("test/hit@10", "test/ndcg@10"))
            + " | "
            + " | ".join(seed_cell([t.get(k) for t in tests]) for k in ("test_full/hit@10", "test_full/ndcg@10"))
            + " |"
        )
    return "\n".join(lines)


def userdp_audit_markdown(results: Path) -> str:
    """`userdp_audit`: at each epsilon, what the server learns from one upload (it sees the upload before its noise:
    the learned attack's membership AUC) and what the release gives a worst-case attacker (measured AUC, and the
    Gaussian mechanism's)."""
    reports = [json.loads(p.read_text()) for p in sorted((results / AUDITS).glob("*.json"))]
    if not reports:
        raise UserError(f"no user-DP audit in {results / AUDITS}; expected `python -m src.audit ...` reports there")
    head = (
        "| dataset | epsilon | clients | server: membership AUC of one upload (learned) "
        "| release: user membership AUC, measured | release: Gaussian mechanism |"
    )
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: |"]

    def order(r: dict) -> tuple[str, float]:
        return r["dataset"], r.get("user_epsilon", math.inf)

    for r in sorted(reports, key=order):
        eps = r.get("user_epsilon")
        learned = r["membership_auc"]["learned"]
        measured = r.get("release_membership_auc")
        gaussian = r.get("release_membership_auc_gaussian")
        lines.append(
            f"| {r['dataset']} | {'none' if eps is None else f'{eps:.3g}'} | {r['clients']} | {learned:.2f} "
            f"| {'-' if measured is None else f'{measured:.2f}'} | {'-' if gaussian is None else f'{gaussian:.2f}'} |"
        )
    return "\n".join(lines)


def best_within(root: Path, dataset: str, epsilon: float) -> tuple[float, float, int] | None:
    """(target epsilon, mean sampled test hit@10 in percent, seeds) of the stored private_epsilon runs with the largest
    target epsilon at most `epsilon`, or None when none is stored."""
    groups: dict[float, list[float]] = defaultdict(list)
    for run in load_runs([root / EXPERIMENT / dataset]):
        eps = target_epsilon(run["config"])
        if eps <= epsilon:
            groups[eps].append(100 * run["test_at_best"]["test/hit@10"])
    if not groups:
        return None
    eps = max(groups)
    return eps, statistics.mean(groups[eps]), len(groups[eps])


def claim(root: Path, reference: str) -> str | None:
    """The README's sentence on user-level DP (ML-100K at epsilon 8 against `reference`, PFedRec's clean hit@10), or
    None before any private_epsilon run is stored."""
    found = best_within(root, "ml-100k", 8.0)
    if found is None:
        return None
    eps, hit, seeds = found
    return (
        f"- **User-level DP** (`private_itemknn`, this project's: one clipped upload per client, Gaussian noise on "
        f"the sum, epsilon from an accountant at delta = 1 / users): ML-100K clean hit@10 {hit:.2f} at epsilon "
        f"{eps:g} ({seeds} seed{'s' * (seeds > 1)}), below PFedRec's {reference} without any protection, so PFedRec's "
        "accuracy at epsilon <= 8 is out of reach of this variant (the accuracy-epsilon curve shows where it breaks); "
        "the noise protects what the server releases, not the round's sum from the server "
        "([Privacy and traffic](docs/communication-privacy.md), User-level differential privacy)."
    )


def secagg_claim(root: Path) -> str | None:
    """The README's sentence on secure aggregation, from the ML-100K fed_itemknn cost report (results/secagg/), or
    None before it exists."""
    path = root.parent / "secagg" / "ml-100k_fed_itemknn.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    runs, audit = report["runs"], report["audit"]
    every, once = runs["secagg"], runs.get("secagg one-shot")
    cheaper = f", {once['bytes_vs_plain']:.1f} times one-shot" if once else ""
    return (
        "- **Secure aggregation** (`flower.secagg=true`, flwr's SecAgg+ on the Flower app): the server holds of each "
        "client only a masked vector, on which the membership audit is at chance (ML-100K `fed_itemknn`, row-sum AUC "
        f"{audit['masked']['row_sum']:.2f} against {audit['upload']['row_sum']:.2f} from the plain upload), and "
        "learning is unchanged; the price is a dense upload of "
        f"{report['masked_bytes_per_client_upload'] / 1e6:.1f} MB per client, {every['bytes_vs_plain']:.0f} times "
        f"the plain bytes over {every['rounds']} rounds when sent every round{cheaper} "
        "([Privacy and traffic](docs/communication-privacy.md#secure-aggregation-issue-35-second-part))."
    )


# bytes per entry of a SecAgg+ vector as flwr sends it: masked modulo 2**32 (4 bytes would do) but serialised as int64
SECAGG_BYTES = 8


def secagg_cost_markdown(root: Path) -> str:
    """`secagg_cost`: what secure aggregation's fixed-size dense vectors would cost against the sparse uploads the
    stored runs measured: `fed_itemknn` (every round, `graph_variants`, clean) and the one-shot `private_itemknn`
    (`private_epsilon`, no noise), per client: one round, and the whole run."""
    head = (
        "| dataset | items | pairs m(m-1)/2 | dense SecAgg vector (KiB) | fed_itemknn upload, one round (KiB) "
        "| dense / sparse | fed_itemknn, 100 rounds (KiB) | private_itemknn, one upload (KiB) |"
    )
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for dataset in ("ml-100k", "filmtrust", "ml-1m", "lastfm-2k"):
        every = load_runs([root / "graph_variants" / dataset / "fed_itemknn" / "clean"])
        once = [r for r in load_runs([root / EXPERIMENT / dataset]) if math.isinf(target_epsilon(r["config"]))]
        if not every or not once:
            continue
        items = int(once[0]["summary"]["items"])
        pairs = items * (items - 1) // 2
        dense = SECAGG_BYTES * pairs / 1024
        sparse = statistics.mean(r["communication"]["upload_bytes_mean_per_client_round"] for r in every) / 1024
        total = statistics.mean(sum(h.get("comm/upload_bytes_total", 0.0) for h in r["history"]) for r in every)
        one = statistics.mean(r["communication"]["upload_bytes_mean_per_client_round"] for r in once) / 1024
        users = int(once[0]["summary"]["users"])
        lines.append(
            f"| {dataset} | {items:,} | {pairs:,} | {dense:,.0f} | {sparse:,.1f} | {dense / sparse:,.0f}x "
            f"| {total / users / 1024:,.0f} | {one:,.1f} |"
        )
    if len(lines) == 2:
        raise UserError(f"no stored fed_itemknn and private_epsilon runs of one dataset under {root}")
    return "\n".join(lines)


def secagg_report_markdown(report: dict[str, Any]) -> str:
    """One `python -m src.perf.secagg_cost` report (results/secagg/*.json) as markdown: the cost table and the audit."""
    lines = [
        f"SecAgg+ cost, {report['dataset']} {report['ablation']}: {report['runs']['plain']['clients']} clients, one "
        f"per node, {report['runs']['plain']['rounds']} rounds; m = {report['items']} items, a dense vector of "
        f"{report['pairs']:,} pairs = {report['masked_bytes_per_client_upload'] / 1e6:.2f} MB per client per upload",
        "",
        "| upload | bytes / client / round | bytes / client, run | x plain | s / round | of it SecAgg+ | x plain "
        f"| best {report['runs']['plain']['select']} |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in report["runs"].items():
        lines.append(
            f"| {name} | {r['bytes_per_client_round']:,.0f} | {r['bytes_per_client_run']:,.0f} | "
            f"{r['bytes_vs_plain']:.1f} | {r['s_per_round']:.2f} | {r['secagg_s_per_round']:.2f} | "
            f"{r['time_vs_plain']:.2f} | {r['best']:.4f} |"
        )
    lines += [
        "",
        "membership audit of what the server holds of each client (ROC AUC vs its training items, mean ± std over "
        "the clients, 0.5 = chance):",
        "",
        "| feature | the upload (plain) | the masked vector (SecAgg+) |",
        "| --- | ---: | ---: |",
    ]
    a = report["audit"]
    for f in (k for k in a["upload"] if not k.endswith("_std")):
        lines.append(
            f"| {f} | {a['upload'][f]:.3f} ± {a['upload'][f + '_std']:.3f} "
            f"| {a['masked'][f]:.3f} ± {a['masked'][f + '_std']:.3f} |"
        )
    return "\n".join(lines)


def secagg_measured_markdown(root: Path) -> str:
    """`secagg_measured`: every SecAgg+ cost report in results/secagg/ (beside the runs folder `root`)."""
    reports = sorted((root.parent / "secagg").glob("*.json"))
    if not reports:
        raise UserError(f"no SecAgg+ reports in {root.parent / 'secagg'}; run python -m src.perf.secagg_cost")
    return "\n\n".join(secagg_report_markdown(json.loads(p.read_text())) for p in reports)


BLOCKS = {"userdp:": userdp_markdown}
