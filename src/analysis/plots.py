"""`python -m src.plots <kind> <run or multirun folder> [...] [--out DIR]`: CSV tables and plots.

Kinds (every figure is written as PNG and SVG, every table as CSV and Markdown, into `--out`,
default `results/<kind>` for runs under results/runs (`results/curves_all` for curves: `results/curves` holds the
results page's, which `src.report` writes) and `plots/<kind>` for others; every row names the run folder it came
from):

- `communication`: upload bytes per client and round against sigma and against the encoding,
  beside the embedding-sharing size, with test hit@10 / ndcg@10 at the best validation round;
- `privacy`: test hit@10 / ndcg@10 against the per-entry epsilon of the Laplace mechanism;
- `user_privacy [--reference <folders>]`: sampled and full-ranking test hit@10 (mean ± std over seeds) against the
  user-level epsilon of `privacy.target_epsilon` (`experiment=private_epsilon`), the noiseless clipped run as a
  line, and the reference runs (e.g. PFedRec) as another;
- `curves`: the selection metric (validation, `eval.select`, default hit@10) and its test
  counterpart against rounds per run, and, for AlignFedRec runs, the number of communities and the
  modularity against rounds;
- `diagnostics`: the server graph's evaluation-only diagnostics of runs with `diag.graph=true` (Spearman
  of S_g with co-occurrence, edges kept from round 1, NMI with genres beside random partitions) per round;
- `sensitivity --param ablation.alpha`: test hit@10 / ndcg@10 (mean ± std over seeds) against the
  value of one swept config key.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from src.analysis.runs import encoding_label, is_page_curves, load_runs, only_stored, refuse_foreign_pages
from src.config.schema import MOVED
from src.runtime.atomic import atomic_path
from src.runtime.checks import check_output_dir
from src.runtime.errors import OneLineParser, UserError
from src.runtime.results import atomic_write_text, selection_of


class MissingFieldError(UserError, ValueError):
    """A run lacks a field a plot needs; the message names the field and the results.json."""


def field(run: dict[str, Any], dotted: str, row: dict[str, Any] | None = None) -> Any:
    """`a.b.c` of a run's results.json, or `key` of one of its history rows (`row`).

    A missing field raises MissingFieldError naming it and the file (keys of history rows hold no dots).
    """
    value: Any = run if row is None else row
    for part in [dotted] if row is not None else dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            where = f"history round {row.get('round', '?')} " if row is not None else ""
            raise MissingFieldError(
                f"{Path(run['path']) / 'results.json'}: {where}has no field {dotted!r}, which this plot needs"
            )
        value = value[part]
    return value


def write_table(rows: list[dict[str, Any]], out: Path, name: str) -> None:
    """rows as `name`.csv and `name`.md in `out` (atomically)."""
    cols = list(rows[0])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / f"{name}.csv", buf.getvalue())
    md = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    md += [
        "| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |" for r in rows
    ]
    atomic_write_text(out / f"{name}.md", "\n".join(md) + "\n")


def save(fig, out: Path, name: str) -> None:
    """The figure as PNG and SVG (each written atomically), byte for byte the same for the same data (no date in the
    SVG, its element ids from a fixed salt), so regenerated figures of unchanged runs change nothing."""
    import matplotlib

    for ext in ("png", "svg"):
        with atomic_path(out / f"{name}.{ext}") as tmp, matplotlib.rc_context({"svg.hashsalt": "alignfedrec"}):
            meta = {"Date": None} if ext == "svg" else None
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight", metadata=meta)


def pct(value: float | None) -> float:
    return float("nan") if value is None else 100 * value


def communication(runs: list[dict[str, Any]], out: Path) -> None:
    """Table and plots of upload size and accuracy against sigma and encoding: the runs of methods that upload
    similarities (a method without `ablation.sigma`, e.g. PFedRec, has no point on that axis)."""
    import matplotlib.pyplot as plt

    rows = []
    for r in runs:
        comm = {
            **field(r, "config.comm"),
            "format": field(r, "config.comm.format"),
            "bits": field(r, "config.comm.bits"),
        }
        if r["config"].get("ablation", {}).get("sigma") is None:
            continue
        rows.append(
            {
                "dataset": r["dataset"],
                "protocol": r["protocol"],
                "sigma": field(r, "config.ablation.sigma"),
                "encoding": encoding_label(comm),
                "seed": r["seed"],
                "rounds": len(r["history"]),
                "upload_bytes_per_client_round": field(r, "communication.upload_bytes_mean_per_client_round"),
                "embedding_bytes": field(r, "communication.embedding_bytes_per_client_round"),
                "upload_vs_embedding": field(r, "communication.upload_vs_embedding"),
                "download_bytes_per_client_round": field(r, "communication.download_bytes_total")
                / max(sum(field(r, "clients", h) for h in r["history"]), 1),
                "test_hit@10": pct(r["test_at_best"].get("test/hit@10")),
                "test_ndcg@10": pct(r["test_at_best"].get("test/ndcg@10")),
                "run": r["path"],
            }
        )
    rows.sort(key=lambda x: (x["dataset"], x["protocol"], x["encoding"], x["sigma"]))
    write_table(rows, out, "communication")
    for (dataset, protocol), group in group_by(rows, ("dataset", "protocol")).items():
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for enc, part in group_by(group, ("encoding",)).items():
            part.sort(key=lambda x: x["sigma"])
            sig = [p["sigma"] for p in part]
            ax1.plot(sig, [p["upload_bytes_per_client_round"] / 1024 for p in part], "o-", label=enc[0])
            ax2.plot(sig, [p["test_hit@10"] for p in part], "o-", label=enc[0])
        ax1.axhline(group[0]["embedding_bytes"] / 1024, color="k", ls="--", label="embedding upload (PFedRec)")
        ax1.set(
            xlabel="threshold sigma",
            ylabel="upload per client and round (KiB)",
            yscale="log",
            title=f"{dataset}, {protocol} protocol: upload size",
        )
        ax2.set(
            xlabel="threshold sigma",
            ylabel="test hit@10 at best val round (%)",
            title=f"{dataset}, {protocol} protocol: accuracy",
        )
        ax1.legend(fontsize=8)
        ax2.legend(fontsize=8)
        save(fig, out, f"communication_{dataset}_{protocol}")
        plt.close(fig)


def privacy(runs: list[dict[str, Any]], out: Path) -> None:
    """Table and plot of accuracy against epsilon."""
    import matplotlib.pyplot as plt

    rows = []
    for r in runs:
        p = field(r, "config.privacy")
        epsilon = field(r, "config.privacy.epsilon")
        eps = epsilon if epsilon is not None else (2.0 / p["scale"] if p.get("scale") else math.inf)
        rows.append(
            {
                "dataset": r["dataset"],
                "protocol": r["protocol"],
                "epsilon_round_entry": float(eps),
                "epsilon_total_entry": float(field(r, "privacy").get("epsilon_total_entry", math.inf)),
                "seed": r["seed"],
                "rounds": len(r["history"]),
                "test_hit@10": pct(r["test_at_best"].get("test/hit@10")),
                "test_ndcg@10": pct(r["test_at_best"].get("test/ndcg@10")),
                "run": r["path"],
            }
        )
    rows.sort(key=lambda x: (x["dataset"], x["protocol"], x["epsilon_round_entry"]))
    write_table(rows, out, "privacy")
    for (dataset, protocol), group in group_by(rows, ("dataset", "protocol")).items():
        fig, ax = plt.subplots(figsize=(6, 4))
        noisy = [g for g in group if math.isfinite(g["epsilon_round_entry"])]
        ax.plot(
            [g["epsilon_round_entry"] for g in noisy], [g["test_hit@10"] for g in noisy], "o-", label="Laplace noise"
        )
        for g in group:
            if not math.isfinite(g["epsilon_round_entry"]):
                ax.axhline(g["test_hit@10"], color="k", ls="--", label="no noise")
        ax.set(
            xscale="log",
            xlabel="epsilon per entry and round",
            ylabel="test hit@10 at best val round (%)",
            title=f"{dataset}, {protocol} protocol: privacy vs accuracy",
        )
        ax.legend()
        save(fig, out, f"privacy_{dataset}_{protocol}")
        plt.close(fig)


def curves(runs: list[dict[str, Any]], out: Path) -> None:
    """The selection metric (val and test) against rounds per run; communities and modularity against
    rounds for AlignFedRec."""
    import matplotlib.pyplot as plt

    for (dataset, protocol), group in group_by(runs, ("dataset", "protocol")).items():
        fig, ax = plt.subplots(figsize=(7, 4))
        metrics = {selection_of(r).split("/", 1)[1] for r in group}  # e.g. hit@10
        for r in group:
            select = selection_of(r)
            metric = select.split("/", 1)[1]
            rounds = [h["round"] for h in r["history"]]
            label = f"{r['ablation']} {field(r, 'config.optim.name')} s{r['seed']}"
            label += f" {metric}" if len(metrics) > 1 else ""
            # an unscored round (a Flower round that lost a node) is a gap; a run that never logged the metric an error
            if not any(select in h for h in r["history"]):
                field(r, select, r["history"][0])  # raises MissingFieldError naming the file and the key
            val = [pct(h.get(select)) for h in r["history"]]
            (line,) = ax.plot(rounds, val, label=f"{label} val")
            ax.plot(
                rounds,
                [pct(h.get(f"test/{metric}")) for h in r["history"]],
                ls=":",
                color=line.get_color(),
                label=f"{label} test",
            )
        shown = " / ".join(sorted(metrics))
        ax.set(xlabel="round", ylabel=f"{shown} (%)", title=f"{dataset}, {protocol} protocol: {shown} per round")
        ax.legend(fontsize=7, ncol=2)
        save(fig, out, f"curves_{dataset}_{protocol}")
        plt.close(fig)
        aligned = [r for r in group if any("community/count" in h for h in r["history"])]
        if not aligned:
            continue
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for r in aligned:
            hist = [h for h in r["history"] if "community/count" in h]
            label = f"{r['ablation']} {field(r, 'config.optim.name')} s{r['seed']}"
            ax1.plot([h["round"] for h in hist], [field(r, "community/non_singleton", h) for h in hist], label=label)
            ax2.plot([h["round"] for h in hist], [field(r, "community/modularity", h) for h in hist], label=label)
        ax1.set(
            xlabel="round", ylabel="communities with 2+ items", title=f"{dataset}, {protocol} protocol: communities"
        )
        ax2.set(xlabel="round", ylabel="weighted modularity", title=f"{dataset}, {protocol} protocol: modularity")
        ax1.legend(fontsize=7)
        save(fig, out, f"communities_{dataset}_{protocol}")
        plt.close(fig)


def diagnostics(runs: list[dict[str, Any]], out: Path) -> None:
    """The server graph's evaluation-only diagnostics (`diag.graph=true`, src/server/diagnostics.py) against
    rounds: Spearman of S_g with the co-occurrence share, the share of edges already in round 1's graph, NMI of
    the communities with genres beside size-matched random partitions, and the selection metric."""
    import matplotlib.pyplot as plt

    logged = [r for r in runs if any("diag/spearman_cooccurrence" in h for h in r["history"])]
    if not logged:
        raise UserError("no run logged diag/*; expected runs made with diag.graph=true")
    rows = []
    for (dataset, protocol), group in group_by(logged, ("dataset", "protocol")).items():
        fig, axes = plt.subplots(1, 4, figsize=(18, 4))
        for r in group:
            hist = [h for h in r["history"] if "diag/spearman_cooccurrence" in h]
            folder = Path(r["path"])
            variant = folder.parent.name if folder.name.startswith("seed") else ""  # results/runs/.../<variant>/seedK
            label = f"{r['ablation']} {variant} s{r['seed']}".replace("  ", " ")
            x = [h["round"] for h in hist]
            kept = [h["diag/edges_from_round1"] if h["diag/edges"] else None for h in hist]  # a share already
            (line,) = axes[0].plot(x, [h["diag/spearman_cooccurrence"] for h in hist], label=label)
            axes[1].plot(x, [None if k is None else 100 * k for k in kept], color=line.get_color(), label=label)
            if any("diag/nmi_genre" in h for h in hist):
                axes[2].plot(x, [h.get("diag/nmi_genre") for h in hist], color=line.get_color(), label=label)
                axes[2].plot(
                    x, [h.get("diag/nmi_genre_random") for h in hist], ls=":", color=line.get_color(), label="random"
                )
            select = selection_of(r)
            axes[3].plot(x, [pct(field(r, select, h)) for h in hist], color=line.get_color(), label=label)
            for h, k in zip(hist, kept):
                rows.append(
                    {
                        "dataset": dataset,
                        "protocol": protocol,
                        "ablation": r["ablation"],
                        "seed": r["seed"],
                        "round": h["round"],
                        "spearman_cooccurrence": h["diag/spearman_cooccurrence"],
                        "edges": h["diag/edges"],
                        "edges_from_round1_share": k,
                        "nmi_genre": h.get("diag/nmi_genre"),
                        "nmi_genre_random": h.get("diag/nmi_genre_random"),
                        "val_select": field(r, select, h),
                        "run": r["path"],
                    }
                )
        titles = ("Spearman(S_g, co-occurrence)", "edges from round 1 (%)", "NMI with genres (dotted: random)")
        for ax, title in zip(axes, (*titles, "validation metric (%)")):
            ax.set(xlabel="round", title=title)
        fig.suptitle(f"{dataset}, {protocol} protocol: the server graph per round (evaluation-only diagnostics)")
        axes[3].legend(fontsize=6, loc="lower right")
        save(fig, out, f"diagnostics_{dataset}_{protocol}")
        plt.close(fig)
    write_table(rows, out, "diagnostics")


def sensitivity(runs: list[dict[str, Any]], out: Path, param: str) -> None:
    """Table and plot of test hit@10 / ndcg@10 against one swept config value, mean ± std over seeds."""
    import statistics

    import matplotlib.pyplot as plt

    if not param:
        raise UserError("sensitivity needs --param; expected e.g. --param ablation.alpha")
    param = MOVED.get(param, param)  # a key's old name (model.alpha) reads as its new one
    rows = []
    keyed = group_by([{**r, "_v": field(r, f"config.{param}")} for r in runs], ("dataset", "protocol", "_v"))
    for (dataset, protocol, value), group in sorted(keyed.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        hit = [pct(r["test_at_best"].get("test/hit@10")) for r in group]
        ndcg = [pct(r["test_at_best"].get("test/ndcg@10")) for r in group]
        rows.append(
            {
                "dataset": dataset,
                "protocol": protocol,
                param: value,
                "seeds": len(group),
                "test_hit@10": statistics.mean(hit),
                "test_hit@10_std": statistics.stdev(hit) if len(hit) > 1 else 0.0,
                "test_ndcg@10": statistics.mean(ndcg),
                "test_ndcg@10_std": statistics.stdev(ndcg) if len(ndcg) > 1 else 0.0,
                "runs": " ".join(r["path"] for r in group),
            }
        )
    name = param.split(".")[-1]
    write_table(rows, out, f"sensitivity_{name}")
    from omegaconf import OmegaConf

    from src.cli.config import load_config

    default = OmegaConf.select(load_config([]), param)  # the composed default, marked on every figure
    for (dataset, protocol), group in group_by(rows, ("dataset", "protocol")).items():
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [g[param] for g in group]
        for metric, marker in (("hit@10", "o"), ("ndcg@10", "s")):
            ys = [g[f"test_{metric}"] for g in group]
            ax.errorbar(xs, ys, yerr=[g[f"test_{metric}_std"] for g in group], marker=marker, capsize=3, label=metric)
        ax.set(
            xlabel=param,
            ylabel="test metric at best val round (%)",
            title=f"{dataset}, {protocol} protocol: sensitivity to {name}",
        )
        if all(isinstance(x, (int, float)) and x > 0 for x in xs) and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        if isinstance(default, (int, float)):
            ax.axvline(default, color="grey", linestyle=":", label=f"default {name} = {default:g}")
        seeds = "/".join(str(g["seeds"]) for g in group)
        ax.text(0.01, 0.01, f"seeds per point: {seeds} (bars: std over seeds)", transform=ax.transAxes, fontsize=8)
        ax.legend()
        save(fig, out, f"sensitivity_{name}_{dataset}_{protocol}")
        plt.close(fig)


def user_privacy(runs: list[dict[str, Any]], out: Path, reference: list[dict[str, Any]] | None = None) -> None:
    """Table and plot of test hit@10 (sampled and full ranking) against the user-level epsilon, mean ± std over
    seeds; `inf` = the clipped uploads without noise. `reference` runs (e.g. PFedRec, no protection) of the same
    dataset and protocol are drawn as a line at their mean sampled hit@10."""
    import statistics

    import matplotlib.pyplot as plt

    rows = []
    keyed = group_by(
        [{**r, "_e": field(r, "config.privacy.target_epsilon")} for r in runs], ("dataset", "protocol", "_e")
    )
    for (dataset, protocol, eps), group in keyed.items():
        row = {"dataset": dataset, "protocol": protocol, "epsilon": math.inf if eps is None else float(eps)}
        for metric in ("test/hit@10", "test_full/hit@10"):
            values = [pct(r["test_at_best"].get(metric)) for r in group]
            row[metric.replace("/", "_")] = statistics.mean(values)
            row[metric.replace("/", "_") + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append({**row, "seeds": len(group), "runs": " ".join(r["path"] for r in group)})
    rows.sort(key=lambda x: (x["dataset"], x["protocol"], x["epsilon"]))
    write_table(rows, out, "user_privacy")
    for (dataset, protocol), group in group_by(rows, ("dataset", "protocol")).items():
        fig, ax = plt.subplots(figsize=(6, 4))
        noisy = [g for g in group if math.isfinite(g["epsilon"])]
        for metric, marker, colour in (("test_hit@10", "o", "C0"), ("test_full_hit@10", "s", "C1")):
            label = "sampled hit@10" if metric == "test_hit@10" else "full-ranking hit@10"
            ax.errorbar(
                [g["epsilon"] for g in noisy],
                [g[metric] for g in noisy],
                yerr=[g[f"{metric}_std"] for g in noisy],
                marker=marker,
                color=colour,
                capsize=3,
                label=label,
            )
            for g in group:
                if not math.isfinite(g["epsilon"]):
                    ax.axhline(g[metric], color=colour, ls="--", lw=1, label=f"{label}, no noise (clipped)")
        same = [r for r in reference or [] if (r["dataset"], r["protocol"]) == (dataset, protocol)]
        if same:
            hit = statistics.mean(pct(r["test_at_best"].get("test/hit@10")) for r in same)
            names = sorted({r["ablation"] for r in same})
            label = f"{'/'.join(names)}, no protection: sampled hit@10 ({len(same)} seeds)"
            ax.axhline(hit, color="k", ls=":", lw=1, label=label)
        seeds = "/".join(str(g["seeds"]) for g in group)
        ax.text(0.01, 0.01, f"seeds per point: {seeds} (bars: std over seeds)", transform=ax.transAxes, fontsize=8)
        ax.set(
            xscale="log",
            xlabel="user-level epsilon (delta = 1 / users), one release",
            ylabel="test metric at best val round (%)",
            title=f"{dataset}, {protocol} protocol: private_itemknn",
        )
        ax.legend(fontsize=8)
        save(fig, out, f"user_privacy_{dataset}_{protocol}")
        plt.close(fig)


def group_by(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in keys)].append(r)
    return dict(groups)


KINDS = {
    "communication": communication,
    "privacy": privacy,
    "user_privacy": user_privacy,
    "curves": curves,
    "diagnostics": diagnostics,
    "sensitivity": sensitivity,
}


def main(argv: list[str] | None = None) -> Path:
    parser = OneLineParser(prog="python -m src.plots", description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--param", default="", help="sensitivity: the swept config key, e.g. ablation.alpha")
    parser.add_argument(
        "--reference", nargs="*", type=Path, default=[], help="user_privacy: runs drawn as a line (e.g. PFedRec)"
    )
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    # the project's figures (results/<kind>) come from results/runs; other runs' go to plots/<kind>; results/curves
    # is the results page's (src.report), so stored runs' curves go to results/curves_all
    stored = only_stored(args.folders)
    out = args.out or Path("results" if stored else "plots") / (
        f"{args.kind}_all" if stored and args.kind == "curves" else args.kind
    )
    refuse_foreign_pages("--out", [out], args.folders, "--out outside results/ (e.g. --out plots/)")
    if is_page_curves(out):  # one writer per file
        raise UserError(
            "--out results/curves holds the results page's curves (seed 0 of the main cells), which python -m "
            "src.report results/runs --out results writes; expected another folder (e.g. --out results/curves_all)"
        )
    check_output_dir("--out", str(out))
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(args.folders)
    if not runs:
        raise UserError(
            f"no finished results.json under {', '.join(map(str, args.folders))}; expected folders holding runs"
        )
    if args.kind == "sensitivity":
        sensitivity(runs, out, args.param)
    elif args.kind == "user_privacy":
        user_privacy(runs, out, load_runs(args.reference))
    else:
        KINDS[args.kind](runs, out)
    print(f"wrote {out}")
    return out
