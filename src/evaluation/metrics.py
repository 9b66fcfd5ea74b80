"""Ranking metrics hit@K and ndcg@K with ties counted against the held-out item.

rank = 1 + #{candidates scoring above the held-out item} + #{candidates scoring equal to it},
so a constant scorer ranks the held-out item last, never first. A NaN score on either side
also counts against the held-out item, so a diverged model cannot look perfect.
"""

from __future__ import annotations

import math

import torch

KS = (5, 10, 20)


def sampled_ranks(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Ranks [n] of `pos` [n] among itself and `neg` [n, k] (ties against the positive)."""
    return 1 + (~(neg < pos.unsqueeze(1))).sum(dim=1)


def full_ranks(scores: torch.Tensor, target: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """Ranks [n] of item `target` [n] among all items not in `exclude` [n, m] (bool; target is kept)."""
    pos = scores.gather(1, target.unsqueeze(1))
    beats = ~(scores < pos) & ~exclude
    beats.scatter_(1, target.unsqueeze(1), False)
    return 1 + beats.sum(dim=1)


def rank_metrics(ranks: torch.Tensor, ks: tuple[int, ...] = KS, prefix: str = "") -> dict[str, float]:
    """hit@K (share of ranks <= K) and ndcg@K (1/log2(1 + rank) when rank <= K) averaged over users."""
    for k in ks:
        if k <= 0:
            raise ValueError(f"metric cutoff K must be positive, got {k}")
    ranks = ranks.to(torch.float64)
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks <= k
        out[f"{prefix}hit@{k}"] = float(hit.double().mean())
        out[f"{prefix}ndcg@{k}"] = float(torch.where(hit, math.log(2) / torch.log1p(ranks), 0.0).mean())
    return out


def chance_level(k: int, candidates: int) -> dict[str, float]:
    """hit@K and ndcg@K of a random scorer: the held-out item's rank uniform on 1..`candidates`.

    hit@K = min(K, n) / n and ndcg@K = (1/n) * sum over r = 1..min(K, n) of 1 / log2(r + 1), exactly
    (the metrics of `src.evaluation.metrics.rank_metrics` averaged over every rank).
    """
    if k < 1 or candidates < 1:
        raise ValueError(f"chance_level needs K >= 1 and candidates >= 1, got K={k}, candidates={candidates}")
    top = min(int(k), int(candidates))
    return {
        f"hit@{k}": top / candidates,
        f"ndcg@{k}": math.fsum(1.0 / math.log2(r + 1) for r in range(1, top + 1)) / candidates,
    }
