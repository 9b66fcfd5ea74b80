"""The product's upload path for tests: client release (`release_blocks`) into the server's `RoundSums`.

Tests feed tables through exactly what a round runs (`Method.release` then `RoundSums.add`) and check
the sums against the numpy oracles of `alignment_helpers.py`.
"""

from __future__ import annotations

import torch

from src.alignment.release import ReleaseSpec, release_blocks
from src.methods.base import Release, RoundSums


class Uploads:
    """Uploads of chunks of clients as a round makes them; `mean`, `count`, `nnz`, `entries` as the server sees."""

    def __init__(
        self,
        m: int,
        sigma: float,
        centre: bool,
        block: int,
        rows: int = 128,
        noise: float = 0.0,
        topk: int | None = None,
        bits: int = 32,
        generator: torch.Generator | None = None,
        entries: bool = False,
    ):
        self.spec = ReleaseSpec(sigma, centre, block, rows, noise, topk, bits)
        self.sums = RoundSums(m, torch.device("cpu"), similarity=True, entries=entries)
        self.gen = generator if generator is not None else torch.Generator().manual_seed(0)

    def add(self, tables: torch.Tensor, uploaded: torch.Tensor) -> None:
        """The clients of `tables` [C, m, d] marked `uploaded` [C] release their uploads; the server sums them."""
        users = torch.arange(len(tables))[uploaded]
        noise = [self.gen] * len(users) if self.spec.noise > 0 else None  # one shared stream: order as drawn
        blocks = release_blocks(tables[uploaded], self.spec, noise, self.sums.keep_entries) if len(users) else None
        self.sums.add(Release(users, {}, blocks))

    def mean(self) -> torch.Tensor | None:
        return self.sums.sims.mean()

    @property
    def count(self) -> int:
        return self.sums.sims.count

    @property
    def nnz(self) -> int:
        return int(self.sums.sender_nnz().sum())

    @property
    def entries(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.sums.entries
