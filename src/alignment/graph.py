"""The server graph of S_g: its edges by one rule that the server (communities) and the clients (GSA on the graph,
item-kNN on S_g) both apply. The server applies it to the S_g it aggregated, the clients to the broadcast as
decoded: the same graph at `comm.bits=32` (the default); with fewer bits, edges within a quantisation step of
sigma may differ."""

from __future__ import annotations

import torch

from src.alignment.neighbours import nearest_entries


def threshold_pairs(sim: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs j < k with sim[j, k] >= max(sigma, 0) and > 0: (j, k) [E] each."""
    upper = torch.triu(sim, diagonal=1)
    return ((upper >= sigma) & (upper > 0)).nonzero(as_tuple=True)


def knn_pairs(sim: torch.Tensor, k: int, block: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """This project's variant (`ablation.graph=knn`, not the paper's): each item joined to its k most similar
    items with sim > 0 (ties to the lower index, `nearest_mask`), an edge when either end chooses it: the
    pairs j < k, (j, k) [E] each. Rows are taken `block` at a time."""
    m = sim.shape[0]
    k = min(int(k), m - 1)
    if k < 1:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    rows, cols, _ = nearest_entries(lambda start, stop: sim[start:stop], m, k, block)
    key = torch.unique(torch.minimum(rows, cols) * m + torch.maximum(rows, cols))
    return key // m, key % m


def graph_pairs(sim: torch.Tensor, sigma: float, knn: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The edges j < k of the server's graph: sim >= sigma (the paper), or with `knn` the k-nearest graph."""
    return threshold_pairs(sim, sigma) if knn is None else knn_pairs(sim, knn)


def graph_mask(sim: torch.Tensor, sigma: float, knn: int | None) -> torch.Tensor:
    """The server graph as a symmetric boolean [m, m] (no diagonal): what GSA aligns to with
    `ablation.gsa_on_graph` (clients derive it from the broadcast S_g by the same rule; nothing more is sent)."""
    src, dst = graph_pairs(sim, sigma, knn)
    mask = torch.zeros(sim.shape, dtype=torch.bool)
    mask[src, dst] = True
    mask[dst, src] = True
    return mask
