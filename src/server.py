"""Server side: aggregation of what the clients upload, accumulated chunk by chunk."""
from __future__ import annotations

import torch

from src.model import Params


class MeanAggregator:
    """Uniform mean of the uploaded tensors of each key, summed chunk by chunk (never all at once)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, params: Params, keys: list[str], uploaded: torch.Tensor) -> None:
        """Add the chunk clients marked `uploaded` [C] to the running sums of `keys`."""
        if not bool(uploaded.any()):
            return
        for k in keys:
            part = params[k][uploaded].sum(dim=0, dtype=torch.float64)
            self.sums[k] = self.sums[k] + part if k in self.sums else part
        self.count += int(uploaded.sum())

    def result(self, previous: Params) -> Params:
        """The mean of what arrived; `previous` values for keys when no client reported this round."""
        if self.count == 0:
            return dict(previous)
        return {k: (v / self.count).to(previous[k].dtype) for k, v in self.sums.items()}
