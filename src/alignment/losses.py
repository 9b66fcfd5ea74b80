"""AlignFedRec's alignment losses on a client's item table (METHOD.md section 3, step 3).

ICA (Eq. 3-4): supervised contrastive loss over the normalised item table, positives = items of
the anchor's community; GSA (Eq. 10): masked squared Frobenius distance between the client's
similarity matrix and the global one, with its gradient flowing into the item table.

The specification of both terms is `src/alignment/spec.py` (plain autograd, `compute=reference`); what
follows are faster backends of it, tested against it. `exact` evaluates both over the whole table (all
anchors, all m x m pairs) with the blocked algebra below (`gsa_blocked`, `lse_blocked`): item rows in
blocks, value and gradient in one pass, so only [clients x rows x m] exists at a time, never a client's
m x m matrix. `fast` takes the first `fast_anchors` items of the
current (shuffled) batch as anchor rows: ICA over those anchors (each still contrasted with all m
items) and, with `fast_gsa=rows` (default), GSA over those rows of the mask (every column), which
keeps the mask's meaning (local, global, union). The rows are the batch's items, not a uniform draw: a batch
holds each training positive with its sampled negatives (1 in 5 a positive with 4 negatives, against about n_u / m
of uniform rows), so the fast terms estimate Eq. 3-4 and 10 with items weighted by how often they are in batches,
not the uniform mean over items of the exact mode (`docs/methods.md`); `fast_gsa=pairs` instead uses only the
pairs of the global mask (cheaper, but with mask=local it becomes local AND global, and it vanishes when no global
similarity reaches sigma).
Both are batched tensor algebra: no loop over items, none over clients beyond chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from src.alignment import native_align, spec
from src.alignment.broadcast import Broadcast
from src.alignment.fast_grad import compiled_fast_value_and_grad, fast_value_and_grad
from src.alignment.similarity import cluster_sums, normalised


def anchor_rows(e: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """s_ak = e_a . e_k for the anchors [C, K] against every item: [C, K, m]."""
    rows = torch.arange(e.shape[0], device=e.device).unsqueeze(1)
    return e[rows, anchors] @ e.transpose(1, 2)


def ica_batch(
    e: torch.Tensor,
    anchors: torch.Tensor,
    anchor_valid: torch.Tensor,
    labels: torch.Tensor,
    sizes: torch.Tensor,
    tau: float,
    tau0: float,
) -> torch.Tensor:
    """ICA with the current batch's items [C, B] as anchors (fast path); [C]: the anchors' log-sum-exp by a
    memory-lean autograd function (it keeps the softmax, not the m-wide intermediates)."""
    rows = torch.arange(e.shape[0], device=e.device).unsqueeze(1)
    ea = e[rows, anchors]
    s = anchor_rows(e, anchors)
    csum = cluster_sums(e, labels, int(sizes.shape[0]))
    al = labels[anchors]
    npos = (sizes[al] - 1).to(e.dtype)
    valid = anchor_valid & (npos > 0)
    weights = valid.to(e.dtype) / valid.sum(dim=1, keepdim=True).clamp(min=1)
    pos = (ea * (csum[rows, al] - ea)).sum(dim=2) / tau / npos.clamp(min=1)
    return (tau / tau0) * (_AnchorLSE.apply(s, anchors, weights, tau) - (pos * weights).sum(dim=1))


class _AnchorLSE(torch.autograd.Function):
    """sum_a w_a lse_{k != a}(s_ak / tau) per client; keeps only the softmax for backward."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, anchors: torch.Tensor, weights: torch.Tensor, tau: float) -> torch.Tensor:
        logits = (s / tau).scatter_(2, anchors.unsqueeze(2), float("-inf"))
        lse = torch.logsumexp(logits, dim=2)
        prob = logits.sub_(lse.unsqueeze(2)).exp_()
        ctx.save_for_backward(prob, weights)
        ctx.tau = tau
        return (weights * lse).sum(dim=1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        prob, weights = ctx.saved_tensors
        scale = (weights * grad_out.unsqueeze(1) / ctx.tau).unsqueeze(2)
        return prob * scale, None, None, None


def gsa_pairs(
    e: torch.Tensor, pairs: torch.Tensor, targets: torch.Tensor, sigma: float, mask: str, reduction: str
) -> torch.Tensor:
    """Eq. 10 restricted to the global mask's pairs j < k [2, P] (fast path); equals `spec.gsa` with
    mask=global. With mask=local it keeps the pairs also above sigma locally (local AND global)."""
    s = (e[:, pairs[0]] * e[:, pairs[1]]).sum(dim=2)
    w = torch.ones_like(s, dtype=torch.bool) if mask != "local" else s.detach() >= sigma
    sq = 2 * ((s - targets) ** 2 * w).sum(dim=1)
    return sq / (2 * w.sum(dim=1)).clamp(min=1) if reduction == "mean" else sq


def _diagonal(r0: int, b: int, m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the diagonal entries inside the row block [r0, r0 + b) of an m-column matrix."""
    rows = torch.arange(b, device=device)
    return rows, rows + r0


def gsa_blocked(
    e: torch.Tensor, global_sim: torch.Tensor, sigma: float, mask: str, reduction: str, rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 10 and its gradient w.r.t. the normalised table e [C, m, d], `rows` items at a time.

    With D = W o (S - S_g) (W, S, S_g symmetric, zero diagonal) the loss is sum D o (S - S_g) and
    dL/de = 4 D e; the mean divides both by the mask size (held constant, as autograd does).
    """
    c, m, _ = e.shape
    value = e.new_zeros(c)
    count = e.new_zeros(c)
    grad = torch.zeros_like(e)
    for r0 in range(0, m, rows):
        b = min(rows, m - r0)
        s = e[:, r0 : r0 + b] @ e.transpose(1, 2)
        g = global_sim[r0 : r0 + b].to(e.dtype)
        di, dj = _diagonal(r0, b, m, e.device)
        if mask == "global":
            w = (g >= sigma).unsqueeze(0).expand_as(s).clone()
        else:
            w = s >= sigma
            if mask == "union":
                w |= (g >= sigma).unsqueeze(0)
        w[:, di, dj] = False
        diff = (s - g) * w
        value += (diff * diff).sum(dim=(1, 2))
        count += w.sum(dim=(1, 2))
        grad[:, r0 : r0 + b] += 4 * (diff @ e)
    if reduction == "mean":
        norm = count.clamp(min=1)
        return value / norm, grad / norm.view(-1, 1, 1)
    return value, grad


def lse_blocked(e: torch.Tensor, weights: torch.Tensor, tau: float, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_a w_a lse_{k != a}(s_ak / tau) per client [C] and its gradient w.r.t. e [C, m, d].

    d/ds_ak = w_a p_ak / tau with p the softmax over k != a; s_ak = e_a . e_k feeds both e_a and e_k.
    """
    c, m, _ = e.shape
    value = e.new_zeros(c)
    grad = torch.zeros_like(e)
    for r0 in range(0, m, rows):
        b = min(rows, m - r0)
        logits = (e[:, r0 : r0 + b] @ e.transpose(1, 2)) / tau
        di, dj = _diagonal(r0, b, m, e.device)
        logits[:, di, dj] = float("-inf")
        lse = torch.logsumexp(logits, dim=2)
        w = weights[:, r0 : r0 + b]
        value += (w * lse).sum(dim=1)
        coef = torch.exp(logits - lse.unsqueeze(2)) * (w / tau).unsqueeze(2)
        grad[:, r0 : r0 + b] += coef @ e
        grad += coef.transpose(1, 2) @ e[:, r0 : r0 + b]
    return value, grad


def ica_positive(e: torch.Tensor, labels: torch.Tensor, sizes: torch.Tensor, tau: float) -> torch.Tensor:
    """mean_{p in P(a)} s_ap / tau for every anchor [C, m] through cluster sums (differentiable, O(m d))."""
    csum = cluster_sums(e, labels, int(sizes.shape[0]))
    npos = (sizes[labels] - 1).to(e.dtype)
    return (e * (csum[:, labels] - e)).sum(dim=2) / tau / npos.clamp(min=1)


# exact mode with the fused kernel: every item is an anchor, so a client's [m, m] rows exist at once (m^2 elements,
# a few buffers of them); above this the blocked algebra keeps memory at `block` elements (Lastfm-2k: 155M)
EXACT_FUSED_MAX = 16_777_216


@dataclass(frozen=True)
class AlignmentLoss:
    """alpha * ICA + beta * GSA on stacked item tables, against the server's latest `Broadcast`."""

    alpha: float
    beta: float
    tau: float
    tau0: float
    sigma: float
    centre: bool
    mask: str
    reduction: str
    mode: str
    chunk: int
    use_ica: bool
    use_gsa: bool
    fast_anchors: int = 64
    block: int = 4_194_304
    fast_gsa: str = "rows"
    fast_block: int | None = None  # fast mode: elements of anchor-row intermediates at once (None: whole chunk)
    # fused (closed form, src/alignment/fast_grad.py, and the blocked algebra of the exact mode) or reference (the
    # specification, src/alignment/spec.py, plain autograd; `compute=reference`)
    fast_kernel: str = "fused"
    # the exact mode runs the fused kernel with every item an anchor up to m^2 = this, the blocked algebra above it
    exact_fused_max: int = EXACT_FUSED_MAX
    compile: bool = False  # the fused kernel through torch.compile
    native_threads: int = 0  # > 0: the fused kernel by its C form on that many threads (native_align)
    # this project's variant (`ablation.gsa_on_graph`): GSA's global mask is the server graph (sigma, knn k or None)
    gsa_graph: tuple[float, int | None] | None = None

    @property
    def has_terms(self) -> bool:
        """Whether any alignment term trains (False: BCE only, as in fed_itemknn)."""
        return self.use_ica or self.use_gsa

    def graph(self, b: Broadcast, device: torch.device) -> torch.Tensor | None:
        """The server graph GSA aligns to with `gsa_graph` (derived from the broadcast S_g), else None."""
        return None if self.gsa_graph is None else b.graph(*self.gsa_graph, device)

    def inputs(self, b: Broadcast, device: torch.device) -> dict[str, torch.Tensor | None]:
        """The broadcast's tensors the enabled terms use, on `device` (None for a term that is off or not yet
        broadcast): labels [m], sizes [n_communities], global_sim [m, m] and GSA's graph [m, m] or None. GSA
        over pairs (`fast_gsa=pairs`) reads `b.on("pairs")` and `b.on("targets")` instead of S_g."""
        ica = self.use_ica and b.labels is not None
        dense_gsa = self.use_gsa and b.global_sim is not None and not self.pairs_gsa
        return {
            "labels": b.on("labels", device) if ica else None,
            "sizes": b.on("sizes", device) if ica else None,
            "global_sim": b.on("global_sim", device) if dense_gsa else None,
            "graph": self.graph(b, device) if dense_gsa else None,
        }

    @property
    def pairs_gsa(self) -> bool:
        """GSA over the pairs of the global mask only (`fast_gsa=pairs`, fast mode)."""
        return self.mode == "fast" and self.fast_gsa == "pairs"

    def active(self, b: Broadcast) -> bool:
        """False until the server has broadcast something the enabled terms need."""
        return (self.use_ica and b.labels is not None) or (self.use_gsa and b.global_sim is not None)

    def terms(
        self,
        table: torch.Tensor,
        b: Broadcast,
        anchors: torch.Tensor | None = None,
        anchor_valid: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Unweighted per-client ICA and GSA values [C] of `table` [C, m, d] (differentiable) as `spec.py` writes
        them: over the batch's first `fast_anchors` anchors [C, K] in the fast mode, over every item in the exact
        mode. With `fast_gsa=pairs` (the fast mode's autograd path) GSA over the global mask's pairs and, but for
        `compute=reference`, ICA by the memory-lean `ica_batch`."""
        e = normalised(table, self.centre)
        x = self.inputs(b, table.device)
        if self.mode == "fast" and anchors is not None:
            anchors, anchor_valid = anchors[:, : self.fast_anchors], anchor_valid[:, : self.fast_anchors]
        else:
            anchors = anchor_valid = None
        out: dict[str, torch.Tensor] = {}
        if x["labels"] is not None:
            if self.fast_kernel != "reference" and self.pairs_gsa and anchors is not None:
                out["ica"] = ica_batch(e, anchors, anchor_valid, x["labels"], x["sizes"], self.tau, self.tau0)
            else:
                out["ica"] = spec.ica(e, x["labels"], self.tau, self.tau0, anchors, anchor_valid)
        if self.use_gsa and b.global_sim is not None:
            if self.pairs_gsa:
                on = e.device
                out["gsa"] = gsa_pairs(e, b.on("pairs", on), b.on("targets", on), self.sigma, self.mask, self.reduction)
            else:
                g, graph = x["global_sim"], x["graph"]
                out["gsa"] = spec.gsa(e, g, self.sigma, self.mask, self.reduction, anchors, anchor_valid, graph)
        return out

    def exact_value_and_grad(self, table: torch.Tensor, b: Broadcast) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Exact ICA and GSA of `table` [C, m, d] with the blocked algebra: the gradient w.r.t. the
        normalised table comes from `gsa_blocked` / `lse_blocked`, and flows through the centring and
        normalisation (and the cheap positive term) by autograd."""
        if self.use_gsa and self.gsa_graph is not None:
            raise ValueError("the blocked exact GSA has no graph mask (ablation.gsa_on_graph needs the fast rows form)")
        part = table.detach().requires_grad_()
        c, m, _ = table.shape
        rows = max(1, self.block // max(c * m, 1))
        values: dict[str, torch.Tensor] = {}
        with torch.enable_grad():
            e = normalised(part, self.centre)
            flat = e.detach()
            g_e = torch.zeros_like(flat)
            surrogate = e.new_zeros(())
            if self.use_ica and b.labels is not None:
                labels, sizes = b.on("labels", table.device), b.on("sizes", table.device)
                valid = (sizes[labels] > 1).to(e.dtype)
                weight = (self.tau / self.tau0) * valid / valid.sum().clamp(min=1)
                lse, g_lse = lse_blocked(flat, weight.expand(c, m), self.tau, rows)
                pos = (ica_positive(e, labels, sizes, self.tau) * weight).sum(dim=1)
                values["ica"] = lse - pos.detach()
                g_e += self.alpha * g_lse
                surrogate = surrogate - self.alpha * pos.sum()
            if self.use_gsa and b.global_sim is not None:
                gsa, g_gsa = gsa_blocked(
                    flat, b.on("global_sim", table.device), self.sigma, self.mask, self.reduction, rows
                )
                values["gsa"] = gsa
                g_e += self.beta * g_gsa
            surrogate = surrogate + (e * g_e).sum()
            grad = torch.autograd.grad(surrogate, part)[0] if values else torch.zeros_like(table)
        return values, grad

    def value_and_grad(
        self, table: torch.Tensor, anchors: torch.Tensor, anchor_valid: torch.Tensor, b: Broadcast
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-client terms and the gradient of alpha * ICA + beta * GSA w.r.t. `table`: the exact mode in
        sub-chunks of `chunk` clients with the blocked algebra (or, with m^2 <= `exact_fused_max`, every item an
        anchor of the fused kernel), the fast mode over the batch's anchors."""
        c, m = table.shape[0], table.shape[1]
        if self.fast_kernel == "reference":  # the specification by autograd, `chunk` clients at a time
            part = self.autograd_value_and_grad
            return _in_parts(lambda s, e: part(table[s:e], anchors[s:e], anchor_valid[s:e], b), table, self.chunk)
        if self.mode == "exact" and m**2 <= self.exact_fused_max:
            every = torch.arange(m, device=table.device).expand(c, m)
            valid = torch.ones(every.shape, dtype=torch.bool, device=table.device)
            return self.every_item_an_anchor(m).value_and_grad(table, every, valid, b)
        if self.mode == "exact":
            return _in_parts(lambda s, e: self.exact_value_and_grad(table[s:e], b), table, self.chunk)
        step = c if self.fast_block is None else max(1, self.fast_block // max(self.fast_anchors * m, 1))
        if self.uses_native(table):
            step = c  # the C kernel keeps one client at a time in cache: no sub-chunks
        # clients are independent: sub-chunks give the same values, with cache-sized intermediates
        return _in_parts(
            lambda s, e: self.fast_value_and_grad(table[s:e], anchors[s:e], anchor_valid[s:e], b), table, step
        )

    def uses_fused(self) -> bool:
        """Whether the fast mode runs the fused kernel (closed form): fast_kernel=fused, GSA over anchor rows or off."""
        return self.fast_kernel == "fused" and (self.fast_gsa == "rows" or not self.use_gsa)

    def uses_native(self, table: torch.Tensor) -> bool:
        """Whether the fused kernel runs in C for these tables (`native_threads`, float32 CPU tables of width 32)."""
        return self.uses_fused() and self.native_threads > 0 and native_align.applies(table)

    def every_item_an_anchor(self, m: int) -> AlignmentLoss:
        """Exact ICA and GSA as the fast mode's fused kernel with all `m` items as anchors (same terms: every
        anchor row of the mask is every row), in sub-chunks of `block` elements."""
        return replace(self, mode="fast", fast_anchors=m, fast_gsa="rows", fast_block=self.block)

    def fast_value_and_grad(
        self, table: torch.Tensor, anchors: torch.Tensor, anchor_valid: torch.Tensor, b: Broadcast
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The fast mode's per-client terms and gradient of `table` [C, m, d]: in closed form (fast_gsa=rows, or GSA
        off) or by autograd (`fast_gsa=pairs`)."""
        if self.uses_fused():
            if not self.active(b):
                return {}, torch.zeros_like(table)
            k = self.fast_anchors
            kernel, extra = compiled_fast_value_and_grad() if self.compile else fast_value_and_grad, {}
            if self.uses_native(table):
                kernel, extra = native_align.value_and_grad, {"threads": self.native_threads}
            return kernel(
                table.detach(),
                anchors[:, :k],
                anchor_valid[:, :k],
                **self.inputs(b, table.device),
                alpha=self.alpha,
                beta=self.beta,
                tau=self.tau,
                tau0=self.tau0,
                sigma=self.sigma,
                centre=self.centre,
                mask=self.mask,
                reduction=self.reduction,
                **extra,
            )
        return self.autograd_value_and_grad(table, anchors, anchor_valid, b)

    def autograd_value_and_grad(
        self, table: torch.Tensor, anchors: torch.Tensor, anchor_valid: torch.Tensor, b: Broadcast
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """`terms` of `table` [C, m, d] and the gradient of alpha * ICA + beta * GSA by autograd."""
        part = table.detach().requires_grad_()
        with torch.enable_grad():
            terms = self.terms(part, b, anchors, anchor_valid)
            total = sum({"ica": self.alpha, "gsa": self.beta}[k] * v.sum() for k, v in terms.items())
            grad = torch.autograd.grad(total, part)[0] if terms else torch.zeros_like(table)
        return {k: v.detach() for k, v in terms.items()}, grad


def _in_parts(
    part: Callable[[int, int], tuple[dict[str, torch.Tensor], torch.Tensor]], table: torch.Tensor, step: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """`part(s, e)` (values [e - s] per term, gradient [e - s, m, d]) over the clients of `table` [C, m, d] in
    sub-chunks of `step`, written into one gradient buffer (no concatenation of the parts)."""
    c = table.shape[0]
    if step >= c:
        return part(0, c)
    grad = torch.empty_like(table)
    values: dict[str, torch.Tensor] = {}
    for s in range(0, c, step):
        e = min(c, s + step)
        v, grad[s:e] = part(s, e)
        if s and set(v) != set(values):
            raise RuntimeError(f"sub-chunk {s}:{e} has terms {sorted(v)}, the first had {sorted(values)}")
        for key, val in v.items():
            values.setdefault(key, val.new_empty(c))[s:e] = val
    return values, grad
