"""The centralised baseline: matrix factorisation (GMF head) trained on all clients' pooled samples.

Same data, negatives and evaluation as the federated methods; one round = one epoch over the
pooled round samples. It bounds what federation costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from src.clients.cohort import RoundSamples
from src.config import schema
from src.data.dataset import FedData
from src.methods.base import Method
from src.methods.calibration import ItemKNNScorer, PopularityScorer
from src.runtime.device import host_value, to_device


class CentralMF(torch.nn.Module):
    """logit(u, i) = w . (p_u * q_i) + b, embeddings N(0, init_std^2)."""

    def __init__(self, n_users: int, n_items: int, dim: int, init_std: float, generator: torch.Generator):
        super().__init__()
        self.users = torch.nn.Parameter(torch.randn(n_users, dim, generator=generator) * init_std)
        self.items = torch.nn.Parameter(torch.randn(n_items, dim, generator=generator) * init_std)
        self.head = torch.nn.Linear(dim, 1)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Logits of (user, item) pairs; `users` broadcasts against `items`."""
        return self.head(self.users[users] * self.items[items]).squeeze(-1)


class CentralTrainer:
    """Holds the central model and its optimiser across rounds.

    `fused`: Adam in one kernel per tensor where torch has it (CPU, CUDA), the same update as the per-op
    Adam up to float rounding and 1.8x faster a step on ML-1M (its dense 310k-parameter update is most of a step).
    A checkpoint written before goes on with the per-op Adam (loading restores its parameter groups).
    """

    def __init__(self, method: Central, n_users: int, n_items: int, device: torch.device, fused: bool = True):
        gen = torch.Generator().manual_seed(method.seed)
        self.model = CentralMF(n_users, n_items, method.dim, method.init_std, gen).to(device)
        fused = fused and device.type in ("cpu", "cuda")
        self.opt = torch.optim.Adam(self.model.parameters(), lr=method.lr, fused=fused or None)
        self.batch = method.batch_size
        self.device = device

    def train_round(self, samples: RoundSamples, generator: torch.Generator) -> dict[str, float]:
        """One epoch over the pooled samples in random order; returns the mean BCE.

        The samples and their order go to the device once per round, the batch losses [n_batches] come
        back once after the last batch, and are summed on the host in batch order (as read batch by batch).
        """
        counts = samples.ptr[1:] - samples.ptr[:-1]
        users = torch.repeat_interleave(torch.arange(len(counts)), counts)
        order = torch.randperm(len(users), generator=generator)
        users, items, labels, order_d = (
            to_device(t, self.device) for t in (users, samples.items, samples.labels, order)
        )
        starts = range(0, len(order), self.batch)
        losses = torch.empty(len(starts), device=self.device)
        for b, start in enumerate(starts):
            idx = order_d[start : start + self.batch]
            loss = F.binary_cross_entropy_with_logits(self.model(users[idx], items[idx]), labels[idx])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            losses[b] = loss.detach()
        total, n = 0.0, 0
        for start, value in zip(starts, host_value(losses)):
            size = min(self.batch, len(order) - start)
            total += value * size
            n += size
        return {"bce": total / max(n, 1)}

    @torch.no_grad()
    def score(self, rows: torch.Tensor, item_ids: torch.Tensor | None) -> torch.Tensor:
        """Logits [C, L] of users `rows` for `item_ids` (None = all items)."""
        rows = rows.to(self.device)
        if item_ids is None:
            return (self.model.users[rows] * self.model.head.weight[0]) @ self.model.items.T + self.model.head.bias
        return self.model(rows.unsqueeze(1), item_ids.to(self.device))

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])


@dataclass(frozen=True)
class Central(Method):
    """A centralised method: no clients, no messages; `make_central` builds what it trains or scores with.
    `scorer`: mf (MF with a GMF head, Adam, trained on the pooled samples), popularity or itemknn (`k`)."""

    name: str
    scorer: str
    seed: int
    dim: int
    init_std: float
    lr: float
    batch_size: int
    k: int = 50  # read by the itemknn scorer only
    central = True
    tables = ("mean", "mean")  # one model of the pooled data
    no_reference = "it trains one pooled model or scores the pooled data; there is no per-client training to compare"


def make_central(
    method: Central, data: FedData, device: torch.device
) -> CentralTrainer | PopularityScorer | ItemKNNScorer:
    """What the centralised method trains or scores with."""
    if method.scorer == "popularity":
        return PopularityScorer(data, device)
    if method.scorer == "itemknn":
        return ItemKNNScorer.pooled(data, method.k, device)
    return CentralTrainer(method, data.n_users, data.n_items, device)


SCORERS = ("mf", "popularity", "itemknn")
# why the Flower app refuses every central ablation (src/flower/settings.py); the simulator runs them
NOT_FEDERATED = "it pools all data on one machine; it has no federated deployment"


@dataclass(kw_only=True)
class CentralKeys(schema.Ablation):
    """The central ablations' keys: its own pooled model's Adam (`lr`, `batch_size`, `init_std`; NCF's defaults where
    the yaml has none), or a calibration scorer (src/methods/calibration.py) that scores from the pooled training
    data (`scorer`, `k`)."""

    lr: float = schema.key(schema.POSITIVE, default=0.001)
    batch_size: int = schema.key(schema.integer(1), default=1024)
    init_std: float = schema.key(schema.POSITIVE, default=0.01)
    scorer: str = schema.key(schema.one_of(*SCORERS), default="mf")
    k: Any = schema.key(schema.integer(1, nullable=True), default=None)

    def check(self) -> None:
        if self.scorer == "itemknn" and self.k is None:
            schema.refuse("ablation.k", None, "an integer >= 1")


METHOD = Central
KEYS = CentralKeys


def build(cfg: DictConfig, device: torch.device) -> Central:
    a = CentralKeys(**OmegaConf.to_container(cfg.ablation, resolve=True))  # checked; absent keys at their defaults
    knn = {} if a.k is None else {"k": int(a.k)}
    return Central(a.name, a.scorer, int(cfg.seed), int(cfg.model.dim), a.init_std, a.lr, a.batch_size, **knn)
