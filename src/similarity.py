"""Client-side item-item similarity (METHOD.md section 3, step 1).

S_u = Ê Êᵀ with Ê = normalise(E_u - mean_rows(E_u)) (centring optional): cosine similarity,
invariant to rotation and positive scaling of the table and, once centred, to translation.
The upload is S_u with its diagonal zeroed and the entries below sigma dropped.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def normalised(table: torch.Tensor, centre: bool) -> torch.Tensor:
    """Ê [C, m, d]: rows centred over items (optional) and scaled to unit length."""
    if centre:
        table = table - table.mean(dim=-2, keepdim=True)
    return F.normalize(table, dim=-1, eps=1e-12)


def similarity(table: torch.Tensor, centre: bool) -> torch.Tensor:
    """Dense cosine similarity [C, m, m] of each client's items (diagonal left at 1)."""
    e = normalised(table, centre)
    return e @ e.transpose(-1, -2)


def thresholded_upload(sim: torch.Tensor, sigma: float) -> torch.Tensor:
    """What a client uploads: S with the diagonal set to 0 and entries below sigma set to 0."""
    out = torch.where(sim >= sigma, sim, 0.0)
    out.diagonal(dim1=-2, dim2=-1).zero_()
    return out


class SimilarityAggregator:
    """Server-side running sum of the uploaded thresholded matrices; never all clients at once.

    Each chunk's thresholded matrices are summed in fp32, the running total is kept in fp64.
    """

    def __init__(self, n_items: int, sigma: float, centre: bool, chunk: int, device: torch.device):
        self.sum = torch.zeros(n_items, n_items, dtype=torch.float64, device=device)
        self.count, self.nnz = 0, 0
        self.sigma, self.centre, self.chunk = sigma, centre, chunk

    @torch.no_grad()
    def add(self, tables: torch.Tensor, uploaded: torch.Tensor) -> None:
        """Add the uploads of the clients marked `uploaded` [C], `chunk` clients at a time."""
        tables = tables[uploaded]
        for start in range(0, tables.shape[0], self.chunk):
            kept = thresholded_upload(similarity(tables[start:start + self.chunk], self.centre), self.sigma)
            self.nnz += int(torch.count_nonzero(kept))
            self.sum += kept.sum(dim=0)
        self.count += int(tables.shape[0])

    def mean(self) -> torch.Tensor | None:
        """S_g = mean of the uploads (float32), or None when nobody uploaded."""
        if self.count == 0:
            return None
        return (self.sum / self.count).float()
