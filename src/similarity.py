"""Client-side item-item similarity (METHOD.md section 3, step 1).

S_u = Ê Êᵀ with Ê = normalise(E_u - mean_rows(E_u)) (centring optional): cosine similarity,
invariant to rotation and positive scaling of the table and, once centred, to translation.
The upload is S_u with its diagonal zeroed and the entries below sigma dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from src.comm import quantise
from src.device import to_device


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


def laplace(shape: tuple[int, ...], scale: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Laplace(0, scale) samples by the inverse CDF of uniforms drawn from `generator` (reproducible).

    The uniforms come from the CPU generator and are copied to `device` block by block: one host-to-device
    copy per noisy block on a GPU. Kept so, because a device generator would draw other numbers (results
    would then depend on the device); the noise is only drawn with `privacy.*` on.
    """
    u = to_device(torch.rand(shape, generator=generator), device) - 0.5
    return -scale * torch.sign(u) * torch.log1p(-2 * u.abs())


class SimilarityAggregator:
    """Server-side running sum of the uploaded thresholded matrices; never all clients at once.

    Equivalent to summing `thresholded_upload(similarity(E_u))` over the uploading clients, but
    computed block by block over the strict upper triangle (the uploads are symmetric with a zero
    diagonal): blocks of `rows` items against all later items, as many clients per matrix product
    as fit in `block` elements, so the intermediates stay cache-sized and half the products are
    skipped. Each block is summed in the table's dtype, the running total is kept in fp64.

    What a client releases can be changed on the way, in this order: Laplace noise of scale
    `noise` on every entry (then clipped to [-1, 1]), the sigma threshold, `topk` per row (an entry
    is kept when it is among the k largest of its row or of its column), quantisation to `bits`
    over [sigma, 1] (`src.comm.quantise`). The server sums what it would decode.
    `client_nnz` holds each uploading client's nonzero count over the whole matrix (twice its
    upper-triangle entries); with `collect` the entries themselves are kept in `entries`
    (per client: sorted linear upper-triangle positions j * m + k and the decoded values).
    A client process builds one with `collect=True, accumulate=False` to produce its uploads;
    the server of a real deployment sums the decoded uploads with `add_entries`.
    """

    def __init__(
        self,
        n_items: int,
        sigma: float,
        centre: bool,
        block: int,
        device: torch.device,
        rows: int = 128,
        noise: float = 0.0,
        topk: int | None = None,
        bits: int = 32,
        collect: bool = False,
        generator: torch.Generator | None = None,
        accumulate: bool = True,
    ):
        self.upper = torch.zeros(
            n_items if accumulate else 0, n_items if accumulate else 0, dtype=torch.float64, device=device
        )
        self.accumulate = accumulate
        self.count = 0
        self.client_nnz: list[torch.Tensor] = []
        self.entries: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.sigma, self.centre, self.block, self.rows = sigma, centre, block, rows
        self.noise, self.topk, self.bits, self.collect = noise, topk, bits, collect
        if noise > 0 and topk is not None:
            raise ValueError("Laplace noise with top-k selection is not supported (top-k would see noiseless rows)")
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        # keep x >= sigma  <=>  x > the largest float32 below sigma
        self.below = float(torch.nextafter(torch.tensor(sigma), torch.tensor(-float("inf"))))

    @property
    def nnz(self) -> int:
        """Nonzero entries uploaded so far, over all clients."""
        return int(sum(int(n.sum()) for n in self.client_nnz))

    @property
    def plain(self) -> bool:
        """True when the upload is the thresholded matrix itself (the fast path)."""
        return self.noise == 0 and self.topk is None and self.bits == 32 and not self.collect

    def row_thresholds(self, e: torch.Tensor) -> torch.Tensor:
        """k-th largest off-diagonal similarity of every row of every client [C, m] (top-k selection)."""
        c, m = e.shape[0], e.shape[1]
        k = min(int(self.topk), m - 1)
        out = torch.full((c, m), float("inf"), dtype=e.dtype, device=e.device)
        if k < 1:
            return out
        per = max(1, self.block // (self.rows * m))
        for r0 in range(0, m, self.rows):
            b = min(self.rows, m - r0)
            for s in range(0, c, per):
                blk = e[s : s + per, r0 : r0 + b] @ e[s : s + per].transpose(-1, -2)
                blk[:, torch.arange(b), torch.arange(r0, r0 + b)] = -float("inf")
                out[s : s + per, r0 : r0 + b] = blk.topk(k, dim=-1).values[..., -1]
        return out

    @torch.no_grad()
    def add(self, tables: torch.Tensor, uploaded: torch.Tensor) -> None:
        """Add the uploads of the clients marked `uploaded` [C]."""
        e = normalised(tables[uploaded], self.centre)
        c, m = e.shape[0], e.shape[1]
        if c == 0:
            return
        nnz = torch.zeros(c, dtype=torch.long, device=e.device)
        thresholds = self.row_thresholds(e) if self.topk is not None else None
        found: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for r0 in range(0, m, self.rows):
            b, cols = min(self.rows, m - r0), m - r0
            strict = torch.ones(b, b, dtype=torch.bool, device=e.device).triu_(1)
            per = max(1, self.block // (b * cols))
            for s in range(0, c, per):
                blk = e[s : s + per, r0 : r0 + b] @ e[s : s + per, r0:].transpose(-1, -2)
                if self.plain and self.sigma > 0:
                    F.threshold(blk, self.below, 0.0, inplace=True)
                    blk[..., :b].masked_fill_(~strict, 0.0)
                    nnz[s : s + per] += torch.sign(blk).sum((1, 2)).long()
                    if self.accumulate:
                        self.upper[r0 : r0 + b, r0:] += blk.sum(0)
                    continue
                if self.noise > 0:
                    blk = blk + laplace(tuple(blk.shape), self.noise, self.generator, e.device).to(blk.dtype)
                    blk = blk.clamp_(-1.0, 1.0)
                keep = blk >= self.sigma
                keep[..., :b] &= strict
                if thresholds is not None:
                    t = thresholds[s : s + per]
                    keep &= (blk >= t[:, r0 : r0 + b, None]) | (blk >= t[:, None, r0:])
                blk = torch.where(keep, quantise(blk, self.sigma, 1.0, self.bits), 0.0)
                nnz[s : s + per] += keep.sum((1, 2))
                if self.collect:
                    ci, ri, ki = keep.nonzero(as_tuple=True)
                    found.append((ci + s) * (m * m) + (ri + r0) * m + (ki + r0))
                    values.append(blk[ci, ri, ki])
                if self.accumulate:
                    self.upper[r0 : r0 + b, r0:] += blk.sum(0)
        if self.collect:
            keys = torch.cat(found) if found else torch.zeros(0, dtype=torch.long, device=e.device)
            vals = torch.cat(values) if values else torch.zeros(0, dtype=e.dtype, device=e.device)
            order = torch.argsort(keys)
            keys, vals = keys[order].cpu(), vals[order].cpu()
            owner = keys // (m * m)
            bounds = torch.searchsorted(owner, torch.arange(c + 1))
            for i in range(c):
                lo, hi = int(bounds[i]), int(bounds[i + 1])
                self.entries.append((keys[lo:hi] % (m * m), vals[lo:hi]))
        self.client_nnz.append(2 * nnz.cpu())
        self.count += c

    @torch.no_grad()
    def add_entries(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> None:
        """Add one client's decoded upload: its strict-upper-triangle entries (row < col)."""
        m = self.upper.shape[0]
        flat = (rows.long() * m + cols.long()).to(self.upper.device)
        self.upper.view(-1).index_add_(0, flat, values.to(self.upper.device, torch.float64))
        if self.collect:
            order = torch.argsort(flat.cpu())
            self.entries.append((flat.cpu()[order], values.cpu()[order]))
        self.client_nnz.append(torch.tensor([2 * len(rows)]))
        self.count += 1

    def mean(self) -> torch.Tensor | None:
        """S_g = mean of the uploads (float32), or None when nobody uploaded."""
        if self.count == 0:
            return None
        return ((self.upper + self.upper.T) / self.count).float()
