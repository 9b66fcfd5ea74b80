"""Server side: aggregation of what the clients upload, accumulated chunk by chunk."""

from __future__ import annotations

import torch

from src.clients.model import Params


class MeanAggregator:
    """Uniform mean of the uploaded tensors of each key, summed chunk by chunk (never all at once).

    The sums stay on the device the uploads arrive on; `result` hands the mean to the server on
    `device` (the CPU by default: the server state, the checkpoints and the Flower messages live there).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.device = torch.device(device)

    def add(self, shared: Params, n: int) -> None:
        """Add the shared tensors [n, ...] of `n` uploading clients to the running sums."""
        if n == 0:
            return
        for k, v in shared.items():
            part = v.sum(dim=0, dtype=torch.float64)
            self.sums[k] = self.sums[k] + part if k in self.sums else part
        self.count += n

    def result(self, previous: Params) -> Params:
        """The mean of what arrived, on the server's device in the dtype of `previous`; `previous` values
        for keys when no client reported this round."""
        if self.count == 0:
            return dict(previous)
        return {k: (v / self.count).to(device=self.device, dtype=previous[k].dtype) for k, v in self.sums.items()}
