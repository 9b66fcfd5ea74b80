"""What a node puts into a secure sum (SecAgg+), and what the server reads back out of the round's sum.

Secure aggregation adds fixed-size dense vectors, so a node's similarity uploads become one dense vector: the sum
over its reporting clients of each upload's strict upper triangle (m(m-1)/2 entries, as decoded from the codec, so
the values are those a plain upload delivers), the same count of holders per pair when the method averages over
holders (`ablation.aggregate=support_mean`), and how many uploads it summed. The server learns only the sum of these
vectors over the nodes (src/flower/secagg.py), never one node's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from src.comm.codec import upper_position

# flwr's SecAgg+ masks each quantised entry in [0, 2**32) and sends it as an int64, in two arrays (the weight, then
# the vector), each serialised with numpy's .npy header
MASKED_ENTRY_BYTES = 8
NPY_HEADER_BYTES = 128


@dataclass(frozen=True)
class SecureLayout:
    """The dense vector of one round: `m` items, with or without the per-pair holder counts."""

    m: int
    support: bool

    @property
    def pairs(self) -> int:
        """m(m-1)/2: the strict upper triangle."""
        return self.m * (self.m - 1) // 2

    @property
    def size(self) -> int:
        """Entries of the vector: the pair sums, the holder counts when kept, and the upload count."""
        return self.pairs * (2 if self.support else 1) + 1

    def masked_bytes(self) -> int:
        """Bytes of one masked vector as sent (flwr SecAgg+: int64 per entry, plus the weight entry)."""
        return (self.size + 1) * MASKED_ENTRY_BYTES + 2 * NPY_HEADER_BYTES

    def triu(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) of the strict upper triangle, row-major: entry i of the pair block is (rows[i], cols[i])."""
        idx = torch.triu_indices(self.m, self.m, offset=1)
        return idx[0], idx[1]

    def pack(self, uploads: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
        """The vector [size] of a node's decoded uploads, each (rows, cols, values) with rows < cols: all of them
        summed at once."""
        out = np.zeros(self.size, dtype=np.float64)
        if uploads:
            rows, cols, vals = (np.concatenate([u[i] for u in uploads]) for i in range(3))
            rows, cols = rows.astype(np.int64), cols.astype(np.int64)
            if np.any(rows >= cols):
                raise ValueError("a similarity upload holds an entry on or below the diagonal")
            pos = upper_position(rows, cols, self.m)
            out[: self.pairs] = np.bincount(pos, weights=vals.astype(np.float64), minlength=self.pairs)
            if self.support:
                out[self.pairs : 2 * self.pairs] = np.bincount(pos, weights=vals != 0, minlength=self.pairs)
        out[-1] = len(uploads)
        return out

    def pair_matrix(self, vector: np.ndarray) -> torch.Tensor:
        """The symmetric [m, m] matrix of a vector's pair block (float64), as a server would read one upload."""
        rows, cols = self.triu()
        upper = torch.zeros(self.m, self.m, dtype=torch.float64)
        upper[rows, cols] = torch.from_numpy(np.ascontiguousarray(vector[: self.pairs], dtype=np.float64))
        return upper + upper.T

    def unpack(
        self, total: np.ndarray, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """The round's sum [size] as (upper [m, m] float64, holders [m, m] int32 or None, uploads): the fields of
        `SimilaritySum`. Counts come back through the quantisation as reals; they are rounded to integers."""
        if total.shape != (self.size,):
            raise ValueError(f"a secure sum of shape {total.shape}; expected ({self.size},) for m={self.m}")
        rows, cols = self.triu()
        upper = torch.zeros(self.m, self.m, dtype=torch.float64)
        upper[rows, cols] = torch.from_numpy(np.ascontiguousarray(total[: self.pairs], dtype=np.float64))
        support = None
        if self.support:
            support = torch.zeros(self.m, self.m, dtype=torch.int32)
            held = np.rint(total[self.pairs : 2 * self.pairs]).astype(np.int32)
            support[rows, cols] = torch.from_numpy(held)
        return upper.to(device), None if support is None else support.to(device), int(round(float(total[-1])))
