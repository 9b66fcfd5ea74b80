"""Calibration baselines (this project's, not the paper's): what co-occurrence alone reaches.

Both are centralised, trained on nothing but the pooled training positives, and evaluated like
every method (same candidates, same protocol, ties against the held-out item):

- `popularity`: score(u, i) = number of training positives of item i over all clients;
- `itemknn`: item-based kNN on training co-occurrence. Cosine similarity of the items' user
  columns, cos(i, j) = |U_i & U_j| / sqrt(|U_i| |U_j|), each item keeping its `k` most similar
  other items; score(u, i) = sum over j in train(u) of sim_k(i, j).

They expose the interface of the centralised trainer (`train_round`, `score`, `state_dict`), so a
run treats them as `ablation.central` methods whose rounds train nothing.
"""

from __future__ import annotations

import numpy as np
import torch

from src.data.dataset import FedData


def item_popularity(data: FedData) -> torch.Tensor:
    """Training positives per item over all clients [m] (float32)."""
    return torch.from_numpy(np.bincount(data.train_items, minlength=data.n_items).astype(np.float32))


def knn_similarity(train: torch.Tensor, k: int, block: int = 2048) -> torch.Tensor:
    """Sparse [m, m] cosine similarity of items' user columns, row i keeping its top-k other items.

    `train` [users, m] bool. Rows are built in blocks of `block` items (never all m x m dense at once).
    """
    x = train.to(torch.float32)
    counts = x.sum(dim=0)
    norms = counts.sqrt().clamp_min(1e-12)
    m = x.shape[1]
    k = min(k, m - 1)
    rows, cols, vals = [], [], []
    for start in range(0, m, block):
        stop = min(start + block, m)
        cos = (x[:, start:stop].T @ x) / (norms[start:stop, None] * norms[None, :])  # [b, m]
        cos[torch.arange(stop - start), torch.arange(start, stop)] = -1.0  # never an item's own neighbour
        top = cos.topk(k, dim=1)
        keep = top.values > 0
        rows.append(torch.arange(start, stop).unsqueeze(1).expand(-1, k)[keep])
        cols.append(top.indices[keep])
        vals.append(top.values[keep])
    index = torch.stack([torch.cat(rows), torch.cat(cols)])
    return torch.sparse_coo_tensor(index, torch.cat(vals), (m, m)).coalesce().to_sparse_csr()


class PopularityScorer:
    """Every client ranks items by their training popularity over all clients."""

    def __init__(self, data: FedData, device: torch.device):
        self.device = device
        self.counts = item_popularity(data).to(device)

    def train_round(self, samples: object, generator: torch.Generator) -> dict[str, float]:
        """Nothing to train: the scores are fixed by the training data."""
        return {}

    @torch.no_grad()
    def score(self, rows: torch.Tensor, item_ids: torch.Tensor | None) -> torch.Tensor:
        """Scores [C, L] of users `rows` for `item_ids` [C, L] (None = all items)."""
        if item_ids is None:
            return self.counts.expand(len(rows), -1)
        return self.counts[item_ids.to(self.device)]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore."""


class ItemKNNScorer:
    """Item-based kNN over the pooled training co-occurrence (cosine, top-k neighbours per item)."""

    def __init__(self, data: FedData, k: int, device: torch.device):
        self.device = device
        self.train = torch.as_tensor(data.train_matrix())
        self.sim = knn_similarity(self.train, int(k)).to(device)

    def train_round(self, samples: object, generator: torch.Generator) -> dict[str, float]:
        """Nothing to train: the neighbourhoods are fixed by the training data."""
        return {}

    @torch.no_grad()
    def score(self, rows: torch.Tensor, item_ids: torch.Tensor | None) -> torch.Tensor:
        """Scores [C, L]: for each item, the summed similarity of its neighbours the user trained on."""
        held = self.train[rows].to(self.device, torch.float32)  # [C, m]
        full = (self.sim @ held.T).T  # [C, m]: score(u, i) = sum_j sim_k(i, j) x_uj
        if item_ids is None:
            return full
        return full.gather(1, item_ids.to(self.device))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore."""
