"""Docs tables read from single stored records rather than from cells over seeds: a run's per-round server-graph
diagnostics, the communication and privacy probes (10 rounds, one seed), the 10-round audits and the co-occurrence
bound. Each is a generated block of `src.report --update` (`<!-- kind:argument -->`), so no figure is pasted.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

from src.analysis import cooccurrence
from src.analysis.bench_tables import NAMES
from src.analysis.runs import claim_figure, config_value, encoding_label, load_runs, mean_std, read_run
from src.config.identity import identity
from src.runtime.errors import UserError
from src.runtime.results import selection_of

COOCCURRENCE = "cooccurrence.json"  # results/<this>: `python -m src.cooccurrence --out results/cooccurrence.json`


def per_client_round(history: list[dict]) -> tuple[float, float]:
    """(upload, download) bytes per client and round over a run: all bytes sent over all client-rounds."""
    up = sum(r.get("comm/upload_bytes_total", 0.0) for r in history) / max(sum(r["comm/uploaders"] for r in history), 1)
    down = sum(r.get("comm/download_bytes_total", 0.0) for r in history) / max(sum(r["clients"] for r in history), 1)
    return up, down


def one_run(root: Path, folder: str) -> dict:
    """The finished run stored in `<root>/<folder>` (its results.json), or UserError naming the folder."""
    run = read_run(root / folder / "results.json") if (root / folder / "results.json").is_file() else None
    if run is None:
        raise UserError(f"no finished run in {root / folder}; expected a stored run folder holding results.json")
    return run


def split_spec(spec: str) -> tuple[list[str], list[int]]:
    """`a,b@1,5,10` -> (['a', 'b'], [1, 5, 10]): the run folders and the rounds of a diagnostics block."""
    folders, _, rounds = spec.partition("@")
    numbers = rounds.split(",")
    if not rounds or not all(r.isdigit() for r in numbers):
        raise UserError(f"block {spec!r} names no rounds; expected <folder>[,<folder>...]@<round>,<round>")
    return folders.split(","), [int(r) for r in numbers]


def round_row(run: dict, round_: int) -> dict:
    """History row `round_` of a run, or UserError naming the run and its last round."""
    row = next((r for r in run["history"] if r["round"] == round_), None)
    if row is None:
        last = run["history"][-1]["round"] if run["history"] else 0
        raise UserError(f"{run['path']} has no round {round_}; expected a round from 1 to {last}")
    return row


def diag_row(run: dict, round_: int) -> dict:
    """History row `round_` of a run that logged the graph diagnostics, or UserError naming the run."""
    row = round_row(run, round_)
    if "diag/edges" not in row:
        raise UserError(f"{run['path']} logged no graph diagnostics; expected a run made with diag.graph=true")
    return row


def diag_markdown(root: Path, spec: str) -> str:
    """`diag:<folder>@<rounds>`: one run's server graph per round (`diag.graph=true`): validation hit@10, Spearman of
    S_g with co-occurrence, graph edges, the share of them already in round 1, communities, NMI with genres beside
    size-matched random partitions; the best validation round is marked."""
    folders, rounds = split_spec(spec)
    if len(folders) != 1:
        raise UserError(f"block diag:{spec} names {len(folders)} runs; expected one (diagvs: compares several)")
    run = one_run(root, folders[0])
    head = "| round | val hit@10 | Spearman with co-occurrence | edges | edges from round 1 | communities "
    head += "| NMI with genres | NMI, size-matched random |"
    lines = [head, "| ---: " * 8 + "|"]
    for k in rounds:
        r = diag_row(run, k)
        mark = " (best)" if k == run["best_round"] else ""
        nmi = [f"{r[key]:.3f}" if key in r else "-" for key in ("diag/nmi_genre", "diag/nmi_genre_random")]
        lines.append(
            f"| {k}{mark} | {100 * r['val/hit@10']:.2f} | {r['diag/spearman_cooccurrence']:.3f} | "
            f"{r['diag/edges']:,.0f} | {100 * r['diag/edges_from_round1']:.0f}% | "
            f"{r.get('community/count', float('nan')):,.0f} | {nmi[0]} | {nmi[1]} |"
        )
    return "\n".join(lines)


def variant_label(run: dict) -> str:
    """A run's method as a column head: `knn_ica`, and `, support mean` where S_g is averaged over supporters."""
    support = config_value(run["config"], "ablation.aggregate") == "support_mean"
    return f"`{run['ablation']}`" + (", support mean" if support else "")


def diagvs_markdown(root: Path, spec: str) -> str:
    """`diagvs:<folder>,<folder>...@<rounds>`: several runs side by side, each cell Spearman of S_g with co-occurrence
    / share of the graph's edges already in round 1 / validation hit@10."""
    folders, rounds = split_spec(spec)
    runs = [one_run(root, f) for f in folders]
    lines = ["| round | " + " | ".join(variant_label(r) for r in runs) + " |", "| ---: " * (len(runs) + 1) + "|"]
    for k in rounds:
        cells = []
        for run in runs:
            r = diag_row(run, k)
            cells.append(
                f"{r['diag/spearman_cooccurrence']:.2f} / {100 * r['diag/edges_from_round1']:.0f}% / "
                f"{100 * r['val/hit@10']:.1f}"
            )
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def graph_markdown(root: Path, spec: str) -> str:
    """`graph:<folder>,<folder>...@<rounds>`: the server graph of several runs side by side, each cell its edges /
    its communities of two or more items (`community/edges`, `community/non_singleton`)."""
    folders, rounds = split_spec(spec)
    runs = [one_run(root, f) for f in folders]
    heads = [f"`{r['ablation']}`, {config_value(r['config'], 'optim.name')}, seed {r['seed']}" for r in runs]
    lines = ["| round | " + " | ".join(heads) + " |", "| ---: " * (len(runs) + 1) + "|"]
    for k in rounds:
        cells = [round_row(run, k) for run in runs]
        lines.append(
            f"| {k} | "
            + " | ".join(f"{c['community/edges']:,.0f} / {c['community/non_singleton']:,.0f}" for c in cells)
            + " |"
        )
    return "\n".join(lines)


def test_pair(run: dict) -> str:
    """Test hit@10 / ndcg@10 (%) at the run's best validation round."""
    t = run["test_at_best"]
    return f"{100 * t['test/hit@10']:.2f} / {100 * t['test/ndcg@10']:.2f}"


def comm_markdown(root: Path, dataset: str) -> str:
    """`comm:<dataset>`: upload and download per client and round against sigma and the encoding (the stored
    `experiment=comm_sigma` and `experiment=comm_encoding` runs), beside the embedding upload and test metrics."""
    runs = load_runs([root / "comm_sigma" / dataset, root / "comm_encoding" / dataset])
    if not runs:
        raise UserError(f"no stored comm_sigma or comm_encoding run for {dataset} under {root}")
    seen, table = set(), []
    for run in runs:
        key = (float(config_value(run["config"], "ablation.sigma")), encoding_label(run["config"]["comm"]))
        if key not in seen:  # csr32 at sigma 0.5 is in both sweeps: the same config, shown once
            seen.add(key)
            table.append((key, run))
    order = ["csr32", "coo32", "csr16", "csr8", "csr4", "csr8+delta", "top16 csr8"]
    table.sort(key=lambda t: (t[0][0], order.index(t[0][1]) if t[0][1] in order else len(order), t[0][1]))
    head = "| sigma | encoding | upload (KiB) | of the embedding upload | download (KiB) | test hit@10 / ndcg@10 |"
    lines = [head, "| ---: | --- | ---: | ---: | ---: | --- |"]
    for (sigma, name), run in table:
        up, down = per_client_round(run["history"])
        embedding = run["communication"]["embedding_bytes_per_client_round"]
        lines.append(
            f"| {sigma:g} | {name} | {up / 1024:,.1f} | {100 * up / embedding:.1f}% | {down / 1024:,.1f} "
            f"| {test_pair(run)} |"
        )
    return "\n".join(lines)


def privacy_markdown(root: Path, dataset: str) -> str:
    """`privacy:<dataset>`: test metrics and upload size against the Laplace epsilon per entry and round (the stored
    `experiment=privacy_epsilon` runs; `none` = no noise, which may be stored under a communication sweep: the
    campaign runs one computation once)."""
    runs = load_runs([root / "privacy_epsilon" / dataset])
    if not runs:
        raise UserError(f"no stored privacy_epsilon run for {dataset} under {root}")
    if all(run["config"]["privacy"]["epsilon"] is not None for run in runs):
        # the noiseless point is one computation with a communication sweep's run, which the campaign stored first
        noiseless = copy.deepcopy(runs[0]["config"])
        noiseless["privacy"]["epsilon"] = None
        same = load_runs([root / "comm_sigma" / dataset, root / "comm_encoding" / dataset])
        runs += [r for r in same if identity(r["config"]) == identity(noiseless)][:1]

    def epsilon(run: dict) -> float:
        value = config_value(run["config"], "privacy.epsilon")
        return float("inf") if value in ("-", "None") else float(value)

    lines = ["| epsilon per entry and round | upload (KiB) | test hit@10 / ndcg@10 |", "| ---: | ---: | --- |"]
    for run in sorted(runs, key=epsilon):
        eps = epsilon(run)
        up, _ = per_client_round(run["history"])
        lines.append(f"| {'none' if eps == float('inf') else f'{eps:,g}'} | {up / 1024:,.1f} | {test_pair(run)} |")
    return "\n".join(lines)


def audit10_markdown(results: Path) -> str:
    """`audit10`: the attacks on uploads after 10 rounds of the paper protocol (`results/audit/*.json`, written by
    `src.audit`): mean ± std over the attacked clients of each membership AUC, and the recovery cosine."""
    head = "| dataset | method | epsilon per entry and round | kept entries per upload | AUC row sum | AUC row degree "
    head += "| AUC distance from S_g | recovery cosine (chance) |"
    lines = [head, "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    audits = [json.loads(p.read_text()) for p in sorted((results / "audit").glob("*.json"))]
    if not audits:
        raise UserError(f"no audit report in {results / 'audit'}; expected the JSON that src.audit writes there")
    for a in sorted(audits, key=lambda a: (a["dataset"], a["ablation"], -(a["epsilon_round_entry"] or float("inf")))):
        auc = [
            f"{a['membership_auc'][k]:.2f} ± {a['membership_auc_std'][k]:.2f}"
            for k in ("row_sum", "row_degree", "distance_from_global")
        ]
        eps = a["epsilon_round_entry"]
        noise = "none" if eps is None else f"{eps:g} (b = {a['noise_scale']:g})"
        lines.append(
            f"| {a['dataset']} | {a['ablation']} | {noise} | {a['upload_nnz_mean']:,.0f} | {' | '.join(auc)} "
            f"| {a['recovery_cosine']:.2f} ({a['recovery_cosine_chance']:.2f}) |"
        )
    return "\n".join(lines)


def cooccurrence_markdown(results: Path) -> str:
    """`cooccurrence`: the share of clients holding both items of a pair, per dataset, protocol and view
    (`results/cooccurrence.json`, written by `python -m src.cooccurrence --out`)."""
    path = results / COOCCURRENCE
    if not path.is_file():
        raise UserError(f"{path} is absent; expected the output of python -m src.cooccurrence --out {path}")
    stored = json.loads(path.read_text())
    return cooccurrence.markdown(stored["rows"], tuple(stored["thresholds"]))


def cost_markdown(root: Path, spec: str) -> str:
    """`cost:<folder>,<folder>...`: what each stored run under the folders cost, from its own record: rounds, mean
    seconds per round, the time over all its processes (a resumed run has several), how many there were, the torch
    threads it ran with (two on 2 cores: it had the machine alone) and the peak RSS of its last process (one that
    resumed also held the checkpoint it read). The machine and what shared it differ between runs: compare rows, not
    machines."""
    runs = load_runs([root / f for f in spec.split(",")])
    if not runs:
        raise UserError(f"no stored run under {spec!r} in {root}; expected folders of results/runs")
    lines = [
        "| dataset | method | protocol | engine | seed | rounds | s / round | time | processes | torch threads "
        "| peak RSS (GiB) |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in sorted(runs, key=lambda r: (r["dataset"], r["ablation"], r["protocol"], r["path"])):
        t = run.get("timings", {})
        total = float(t.get("total_s", 0.0))
        when = f"{total / 60:.0f} min" if total < 3600 else f"{total / 3600:.1f} h"
        engine = config_value(run["config"], "ablation.engine")
        resources = run.get("resources") or {}
        rss = resources.get("peak_rss_mib")
        lines.append(
            f"| {run['dataset']} | {run['ablation']} | {run['protocol']} | {engine} "
            f"| {run['seed']} | {len(run['history'])} | {float(t.get('mean_round_s', 0.0)):.1f} | {when} "
            f"| {t.get('processes', 1)} | {resources.get('torch_threads') or '-'} "
            f"| {'-' if rss is None else f'{rss / 1024:.1f}'} |"
        )
    return "\n".join(lines)


# the keys a search varies (conf/hparams_search/), as column heads
SEARCHED = (
    ("optim.name", "engine"),
    ("optim.lr", "lr"),
    ("ablation.alpha", "alpha"),
    ("ablation.beta", "beta"),
    ("ablation.tau", "tau"),
    ("ablation.sigma", "sigma"),
)


def ranked(trials: list[dict], select: str) -> list[dict]:
    """A search's trials, best validation value first (ties by folder, so the first of a tie is always the same)."""
    return sorted(trials, key=lambda r: (-float(r["best_val"].get(select, 0.0)), r["path"]))


def search_markdown(root: Path, folder: str) -> str:
    """`search:<folder>`: the stored trials of a search (`search.store`), best validation value first, with the values
    they were run with. Only the selection metric is shown: a trial's test numbers pick nothing, and the best setting's
    are reported from its own seeds."""
    runs = load_runs([root / folder])
    if not runs:
        raise UserError(f"no stored trial under {root / folder}; expected the folder a search stores into")
    select = selection_of(runs[0])
    lines = [
        f"{len(runs)} trials stored ({runs[0]['dataset']}, {runs[0]['ablation']}, {runs[0]['protocol']} protocol, "
        f"seed {runs[0]['seed']}), best {select} first.",
        "",
        f"| rank | {' | '.join(head for _, head in SEARCHED)} | best round | {select} (%) | s / round |",
        "| ---: | --- |" + " ---: |" * (len(SEARCHED) + 2),
    ]
    ordered = ranked(runs, select)
    for rank, run in enumerate(ordered, 1):
        values = []
        for key, _ in SEARCHED:
            value = config_value(run["config"], key)
            values.append(value if key == "optim.name" or value == "-" else f"{float(value):.3g}")
        best = 100 * float(run["best_val"].get(select, 0.0))
        seconds = float(run.get("timings", {}).get("mean_round_s", 0.0))
        lines.append(f"| {rank} | {' | '.join(values)} | {run['best_round']} | {best:.2f} | {seconds:.1f} |")
    top = ordered[0]["config"]
    engine = f"optim={top['optim']['name']} optim.lr={top['optim']['lr']!r}"
    method = " ".join(f"ablation.{k}={top['ablation'][k]!r}" for k in ("alpha", "beta", "tau", "sigma"))
    lines += [
        "",
        "The best trial's setting, 3 seeds under both protocols (`conf/experiment/search_best.yaml`), and the backbone",
        "at its engine and learning rate:",
        "",
        "```bash",
        f"python -m src.campaign experiment=search_best {method} {engine}",
        f"python -m src.campaign experiment=search_best ablation=backbone {engine}",
        "```",
    ]
    return "\n".join(lines)


def same_value(a: str, b: str) -> bool:
    """Two config values as `config_value` gives them: equal as numbers when both are (5 and 5.0), else as text."""
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


# what a run at the search's best setting shares with its trial beside the searched keys
SETTING_KEYS = ("dataset.name", "fl.rounds", "model.alignment", "optim.name", "optim.lr")
SEARCHED_ALIGNMENT = ("ablation.alpha", "ablation.beta", "ablation.tau", "ablation.sigma")


def at_setting(run: dict, top: dict) -> bool:
    """Whether `run` ran at the search's best setting `top` (a resolved config): its dataset, rounds, alignment mode,
    engine and learning rate, and (for a method with the alignment's values) its alpha, beta, tau and sigma; the
    backbone has no alignment values to match."""
    keys = SETTING_KEYS + (() if run["ablation"] == "backbone" else SEARCHED_ALIGNMENT)
    return all(same_value(config_value(run["config"], k), config_value(top, k)) for k in keys)


def search_claim(
    root: Path, published: dict, canary: Callable[[str, str], str], folder: str = "search_published"
) -> str | None:
    """The README's sentence on the published-number search: test hit@10 of every method at the best trial's setting
    (by validation), both protocols, from the trial and the runs of `experiment=search_best` at that setting (mean
    over the seeds stored; their number in brackets when not 3), beside `published` (method -> dataset -> [hit@10,
    ndcg@10]) and the `local` canary's paper-protocol figure (`canary(dataset, engine)`). None before the search has
    stored a trial."""
    trials = load_runs([root / folder])
    if not trials:
        return None
    select = selection_of(trials[0])
    top = ranked(trials, select)[0]
    runs = [r for r in trials + load_runs([root / "search_best"]) if at_setting(r, top["config"])]
    cells: dict[tuple[str, str], dict[int, float]] = {}
    for run in runs:  # one value per seed: the trial is also the paper protocol's seed 0 of `full`
        cells.setdefault((run["ablation"], run["protocol"]), {})[run["seed"]] = run["test_at_best"]["test/hit@10"]

    def mean(method: str, protocol: str) -> float | None:
        return mean_std(list(cells.get((method, protocol), {}).values()))[0]

    def hit(method: str, protocol: str) -> str:
        return claim_figure(mean(method, protocol), len(cells.get((method, protocol), {})))

    order = [mean(m, "paper") for m in ("full", "no_ica", "no_gsa", "backbone")]
    if None in order:
        ordering = "is not yet measured"
    elif all(a > b for a, b in zip(order, order[1:])):
        ordering = "appears"
    else:
        ordering = "does not appear"
    row = published.get("full", {}).get(top["dataset"])
    full = mean("full", "paper")
    if row is None or full is None:
        head = "A search for AlignFedRec's published row"
    elif full >= row[0]:
        head = "A search passes AlignFedRec's published row"
    else:
        head = "No searched setting reaches AlignFedRec's published row"
    against = "" if not row else f" against the published {row[0]:.2f}"
    # the trial's own seed won the selection on validation: the seeds it never saw, apart, show what that adds
    unseen = [v for seed, v in cells.get(("full", "paper"), {}).items() if seed != top["seed"]]
    if unseen:
        n = len(unseen)
        against = f" ({mean_std(unseen)[0]:.2f} on the {n} seed{'s' * (n > 1)} the search never saw){against}"
    dataset = NAMES.get(top["dataset"], top["dataset"])
    engine = config_value(top["config"], "optim.name")
    lr = float(config_value(top["config"], "optim.lr"))
    local = canary(top["dataset"], engine)
    return (
        f"- **{head}** under the paper protocol: {len(trials)} trials over alpha, beta, tau, sigma, the learning rate "
        f"and the engine, selected on validation ({dataset}), end at {engine} with learning rate {lr:.3g}, where "
        f"`full` scores {hit('full', 'paper')}{against} (the `local` canary, which never federates: {local}); "
        f"the published ordering full > no_ica > no_gsa > backbone {ordering} there (no_ica {hit('no_ica', 'paper')}, "
        f"no_gsa {hit('no_gsa', 'paper')}, backbone {hit('backbone', 'paper')}), and under the clean protocol the "
        f"same `full` scores {hit('full', 'clean')} (chance is 10) "
        "([Findings](docs/findings.md#the-published-number-search-issue-34-item-4))."
    )


# the generated blocks with an argument (`<!-- comm:ml-100k -->`): prefix -> render(runs' root, argument)
BLOCKS = {
    "graph:": graph_markdown,
    "cost:": cost_markdown,
    "diag:": diag_markdown,
    "diagvs:": diagvs_markdown,
    "comm:": comm_markdown,
    "privacy:": privacy_markdown,
    "search:": search_markdown,
}
