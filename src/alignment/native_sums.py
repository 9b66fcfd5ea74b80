"""The server's sums of plain uploads by a small C kernel (`upper_sums.c`; built by `src/runtime/native.py`).

The compiled torch tile (`release.summed_plain_block`) runs the similarity product as a separate GEMM whose
[clients x rows x columns] output goes through memory before the threshold and the sum read it back; with
d = 32 multiply-adds per entry that round trip costs as much as the product. The C kernel keeps each client's
products in registers, thresholds and adds them to a cache-resident tile summed over the chunk's clients, and
counts them (README, Benchmark: 2.4x the compiled tile on ML-1M). Same pairs as the fp32 product but for
cosines within float rounding of sigma; sums in fp32 over a chunk's clients as the compiled tile does
(tests/test_native_sums.py).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

from src.runtime import native

SOURCE = Path(__file__).with_name("upper_sums.c")
NR = 32  # the columns of the kernel's register tile (its rows: 8 with AVX-512, 2 with AVX2)
TILE_ROWS, TILE_COLS = 128, 256  # its cache tile: a multiple of 8 rows x a multiple of NR columns (measured)


@cache
def kernel(defines: tuple[str, ...] = ()):
    """The C function `upper_sums`, typed (built for this CPU's vector width; `defines` as `native.library`)."""
    fn = native.library(SOURCE, defines).upper_sums
    fn.restype = None
    i64, ptr = native.I64, native.PTR
    fn.argtypes = [ptr, ptr, i64, i64, i64, i64, native.F32, i64, i64, ptr, ptr, ptr, i64, i64, native.INT, ptr]
    return fn


def padded(e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's operands from normalised tables e [C, m, d] (float32, CPU): e with its rows padded with zeros
    to a multiple of 32 [C, mp, d], and its transpose in panels of 32 items [C, mp / 32, d, 32] (a register tile's
    columns contiguous: fewer pages touched per tile than rows of the whole transpose)."""
    c, m, d = e.shape
    mp = -(-m // NR) * NR
    rows = torch.zeros(c, mp, d, dtype=torch.float32)
    rows[:, :m] = e
    return rows, rows.view(c, mp // NR, NR, d).transpose(2, 3).contiguous()


def band_sums(
    rows: torch.Tensor, cols: torch.Tensor, m: int, below: float, r0: int, r1: int, held: bool, threads: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Plain uploads of item rows [r0, r1) against items r0.. (strict upper triangle, entries > `below`), from
    `padded` operands: their sum over the clients [r1 - r0, m - r0] (float32), with `held` how many clients
    send each entry (int32, else None), and each client's entry count [C] (int64). r0 a multiple of TILE_ROWS."""
    if r0 % TILE_ROWS or (r1 % TILE_ROWS and r1 != m):
        raise ValueError(f"band [{r0}, {r1}) must start and end on a multiple of {TILE_ROWS} rows (or end at m={m})")
    if below < 0:
        raise ValueError(f"below={below}: the kernel's zero padding would count as sent entries (sigma must be > 0)")
    c, mp, d = rows.shape
    total = torch.zeros(r1 - r0, m - r0, dtype=torch.float32)
    hold = torch.zeros(r1 - r0, m - r0, dtype=torch.int32) if held else None
    counts = torch.zeros(c, dtype=torch.int64)
    args = (rows.data_ptr(), cols.data_ptr(), c, m, mp, d, below, r0, r1, total.data_ptr())
    status = torch.zeros(1, dtype=torch.int32)
    args += (0 if hold is None else hold.data_ptr(), counts.data_ptr(), TILE_ROWS, TILE_COLS, threads)
    kernel()(*args, status.data_ptr())
    if status.item():
        raise MemoryError("upper_sums: a thread could not allocate its cache tile")
    return total, hold, counts
