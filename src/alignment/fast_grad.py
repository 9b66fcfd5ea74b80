"""The fast alignment's values and gradient in closed form (`compute=fused`; `compute=native` where C does not apply).

Same math as the specification over anchors (`src/alignment/spec.py`, `ica` and `gsa` with `anchors`, fast_gsa=rows):
ICA over the step's K anchors (Eq. 3-4) and GSA over those anchor rows (Eq. 10). Written out, the
gradient w.r.t. the anchor rows S = e_A e^T [C, K, m] is one buffer G; the table's gradient is then
G^T e_A + (G e) at the anchors, plus the positive term through the community sums, and goes back
through the normalisation and the centring by their closed forms. Each [C, K, m] buffer is touched
a handful of times in place, against about thirty passes and an autograd graph before; the products
are the same three. Values and gradients agree with autograd to float rounding (tests/test_fast_grad.py).
"""

from __future__ import annotations

from functools import cache

import torch

from src.alignment.similarity import cluster_sums


def _normalise(table: torch.Tensor, centre: bool, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """e = x / max(|x|, eps), x = the table [C, m, d] (centred over items if `centre`), and max(|x|, eps) [C, m, 1]."""
    x = table - table.mean(dim=1, keepdim=True) if centre else table
    n = torch.linalg.vector_norm(x, dim=2, keepdim=True).clamp_min_(eps)
    return x / n, n


def _normalise_backward(grad_e: torch.Tensor, e: torch.Tensor, n: torch.Tensor, centre: bool, eps: float = 1e-12):
    """d/d table from d/d e [C, m, d]: (g - e (e . g)) / |x| (g / eps where |x| <= eps), then minus its item mean."""
    radial = (e * grad_e).sum(dim=2, keepdim=True).mul_(n > eps)
    grad_x = (grad_e - e * radial).div_(n)
    return grad_x - grad_x.mean(dim=1, keepdim=True) if centre else grad_x


def fast_value_and_grad(
    table: torch.Tensor,
    anchors: torch.Tensor,
    anchor_valid: torch.Tensor,
    *,
    labels: torch.Tensor | None,
    sizes: torch.Tensor | None,
    global_sim: torch.Tensor | None,
    alpha: float,
    beta: float,
    tau: float,
    tau0: float,
    sigma: float,
    centre: bool,
    mask: str,
    reduction: str,
    graph: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """ICA (when `labels`) and GSA (when `global_sim`) of the tables [C, m, d] over the anchors [C, K]
    (`anchor_valid` [C, K] marks real ones): per-client values [C] and d(alpha ICA + beta GSA)/d table.
    `graph` [m, m] (bool): the global part of GSA's mask is the server graph, not S_g >= sigma."""
    c, m, d = table.shape
    e, n = _normalise(table, centre)
    rows = torch.arange(c, device=table.device).unsqueeze(1)
    ea = e[rows, anchors]  # [C, K, d]
    s = torch.bmm(ea, e.transpose(1, 2))  # [C, K, m]
    self_col = anchors.unsqueeze(2)
    values: dict[str, torch.Tensor] = {}
    grad_e = torch.zeros_like(e)
    grad_ea = torch.zeros_like(ea)
    g_s: torch.Tensor | None = None
    if labels is not None:
        al = labels[anchors]
        npos = (sizes[al] - 1).to(e.dtype).clamp_(min=1)
        valid = anchor_valid & (sizes[al] > 1)
        w = valid.to(e.dtype) / valid.sum(dim=1, keepdim=True).clamp(min=1)
        # Eq. 3-4, negatives: lse over k != a of s_ak / tau; its gradient w.r.t. s is the softmax p_ak / tau
        p = torch.div(s, tau).scatter_(2, self_col, float("-inf"))
        top = p.amax(dim=2, keepdim=True)
        p.sub_(top).exp_()
        z = p.sum(dim=2, keepdim=True)
        lse = (top + z.log()).squeeze(2)
        # positives through community sums: sum_{p in P(a)} s_ap = e_a . (sum of a's community - e_a)
        csum = cluster_sums(e, labels, int(sizes.shape[0]))
        cs_a = csum[rows, al]
        pos = (ea * (cs_a - ea)).sum(dim=2) / tau / npos
        values["ica"] = (tau / tau0) * ((w * lse).sum(dim=1) - (w * pos).sum(dim=1))
        g_s = p.mul_((alpha * w / tau0).unsqueeze(2) / z)
        # d/de of -(tau/tau0) w_a pos_a: e_a gets c_a (cs_a - 2 e_a), every item j of a's community c_a e_a
        coef = (-alpha / tau0) * w / npos
        spread = torch.zeros_like(csum).view(-1, d)
        spread.index_add_(0, (rows * csum.shape[1] + al).reshape(-1), (coef.unsqueeze(2) * ea).reshape(-1, d))
        grad_e += spread.view_as(csum)[:, labels]
        grad_ea += coef.unsqueeze(2) * (cs_a - 2 * ea)
    if global_sim is not None:
        diff = global_sim[anchors].to(e.dtype)  # S_g's anchor rows [C, K, m], then (S - S_g) o W
        glob = graph[anchors] if graph is not None else diff >= sigma
        if mask == "local":
            keep = (s >= sigma).to(e.dtype)
        elif mask == "global":
            keep = glob.to(e.dtype)
        elif mask == "union":
            keep = ((s >= sigma) | glob).to(e.dtype)
        else:
            raise ValueError(f"ablation.gsa_mask={mask!r}; expected local, global or union")
        keep.scatter_(2, self_col, 0.0)
        keep.mul_(anchor_valid.unsqueeze(2))
        torch.sub(s, diff, out=diff).mul_(keep)  # Eq. 10: W o (S_u - S_g) on the anchor rows
        flat = diff.view(c, 1, -1)
        squares = torch.bmm(flat, flat.transpose(1, 2)).view(c)
        if reduction == "mean":
            scale = 1.0 / keep.sum(dim=(1, 2)).clamp(min=1)
        else:
            scale = m / anchor_valid.sum(dim=1).clamp(min=1).to(e.dtype)
        values["gsa"] = squares * scale
        diff.mul_((2 * beta * scale).view(-1, 1, 1))
        g_s = diff if g_s is None else g_s.add_(diff)
    if g_s is not None:
        grad_e.baddbmm_(g_s.transpose(1, 2), ea)  # s_ak = e_a . e_k: d/de_k = sum_a G_ak e_a
        grad_ea.baddbmm_(g_s, e)  # d/de_a = sum_k G_ak e_k
    grad_e.view(-1, d).index_add_(0, (rows * m + anchors).reshape(-1), grad_ea.reshape(-1, d))
    return values, _normalise_backward(grad_e, e, n, centre)


@cache
def compiled_fast_value_and_grad():
    """`fast_value_and_grad` compiled once per process (torch.compile, dynamic shapes: sub-chunks differ in size)."""
    return torch.compile(fast_value_and_grad, dynamic=True)
