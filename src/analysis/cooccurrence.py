"""`python -m src.cooccurrence [--datasets ...] [--protocols paper,clean] [--thresholds 0.5,0.3,0.1] [--out F.json]`

What the server graph can hold at most, from the data alone. AlignFedRec's server averages the
clients' thresholded similarities over all clients and keeps the item pairs with S_g >= sigma.
Even if every client that interacted with both items of a pair reported similarity 1 for it and
every other client 0, S_g of that pair would be the share of clients holding both items. So the
pairs whose co-occurrence share reaches sigma bound the collaborative edges the graph can carry.
Printed per dataset and protocol, on the training positives the clients hold (and on all
interactions): users, items, the largest share of any pair, and the number of pairs whose share
reaches each threshold. `--out` also writes the rows as JSON (atomically): the docs' `<!-- cooccurrence -->`
block is generated from `results/cooccurrence.json` (`src.report --update`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from src.cli.config import load_config
from src.data.dataset import load
from src.runtime.atomic import atomic_write_text

DATASETS = ("ml-100k", "ml-1m", "filmtrust", "lastfm-2k")


def pair_shares(matrix: np.ndarray, thresholds: tuple[float, ...], block: int = 2048) -> dict[str, float]:
    """Largest co-occurrence share over item pairs j < k and the count of pairs at or above each threshold.

    `matrix` [users, items] bool. Shares are computed in row blocks of X^T X / users (never all m x m at once).
    """
    users, items = matrix.shape
    x = torch.from_numpy(matrix.astype(np.float32))
    counts = {t: 0 for t in thresholds}
    best = 0.0
    for start in range(0, items, block):
        stop = min(start + block, items)
        share = (x[:, start:stop].T @ x) / users  # [block, items]
        cols = torch.arange(items).unsqueeze(0)
        upper = cols > torch.arange(start, stop).unsqueeze(1)  # j < k only
        share = share.masked_fill(~upper, -1.0)
        best = max(best, float(share.max()))
        for t in thresholds:
            counts[t] += int((share >= t).sum())
    return {"max_share": best, **{f"pairs>={t}": float(n) for t, n in counts.items()}}


def table(datasets: list[str], protocols: list[str], thresholds: tuple[float, ...]) -> list[dict]:
    """One row per dataset, protocol and data view (training positives, all interactions)."""
    rows = []
    for dataset in datasets:
        for protocol in protocols:
            data = load(load_config([f"dataset={dataset}", f"protocol={protocol}"]))
            for view, matrix in (("train", data.train_matrix()), ("all", data.interacted_matrix())):
                rows.append(
                    {
                        "dataset": dataset,
                        "protocol": protocol,
                        "view": view,
                        "users": data.n_users,
                        "items": data.n_items,
                        **pair_shares(matrix, thresholds),
                    }
                )
    return rows


def markdown(rows: list[dict], thresholds: tuple[float, ...]) -> str:
    head = ["dataset", "protocol", "view", "users", "items", "max share", *(f"pairs >= {t}" for t in thresholds)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(
                [
                    r["dataset"],
                    r["protocol"],
                    r["view"],
                    f"{r['users']:,}",
                    f"{r['items']:,}",
                    f"{r['max_share']:.3f}",
                    *(f"{int(r[f'pairs>={t}']):,}" for t in thresholds),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m src.cooccurrence", description=__doc__.split("\n\n")[1])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--protocols", default="paper,clean")
    parser.add_argument("--thresholds", default="0.5,0.3,0.1")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows and thresholds as JSON here")
    ns = parser.parse_args(argv)
    thresholds = tuple(float(t) for t in ns.thresholds.split(","))
    rows = table(ns.datasets.split(","), ns.protocols.split(","), thresholds)
    print(markdown(rows, thresholds))
    if ns.out is not None:
        atomic_write_text(ns.out, json.dumps({"thresholds": list(thresholds), "rows": rows}, indent=1) + "\n")
    return rows
