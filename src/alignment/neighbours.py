"""Each item's k nearest neighbours by a similarity, of equal values the lower item index first.

One rule for every k-nearest choice (the server's kNN graph, the graph clients derive from the
broadcast for GSA, the item-kNN kernels): it depends on the values alone, so a server and its
clients pick the same neighbours whatever their device or memory layout (`topk` leaves ties to the
kernel, which differs between CPU and CUDA).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def nearest_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean [rows, m]: each row's k largest entries of `scores` [rows, m], ties to the lower column.

    Exactly the first k of a stable descending sort, found with one `topk` for the k-th value: the entries
    above it, then the leftmost entries equal to it until k are kept."""
    k = min(int(k), scores.shape[1])
    if k < 1:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    kth = scores.topk(k, dim=1).values[:, -1:]  # [rows, 1]
    above = scores > kth
    tied = scores == kth
    room = k - above.sum(dim=1, keepdim=True)  # how many of the tied entries fit
    return above | (tied & (tied.cumsum(dim=1) <= room))


def nearest_entries(
    rows_of: Callable[[int, int], torch.Tensor], m: int, k: int, block: int = 2048
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row, column and value [E] of each item's k largest positive entries of an m x m similarity (never the
    item itself; `nearest_mask`'s ties). `rows_of(start, stop)` gives rows start..stop-1 [stop - start, m]; they
    are taken `block` rows at a time (never all m x m at once)."""
    k = min(int(k), m - 1)
    rows, cols, vals = [], [], []
    for start in range(0, m, block):
        stop = min(start + block, m)
        scores = rows_of(start, stop).clone()  # [b, m]
        own = torch.arange(start, stop, device=scores.device)
        scores[own - start, own] = -float("inf")  # never an item's own neighbour
        r, c = (nearest_mask(scores, k) & (scores > 0)).nonzero(as_tuple=True)
        rows.append(r + start)
        cols.append(c)
        vals.append(scores[r, c])
    return torch.cat(rows), torch.cat(cols), torch.cat(vals)
