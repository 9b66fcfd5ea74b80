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

    Equivalent to summing `thresholded_upload(similarity(E_u))` over the uploading clients, but
    computed block by block over the strict upper triangle (the uploads are symmetric with a zero
    diagonal): blocks of `rows` items against all later items, as many clients per matrix product
    as fit in `block` elements, so the intermediates stay cache-sized and half the products are
    skipped. Each block is summed in the table's dtype, the running total is kept in fp64.
    `client_nnz` holds each uploading client's number of nonzero entries (what it would send).
    """

    def __init__(self, n_items: int, sigma: float, centre: bool, block: int, device: torch.device, rows: int = 128):
        self.upper = torch.zeros(n_items, n_items, dtype=torch.float64, device=device)
        self.count = 0
        self.client_nnz: list[torch.Tensor] = []
        self.sigma, self.centre, self.block, self.rows = sigma, centre, block, rows
        # keep x >= sigma  <=>  x > the largest float32 below sigma
        self.below = float(torch.nextafter(torch.tensor(sigma), torch.tensor(-float("inf"))))

    @property
    def nnz(self) -> int:
        """Nonzero entries uploaded so far, over all clients."""
        return int(sum(int(n.sum()) for n in self.client_nnz))

    @torch.no_grad()
    def add(self, tables: torch.Tensor, uploaded: torch.Tensor) -> None:
        """Add the uploads of the clients marked `uploaded` [C]."""
        e = normalised(tables[uploaded], self.centre)
        c, m = e.shape[0], e.shape[1]
        if c == 0:
            return
        nnz = torch.zeros(c, dtype=torch.long, device=e.device)
        for r0 in range(0, m, self.rows):
            b, cols = min(self.rows, m - r0), m - r0
            strict = torch.ones(b, b, dtype=torch.bool, device=e.device).triu_(1)
            per = max(1, self.block // (b * cols))
            for s in range(0, c, per):
                blk = e[s:s + per, r0:r0 + b] @ e[s:s + per, r0:].transpose(-1, -2)
                if self.sigma > 0:
                    F.threshold(blk, self.below, 0.0, inplace=True)
                    blk[..., :b].masked_fill_(~strict, 0.0)
                    nnz[s:s + per] += torch.sign(blk).sum((1, 2)).long()
                else:
                    blk = torch.where(blk >= self.sigma, blk, 0.0)
                    blk[..., :b].masked_fill_(~strict, 0.0)
                    nnz[s:s + per] += blk.ne(0).sum((1, 2))
                self.upper[r0:r0 + b, r0:] += blk.sum(0)
        self.client_nnz.append(2 * nnz.cpu())
        self.count += c

    def mean(self) -> torch.Tensor | None:
        """S_g = mean of the uploads (float32), or None when nobody uploaded."""
        if self.count == 0:
            return None
        return ((self.upper + self.upper.T) / self.count).float()
