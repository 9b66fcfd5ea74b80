"""What the server graph carries, per round (`diag.graph=true`): evaluation-only diagnostics.

They use the clients' training data, which a server never sees, so they are logged under `diag/`
for analysis only: nothing selects on them, nothing trains on them.

- `diag/spearman_cooccurrence`: Spearman correlation of S_g's upper triangle with the share of
  clients holding both items of each pair in their training data (ties get average ranks);
- `diag/edges`: the edges of the graph the communities come from (pairs with S_g >= sigma, or with
  `ablation.graph=knn` the k-nearest-neighbour graph; `src.alignment.graph.graph_pairs`);
- `diag/edges_from_round1`: the share of this round's edges already in the first round's graph
  (near 1 when the graph only keeps what the shared initialisation put there);
- `diag/nmi_genre` (ML-100K, ML-1M): normalised mutual information of the communities with the
  films' first listed genre (`src/data/genres.py`), beside `diag/nmi_genre_random`, the mean NMI of
  5 random partitions with the same community sizes (the communities' labels permuted, seeded).
"""

from __future__ import annotations

import numpy as np
import torch

from src.alignment.graph import graph_pairs
from src.data.dataset import FedData
from src.data.genres import item_genres


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


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information 2 I(a; b) / (H(a) + H(b)) of two labelings [n] (1 when both are constant)."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    joint = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(joint, (ai, bi), 1.0)
    p = joint / len(a)
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum())
    ha, hb = float(-(pa * np.log(pa)).sum()), float(-(pb * np.log(pb)).sum())
    return 2 * mi / (ha + hb) if ha + hb > 0 else 1.0


class GraphDiagnostics:
    """Holds the training co-occurrence of a split and the first round's graph; called with each round's S_g."""

    def __init__(self, data: FedData, sigma: float, knn: int | None = None):
        x = torch.from_numpy(data.train_matrix().astype(np.float32))
        self.rows, self.cols = np.triu_indices(data.n_items, k=1)
        share = ((x.T @ x) / data.n_users).numpy()[self.rows, self.cols]
        self.share_ranks = average_ranks(share)
        self.sigma, self.knn, self.m = sigma, knn, data.n_items
        self.first_edges: np.ndarray | None = None
        self.genres = item_genres(data)

    def restore(self, fed: dict) -> None:
        """The first round's edges from a checkpoint: keys j * m + k, or (checkpoints before the kNN graph was
        counted) positions in the upper triangle's flat order."""
        if "diag_first_edge_keys" in fed:
            self.first_edges = fed["diag_first_edge_keys"]
        elif fed.get("diag_first_edges") is not None:
            pos = fed["diag_first_edges"]
            self.first_edges = np.unique(self.rows[pos] * self.m + self.cols[pos])

    def __call__(self, global_sim: torch.Tensor, labels: np.ndarray | None = None) -> dict[str, float]:
        """The round's diagnostics of S_g [m, m] and, when given, of the communities `labels` [m]."""
        sim = global_sim.detach().cpu()
        s = sim.double().numpy()[self.rows, self.cols]
        src, dst = graph_pairs(sim, self.sigma, self.knn)  # the server's community graph, j < k
        edges = np.unique(src.numpy() * self.m + dst.numpy())
        if self.first_edges is None:
            self.first_edges = edges
        kept = np.isin(edges, self.first_edges).mean() if len(edges) else 0.0
        out = {
            "diag/spearman_cooccurrence": spearman(s, self.share_ranks),
            "diag/edges": float(len(edges)),
            "diag/edges_from_round1": float(kept),
        }
        if labels is not None and self.genres is not None:
            rng = np.random.default_rng(0)
            out["diag/nmi_genre"] = nmi(np.asarray(labels), self.genres)
            out["diag/nmi_genre_random"] = float(np.mean([nmi(rng.permutation(labels), self.genres) for _ in range(5)]))
        return out
