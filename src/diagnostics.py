"""What the server graph carries, per round (`diag.graph=true`): evaluation-only diagnostics.

They use the clients' training data, which a server never sees, so they are logged under `diag/`
for analysis only: nothing selects on them, nothing trains on them.

- `diag/spearman_cooccurrence`: Spearman correlation of S_g's upper triangle with the share of
  clients holding both items of each pair in their training data (ties get average ranks);
- `diag/edges`: pairs with S_g >= sigma (the graph the communities come from);
- `diag/edges_from_round1`: the share of this round's edges already in the first round's graph
  (near 1 when the graph only keeps what the shared initialisation put there).
"""

from __future__ import annotations

import numpy as np
import torch

from src.data.dataset import FedData


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x` [n], ties sharing the mean of their ranks."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return (last - (counts - 1) / 2.0)[inverse]


def spearman(x: np.ndarray, y_ranks: np.ndarray) -> float:
    """Spearman correlation of `x` with a variable whose average ranks are `y_ranks` (0 when either is constant)."""
    a = average_ranks(x) - (len(x) + 1) / 2.0
    b = y_ranks - (len(x) + 1) / 2.0
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


class GraphDiagnostics:
    """Holds the training co-occurrence of a split and the first round's graph; called with each round's S_g."""

    def __init__(self, data: FedData, sigma: float):
        x = torch.from_numpy(data.train_matrix().astype(np.float32))
        self.rows, self.cols = np.triu_indices(data.n_items, k=1)
        share = ((x.T @ x) / data.n_users).numpy()[self.rows, self.cols]
        self.share_ranks = average_ranks(share)
        self.sigma = sigma
        self.first_edges: np.ndarray | None = None

    def __call__(self, global_sim: torch.Tensor) -> dict[str, float]:
        """The round's diagnostics of S_g [m, m]."""
        s = global_sim.detach().cpu().double().numpy()[self.rows, self.cols]
        edges = np.flatnonzero((s >= self.sigma) & (s > 0))
        if self.first_edges is None:
            self.first_edges = edges
        kept = np.isin(edges, self.first_edges).mean() if len(edges) else 0.0
        return {
            "diag/spearman_cooccurrence": spearman(s, self.share_ranks),
            "diag/edges": float(len(edges)),
            "diag/edges_from_round1": float(kept),
        }
