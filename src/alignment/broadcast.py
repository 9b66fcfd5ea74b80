"""What the server broadcasts to the clients after a round: community labels and the global similarity S_g.

A `Broadcast` is a value: the server builds it once per round (`src/methods/alignfedrec.py`), the
clients' alignment loss reads it (`src/alignment/losses.py`), the checkpoint stores its two tensors.
It also holds what the clients derive from it (community sizes, the pairs of S_g above sigma) and
its copies on each compute device, made once per broadcast and device instead of once per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from src.alignment.graph import graph_mask
from src.runtime.device import to_device


@dataclass
class Broadcast:
    """Community labels [m] (long) and S_g [m, m] as the clients decode them; either may be None."""

    labels: torch.Tensor | None
    global_sim: torch.Tensor | None
    sigma: float
    sizes: torch.Tensor | None = field(init=False)  # [K] items per community
    pairs: torch.Tensor | None = field(init=False)  # [2, P] pairs j < k with S_g >= sigma
    targets: torch.Tensor | None = field(init=False)  # [P] their S_g values
    copies: dict[tuple[torch.device, str], torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.sizes = None if self.labels is None else torch.bincount(self.labels)
        self.pairs = self.targets = None
        if self.global_sim is not None:
            upper = torch.triu(self.global_sim >= self.sigma, diagonal=1)
            self.pairs = upper.nonzero().T.contiguous()
            self.targets = self.global_sim[self.pairs[0], self.pairs[1]]

    @classmethod
    def empty(cls, sigma: float) -> Broadcast:
        """Before the first server round: nothing to align to."""
        return cls(None, None, sigma)

    def on(self, name: str, device: torch.device) -> torch.Tensor:
        """The tensor `name` (labels, sizes, global_sim, pairs, targets) on `device`, copied once."""
        key = (device, name)
        if key not in self.copies:
            self.copies[key] = to_device(getattr(self, name), device)
        return self.copies[key]

    def graph(self, sigma: float, knn: int | None, device: torch.device) -> torch.Tensor:
        """The server graph of S_g as a boolean [m, m] (`graph.graph_mask`: S_g >= sigma, or its k nearest
        neighbours), derived by the clients from what they received, once per broadcast and device."""
        key = (device, f"graph/{sigma}/{knn}")
        if key not in self.copies:
            self.copies[key] = to_device(graph_mask(self.global_sim, sigma, knn), device)
        return self.copies[key]
