"""A plain per-client reference of the client model and its local training.

This is a reference, not the engine: the stacked cohort (`src.clients.cohort`) is what runs experiments.
It is written independently of `src.clients.cohort` / `src.clients.model`: one `nn.Module` per client, torch.optim
optimisers created fresh for the client's round, and a Python loop over its batches, as the
PFedRec lineage trains one user at a time (METHOD.md section 2). `tests/test_cohort_exact.py`
checks the cohort against it, and `src.bench` times the cohort against this slow loop doing the
same work. `ExactAlignment` adds AlignFedRec's terms the plain way, one client at a time: the
whole m x m similarity matrix, a positive-pair mask for ICA (no cluster-sum algebra) and the dense
masked GSA, i.e. the exact loss as a straightforward implementation would write it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from src.alignment import spec


class ReferenceClient(nn.Module):
    """Item table (nn.Embedding), optional user embedding, score MLP (nn.Linear + ReLU), sigmoid."""

    def __init__(
        self,
        n_items: int,
        dim: int,
        user_embedding: bool = False,
        hidden: list[int] | tuple[int, ...] = (),
        loss: str = "sigmoid_bce",
    ):
        super().__init__()
        if loss not in ("sigmoid_bce", "logits_bce"):
            raise ValueError(loss)
        self.loss_name = loss
        self.embedding_item = nn.Embedding(n_items, dim)
        self.user = nn.Parameter(torch.zeros(dim)) if user_embedding else None
        sizes = [dim * (2 if user_embedding else 1), *[int(h) for h in hidden], 1]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.relu = nn.ReLU()
        self.logistic = nn.Sigmoid()
        self.crit = nn.BCELoss() if loss == "sigmoid_bce" else nn.BCEWithLogitsLoss()

    def score_parameters(self) -> list[nn.Parameter]:
        """Everything except the item table (the personal score function)."""
        return [p for n, p in self.named_parameters() if not n.startswith("embedding_item")]

    def item_parameters(self) -> list[nn.Parameter]:
        return [self.embedding_item.weight]

    def logits(self, items: torch.Tensor) -> torch.Tensor:
        x = self.embedding_item(items)
        if self.user is not None:
            x = torch.cat([x, self.user.unsqueeze(0).expand(x.shape[0], -1)], dim=1)
        for i, lin in enumerate(self.linears):
            x = lin(x)
            if i < len(self.linears) - 1:
                x = self.relu(x)
        return x.view(-1)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """Probabilities for `sigmoid_bce` (Sigmoid + BCELoss), logits for `logits_bce`."""
        z = self.logits(items)
        return self.logistic(z) if self.loss_name == "sigmoid_bce" else z

    def loss(self, items: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.crit(self(items), labels)

    @torch.no_grad()
    def load_stacked(self, params: dict[str, torch.Tensor], row: int) -> ReferenceClient:
        """Copy row `row` of stacked parameters ([C, in, out] weights) into this module."""
        self.embedding_item.weight.copy_(params["items"][row])
        if self.user is not None:
            self.user.copy_(params["user"][row])
        for i, lin in enumerate(self.linears):
            lin.weight.copy_(params[f"w{i}"][row].t())
            lin.bias.copy_(params[f"b{i}"][row])
        return self

    @torch.no_grad()
    def to_stacked(self) -> dict[str, torch.Tensor]:
        """This client's parameters under the stacked names and layouts (weights [in, out])."""
        out = {"items": self.embedding_item.weight.detach().clone()}
        if self.user is not None:
            out["user"] = self.user.detach().clone()
        for i, lin in enumerate(self.linears):
            out[f"w{i}"] = lin.weight.detach().t().clone()
            out[f"b{i}"] = lin.bias.detach().clone()
        return out


def make_client(model_cfg, n_items: int, params: dict[str, torch.Tensor], row: int) -> ReferenceClient:
    """A reference client built from a model config, holding row `row` of stacked `params`."""
    client = ReferenceClient(
        n_items, int(model_cfg.dim), bool(model_cfg.user_embedding), list(model_cfg.score_hidden), str(model_cfg.loss)
    )
    client = client.to(dtype=params["items"].dtype)
    return client.load_stacked(params, row)


@dataclass
class ExactAlignment:
    """alpha * ICA (Eq. 3-4) + beta * GSA (Eq. 10) of one client's item table [m, d], written plainly."""

    alpha: float
    beta: float
    tau: float
    tau0: float
    sigma: float
    centre: bool
    mask: str
    reduction: str
    labels: torch.Tensor | None
    global_sim: torch.Tensor | None

    def __call__(self, table: torch.Tensor) -> torch.Tensor:
        e = table - table.mean(dim=0, keepdim=True) if self.centre else table
        e = F.normalize(e, dim=1, eps=1e-12).unsqueeze(0)  # one client: [1, m, d]
        total = e.new_zeros(())
        if self.alpha and self.labels is not None:
            total = total + self.alpha * spec.ica(e, self.labels, self.tau, self.tau0)[0]
        if self.beta and self.global_sim is not None:
            total = total + self.beta * spec.gsa(e, self.global_sim, self.sigma, self.mask, self.reduction)[0]
        return total


def _make_optimizer(optim_cfg, groups: list[dict]) -> torch.optim.Optimizer:
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=float(optim_cfg.lr))
    if optim_cfg.name == "adam":
        return torch.optim.Adam(
            groups, lr=float(optim_cfg.lr), betas=tuple(float(b) for b in optim_cfg.betas), eps=float(optim_cfg.eps)
        )
    raise ValueError(optim_cfg.name)


def client_batches(samples, layout, row: int, max_steps: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (items, labels) batches of layout row `row`, only its own steps (t < layout.steps[row])."""
    n = int(layout.steps[row]) if max_steps is None else min(int(layout.steps[row]), max_steps)
    out = []
    for t in range(n):
        idx = layout.index[row, t]
        idx = idx[idx >= 0]
        out.append((samples.items[idx], samples.labels[idx]))
    return out


def train_client(
    client: ReferenceClient,
    batches,
    optim_cfg,
    n_items: int,
    align: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[float]:
    """One round of local training of one client; returns the BCE of every item-table step.

    `align(item_table)` (e.g. `ExactAlignment`) is added to the loss of every item-table step.

    Optimisers are created here, fresh for this client and round. Score lr = optim.lr; item lr =
    optim.lr * n_items * optim.item_lr_eta when item_lr_eta is set, else optim.lr. With
    `optim.alternate` (PFedRec's engine) each batch steps the score function on the loss at the
    current parameters, then recomputes the forward pass and steps the item table.
    """
    lr = float(optim_cfg.lr)
    eta = optim_cfg.get("item_lr_eta")
    item_lr = lr * n_items * float(eta) if eta is not None else lr
    dtype = client.embedding_item.weight.dtype
    losses: list[float] = []
    if bool(optim_cfg.alternate):
        opt_score = _make_optimizer(optim_cfg, [{"params": client.score_parameters(), "lr": lr}])
        opt_items = _make_optimizer(optim_cfg, [{"params": client.item_parameters(), "lr": item_lr}])
        for items, labels in batches:
            labels = labels.to(dtype)
            opt_score.zero_grad()
            client.loss(items, labels).backward()
            opt_score.step()
            opt_items.zero_grad()
            loss_i = client.loss(items, labels)
            extra = align(client.embedding_item.weight) if align is not None else 0.0
            (loss_i + extra).backward()
            opt_items.step()
            losses.append(loss_i.item())
    else:
        opt = _make_optimizer(
            optim_cfg,
            [{"params": client.score_parameters(), "lr": lr}, {"params": client.item_parameters(), "lr": item_lr}],
        )
        for items, labels in batches:
            labels = labels.to(dtype)
            opt.zero_grad()
            loss = client.loss(items, labels)
            extra = align(client.embedding_item.weight) if align is not None else 0.0
            (loss + extra).backward()
            opt.step()
            losses.append(loss.item())
    return losses
