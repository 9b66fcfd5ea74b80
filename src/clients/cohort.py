"""Local training of a cohort of clients held as stacked tensors.

Each round every chosen client gets its positives plus fresh negatives (`sample_round`), shuffled
per local epoch and cut into batches (`batch_layout`), all drawn from the client's own random
stream (`src/clients/streams.py`). `train_cohort` then runs all clients'
step t at once; a client whose batches are used up is masked (no parameter or optimiser-state
change), so each client trains exactly as it would alone (tested against a per-client loop).

On a GPU the step loop neither copies nor waits: a chunk's batches, which clients step when and
their rows go to the device once per chunk (`ChunkBatches`), and the loss values come back once
per chunk (`src/runtime/device.py` counts both).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from src.clients.model import Params, flat_index, gather_items, score_embeddings
from src.clients.streams import ClientStream
from src.runtime.device import host_value, to_device

# Dense extra terms on a chunk's item tables (ICA, GSA): (tables [C, m, d], batch items [C, B], valid [C, B])
# -> (per-client values [C] by name, gradient of the weighted sum w.r.t. the tables [C, m, d])
DenseLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[dict[str, torch.Tensor], torch.Tensor]]
# A dense term written plainly: (tables [C, m, d], batch items [C, B], valid [C, B]) -> per-client values [C] by name
DenseTerms = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def autograd_dense(terms: DenseTerms, weights: dict[str, float]) -> DenseLoss:
    """The `DenseLoss` of terms written plainly, its gradient by autograd: d/d tables of the sum over clients of
    sum_k weights[k] * terms[k] (a term without a weight counts once). How a new method adds a loss of its own
    (`Method.dense_loss`); a hand-derived gradient is only ever a backend tested against such a spec."""

    def dense(tables: torch.Tensor, items: torch.Tensor, valid: torch.Tensor):
        part = tables.detach().requires_grad_()
        with torch.enable_grad():
            values = terms(part, items, valid)
            unknown = sorted(set(weights) - set(values))
            if unknown:
                raise ValueError(
                    f"autograd_dense: weights for {unknown}, which the terms do not return ({sorted(values)})"
                )
            for name, value in values.items():
                if value.shape != tables.shape[:1]:
                    raise ValueError(
                        f"autograd_dense: term {name!r} has shape {tuple(value.shape)}; expected one value a "
                        f"client, ({tables.shape[0]},)"
                    )
            total = sum(weights.get(k, 1.0) * v.sum() for k, v in values.items())
            grad = None
            if values and total.requires_grad:  # a term that does not read the tables has no gradient
                grad = torch.autograd.grad(total, part, allow_unused=True)[0]
        return {k: v.detach() for k, v in values.items()}, torch.zeros_like(tables) if grad is None else grad

    return dense


@dataclass
class RoundSamples:
    """One round's training samples of some clients, grouped by client (CSR); row r is user `users[r]`."""

    ptr: torch.Tensor
    items: torch.Tensor
    labels: torch.Tensor
    users: torch.Tensor


def sample_round(
    train_ptr: torch.Tensor,
    train_items: torch.Tensor,
    sampler,
    num_negatives: int,
    seed: int,
    round_: int,
    users: torch.Tensor | None = None,
) -> RoundSamples:
    """Each training positive of `users` (default all) followed by `num_negatives` negatives from its
    client's pool; a client's draws depend only on (seed, round, client), see `src/clients/streams.py`."""
    users = torch.arange(len(train_ptr) - 1) if users is None else users.long()
    counts = train_ptr[users + 1] - train_ptr[users]
    ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    owner = torch.repeat_interleave(users, counts)
    local = torch.arange(int(ptr[-1])) - torch.repeat_interleave(ptr[:-1], counts)
    positives = train_items[torch.repeat_interleave(train_ptr[users], counts) + local]
    index = local.unsqueeze(1) * num_negatives + torch.arange(num_negatives)
    stream = ClientStream(seed, round_, "negatives")
    negs = sampler.sample(owner.unsqueeze(1).expand(-1, num_negatives), stream, index)
    items = torch.cat([positives.unsqueeze(1), negs], dim=1).reshape(-1)
    labels = torch.zeros(len(positives), 1 + num_negatives)
    labels[:, 0] = 1.0
    return RoundSamples(ptr * (1 + num_negatives), items, labels.reshape(-1), users)


@dataclass
class BatchLayout:
    """Sample positions of each client's local steps: index [C, T, B] into RoundSamples, -1 = padding."""

    index: torch.Tensor
    steps: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        return self.index >= 0


def batch_layout(
    samples: RoundSamples, clients: torch.Tensor, epochs: int, batch_size: int, seed: int, round_: int
) -> BatchLayout:
    """Shuffle each client's samples once per epoch and cut every epoch into batches of `batch_size`.

    `clients` are rows of `samples`; the shuffle keys come from each client's own stream.
    """
    start = samples.ptr[clients]
    n = samples.ptr[clients + 1] - start
    per_epoch = local_steps(samples, clients, 1, batch_size)
    steps = per_epoch * epochs
    c, t_max, nmax = len(clients), int(steps.max()) if len(clients) else 0, int(n.max()) if len(clients) else 0
    index = torch.full((c, max(t_max, 1), batch_size), -1, dtype=torch.long)
    pos = torch.arange(nmax)
    users = samples.users[clients].unsqueeze(1)
    for epoch in range(epochs):
        keys = ClientStream(seed, round_, f"shuffle/{epoch}").uniform(users, pos.unsqueeze(0))
        keys[pos.unsqueeze(0) >= n.unsqueeze(1)] = 2.0
        perm = keys.argsort(dim=1)
        slot = pos.unsqueeze(0).expand(c, -1)
        step = epoch * per_epoch.unsqueeze(1) + torch.div(slot, batch_size, rounding_mode="floor")
        ok = slot < n.unsqueeze(1)
        ci = torch.arange(c).unsqueeze(1).expand(-1, nmax)
        index[ci[ok], step[ok], (slot % batch_size)[ok]] = (start.unsqueeze(1) + perm)[ok]
    return BatchLayout(index, steps)


@dataclass
class Active:
    """The clients that step at one local step: `mask` [C] and their rows [A] in ascending order (None when
    all C step), both on the device, and their number A, known on the host (no sync)."""

    mask: torch.Tensor
    rows: torch.Tensor | None
    count: int


def touched_rows(items: torch.Tensor, valid: torch.Tensor, n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The item rows each client's batches touch: `rows` [C, U] (ascending, padded with -1; U the most any client
    touches) and each sample's slot among its client's rows [T, C, B] (padding samples: slot 0).

    Without a dense term an item row no batch of the round touches has zero gradient at every step, so Adam
    (fresh each round: m = v = 0) leaves it and its moments exactly as they are; stepping the touched rows only
    (here ~600 of Lastfm-2k's 12,454 per client) gives the same tables.
    """
    c = items.shape[1]
    mark = torch.zeros(c, n_items, dtype=torch.bool, device=items.device)
    client = torch.arange(c, device=items.device).view(1, c, 1).expand_as(items)
    mark[client[valid], items[valid]] = True
    slot_of = mark.to(torch.int32).cumsum(dim=1, dtype=torch.int32).long() - 1  # [C, m]: a touched item's slot
    width = max(int(mark.sum(dim=1).max()) if c else 0, 1)
    rows = torch.full((c, width), -1, dtype=torch.long, device=items.device)
    hit = mark.nonzero()
    rows[hit[:, 0], slot_of[hit[:, 0], hit[:, 1]]] = hit[:, 1]
    slots = torch.where(valid, slot_of[client, items], torch.zeros_like(items))
    return rows, slots


@dataclass
class ChunkBatches:
    """A chunk's batches on the compute device, moved there once: items and labels [T, C, B] (padding:
    the item and label of sample 0, `valid` False), `active` [T, C] (a client steps while it has a batch),
    the active rows of all steps concatenated [sum_t A_t] and, on the host, each step's count A_t; with
    `item_rows` [C, U], `items` are slots among each client's touched rows (`touched_rows`)."""

    items: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    active: torch.Tensor
    rows: torch.Tensor
    counts: list[int]
    bounds: list[int]
    item_rows: torch.Tensor | None = None
    item_back: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def build(
        cls,
        samples: RoundSamples,
        layout: BatchLayout,
        device: torch.device,
        dtype: torch.dtype,
        n_items: int | None = None,
    ) -> ChunkBatches:
        """Gather the chunk's samples on the host in step-major order and move them (five transfers).

        With `n_items`, `items` are slots among each client's touched rows, `item_rows` [C, U] those rows (padding:
        row 0) and `item_back` the flat positions [N] of the real ones in the [C, U] and [C, m] tables (found on the
        host by `touched_rows`: three transfers more, no sync)."""
        index = layout.index.transpose(0, 1).contiguous()
        valid = index >= 0
        safe = index.clamp(min=0)
        active = valid.any(dim=2)
        counts = active.sum(dim=1).tolist()
        bounds = [0]
        for n in counts:
            bounds.append(bounds[-1] + n)
        items, item_rows, item_back = samples.items[safe], None, None
        if n_items is not None:
            rows, items = touched_rows(items, valid, n_items)
            kept = (rows >= 0).reshape(-1)
            full_pos = (torch.arange(rows.shape[0]).unsqueeze(1) * n_items + rows).reshape(-1)
            item_rows = to_device(rows.clamp(min=0), device)
            item_back = (to_device(kept.nonzero().squeeze(1), device), to_device(full_pos[kept], device))
        return cls(
            to_device(items, device),
            to_device(samples.labels[safe], device, dtype),
            to_device(valid, device),
            to_device(active, device),
            to_device(active.nonzero()[:, 1], device),
            counts,
            bounds,
            item_rows,
            item_back,
        )

    @property
    def steps(self) -> int:
        """T, the chunk's number of local steps (its longest client's)."""
        return self.items.shape[0]

    def at(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Active]:
        """Step t: item ids [C, B], labels [C, B], valid [C, B] and the active clients; views, no copy."""
        n, c = self.counts[t], self.items.shape[1]
        rows = None if n == c else self.rows[self.bounds[t] : self.bounds[t + 1]]
        return self.items[t], self.labels[t], self.valid[t], Active(self.active[t], rows, n)


@dataclass(frozen=True)
class OptimSpec:
    """The clients' optimiser (`optim.*`), typed once from the validated config: `sgd` or `adam`; with
    `item_lr_eta` the item table steps at lr * n_items * item_lr_eta; `alternate` = the lineage's SGD order;
    `fused`: Adam in one kernel per tensor (torch's fused Adam) instead of eight tensor ops; `touched_rows`: Adam
    on the item rows a client's round touches only (`touched_rows`), the others being left exactly as they are."""

    name: str
    lr: float
    item_lr_eta: float | None = None
    alternate: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    fused: bool = False
    touched_rows: bool = False

    @classmethod
    def from_cfg(cls, optim: Any) -> OptimSpec:
        """From the `optim` config group (already validated by `src/cli/config.py`)."""
        eta = optim.get("item_lr_eta")
        betas = optim.get("betas") or (0.9, 0.999)
        return cls(
            str(optim.name),
            float(optim.lr),
            None if eta is None else float(eta),
            bool(optim.alternate),
            (float(betas[0]), float(betas[1])),
            float(optim.get("eps", 1e-8)),
            bool(optim.get("fused", False)),
            bool(optim.get("touched_rows", False)),
        )


class StackedOptimizer:
    """SGD or Adam over stacked client tensors, stepping only the clients marked active.

    Matches torch.optim.SGD / Adam (no momentum / default Adam) applied to each client alone,
    with a fresh optimiser per client per round as in the lineage.
    """

    def __init__(self, optim: OptimSpec, params: Params, n_items: int):
        self.name = optim.name
        self.lr = {k: optim.lr for k in params}
        if optim.item_lr_eta is not None:
            self.lr["items"] = optim.lr * n_items * optim.item_lr_eta
        self.fused = optim.fused
        # steps of each tensor so far: every active client has taken them all (a client steps until it is done)
        self.steps = dict.fromkeys(params, 0)
        if self.name == "adam":
            self.b1, self.b2 = optim.betas
            self.eps = optim.eps
            self.m = {k: torch.zeros_like(v) for k, v in params.items()}
            self.v = {k: torch.zeros_like(v) for k, v in params.items()}

    def step(self, params: Params, grads: Params, active: Active) -> None:
        """Update `params` in place from `grads` for the `active` clients."""
        for k in grads:
            self.steps[k] += 1
        if self.name == "sgd":
            for k, g in grads.items():
                mask = active.mask.view(-1, *([1] * (g.dim() - 1))).to(g.dtype)
                params[k].sub_(g * mask, alpha=self.lr[k])
            return
        sel = active.rows
        if self.fused:
            self.fused_step(params, grads, sel)
            return

        def take(x: torch.Tensor) -> torch.Tensor:
            """The active clients' rows: the tensor itself (updated in place) when all are active."""
            return x if sel is None else x.index_select(0, sel)

        for k, g in grads.items():
            m, v, g = take(self.m[k]), take(self.v[k]), take(g)
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            # in float64 as torch.optim.Adam does (in fp32, 1 - 0.999 ** 1 is off by 1.3e-5 relative); every active
            # client is at step self.steps[k]
            bias1 = 1 - self.b1 ** self.steps[k]
            bias2 = 1 - self.b2 ** self.steps[k]
            step = (v.sqrt() / math.sqrt(bias2)).add_(self.eps)
            step = torch.div(m, step).mul_(self.lr[k] / bias1)
            if sel is None:
                params[k].sub_(step)
            else:
                self.m[k].index_copy_(0, sel, m)
                self.v[k].index_copy_(0, sel, v)
                params[k].index_add_(0, sel, step, alpha=-1.0)

    def fused_step(self, params: Params, grads: Params, sel: torch.Tensor | None) -> None:
        """Adam on the active rows `sel` (None: all) by torch's fused kernel; the active clients all are at step
        `self.steps` (clients leave a chunk for good), so one step count serves them all."""
        for k, g in grads.items():
            p, m, v = params[k], self.m[k], self.v[k]
            if sel is not None:
                p, m, v, g = (x.index_select(0, sel) for x in (p, m, v, g))
            g = g.contiguous()  # the CPU kernel assumes the parameter's layout
            step = torch.tensor(float(self.steps[k]), device=p.device)
            hyper = {"beta1": self.b1, "beta2": self.b2, "weight_decay": 0.0, "eps": self.eps}
            torch._fused_adam_([p], [g], [m], [v], [], [step], lr=self.lr[k], amsgrad=False, maximize=False, **hyper)
            if sel is not None:
                params[k].index_copy_(0, sel, p)
                self.m[k].index_copy_(0, sel, m)
                self.v[k].index_copy_(0, sel, v)


def bce_per_client(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean BCE over each client's batch [C]. `sigmoid_bce` is the lineage's Sigmoid + BCELoss (its
    log clamp at -100 stops the gradient of saturated scores); `logits_bce` is the fused, unclamped form."""
    if loss == "sigmoid_bce":
        per = F.binary_cross_entropy(torch.sigmoid(logits), labels, reduction="none")
    elif loss == "logits_bce":
        per = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    else:
        raise ValueError(f"model.loss={loss!r}; expected sigmoid_bce or logits_bce")
    return (per * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)


def dense_on_active(
    dense_loss: DenseLoss, items: torch.Tensor, item_ids: torch.Tensor, valid: torch.Tensor, active: Active
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The dense alignment terms of the clients still stepping only (padded ones get zeros), so a
    chunk's short clients do not pay for its long ones."""
    if active.rows is None:
        return dense_loss(items, item_ids, valid)
    rows = active.rows
    grad = torch.zeros_like(items)
    if active.count == 0:
        return {}, grad
    values, part = dense_loss(items.index_select(0, rows), item_ids.index_select(0, rows), valid.index_select(0, rows))
    grad.index_copy_(0, rows, part)
    full = {
        k: torch.zeros(items.shape[0], dtype=v.dtype, device=v.device).index_copy(0, rows, v) for k, v in values.items()
    }
    return full, grad


def train_cohort(
    params: Params,
    samples: RoundSamples,
    layout: BatchLayout,
    optim: OptimSpec,
    n_items: int,
    loss: str = "sigmoid_bce",
    dense_loss: DenseLoss | None = None,
) -> dict[str, float]:
    """Run every local step of a chunk of clients in place; return the mean of each loss term.

    Per client and step: loss = mean BCE over its batch (+ dense alignment terms on the item
    table); the chunk's total is the sum over clients, so each client's gradient is its own.
    With `optim.alternate` (the lineage's SGD) the score function steps first, then the item
    table steps on a fresh forward pass through the updated score function.
    The loss values are read on the host once, after the last step (summed there in step order).
    """
    alternate = optim.alternate
    device = params["items"].device
    score_keys = [k for k in params if k != "items"]
    full = params
    compact = optim.touched_rows and optim.name == "adam" and dense_loss is None
    batches = ChunkBatches.build(samples, layout, device, params["items"].dtype, n_items if compact else None)
    if compact:
        params = {**params, "items": gather_items(full["items"], batches.item_rows)}  # [C, U, d]
    opt = StackedOptimizer(optim, params, n_items)
    pending: list[tuple[str, torch.Tensor]] = []
    counted = 0
    for t in range(batches.steps):
        item_ids, labels, valid, active = batches.at(t)
        if alternate:
            score = {k: params[k].detach().requires_grad_() for k in score_keys}
            emb = gather_items(params["items"], item_ids)
            bce = bce_per_client(score_embeddings(score, emb), labels, valid, loss)
            grads = torch.autograd.grad((bce * active.mask).sum(), list(score.values()))
            with torch.no_grad():
                opt.step(params, dict(zip(score_keys, grads)), active)
        score = {k: params[k] if alternate else params[k].detach().requires_grad_() for k in score_keys}
        emb = gather_items(params["items"], item_ids).requires_grad_()
        terms = {"bce": bce_per_client(score_embeddings(score, emb), labels, valid, loss)}
        g_table = None
        if dense_loss is not None:
            extra, g_table = dense_on_active(dense_loss, params["items"], item_ids, valid, active)
            terms.update(extra)
        leaves = [emb] + ([] if alternate else list(score.values()))
        grads = list(torch.autograd.grad((terms["bce"] * active.mask).sum(), leaves, allow_unused=True))
        with torch.no_grad():
            g_emb = grads.pop(0)
            g = {} if alternate else {k: grads.pop(0) for k in score_keys}
            flat = flat_index(params["items"], item_ids)
            dim = params["items"].shape[2]
            if opt.name == "sgd" and g_table is None:
                opt.step(params, g, active)
                mask = active.mask.view(-1, 1, 1).to(g_emb.dtype)
                params["items"].view(-1, dim).index_add_(
                    0, flat, (g_emb * mask).reshape(-1, dim), alpha=-opt.lr["items"]
                )
            else:
                g_items = g_table.contiguous() if g_table is not None else torch.zeros_like(params["items"])
                g_items.view(-1, dim).index_add_(0, flat, g_emb.reshape(-1, dim))
                g["items"] = g_items
                opt.step(params, g, active)
            if active.count:
                pending += [(k, (v.detach() * active.mask).sum()) for k, v in terms.items()]
                counted += active.count
    if compact:
        dim = full["items"].shape[2]
        src, dst = batches.item_back
        full["items"].view(-1, dim).index_copy_(0, dst, params["items"].reshape(-1, dim).index_select(0, src))
    totals: dict[str, float] = {}
    values = host_value(torch.stack([v.double() for _, v in pending])) if pending else []
    for (k, _), value in zip(pending, values):
        totals[k] = totals.get(k, 0.0) + value
    return {k: v / max(counted, 1) for k, v in totals.items()}


def chunks_by_steps(clients: torch.Tensor, steps: torch.Tensor, chunk_size: int | None) -> list[torch.Tensor]:
    """Split `clients` into chunks of similar step counts, so short clients do not wait for long ones."""
    order = clients[torch.argsort(steps, stable=True)]
    size = len(order) if not chunk_size else int(chunk_size)
    return [order[i : i + size] for i in range(0, len(order), max(size, 1))]


def local_steps(samples: RoundSamples, clients: torch.Tensor, epochs: int, batch_size: int) -> torch.Tensor:
    """Number of local steps of each client this round."""
    n = samples.ptr[clients + 1] - samples.ptr[clients]
    return torch.div(n + batch_size - 1, batch_size, rounding_mode="floor") * epochs
