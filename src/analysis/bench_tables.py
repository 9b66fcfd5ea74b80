"""Docs tables generated from the committed bench reports (`results/bench/<name>.json`, written by `src.bench`):
phase times, the speed table (this config against the `bench.baseline` benched first in the same command) and the
roofline. Each is a generated block of `src.report --update`: `<!-- speed:native_ml-100k_paper,... -->`.
"""

from __future__ import annotations

import json
from pathlib import Path

from src.runtime.errors import UserError
from src.runtime.round_estimate import estimated_round_seconds

NAMES = {"ml-100k": "ML-100K", "ml-1m": "ML-1M", "filmtrust": "FilmTrust", "lastfm-2k": "Lastfm-2k"}


def reports(root: Path, spec: str) -> list[dict]:
    """The bench reports `<root>/../bench/<name>.json` named by `spec` (`a,b,...`), or UserError naming the file."""
    found = []
    for name in spec.split(","):
        path = root.parent / "bench" / f"{name}.json"
        if not path.is_file():
            raise UserError(f"bench report {path} is absent; expected the output of src.bench with bench.out={path}")
        found.append(json.loads(path.read_text()))
    return found


def command(bench: dict) -> str:
    """The bench command that wrote a report (its overrides, less where it was written)."""
    overrides = [o for o in bench.get("overrides", []) if not o.startswith("bench.out=")]
    return "`python -m src.bench " + " ".join(overrides) + "`"


def seconds(secs: dict, phase: str) -> str:
    """A phase's seconds per round as a cell ('-' for a phase the report does not time)."""
    return f"{secs[phase]:.2f}" if phase in secs else "-"


def phases_markdown(root: Path, spec: str) -> str:
    """`bench:<names>`: seconds per round by phase, client-steps per second and peak RSS, one report a row."""
    lines = [
        "| command | train | aggregate | community | eval | round | client-steps/s | peak RSS |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for b in reports(root, spec):
        s = b["seconds_per_round"]
        lines.append(
            f"| {command(b)} | {seconds(s, 'train')} | {seconds(s, 'aggregate')} | {seconds(s, 'community')} "
            f"| {seconds(s, 'eval')} | **{s['round']:.2f}** | {b['client_steps_per_second']:,.0f} "
            f"| {b['peak_rss_mib'] / 1024:.1f} GiB |"
        )
    return "\n".join(lines)


def cell_name(b: dict) -> str:
    """`ML-1M, paper (6,040 x 3,706)`, or `PFedRec (ablation=backbone), ML-1M, paper`."""
    where = f"{NAMES.get(b['dataset'], b['dataset'])}, {b['protocol']}"
    if b["ablation"] == "backbone":
        return f"PFedRec (`ablation=backbone`), {where}"
    return f"{where} ({b['n_users']:,} x {b['n_items']:,})"


def duration(total_s: float) -> str:
    """Seconds as minutes under an hour, else hours."""
    return f"{total_s / 60:.0f} min" if total_s < 3600 else f"{total_s / 3600:.1f} h"


def speed_markdown(root: Path, spec: str) -> str:
    """`speed:<names>`: each report's phases against the baseline benched first in the same command (its
    `baseline`), the measured round and the whole round estimated from the share of clients benched
    (`estimated_round_seconds`), the speed-ups, 100 rounds at that pace and the peak RSS (the baseline's in
    brackets)."""
    head = "| dataset, protocol (clients x items) | clients benched | train | aggregate | server | community | eval "
    head += "| round | before | speed-up | full round (est.) | before | speed-up | 100 rounds | peak RSS (before) |"
    lines = [head, "| --- " + "| ---: " * 14 + "|"]
    for b in reports(root, spec):
        base = b.get("baseline")
        if not isinstance(base, dict):
            raise UserError(f"bench report for {cell_name(b)} has no baseline; expected one run with bench.baseline=")
        s, before = b["seconds_per_round"], base["seconds_per_round"]["round"]
        share = float(b.get("config", {}).get("client_fraction", 1.0)) or 1.0
        full, full_before = estimated_round_seconds(b), estimated_round_seconds(base)
        lines.append(
            f"| {cell_name(b)} | {'all' if share == 1.0 else f'{share:.0%}'} | {seconds(s, 'train')} "
            f"| {seconds(s, 'aggregate')} | {seconds(s, 'server')} | {seconds(s, 'community')} | {seconds(s, 'eval')} "
            f"| **{s['round']:.2f}** | {before:.2f} | {before / s['round']:.2f}x | **{full:.1f} s** "
            f"| {full_before:.1f} s | {full_before / full:.2f}x | {duration(100 * full)} "
            f"| {b['peak_rss_mib'] / 1024:.1f} GiB ({base['peak_rss_mib'] / 1024:.1f}) |"
        )
    return "\n".join(lines)


def roofline_markdown(root: Path, spec: str) -> str:
    """`roofline:<names>`: per phase, the GFLOP/s achieved, torch's rate for the same product class and the
    machine's fp32 multiply-add peak, all measured in the same bench run, with the share of that peak."""
    lines = [
        "| dataset, protocol | train: achieved / torch product / multiply-add peak GFLOP/s (of peak) "
        "| aggregate: the same |",
        "| --- | ---: | ---: |",
    ]
    for b in reports(root, spec):
        roof = b["roofline"]
        cells = [
            f"{roof[p]['achieved_gflop_s']:.0f} / {roof[p]['peak_gflop_s']:.0f} / {roof['fma_peak_gflop_s']:.0f} "
            f"({roof[p]['fma_fraction']:.0%})"
            for p in ("train", "aggregate")
        ]
        lines.append(f"| {NAMES.get(b['dataset'], b['dataset'])}, {b['protocol']} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


# the generated blocks over bench reports: prefix -> render(runs' root, the report names)
BLOCKS = {"bench:": phases_markdown, "speed:": speed_markdown, "roofline:": roofline_markdown}
