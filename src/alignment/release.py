"""What a client releases: its thresholded item-item similarity, as it would be sent (client side).

A client sends the strict upper triangle of `thresholded_upload(similarity(E_u))`, changed on the way,
in this order, by what the run configures: Laplace noise of scale `noise` on every entry (then
clipped to [-1, 1]; `src/comm/privacy.py`), the sigma threshold, `topk` per row (an entry is kept
when it is among the k largest of its row or of its column, so the upload stays symmetric), and
quantisation to `bits` over [sigma, 1] (`src/comm/codec.py`). The values are those the server decodes.

`release_blocks` computes this for a chunk of clients block by block (item rows r0..r0+b against
all later items, as many clients per product as fit in `block` elements), so no client's m x m
matrix ever exists whole. With `compile` (`compute.compile`) the plain upload of a block is made by
one compiled kernel that also sums it over the block's clients (what the server adds; the simulator's
shortcut) and counts each client's entries, instead of five passes over the block; the same pairs,
sums within float rounding (tests/test_compiled.py). With `native` (`compute=native`) the C kernel of
`src/alignment/native_sums.py` makes those sums with the threshold in the product's epilogue instead.
The simulator hands each block to the server's sum as it comes (`src/server/global_similarity.py`); the Flower client
and the audit collect the entries of each client (`ChunkUploads`, `release_entries`) and encode them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import cache

import torch
import torch.nn.functional as F

from src.alignment import native_sums
from src.alignment.similarity import normalised
from src.comm.codec import quantise
from src.comm.privacy import laplace


@dataclass(frozen=True)
class ReleaseSpec:
    """How a client's similarity upload is made: threshold, centring, noise, top-k, bits, block sizes."""

    sigma: float
    centre: bool
    block: int = 4_194_304  # elements of one block product (clients x rows x columns)
    rows: int = 128  # item rows per block
    noise: float = 0.0
    topk: int | None = None
    bits: int = 32
    compile: bool = False  # plain uploads through the compiled kernel that also sums them over clients
    native: bool = False  # plain uploads of float32 CPU tables summed by the C kernel (src/alignment/native_sums.py)
    threads: int = 1  # threads of the C kernel
    clip: float | None = None  # user-level DP: each client's whole upload scaled to L2 norm <= clip

    def __post_init__(self) -> None:
        if self.noise > 0 and self.topk is not None:
            raise ValueError("Laplace noise with top-k selection is not supported (top-k would see noiseless rows)")
        if self.clip is not None and (self.noise > 0 or self.bits != 32):
            raise ValueError("a clipped upload needs no Laplace noise and 32-bit values (quantisation would undo it)")

    @property
    def below(self) -> float:
        """The largest float32 below sigma: keep x >= sigma <=> x > below."""
        return float(torch.nextafter(torch.tensor(self.sigma), torch.tensor(-float("inf"))))

    def plain(self, entries: bool) -> bool:
        """True when the upload is the thresholded matrix itself and no entries are listed (the fast path)."""
        plain = self.noise == 0 and self.topk is None and self.bits == 32 and self.clip is None
        return plain and not entries and self.sigma > 0


@dataclass
class ReleasedBlock:
    """Item rows r0..r0+b (columns c0.., default r0..) of what clients first..first+c of a chunk send (strict
    upper triangle, 0 = not sent)."""

    first: int
    r0: int
    values: torch.Tensor | None  # [c, b, m - r0]; None when only their sum over the c clients was made
    count: torch.Tensor  # [c] entries each of these clients sends in this block
    keep: torch.Tensor | None  # [c, b, m - r0] the sent positions; None on the fast path
    total: torch.Tensor | None = None  # [b, w] sum over the c clients of columns c0..c0+w (the compiled path)
    held: torch.Tensor | None = None  # [b, w] how many of the c clients send each entry (with `total`)
    c0: int | None = None  # the first column (None: r0)

    @property
    def col(self) -> int:
        """The block's first column."""
        return self.r0 if self.c0 is None else self.c0

    def summed(self) -> torch.Tensor:
        """The block summed over its clients [b, m - r0]; listed (encoded) values in fp64, as the server sums decoded
        uploads one by one, so the simulator's S_g is the deployment's."""
        if self.total is not None:
            return self.total
        return self.values.sum(0, dtype=torch.float64) if self.keep is not None else self.values.sum(0)

    def holders(self) -> torch.Tensor:
        """How many of the block's clients send each entry [b, m - r0] (int32)."""
        return self.held if self.held is not None else (self.values != 0).sum(0, dtype=torch.int32)


def row_thresholds(e: torch.Tensor, spec: ReleaseSpec) -> torch.Tensor:
    """k-th largest off-diagonal similarity of every row of every client [C, m] (top-k selection)."""
    c, m = e.shape[0], e.shape[1]
    k = min(int(spec.topk), m - 1)
    out = torch.full((c, m), float("inf"), dtype=e.dtype, device=e.device)
    if k < 1:
        return out
    per = max(1, spec.block // (spec.rows * m))
    for r0 in range(0, m, spec.rows):
        b = min(spec.rows, m - r0)
        for s in range(0, c, per):
            blk = e[s : s + per, r0 : r0 + b] @ e[s : s + per].transpose(-1, -2)
            blk[:, torch.arange(b), torch.arange(r0, r0 + b)] = -float("inf")
            out[s : s + per, r0 : r0 + b] = blk.topk(k, dim=-1).values[..., -1]
    return out


def summed_plain_block(rows: torch.Tensor, cols: torch.Tensor, shift: int, below: float, held: bool):
    """Plain uploads of a tile, item rows r0..r0+b [c, b, d] against items c0..c0+w [c, w, d] (shift = c0 - r0):
    entries > `below` of the strict upper triangle, summed over the c clients [b, w], each client's entry
    count [c] and, with `held`, how many clients send each entry [b, w] (int32; else None)."""
    blk = torch.bmm(rows, cols.transpose(1, 2))
    i = torch.arange(rows.shape[1], device=rows.device).unsqueeze(1)
    j = torch.arange(cols.shape[1], device=rows.device).unsqueeze(0) + shift
    keep = (blk > below) & (j > i)
    holders = keep.sum(0, dtype=torch.int32) if held else None
    return torch.where(keep, blk, 0.0).sum(0), keep.sum(dim=(1, 2)), holders


@cache
def compiled_plain_block():
    """`summed_plain_block` compiled once per process (torch.compile, dynamic shapes: every block differs)."""
    return torch.compile(summed_plain_block, dynamic=True)


TILE_COLS = 2048  # columns of one compiled tile: its [clients x rows x columns] products stay in cache


def tiles(m: int, rows: int, cols: int | None, block: int) -> Iterator[tuple[int, int, int, int, int]]:
    """The upper triangle of an m x m matrix in tiles: (r0, b, c0, w, per) for rows [r0, r0 + b) and columns
    [c0, c0 + w) (from r0 on, `cols` at a time; None: all at once), and the clients `per` block so that one
    block holds about `block` elements."""
    for r0 in range(0, m, rows):
        b = min(rows, m - r0)
        width = m - r0 if cols is None else cols
        for c0 in range(r0, m, width):
            w = min(width, m - c0)
            yield r0, b, c0, w, max(1, block // (b * w))


def summed_tiles(e: torch.Tensor, spec: ReleaseSpec, held: bool) -> Iterator[ReleasedBlock]:
    """The plain uploads of the normalised tables `e` [C, m, d] by the compiled kernel, one block per tile of
    `spec.rows` rows x `TILE_COLS` columns summed over all C clients (the server adds each tile once)."""
    kernel = compiled_plain_block()
    c, m = e.shape[0], e.shape[1]
    if c == 0:
        return
    for r0, b, c0, w, per in tiles(m, spec.rows, TILE_COLS, spec.block):
        total, counts, holders = None, [], None
        for s in range(0, c, per):
            part, count, hold = kernel(
                e[s : s + per, r0 : r0 + b], e[s : s + per, c0 : c0 + w], c0 - r0, spec.below, held
            )
            total = part if total is None else total.add_(part)
            holders = hold if holders is None or hold is None else holders.add_(hold)
            counts.append(count)
        yield ReleasedBlock(0, r0, None, torch.cat(counts), None, total, holders, c0)


NATIVE_BAND = 512  # item rows of one block of the C kernel's sums (a multiple of native_sums.TILE_ROWS)


def native_bands(e: torch.Tensor, spec: ReleaseSpec, held: bool) -> Iterator[ReleasedBlock]:
    """The plain uploads of the normalised tables `e` [C, m, d] (float32, CPU) summed by the C kernel, one block
    per band of `NATIVE_BAND` item rows against the items from the band on."""
    c, m = e.shape[0], e.shape[1]
    if c == 0:
        return
    rows, cols = native_sums.padded(e)
    for r0 in range(0, m, NATIVE_BAND):
        r1 = min(r0 + NATIVE_BAND, m)
        total, holders, counts = native_sums.band_sums(rows, cols, m, spec.below, r0, r1, held, spec.threads)
        yield ReleasedBlock(0, r0, None, counts, None, total, holders, r0)


@torch.no_grad()
def release_blocks(
    tables: torch.Tensor,
    spec: ReleaseSpec,
    noise: Sequence[torch.Generator] | None = None,
    entries: bool = False,
    held: bool = False,
) -> Iterator[ReleasedBlock]:
    """The uploads of the clients whose item tables are `tables` [C, m, d], block by block.

    With `entries` every block also says which positions are sent (for encoding or delta accounting);
    with `held` a compiled block also counts the clients sending each entry (`ablation.aggregate=support_mean`).
    With `spec.noise` > 0 client i's noise comes from `noise[i]` (one generator per client, `NoiseStreams`),
    block by block in this order, so a client's upload does not depend on the chunk it is released in.
    """
    if spec.noise > 0 and (noise is None or len(noise) != tables.shape[0]):
        raise ValueError(f"noisy release of {tables.shape[0]} clients needs one noise generator per client")
    if spec.clip is not None:
        yield from clipped_blocks(tables, spec, entries)
        return
    e = normalised(tables, spec.centre)
    c, m = e.shape[0], e.shape[1]
    plain = spec.plain(entries)
    below = spec.below
    if plain and spec.native and e.dtype == torch.float32 and e.device.type == "cpu":
        yield from native_bands(e, spec, held)
        return
    if plain and spec.compile:
        yield from summed_tiles(e, spec, held)
        return
    thresholds = row_thresholds(e, spec) if spec.topk is not None else None
    for r0, b, _, _, per in tiles(m, spec.rows, None, spec.block):
        strict = torch.ones(b, b, dtype=torch.bool, device=e.device).triu_(1)
        for s in range(0, c, per):
            blk = e[s : s + per, r0 : r0 + b] @ e[s : s + per, r0:].transpose(-1, -2)
            if plain:
                F.threshold(blk, below, 0.0, inplace=True)
                blk[..., :b].masked_fill_(~strict, 0.0)
                yield ReleasedBlock(s, r0, blk, torch.sign(blk).sum((1, 2)).long(), None)
                continue
            if spec.noise > 0:
                draws = [laplace(tuple(blk.shape[1:]), spec.noise, g, e.device) for g in noise[s : s + per]]
                blk = blk + torch.stack(draws).to(blk.dtype)
                blk = blk.clamp_(-1.0, 1.0)
            keep = blk >= spec.sigma
            keep[..., :b] &= strict
            if thresholds is not None:
                t = thresholds[s : s + per]
                keep &= (blk >= t[:, r0 : r0 + b, None]) | (blk >= t[:, None, r0:])
            blk = torch.where(keep, quantise(blk, spec.sigma, 1.0, spec.bits), 0.0)
            yield ReleasedBlock(s, r0, blk, keep.sum((1, 2)), keep)


def clipped_blocks(tables: torch.Tensor, spec: ReleaseSpec, entries: bool) -> Iterator[ReleasedBlock]:
    """The uploads of `tables` [C, m, d] with each client's whole upload scaled by min(1, clip / its L2 norm): a
    first pass sums each client's squared entries over all its blocks, the second releases the blocks scaled."""
    inner = replace(spec, clip=None, native=False, compile=False)  # blocks that hold each client's values
    squares = torch.zeros(tables.shape[0], dtype=torch.float64, device=tables.device)
    for blk in release_blocks(tables, inner):
        squares[blk.first : blk.first + blk.values.shape[0]] += blk.values.double().square().sum((1, 2))
    scale = (spec.clip / squares.sqrt()).clamp(max=1.0)  # an empty upload (norm 0) is left as it is
    for blk in release_blocks(tables, inner, entries=entries):
        blk.values = blk.values * scale[blk.first : blk.first + blk.values.shape[0], None, None].to(blk.values.dtype)
        yield blk


class ChunkUploads:
    """What each client of a chunk sent, gathered from its released blocks: nonzero counts and entries."""

    def __init__(self, n_clients: int, n_items: int, device: torch.device, entries: bool):
        self.n, self.m, self.entries = n_clients, n_items, entries
        self.count = torch.zeros(n_clients, dtype=torch.long, device=device)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def add(self, blk: ReleasedBlock) -> None:
        """Count the block's entries per client and, when listing entries, keep their positions and values."""
        c = blk.count.shape[0]
        self.count[blk.first : blk.first + c] += blk.count
        if self.entries:
            m = self.m
            ci, ri, ki = blk.keep.nonzero(as_tuple=True)
            self.keys.append((ci + blk.first) * (m * m) + (ri + blk.r0) * m + (ki + blk.r0))
            self.values.append(blk.values[ci, ri, ki])

    def nnz(self) -> torch.Tensor:
        """Nonzero entries of each client's whole matrix [C] (twice its upper-triangle entries), on the CPU."""
        return 2 * self.count.cpu()

    def client_entries(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per client: sorted linear upper-triangle positions j * m + k and the decoded values (CPU)."""
        m = self.m
        keys = torch.cat(self.keys) if self.keys else torch.zeros(0, dtype=torch.long)
        vals = torch.cat(self.values) if self.values else torch.zeros(0)
        order = torch.argsort(keys)
        keys, vals = keys[order].cpu(), vals[order].cpu()
        bounds = torch.searchsorted(keys // (m * m), torch.arange(self.n + 1))
        return [
            (keys[int(bounds[i]) : int(bounds[i + 1])] % (m * m), vals[int(bounds[i]) : int(bounds[i + 1])])
            for i in range(self.n)
        ]


def gather(blocks: Iterator[ReleasedBlock], n_clients: int, n_items: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each of `n_clients` clients' upload from its released blocks (made with `entries`): (sorted linear
    positions j * m + k with j < k, values), as it is encoded."""
    uploads: ChunkUploads | None = None
    for blk in blocks:
        if uploads is None:
            uploads = ChunkUploads(n_clients, n_items, blk.values.device, entries=True)
        uploads.add(blk)
    if uploads is None:
        uploads = ChunkUploads(n_clients, n_items, torch.device("cpu"), entries=True)
    return uploads.client_entries()


def release_entries(
    tables: torch.Tensor, spec: ReleaseSpec, noise: Sequence[torch.Generator] | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each client's upload of the tables [C, m, d], as (sorted positions, values)."""
    return gather(release_blocks(tables, spec, noise, entries=True), tables.shape[0], tables.shape[1])
