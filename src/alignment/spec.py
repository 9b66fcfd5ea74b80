"""The specification of AlignFedRec's alignment losses: each written plainly, as the paper states it, with autograd.

`compute=reference` trains with these functions. The other backends compute the same values and gradients faster:
`compute=fused` (the closed-form torch kernel `fast_grad.py`, the blocked algebra of `losses.py`) and
`compute=native` (the same in C, `native_align.py`); each is tested against this module (tests/test_spec.py). To
change a loss, change it here and run with `compute=reference` (docs/methods.md, "Change the ICA loss").

Shapes: C clients, m items, d dimensions, K anchor rows per client. `e` is the normalised item table
(`similarity.normalised`: rows centred, then of unit length), so s_jk = e_j . e_k is the cosine of items j and k.
"""

from __future__ import annotations

import torch


def anchor_rows_of(
    e: torch.Tensor, anchors: torch.Tensor | None, anchor_valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The anchors [C, K] (every item when None) and which of them count [C, K]."""
    c, m, _ = e.shape
    if anchors is None:
        anchors = torch.arange(m, device=e.device).expand(c, m)
    if anchor_valid is None:
        anchor_valid = torch.ones(anchors.shape, dtype=torch.bool, device=e.device)
    return anchors, anchor_valid


def ica(
    e: torch.Tensor,
    labels: torch.Tensor,
    tau: float,
    tau0: float,
    anchors: torch.Tensor | None = None,
    anchor_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 3-4, per client [C]:
    L_ICA = (tau/tau0) * mean_a [ -mean_{p in P(a)} log( exp(s_ap/tau) / sum_{k != a} exp(s_ak/tau) ) ]
    over the anchors a (every item when `anchors` is None), P(a) = the other items of a's community (`labels` [m]);
    anchors without a positive are skipped."""
    anchors, anchor_valid = anchor_rows_of(e, anchors, anchor_valid)
    m = e.shape[1]
    rows = torch.arange(e.shape[0], device=e.device).unsqueeze(1)
    s = e[rows, anchors] @ e.transpose(1, 2)  # s_ak [C, K, m]
    itself = anchors.unsqueeze(2) == torch.arange(m, device=e.device)  # k == a
    logits = (s / tau).masked_fill(itself, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=2, keepdim=True)  # log softmax over k != a
    positive = (labels[anchors].unsqueeze(2) == labels) & ~itself  # p in P(a)
    n_pos = positive.sum(dim=2)
    per_anchor = -log_prob.masked_fill(~positive, 0.0).sum(dim=2) / n_pos.clamp(min=1)
    counted = anchor_valid & (n_pos > 0)
    return (tau / tau0) * (per_anchor * counted).sum(dim=1) / counted.sum(dim=1).clamp(min=1)


def gsa(
    e: torch.Tensor,
    global_sim: torch.Tensor,
    sigma: float,
    mask: str,
    reduction: str,
    anchors: torch.Tensor | None = None,
    anchor_valid: torch.Tensor | None = None,
    graph: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 10, per client [C]: sum_{j,k} W_u[j,k] (S_u[j,k] - S_g[j,k])^2 over the rows j of the anchors (every item
    when `anchors` is None), k != j, with W_u = 1[S_u >= sigma] (`local`, as the paper states), 1[S_g >= sigma]
    (`global`; with `graph` [m, m] the server graph instead) or either (`union`); the mask is not differentiated.
    `mean` divides by the mask's entries; `sum` scales the rows' sum by m / K (the whole sum when every item is a row).
    """
    anchors, anchor_valid = anchor_rows_of(e, anchors, anchor_valid)
    m = e.shape[1]
    rows = torch.arange(e.shape[0], device=e.device).unsqueeze(1)
    s = e[rows, anchors] @ e.transpose(1, 2)  # S_u rows [C, K, m]
    g = global_sim[anchors].to(e.dtype)  # S_g rows [C, K, m]
    local = s.detach() >= sigma
    glob = graph[anchors] if graph is not None else g >= sigma
    w = {"local": local, "global": glob, "union": local | glob}[mask]
    w = w & (anchors.unsqueeze(2) != torch.arange(m, device=e.device)) & anchor_valid.unsqueeze(2)
    sq = (w * (s - g) ** 2).sum(dim=(1, 2))
    if reduction == "mean":
        return sq / w.sum(dim=(1, 2)).clamp(min=1)
    return sq * m / anchor_valid.sum(dim=1).clamp(min=1)
