"""The server's side of the alignment (METHOD.md section 3, step 2): sum the uploads, S_g, communities.

`SimilaritySum` only adds what clients released (`src/alignment/release.py`): blocks as they come in
the simulator, decoded entries in a Flower deployment. `communities` finds the communities of S_g by
modularity and returns them with the round's statistics.
"""

from __future__ import annotations

import torch

from src.alignment.release import ReleasedBlock
from src.server.communities import Communities, adjusted_rand_index, detect


class SimilaritySum:
    """Running sum of the uploaded matrices' strict upper triangles [m, m] in fp64, and the uploaders' count;
    with `support`, also how many uploads hold each pair (`ablation.aggregate=support_mean`, this project's)."""

    def __init__(self, n_items: int, device: torch.device | str = "cpu", support: bool = False):
        self.upper = torch.zeros(n_items, n_items, dtype=torch.float64, device=device)
        self.support = torch.zeros(n_items, n_items, dtype=torch.int32, device=device) if support else None
        self.count = 0

    @torch.no_grad()
    def add_block(self, blk: ReleasedBlock) -> None:
        """Add a released block of some clients (summed over those clients in the block's dtype)."""
        total = blk.summed()
        rows, cols = slice(blk.r0, blk.r0 + total.shape[0]), slice(blk.col, blk.col + total.shape[1])
        self.upper[rows, cols] += total
        if self.support is not None:
            self.support[rows, cols] += blk.holders()

    @torch.no_grad()
    def add_entries(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> None:
        """Add one client's decoded upload: its strict-upper-triangle entries (row < col)."""
        m = self.upper.shape[0]
        flat = (rows.long() * m + cols.long()).to(self.upper.device)
        self.upper.view(-1).index_add_(0, flat, values.to(self.upper.device, torch.float64))
        if self.support is not None:
            self.support.view(-1).index_add_(0, flat, (values != 0).to(self.support.device, torch.int32))

    def mean(self) -> torch.Tensor | None:
        """S_g = mean of the uploads [m, m] (float32, symmetric), or None when nobody uploaded."""
        if self.count == 0:
            return None
        return ((self.upper + self.upper.T) / self.count).float()

    def support_mean(self) -> torch.Tensor | None:
        """S_g = mean over the uploads that hold each pair (0 where none does) [m, m], or None when nobody uploaded."""
        if self.count == 0:
            return None
        held = (self.support + self.support.T).double()
        return torch.where(held > 0, (self.upper + self.upper.T) / held.clamp(min=1), 0.0).float()


def communities(
    global_sim: torch.Tensor,
    sigma: float,
    method: str,
    resolution: float,
    seed: int,
    previous: torch.Tensor | None,
    knn: int | None = None,
) -> tuple[Communities, dict[str, float]]:
    """Communities of the graph S_g >= sigma (or, with `knn`, each item's k nearest) by modularity and the
    round's statistics (`previous`: last labels)."""
    comms = detect(global_sim, sigma, method, resolution, seed, knn)
    sizes = comms.sizes
    stats = {
        "community/count": float(len(sizes)),
        "community/largest": float(sizes.max()),
        "community/singletons": float((sizes == 1).sum()),
        "community/non_singleton": float((sizes > 1).sum()),
        "community/modularity": comms.modularity,
        "community/edges": float(comms.edges),
    }
    if previous is not None:
        stats["community/ari_prev"] = adjusted_rand_index(previous.numpy(), comms.labels)
    return comms, stats
