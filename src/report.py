"""`python -m src.report <folder> [...]`: mean and standard deviation over seeds of every run's
test metrics at its best validation round, as a Markdown table (one row per dataset, method, protocol)."""
from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

COLUMNS = ("test/hit@10", "test/ndcg@10", "test_full/hit@10", "test_full/ndcg@10")


def collect(folders: list[Path]) -> dict[tuple[str, str, str], list[dict]]:
    """Finished results.json files under `folders`, grouped by (dataset, ablation, protocol)."""
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for folder in folders:
        for path in sorted(Path(folder).rglob("results.json")):
            payload = json.loads(path.read_text())
            if payload.get("finished"):
                payload["path"] = str(path.parent)
                groups[(payload["dataset"], payload["ablation"], payload["protocol"])].append(payload)
    return groups


def fmt(values: list[float]) -> str:
    """`mean ± std` in percent; std over seeds (0 for a single seed)."""
    if not values:
        return "-"
    pct = [100 * v for v in values]
    std = statistics.stdev(pct) if len(pct) > 1 else 0.0
    return f"{statistics.mean(pct):.2f} ± {std:.2f}"


def table(groups: dict[tuple[str, str, str], list[dict]]) -> str:
    """Markdown table of the grouped runs."""
    head = "| dataset | method | protocol | seeds | rounds | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (5 + len(COLUMNS))]
    for (dataset, ablation, protocol), runs in sorted(groups.items()):
        cells = [fmt([r["test_at_best"][c] for r in runs if c in r["test_at_best"]]) for c in COLUMNS]
        rounds = sorted({len(r["history"]) for r in runs})
        lines.append(f"| {dataset} | {ablation} | {protocol} | {len(runs)} | {'/'.join(map(str, rounds))} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m src.report <run or multirun folder> [...]")
    print(table(collect([Path(a) for a in sys.argv[1:]])))
