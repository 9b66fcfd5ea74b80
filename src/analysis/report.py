"""`python -m src.report <folder> [...] [--out DIR] [--name NAME]`: mean and standard deviation over
seeds of every run's test metrics at its best validation round, beside the published number.

`--rounds N` cuts every run to its first N rounds (best validation round chosen within them).
One row per (dataset, method, protocol, variant): runs are split by every config key that differs between them
beyond the seed (the variant column names those keys), and `--by optim.name ...` adds keys: seeds, rounds, engine, test
hit@10 / ndcg@10 (sampled) and, under the clean protocol, the full-ranking ones, the published hit@10 /
ndcg@10 (`experiments/published.yaml`, paper protocol) and, for paper-protocol rows, the difference,
and the run folders the row was computed from. `--table table1|table2`: the paper's table (its rows,
runs of its 100 rounds), every cell not yet run shown as missing. Printed as
Markdown; with `--out`, also written as `<name>.md` and `<name>.csv` (atomically).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import warnings
from collections import defaultdict
from functools import cache
from pathlib import Path

from hydra.errors import HydraException
from omegaconf import OmegaConf

from src.analysis import bench_tables, privacy_tables, record_tables
from src.analysis.record_tables import per_client_round
from src.analysis.runs import (
    cell,
    claim_figure,
    config_value,
    load_runs,
    mean_std,
    planned_rounds,
    read_run,
    refuse_foreign_pages,
    truncate,
)
from src.cli.jobs import compose_runs
from src.cli.store import unreportable
from src.config.identity import NOT_IDENTITY, identity, neutral_values, normalised, only_where
from src.runtime.errors import OneLineParser, UserError
from src.runtime.published import published, published_tables
from src.runtime.results import atomic_write_text, selection_of

COLUMNS = ("test/hit@10", "test/ndcg@10", "test_full/hit@10", "test_full/ndcg@10")
TABLE_ROUNDS = 100  # the paper's tables train 100 rounds: `--table` leaves out shorter probes and longer sweeps


def collect(
    folders: list[Path], by: tuple[str, ...] = (), rounds: int | None = None, planned: int | None = None
) -> dict[tuple[str, ...], list[dict]]:
    """Finished results.json files under `folders`, grouped by (dataset, ablation, protocol[, variant]);
    with `rounds`, each run is cut to its first `rounds` rounds (`truncate`); with `planned`, only runs
    configured for that many rounds (`fl.rounds`) and not of a sensitivity sweep, traffic count or search (unless a
    table cell's computation, `table_cells`) are kept, the others counted in a warning."""
    groups: dict[tuple[str, ...], list[dict]] = defaultdict(list)
    usable = []
    payloads = load_runs(folders)
    if planned is not None:
        lengths = [planned_rounds(p["config"]) for p in payloads]
        other = sorted({n for n in lengths if n != planned}, key=str)
        if other:
            left = sum(n != planned for n in lengths)
            warnings.warn(
                f"left out {left} run(s) not of {planned} rounds (fl.rounds {', '.join(map(str, other))})",
                stacklevel=2,
            )
        payloads = [p for p, n in zip(payloads, lengths) if n == planned]
        # a paper table shows the paper's settings: the sensitivity sweeps' runs (`experiment_name: sweep_*`) have
        # their own figures (`src.plots sensitivity`); a sweep's default point is a table cell's computation, which
        # the campaign does not run twice (whichever experiment stored it first), so such a run stays in
        sweeps = [p for p in payloads if str(p["config"].get("experiment_name", "")).startswith(SWEEPS)]
        cells = table_cells(sweeps)
        sweeps = [p for p, is_cell in zip(sweeps, cells) if not is_cell]
        if sweeps:
            warnings.warn(
                f"left out {len(sweeps)} run(s) of sensitivity sweeps, traffic counts and searches (experiment "
                f"{', '.join(s + '*' for s in SWEEPS)}) that are not a table cell's computation",
                stacklevel=2,
            )
        payloads = [p for p in payloads if p not in sweeps]
    for payload in payloads:
        if rounds is not None:
            try:
                payload = truncate(payload, rounds)
            except ValueError as err:
                warnings.warn(f"skipped {err}", stacklevel=2)
                continue
        usable.append(payload)
    for payload in distinct(usable):
        key = (payload["dataset"], payload["ablation"], payload["protocol"])
        if by:
            key += (" ".join(f"{k}={config_value(payload['config'], k)}" for k in by),)
        groups[key].append(payload)
    return {k: v for key, runs in groups.items() for k, v in split_differing(key, runs).items()}


def table_cells(runs: list[dict]) -> list[bool]:
    """Whether each run is the computation a paper table runs for its cell: its config composed anew from the
    cell's choices alone (`dataset=`, `ablation=`, `protocol=`, `optim=`, `seed=`, as `experiment=table1|table2` run
    them) has the run's identity. Runs of a method or dataset that no longer composes are not."""
    by_choices: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for i, r in enumerate(runs):
        choices = ("dataset", r["dataset"]), ("ablation", r["ablation"]), ("protocol", r["protocol"])
        choices += (("optim", config_value(r["config"], "optim.name")),)
        by_choices[tuple(f"{k}={v}" for k, v in choices)].append(i)
    out = [False] * len(runs)
    for choices, members in by_choices.items():
        cells = cell_identities(choices, tuple(sorted({int(runs[i]["seed"]) for i in members})))
        for i in members:
            out[i] = cells.get(int(runs[i]["seed"])) == identity(runs[i]["config"])
    return out


@cache
def cell_identities(choices: tuple[str, ...], seeds: tuple[int, ...]) -> dict[int, str]:
    """seed -> identity of the table cell `choices` at that seed, composed once per set of choices (a page's tables
    ask for the same cells again); empty when a choice has no yaml today (or none was recorded)."""
    try:
        composed = compose_runs([[*choices, f"seed={seed}"] for seed in seeds])
    except (UserError, HydraException):
        return {}
    return {seed: identity(OmegaConf.to_container(cfg, resolve=True)) for seed, cfg in zip(seeds, composed)}


# experiments whose runs are not the paper tables' cells (unless one is a cell's computation, `table_cells`): the
# sensitivity sweeps, the traffic counts (a table's run counted another way) and the trials of hyperparameter searches
SWEEPS = ("sweep_", "traffic", "search")
# config keys that may differ between runs of one row: the seed, and the keys that cannot change results (where
# things are read or written, speed, chunking, device: `NOT_IDENTITY`)
SAME_ROW = ("seed", *NOT_IDENTITY)


def distinct(runs: list[dict]) -> list[dict]:
    """The runs with one of each computation (`identity`: the campaign's key, the seed included): two runs of one
    config and seed (stored twice, or an `optim=` sweep of a method that never reads `optim`) would count as two
    seeds; the first by path is kept and the other named in a warning."""
    kept: dict[tuple[str, str], dict] = {}
    for run in runs:
        key = (identity(run["config"]), runner_of(run))
        if key in kept:
            warnings.warn(
                f"{run['path']} is the computation of {kept[key]['path']} (same config and seed): counted once",
                stacklevel=2,
            )
            continue
        kept[key] = run
    return list(kept.values())


def flat(config: dict) -> dict[str, str]:
    """A resolved config as {dotted key: value as text}, keys added later at their default left out (so a
    run made before such a key existed groups with one made after)."""
    return {k: str(v) for k, v in normalised(config).items()}


def runner_of(run: dict) -> str:
    """What ran it: `flower` (results.json `engine`) or the simulator (no such field)."""
    return str(run.get("engine", "simulator"))


def split_differing(key: tuple[str, ...], runs: list[dict]) -> dict[tuple[str, ...], list[dict]]:
    """Never average runs whose configs differ in more than the seed, or that ran on different engines (the
    simulator, Flower): such a group is split by the keys that differ, which become (part of) the row's variant."""
    configs = [{**flat(r["config"]), "run.runner": runner_of(r)} for r in runs]
    keys = sorted(
        {k for c in configs for k in c if not only_where(k, SAME_ROW) and len({c.get(k) for c in configs}) > 1}
    )
    named = {k.rsplit(".", 1)[0] for k in keys if k.endswith(".name")}

    def implied(k: str) -> bool:
        """A key of a group whose choice differs, one value among the runs of each choice: its name says it."""
        group = k.rsplit(".", 1)[0]
        if k.endswith(".name") or group not in named:
            return False
        values: dict[str | None, set] = defaultdict(set)
        for conf in configs:
            values[conf.get(f"{group}.name")].add(conf.get(k))
        return all(len(v) == 1 for v in values.values())

    # a group whose choice differs is shown by its name alone (optim.name=sgd, not its lr, betas, ...), unless runs
    # of one choice differ in another of its keys (two SGD learning rates): then that key is shown too
    keys = [k for k in keys if not implied(k)]
    # a run on a cut dataset or unverified files is never a reported number: its row always says so
    off_limits = sorted({k for r in runs for k in unreportable(r["config"])})
    keys = sorted(set(keys) | set(off_limits))
    if off_limits:
        warnings.warn(
            f"{key[0]} {key[1]} {key[2]}: runs with {' or '.join(off_limits)} set (a cut dataset or unverified files) "
            "are shown as their own rows; never a reported number",
            stacklevel=2,
        )
    if not keys:
        return {key: runs}
    out: dict[tuple[str, ...], list[dict]] = defaultdict(list)
    for run, conf in zip(runs, configs):
        label = " ".join(
            f"{k}={conf.get(k, neutral_values().get(k, '-'))}" for k in keys
        )  # absent: its neutral default
        variant = f"{key[3]} {label}" if len(key) > 3 else label
        out[(*key[:3], variant)].append(run)
    return out


def rows(groups: dict[tuple[str, ...], list[dict]]) -> list[dict]:
    """One summary row per group, with the published number and the difference."""
    pub = published()
    out = []
    for key, runs in sorted(groups.items()):
        dataset, ablation, protocol = key[:3]
        row: dict = {"dataset": dataset, "method": ablation, "protocol": protocol}
        if len(key) > 3:
            row["variant"] = key[3]
        row |= {
            "seeds": len(runs),
            "rounds": "/".join(map(str, sorted({len(r["history"]) for r in runs}))),
            "engine": "/".join(sorted({engine(r["config"]) for r in runs})),
        }
        # what chose each run's best round (validation only), so variants are compared on it, not on test
        selects = {selection_of(r) for r in runs}
        chosen = [r["best_val"][selection_of(r)] for r in runs if selection_of(r) in (r.get("best_val") or {})]
        row["selects"] = ", ".join(sorted(selects))
        # runs that chose on different metrics have no one figure to average
        row["best val"], row["best val std"] = mean_std(chosen) if len(selects) == 1 else (None, None)
        row["best val seeds"] = len(chosen) if len(selects) == 1 else 0
        for col in COLUMNS:
            values = [r["test_at_best"][col] for r in runs if col in r["test_at_best"]]
            row[col], row[f"{col} std"] = mean_std(values)
            row[f"{col} seeds"] = len(values)  # fewer than `seeds` where some runs lack the metric (no full ranking)
        ref = pub.get(ablation, {}).get(dataset)
        row["published hit@10"], row["published ndcg@10"] = ref if ref else (None, None)
        # the paper's numbers are paper-protocol figures: a difference is only like for like there
        comparable = ref is not None and protocol == "paper" and row["test/hit@10"] is not None
        row["diff hit@10"] = row["test/hit@10"] - ref[0] if comparable else None
        row["diff ndcg@10"] = row["test/ndcg@10"] - ref[1] if comparable else None
        row["runs"] = " ".join(r["path"] for r in runs)
        out.append(row)
    return out


def engine(config: dict) -> str:
    """What trains the method, as its yaml names it (`ablation.engine`): the optimiser, with the alignment mode for
    the alignment methods (`adam+fast`, `sgd+exact`); `central-adam` for the centralised MF's own Adam; `none` for
    a calibration scorer, which trains nothing."""
    return config_value(config, "ablation.engine")


def with_missing(table: list[dict], name: str) -> list[dict]:
    """The rows of published table `name` (every dataset x method, both protocols), each cell not yet run
    added as a row with 0 seeds, so a missing cell shows instead of being left out."""
    have = {(r["dataset"], r["method"], r["protocol"]) for r in table}
    spec = published_tables()[name]
    out = list(table)
    for method, per_dataset in spec.items():
        for dataset, ref in per_dataset.items():
            for protocol in ("paper", "clean"):
                if (dataset, method, protocol) not in have:
                    row = {
                        "dataset": dataset,
                        "method": method,
                        "protocol": protocol,
                        "seeds": 0,
                        "rounds": "-",
                        "engine": "-",
                        "selects": "-",
                        "best val": None,
                        "best val std": None,
                        "best val seeds": 0,
                        **{c: None for c in COLUMNS},
                        **{f"{c} std": None for c in COLUMNS},
                        **{f"{c} seeds": 0 for c in COLUMNS},
                        "published hit@10": ref[0] if ref else None,
                        "published ndcg@10": ref[1] if ref else None,
                        "diff hit@10": None,
                        "diff ndcg@10": None,
                        "runs": "",
                    }
                    if any("variant" in r for r in table):
                        row["variant"] = ""
                    out.append(row)
    order = {m: i for i, m in enumerate(spec)}
    datasets = {d: i for i, d in enumerate(dict.fromkeys(d for per in spec.values() for d in per))}
    keep = [r for r in out if r["method"] in order and r["dataset"] in datasets]
    return sorted(
        keep,
        key=lambda r: (
            datasets[r["dataset"]],
            r["protocol"] != "paper",
            order[r["method"]],
            engine_rank(r["engine"]),
            r.get("variant", ""),
        ),
    )


# The engines in the order a table lists a cell's rows: the lineage's SGD first, the engine that reproduces the
# published backbone (PFedRec within 1.2 hit@10 of its published row on the four datasets; Adam 4-34 below).
ENGINE_ORDER = ("sgd", "adam")


def engine_rank(name: str) -> int:
    """A row's place by its engine (`ENGINE_ORDER`; others after, then rows not run)."""
    base = name.split("+")[0]
    return ENGINE_ORDER.index(base) if base in ENGINE_ORDER else len(ENGINE_ORDER) + (name == "-")


def markdown(table: list[dict]) -> str:
    """The rows as a Markdown table (published numbers are paper-protocol figures)."""
    variant = any("variant" in r for r in table)
    head = [
        "dataset",
        "method",
        "protocol",
        *(["variant"] if variant else []),
        "seeds",
        "rounds",
        "engine",
        "best val (selects)",
        *COLUMNS,
        "published (paper)",
        "diff hit@10 / ndcg@10",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in table:
        pub = "-" if r["published hit@10"] is None else f"{r['published hit@10']:.2f} / {r['published ndcg@10']:.2f}"
        diff = "-" if r["diff hit@10"] is None else f"{r['diff hit@10']:+.2f} / {r['diff ndcg@10']:+.2f}"
        lines.append(
            "| "
            + " | ".join(
                [
                    r["dataset"],
                    r["method"],
                    r["protocol"],
                    *([r.get("variant", "")] if variant else []),
                    str(r["seeds"]),
                    r["rounds"],
                    r.get("engine", "-"),
                    selected_cell(r),
                    *[column_cell(r, c) for c in COLUMNS],
                    pub,
                    diff,
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def selected_cell(row: dict) -> str:
    """The selection metric at each run's best round, mean ± std (named where it is not val/hit@10): what chose the
    round the test figures are read at, and what a comparison of variants should be read on."""
    if not row["seeds"] or row.get("best val") is None:
        return "missing" if not row["seeds"] else "-"
    text = cell(row["best val"], row["best val std"])
    counted = row.get("best val seeds", row["seeds"])
    text = text if counted == row["seeds"] else f"{text} ({counted} of {row['seeds']} seeds)"
    return text if row["selects"] == "val/hit@10" else f"{row['selects']} {text}"


def column_cell(row: dict, col: str) -> str:
    """A metric's cell: mean ± std over the seeds, with how many runs it averages where fewer than the row's seeds
    have the metric (`missing` for a cell not yet run)."""
    if not row["seeds"]:
        return "missing"
    text = cell(row[col], row[f"{col} std"])
    counted = row.get(f"{col} seeds", row["seeds"])
    return text if counted in (0, row["seeds"]) else f"{text} ({counted} of {row['seeds']} seeds)"


def write(table: list[dict], out: Path, name: str) -> None:
    """`name`.md and `name`.csv in `out`."""
    atomic_write_text(out / f"{name}.md", markdown(table) + "\n\nRuns per row: see the `runs` column of the CSV.\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for row in table for k in row)), restval="")
    writer.writeheader()
    writer.writerows(table)
    atomic_write_text(out / f"{name}.csv", buf.getvalue())


# the headline: the main methods of Table 1, a row per method and engine, both protocols side by side
HEADLINE_METHODS = ("central", "backbone", "fedavg", "local", "full", "fed_itemknn")


def headline(table1: list[dict]) -> list[dict]:
    """Table 1's main methods as one row per (dataset, method, engine): test hit@10 under the paper and the clean
    protocol (mean ± std, seeds), the clean protocol's full-ranking hit@10, and the published number."""
    out: dict[tuple[str, str, str], dict] = {}
    for r in table1:
        if r["method"] not in HEADLINE_METHODS or (r["seeds"] and "aggregate=" in r.get("variant", "")):
            continue
        key = (r["dataset"], r["method"], r["engine"] if r["seeds"] else "-")
        row = out.setdefault(key, {"dataset": key[0], "method": key[1], "engine": key[2]})
        seeds = f" ({r['seeds']})" if r["seeds"] else ""
        row[r["protocol"]] = cell(r["test/hit@10"], r["test/hit@10 std"]) + seeds if r["seeds"] else "missing"
        if r["protocol"] == "clean":
            row["clean, full ranking"] = cell(r["test_full/hit@10"], r["test_full/hit@10 std"]) if r["seeds"] else "-"
        row["published"] = cell(r["published hit@10"])
    ran = {key[:2] for key in out if key[2] != "-"}  # cells some engine has run: their "not run" row goes
    return [row for key, row in out.items() if key[2] != "-" or key[:2] not in ran]


def headline_markdown(rows_: list[dict]) -> str:
    cols = ("dataset", "method", "engine", "paper", "clean", "clean, full ranking", "published")
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    absent = {"paper": "missing", "clean": "missing"}  # a protocol this engine has not run yet
    lines += ["| " + " | ".join(str(r.get(c, absent.get(c, "-"))) for c in cols) + " |" for r in rows_]
    return "\n".join(lines)


def generated(kind: str, root: Path) -> str:
    """The markdown of a generated block: `table1`, `table2` (the paper's tables), `headline` (Table 1's main
    methods, both protocols side by side), `calibration` (the runs under <root>/calibration), `variants` (the
    graph variants beside the methods they vary, `VARIANT_FOLDERS`), `traffic`, `audit`, `claims`, `audit10`,
    `cooccurrence`, `runs:<folders>`, and the blocks with an argument of `BLOCKS` (single run records,
    src/analysis/record_tables.py; bench reports, src/analysis/bench_tables.py)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "calibration":
            return markdown(rows(collect([root / "calibration"])))
        if kind == "variants":
            return markdown(rows(collect([root / f for f in VARIANT_FOLDERS])))
        if kind == "traffic":
            return traffic_markdown(root)
        if kind == "audit":
            return audit_markdown(root)
        if kind == "claims":
            return claims_markdown(root)
        if kind == "audit10":
            return record_tables.audit10_markdown(root.parent)
        if kind == "cooccurrence":
            return record_tables.cooccurrence_markdown(root.parent)
        if kind == "userdp_audit":
            return privacy_tables.userdp_audit_markdown(root.parent)
        if kind == "secagg_cost":
            return privacy_tables.secagg_cost_markdown(root)
        if kind == "secagg_measured":
            return privacy_tables.secagg_measured_markdown(root)
        for prefix, render in BLOCKS.items():  # `diag:<folder>@<rounds>`, `comm:<dataset>`, `speed:<bench>`, ...
            if kind.startswith(prefix):
                return render(root, kind[len(prefix) :])
        if kind.startswith(RUNS_BLOCK):  # `runs:a,b`: the table of the stored runs under <root>/a and <root>/b
            return markdown(rows(collect(block_folders(root, kind[len(RUNS_BLOCK) :]))))
        table = with_missing(rows(collect([root], planned=TABLE_ROUNDS)), "table1" if kind == "headline" else kind)
    return headline_markdown(headline(table)) if kind == "headline" else markdown(table)


def block_folders(root: Path, spec: str) -> list[Path]:
    """The folders of a `runs:` block: comma-separated paths under `root`, each a folder or a glob pattern
    (`search_best/ml-100k/*/*/*lr=0.005_optim=sgd`: one setting of every method and protocol)."""
    out: list[Path] = []
    for item in spec.split(","):
        out.extend(sorted(p for p in root.glob(item) if p.is_dir()) if set(item) & set("*?[") else [root / item])
    return out


# the runs the graph-variants table compares (this project's kNN variants beside the paper's methods and the
# calibration), relative to the runs' root
VARIANT_FOLDERS = (
    "graph_variants",
    "issue3_baselines",
    "calibration",
    "table1/ml-100k/backbone",
    "table1/ml-100k/local",
    "table1/filmtrust/backbone",
    "table2/ml-100k/full",
    "table2/filmtrust/full",
    "table1/filmtrust/full",
)
GENERATED = (
    "table1",
    "table2",
    "headline",
    "calibration",
    "variants",
    "traffic",
    "audit",
    "claims",
    "audit10",
    "cooccurrence",
    "userdp_audit",
    "secagg_cost",
    "secagg_measured",
)


def cell_row(table: list[dict], dataset: str, method: str, protocol: str, optim: str) -> dict | None:
    """The summary row of a method's runs on a dataset under a protocol with engine `optim` (the one with the most
    seeds when several variants ran), or None when none is stored."""
    found = [r for r in table if (r["dataset"], r["method"], r["protocol"]) == (dataset, method, protocol)]
    found = [r for r in found if r["engine"].split("+")[0] == optim and r["seeds"]]
    return max(found, key=lambda r: r["seeds"]) if found else None


LEVEL_POINTS = 1.0  # two hit@10 means this close (or within their seeds' summed std) are "level"


def gap(ours: dict, theirs: dict) -> float | None:
    """hit@10 of two summary rows, ours minus theirs in points; None when level: the means differ by at most
    LEVEL_POINTS or by at most the sum of their seed stds (a one-seed row has std 0)."""
    diff = ours["test/hit@10"] - theirs["test/hit@10"]
    return None if abs(diff) <= max(LEVEL_POINTS, ours["test/hit@10 std"] + theirs["test/hit@10 std"]) else diff


def fed_itemknn_verdict(table: list[dict]) -> str:
    """`fed_itemknn` (Adam) against PFedRec with the lineage engine under the clean protocol, on every dataset where
    both are stored, each comparison worded from its figures (`gap`)."""
    found = []  # (dataset name, the gap or None when level, "ours vs theirs")
    for dataset, name in bench_tables.NAMES.items():
        ours = cell_row(table, dataset, "fed_itemknn", "clean", "adam")
        theirs = cell_row(table, dataset, "backbone", "clean", "sgd")
        if ours and theirs:
            figures = " vs ".join(claim_figure(r["test/hit@10"], r["seeds"]) for r in (ours, theirs))
            found.append((name, gap(ours, theirs), figures))
    if not found:
        return "has no clean-protocol run beside PFedRec's yet"
    if all(diff is None for _, diff, _ in found):
        listed = ", ".join(f"{name} {figures}" for name, _, figures in found)
        return f"is level with PFedRec under the clean protocol without sharing an embedding ({listed})"
    said = []
    for i, (name, diff, figures) in enumerate(found):
        who = "PFedRec" if i == 0 else "it"
        verdict = (
            f"level with {who}" if diff is None else f"{abs(diff):.2f} points {'below' if diff < 0 else 'above'} {who}"
        )
        said.append(f"{verdict} on {name} ({figures})")
    listed = said[0] if len(said) == 1 else ", ".join(said[:-1]) + " and " + said[-1]
    return f"shares no embedding and, under the clean protocol, is {listed}"


def claims_markdown(root: Path) -> str:
    """The README's findings as sentences whose every figure is read from the stored runs (Table 1/2 cells, the
    traffic table): sampled test hit@10 in percent, mean over the seeds stored (their number in brackets)."""
    table = rows(collect([root], planned=TABLE_ROUNDS))

    def hit(dataset: str, method: str, protocol: str, optim: str) -> str:
        r = cell_row(table, dataset, method, protocol, optim)
        return claim_figure(None, 0) if r is None else claim_figure(r["test/hit@10"], r["seeds"])

    def pub(dataset: str, method: str) -> str:
        ref = published().get(method, {}).get(dataset)
        return f"{ref[0]:.2f}" if ref else "-"

    aucs = [
        v
        for path in sorted((root.parent / AUDITS).glob("fed_itemknn_*.json"))
        for v in json.loads(path.read_text())["membership_auc"].values()
    ]
    leak = f" (membership AUC {min(aucs):.2f}-{max(aucs):.2f} from one upload at its operating point)" if aucs else ""
    backbone = ", ".join(
        f"{bench_tables.NAMES[d]} ({hit(d, 'backbone', 'paper', 'sgd')} vs {pub(d, 'backbone')})"
        for d in ("ml-100k", "filmtrust", "ml-1m", "lastfm-2k")
    )
    private = privacy_tables.claim(root, hit("ml-100k", "backbone", "clean", "sgd"))
    secure = privacy_tables.secagg_claim(root)
    search = record_tables.search_claim(root, published(), lambda d, engine: hit(d, "local", "paper", engine))
    traffic = traffic_verdict(root, "fed_itemknn")
    return "\n".join(
        [
            f"- **The paper protocol leaks.** The `local` canary, which never federates, reaches "
            f"{hit('ml-100k', 'local', 'paper', 'sgd')} hit@10 on ML-100K with the lineage engine under it, and "
            f"{hit('ml-100k', 'local', 'clean', 'sgd')} (chance is 10) under the clean protocol "
            "([Data and protocols](docs/data.md)).",
            f"- **The lineage SGD engine reproduces the published PFedRec backbone** (paper protocol, here vs "
            f"published): {backbone}; Adam does not (ML-100K {hit('ml-100k', 'backbone', 'paper', 'adam')}).",
            f"- **AlignFedRec is at chance under the clean protocol** (ML-100K {hit('ml-100k', 'full', 'clean', 'sgd')}"
            f" with SGD), and no engine reproduces its published rows under the paper protocol (ML-100K: "
            f"{hit('ml-100k', 'full', 'paper', 'sgd')} with SGD, {hit('ml-100k', 'full', 'paper', 'adam')} with "
            f"Adam, against {pub('ml-100k', 'full')}).",
            f"- **`fed_itemknn`** (this project's: item-kNN on the shared similarity) {fed_itemknn_verdict(table)}, "
            f"but its uploads give away a client's training items{leak}"
            f"{' and, ' + traffic if traffic else ''} ([Privacy and traffic](docs/communication-privacy.md)).",
            *([search] if search else []),
            *([private] if private else []),
            *([secure] if secure else []),
        ]
    )


# the audits at the operating point of stored runs (`src.audit ... fl.rounds=<the run's best round>`), beside the runs
AUDITS = "audit/operating_point"


def audit_markdown(root: Path) -> str:
    """The membership and recovery attacks on the uploads at the best validation round of each stored run audited
    (`<root>/../audit/operating_point/*.json`), each beside its run's accuracy at that round."""
    head = "| dataset | method | upload | seed | round (best val) | val hit@10 (audit / run) | test hit@10 (run) "
    head += "| membership AUC by score (mean ± std over clients) | recovery cosine (chance) |"
    lines = [head, "|" + "---|" * 9]
    for path in sorted((root.parent / AUDITS).glob("*.json")):
        a = json.loads(path.read_text())
        o = dict(x.split("=", 1) for x in a["overrides"] if "=" in x)
        folder = root / o["experiment"] / a["dataset"] / a["ablation"] / a["protocol"] / "default" / f"seed{o['seed']}"
        run = read_run(folder / "results.json")
        best = next(r for r in run["history"] if r["round"] == run["best_round"])
        aucs = ", ".join(f"{k} {v:.2f} ± {a['membership_auc_std'][k]:.2f}" for k, v in a["membership_auc"].items())
        chance = a["recovery_cosine_chance"]
        recovery = f"{a['recovery_cosine']:.2f} ({'-' if chance != chance else f'{chance:.2f}'})"
        lines.append(
            f"| {a['dataset']} | {a['ablation']} | {a.get('upload', 'similarity')} | {o['seed']} | {a['rounds']} "
            f"| {100 * a['val_hit@10_last']:.2f} / {100 * best['val/hit@10']:.2f} | {100 * best['test/hit@10']:.2f} "
            f"| {aucs} | {recovery} |"
        )
    return "\n".join(lines)


# the runs the traffic table compares, per dataset: the parameter-sharing baselines counted densely (Table 1) and
# as changed rows (experiment=traffic), beside the similarity-sharing methods (Table 2's full, fed_itemknn)
TRAFFIC_FOLDERS = (
    "traffic/{d}",
    "table1/{d}/backbone",
    "table1/{d}/fedavg",
    "table2/{d}/full",
    "graph_variants/{d}/fed_itemknn",
)
TRAFFIC_DATASETS = ("ml-100k", "filmtrust")


def traffic_rows(root: Path) -> list[dict]:
    """Upload and download bytes per client and round of each method's run (clean protocol, seed 0, 100 rounds), per
    traffic dataset, with `ratio`: the total over PFedRec's counted as changed rows (None without that run)."""
    out = []
    for d in TRAFFIC_DATASETS:
        runs = [
            r
            for r in distinct(load_runs([root / f.format(d=d) for f in TRAFFIC_FOLDERS]))
            if r["protocol"] == "clean"
            and r["config"].get("seed") == 0
            and planned_rounds(r["config"]) == TABLE_ROUNDS
            and "comm/uploaders" in r["history"][0]
        ]
        table = []
        for r in runs:
            up, down = per_client_round(r["history"])
            tables = "-"  # a similarity-sharing method shares no table
            if r["ablation"] in ("backbone", "fedavg"):  # runs made before comm.tables existed counted them densely
                tables = {"-": "dense"}.get(
                    config_value(r["config"], "comm.tables"), config_value(r["config"], "comm.tables")
                )
            row = {"dataset": d, "method": r["ablation"], "tables": tables, "engine": engine(r["config"])}
            table.append(row | {"up": up, "down": down, "run": r})
        ref = next((t["up"] + t["down"] for t in table if t["method"] == "backbone" and t["tables"] == "rows"), None)
        for row in sorted(table, key=lambda t: (t["method"], t["tables"], t["engine"])):
            out.append(row | {"ratio": (row["up"] + row["down"]) / ref if ref else None})
    return out


def traffic_markdown(root: Path) -> str:
    """Upload, download and their total per client and round, side by side per method (clean protocol, seed 0,
    100 rounds), each with the test hit@10 of its run; `rows` = tables counted as their changed rows."""
    head = (
        "| dataset | method | tables counted | engine | upload KiB | download KiB | total KiB | total / PFedRec rows "
    )
    head += "| test hit@10 | run (under results/runs) |"
    lines = [head, "|" + "---|" * 10]
    for t in traffic_rows(root):
        ratio = f"{t['ratio']:.2f}" if t["ratio"] is not None else "-"
        hit = cell(100 * t["run"]["test_at_best"]["test/hit@10"])
        up, down = t["up"], t["down"]
        lines.append(
            f"| {t['dataset']} | {t['method']} | {t['tables']} | {t['engine']} | {up / 1024:.1f} | {down / 1024:.1f} "
            f"| {(up + down) / 1024:.1f} | {ratio} | {hit} | "
            f"{Path(t['run']['path']).resolve().relative_to(root.resolve())} |"
        )
    return "\n".join(lines)


def traffic_verdict(root: Path, method: str) -> str:
    """`counted as sent, it moves 2.01 times (ML-100K) and 1.60 times (FilmTrust) the bytes of PFedRec sending its
    changed rows`, from the traffic table ("" when no run of `method` is there)."""
    found = [t for t in traffic_rows(root) if t["method"] == method and t["ratio"] is not None]
    if not found:
        return ""
    names = bench_tables.NAMES
    ratios = " and ".join(f"{t['ratio']:.2f} times ({names.get(t['dataset'], t['dataset'])})" for t in found)
    return f"counted as sent, it moves {ratios} the bytes of PFedRec sending its changed rows"


# the generated blocks with an argument, from single run records and from the bench reports
BLOCKS = {**record_tables.BLOCKS, **bench_tables.BLOCKS, **privacy_tables.BLOCKS}
RUNS_BLOCK = "runs:"  # a block of any stored folders: `<!-- runs:issue3_baselines -->` ... `<!-- /runs:... -->`


def block_kinds(text: str) -> list[str]:
    """The generated blocks a text holds: the kinds of GENERATED, and every block with an argument (`runs:<folders>`
    and the prefixes of `BLOCKS`)."""
    prefixes = "|".join(re.escape(p) for p in (RUNS_BLOCK, *BLOCKS))
    named = re.findall(rf"<!-- ((?:{prefixes})[^ >]+) -->", text)
    return [k for k in GENERATED if f"<!-- {k} -->" in text] + sorted(set(named))


def update(files: list[Path], root: Path) -> list[str]:
    """Rewrite every generated block (`<!-- kind -->` ... `<!-- /kind -->`, `block_kinds`) of `files` from the
    runs under `root`; return the kinds found. A file is written only when a block changed."""
    found = []
    for path in files:
        text = new = path.read_text()
        for kind in block_kinds(text):
            head, tail = f"<!-- {kind} -->\n", f"\n<!-- /{kind} -->"
            if head in new and tail in new:
                start, end = new.index(head) + len(head), new.index(tail)
                new = new[:start] + generated(kind, root) + new[end:]
                found.append(kind)
        if new != text:
            atomic_write_text(path, new)
    return found


PAGE_SECTIONS = (
    ("The main methods under both protocols (Table 1's, hit@10)", "headline"),
    ("Table 1", "table1"),
    ("Table 2: the ablations", "table2"),
    ("Calibration: what co-occurrence alone reaches (centralised, nothing trained)", "calibration"),
    ("Server-graph variants (this project's, not the paper's) beside the methods they vary", "variants"),
    ("Traffic per client and round, every method counted as sent (clean protocol, seed 0)", "traffic"),
)


def curve_runs(root: Path) -> list[dict]:
    """Seed 0 of Table 1's and Table 2's main cells (`HEADLINE_METHODS`, 100 rounds): the runs the page plots."""
    runs = load_runs([root / "table1", root / "table2"])
    keep = [
        r
        for r in runs
        if r["ablation"] in HEADLINE_METHODS
        and r["config"].get("seed") == 0
        and planned_rounds(r["config"]) == TABLE_ROUNDS
    ]
    return distinct(keep)


def results_page(root: Path, out: Path) -> None:
    """Write `<out>/README.md` (`results_page_text`) and the per-round curves of the main cells beside it as PNG and
    SVG (`<out>/curves/`)."""
    from src.analysis.plots import curves

    atomic_write_text(out / "README.md", results_page_text(root, out))
    curves(curve_runs(root), out / "curves")


def results_page_text(root: Path, out: Path) -> str:
    """The results page of the runs under `root`: every generated table, and the curves' images (in `<out>/curves/`)."""
    groups = sorted({(r["dataset"], r["protocol"]) for r in curve_runs(root)})
    parts = [
        "# Results\n",
        f"Generated by `python -m src.report {root} --out {out}` from the runs stored in `{root}/` (each with its "
        "config, its\nwhole per-round history and the commit it ran at); never edited by hand: `tests/test_docs.py` "
        "fails when\nthis page is out of date. Test metrics in percent at the best validation round, mean ± std over "
        "seeds;\n`missing` = not run yet; `published` = the paper's number (paper protocol only).\n",
    ]
    for title, kind in PAGE_SECTIONS:
        parts.append(f"## {title}\n\n<!-- {kind} -->\n{generated(kind, root)}\n<!-- /{kind} -->\n")
    parts.append("## Per-round curves (seed 0 of the main cells; validation solid, test dotted)\n")
    parts += [f"![{d}, {p}](curves/curves_{d}_{p}.png)\n" for d, p in groups]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = OneLineParser(
        prog="python -m src.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="also write <name>.md and <name>.csv here")
    parser.add_argument(
        "--name", default=None, help="write <name>.md and <name>.csv; without it, --out writes the results page"
    )
    parser.add_argument(
        "--by", nargs="*", default=[], help="config keys that split rows besides those that differ, e.g. optim.name"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="compare runs of different lengths: cut each to its first N rounds, best val round within",
    )
    parser.add_argument(
        "--update",
        nargs="+",
        type=Path,
        default=None,
        help="rewrite the generated blocks (<!-- table1 --> ...) of these Markdown files from the runs under FOLDER",
    )
    parser.add_argument(
        "--table",
        choices=("table1", "table2"),
        default=None,
        help=f"the paper's table: its rows, its {TABLE_ROUNDS}-round runs, every cell not yet run shown as missing",
    )
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds {args.rounds} is invalid; expected an integer >= 1")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; expected a folder (created when missing)")
    refuse_foreign_pages("--update", args.update or [], args.folders, "--update only with results/runs")
    if args.out is not None:  # what it writes: the results page (README.md and curves/) or <name>.md and .csv
        pages = ["README.md", "curves"] if args.table is None and args.name is None else [f"{args.name or 'table'}.md"]
        written = [args.out / p for p in (*pages, f"{args.name or 'table'}.csv")]
        refuse_foreign_pages("--out", written, args.folders, "--out outside results/ (e.g. --out tables/)")
    if args.update:
        missing = [str(f) for f in args.update if not f.is_file()]
        if missing:
            parser.error(f"--update {' '.join(missing)}: no such file; expected Markdown files with generated blocks")
        kinds = update(args.update, args.folders[0])
        print(f"updated {', '.join(kinds) or 'no'} generated block(s) in {', '.join(map(str, args.update))}")
        return []
    if args.out is not None and args.table is None and args.name is None:
        results_page(args.folders[0], args.out)
        print(f"wrote {args.out / 'README.md'} and its curves in {args.out / 'curves'}")
        return []
    planned = TABLE_ROUNDS if args.table else None
    table = rows(collect(args.folders, tuple(args.by), args.rounds, planned))
    if args.table:
        table = with_missing(table, args.table)
    if not table:
        raise UserError(
            f"no finished results.json under {', '.join(map(str, args.folders))}; expected folders holding runs"
        )
    print(markdown(table))
    if args.out is not None:
        write(table, args.out, args.name or "table")
    return table
