"""Client-side item-item similarity (METHOD.md section 3, step 1).

S_u = Ê Êᵀ with Ê = normalise(E_u - mean_rows(E_u)) (centring optional): cosine similarity,
invariant to rotation and positive scaling of the table and, once centred, to translation.
The upload is S_u with its diagonal zeroed and the entries below sigma dropped: what a client
releases is computed block by block in `src/alignment/release.py`; the plain forms here are what
the tests check it against.
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


def cluster_sums(e: torch.Tensor, labels: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """Sum of the normalised embeddings of every cluster: [C, K, d] (a float `index_add`: its CUDA kernel
    accumulates in varying order unless `compute.deterministic`, see src/runtime/device.py)."""
    out = torch.zeros(e.shape[0], n_clusters, e.shape[2], dtype=e.dtype, device=e.device)
    return out.index_add(1, labels, e)
