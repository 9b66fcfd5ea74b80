"""The paper's published numbers (`experiments/published.yaml`): hit@10 / ndcg@10 of Table 1 and Table 2, paper
protocol, in percent. Read by the report (the published column) and by a run's closing lines."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import yaml

PUBLISHED = Path(__file__).resolve().parents[2] / "experiments" / "published.yaml"


def published_tables() -> dict[str, dict[str, dict[str, list[float] | None]]]:
    """table -> method -> dataset -> [hit@10, ndcg@10] (None: a cell the paper's table leaves empty)."""
    return yaml.safe_load(PUBLISHED.read_text())


def published() -> dict[str, dict[str, list[float]]]:
    """method -> dataset -> [hit@10, ndcg@10] (None: not in the paper) from Table 1 and Table 2 (they agree where
    they overlap)."""
    out: dict[str, dict[str, list[float]]] = defaultdict(dict)
    for table in published_tables().values():
        for method, per_dataset in table.items():
            for dataset, ref in per_dataset.items():
                out[method][dataset] = ref or out[method].get(dataset)
    return dict(out)
