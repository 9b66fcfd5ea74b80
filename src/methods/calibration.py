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

import warnings
from collections.abc import Callable

import numpy as np
import torch

from src.alignment.neighbours import nearest_entries
from src.data.dataset import FedData


def item_popularity(data: FedData) -> torch.Tensor:
    """Training positives per item over all clients [m] (float32)."""
    return torch.from_numpy(np.bincount(data.train_items, minlength=data.n_items).astype(np.float32))


def keep_top_k(rows_of: Callable[[int, int], torch.Tensor], m: int, k: int, block: int = 2048) -> torch.Tensor:
    """Sparse CSR [m, m]: row i keeps its k largest positive entries of the similarity, never i itself; of
    equal values the lower item index first (`nearest_mask`, the rule of the server's kNN graph too).

    `rows_of(start, stop)` gives rows start..stop-1 of the dense similarity [stop - start, m]; they are
    built `block` rows at a time (never all m x m at once)."""
    rows, cols, vals = nearest_entries(lambda start, stop: rows_of(start, stop).to(torch.float32), m, k, block)
    index = torch.stack([rows, cols])
    with warnings.catch_warnings():  # torch's notes that sparse CSR is beta and unchecked
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_coo_tensor(index, vals, (m, m)).coalesce().to_sparse_csr()


def knn_similarity(train: torch.Tensor, k: int, block: int = 2048) -> torch.Tensor:
    """Sparse [m, m] cosine similarity of items' user columns, row i keeping its top-k other items.

    `train` [users, m] bool."""
    x = train.to(torch.float32)
    norms = x.sum(dim=0).sqrt().clamp_min(1e-12)

    def cosine(start: int, stop: int) -> torch.Tensor:
        return (x[:, start:stop].T @ x) / (norms[start:stop, None] * norms[None, :])  # [b, m]

    return keep_top_k(cosine, x.shape[1], k, block)


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
    """Item-based kNN: a client's score for item i sums sim(i, j) over the items j it trained on.

    `train` [users, m] bool (each client reads its own row), `sim` [m, m] sparse: each item's kept neighbours."""

    def __init__(self, train: torch.Tensor, sim: torch.Tensor, device: torch.device):
        self.device = device
        self.train = train
        self.sim = sim.to(device)

    @classmethod
    def pooled(cls, data: FedData, k: int, device: torch.device) -> ItemKNNScorer:
        """The calibration baseline: cosine of co-occurrence over the pooled training data, top-k per item."""
        train = torch.as_tensor(data.train_matrix())
        return cls(train, knn_similarity(train, int(k)), device)

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
