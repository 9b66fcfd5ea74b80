"""The client model, stacked over a cohort: item table, optional user embedding, personal score MLP.

PFedRec (METHOD.md section 2): item table E_u (m x d, N(0, 1) init), score = sigmoid(Linear(d -> 1))
on the item embedding. Every tensor carries a leading client axis C so a whole cohort is one
batched computation; `forward` is the math of one client applied to all C at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ModelSpec:
    """The client model's shape and initialisation (`model.*`), typed once from the validated config."""

    dim: int
    init_std: float = 1.0
    shared_init: bool = True
    user_embedding: bool = False
    score_hidden: tuple[int, ...] = ()

    @classmethod
    def from_cfg(cls, model: Any) -> ModelSpec:
        """From the `model` config group (already validated by `src/cli/config.py`)."""
        return cls(
            int(model.dim),
            float(model.init_std),
            bool(model.shared_init),
            bool(model.user_embedding),
            tuple(int(h) for h in model.score_hidden),
        )


def layer_sizes(model: ModelSpec) -> list[tuple[int, int]]:
    """(in, out) of every score layer: input is the item embedding (plus user embedding), output 1."""
    dims = [model.dim * (2 if model.user_embedding else 1), *model.score_hidden, 1]
    return list(zip(dims[:-1], dims[1:]))


def init_params(
    model: ModelSpec, n_clients: int, n_items: int, generator: torch.Generator, rows: torch.Tensor | None = None
) -> Params:
    """Initial parameters of every client (or of clients `rows` only, with the same values):
    one shared draw (lineage) or one draw per client.

    Item table and user embedding ~ N(0, init_std^2) (nn.Embedding default); score layers
    ~ U(-1/sqrt(in), 1/sqrt(in)) for weight and bias (nn.Linear default). With per-client draws
    the whole sequence is drawn before `rows` are kept (a subset must see the same numbers).
    """
    copies = 1 if model.shared_init else n_clients
    d = model.dim
    p: Params = {"items": torch.randn(copies, n_items, d, generator=generator) * model.init_std}
    if model.user_embedding:
        p["user"] = torch.randn(copies, d, generator=generator) * model.init_std
    for i, (fan_in, fan_out) in enumerate(layer_sizes(model)):
        bound = 1.0 / math.sqrt(fan_in)
        p[f"w{i}"] = (torch.rand(copies, fan_in, fan_out, generator=generator) * 2 - 1) * bound
        p[f"b{i}"] = (torch.rand(copies, fan_out, generator=generator) * 2 - 1) * bound
    n = n_clients if rows is None else len(rows)
    if copies == 1:
        return {k: v.expand(n, *v.shape[1:]).clone() for k, v in p.items()}
    return p if rows is None else {k: v[rows].clone() for k, v in p.items()}


def n_layers(params: Params) -> int:
    """Number of score layers in a parameter dict."""
    return sum(1 for k in params if k.startswith("w"))


def score_embeddings(params: Params, emb: torch.Tensor) -> torch.Tensor:
    """Logits [C, L] of item embeddings `emb` [C, L, d] under each client's score function."""
    x = emb
    if "user" in params:
        x = torch.cat([x, params["user"].unsqueeze(1).expand(-1, x.shape[1], -1)], dim=2)
    depth = n_layers(params)
    for i in range(depth):
        x = torch.baddbmm(params[f"b{i}"].unsqueeze(1), x, params[f"w{i}"])
        if i < depth - 1:
            x = torch.relu(x)
    return x.squeeze(2)


def flat_index(table: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
    """Positions [C * L] of (client c, item_ids[c, l]) in the table viewed as [C * m, d]."""
    offsets = torch.arange(table.shape[0], device=table.device).unsqueeze(1) * table.shape[1]
    return (item_ids + offsets).reshape(-1)


def gather_items(table: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
    """Rows of each client's own table: [C, m, d] x [C, L] -> [C, L, d] (one flat index_select)."""
    flat = table.reshape(-1, table.shape[2]).index_select(0, flat_index(table, item_ids))
    return flat.view(*item_ids.shape, table.shape[2])


def forward(params: Params, item_ids: torch.Tensor) -> torch.Tensor:
    """Logits [C, L] of items `item_ids` [C, L], each client with its own parameters."""
    return score_embeddings(params, gather_items(params["items"], item_ids))


def score_all_items(params: Params) -> torch.Tensor:
    """Logits [C, m] of every item for every client (full-ranking evaluation)."""
    if "user" not in params and n_layers(params) == 1:
        return torch.baddbmm(params["b0"].unsqueeze(1), params["items"], params["w0"]).squeeze(2)
    return score_embeddings(params, params["items"])
