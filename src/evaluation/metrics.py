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
