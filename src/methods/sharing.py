"""Parameter sharing (FedAvg-style): `backbone` (PFedRec: shared item table, personal score function),
`fedavg` (both shared) and `local` (nothing shared: each client trains alone)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from src.clients.model import Params
from src.methods.base import Method


@dataclass(frozen=True)
class ParameterSharing(Method):
    """The server averages the item table (`item_table: mean`) and/or the score layers (`score_fn: mean`)."""

    name: str
    item_table: str  # mean | personal
    score_fn: str  # mean | personal

    def shared_keys(self, params: Params) -> list[str]:
        keys = ["items"] if self.item_table == "mean" else []
        if self.score_fn == "mean":
            keys += [k for k in params if k[0] in "wb" and k[1:].isdigit()]
        return keys


METHOD = ParameterSharing


def build(cfg: DictConfig, device: torch.device) -> ParameterSharing:
    a = cfg.ablation
    return ParameterSharing(str(a.name), str(a.item_table), str(a.score_fn))
