"""Independent reference computations for the alignment tests (numpy / plain loops, tests only).

Nothing here imports `src`: every expectation in the alignment tests (`test_similarity.py`,
`test_losses.py`, `test_community.py`) is computed from the formulas of METHOD.md sections 1 and 3,
never with the function under test. Also the inputs those tests share (random tables, labels, S_g).
"""

from __future__ import annotations

import numpy as np
import torch


# ----------------------------------------------------------------------------- similarity
def np_normalise(table: np.ndarray, centre: bool) -> np.ndarray:
    """One client's table [m, d]: rows centred over items (optional), each row scaled to unit length."""
    x = np.asarray(table, dtype=np.float64)
    if centre:
        x = x - x.mean(axis=0, keepdims=True)
    norms = np.sqrt((x * x).sum(axis=1, keepdims=True))
    return x / np.maximum(norms, 1e-12)


def np_cosine(table: np.ndarray, centre: bool) -> np.ndarray:
    """Cosine similarity [m, m] of one client's items, entry by entry (diagonal 1)."""
    e = np_normalise(table, centre)
    m = e.shape[0]
    out = np.empty((m, m))
    for j in range(m):
        for k in range(m):
            out[j, k] = float(np.dot(e[j], e[k]))
    return out


def np_upload(sim: np.ndarray, sigma: float) -> np.ndarray:
    """Thresholded upload of one client by a plain loop: diagonal 0, entries < sigma 0."""
    m = sim.shape[0]
    out = np.zeros_like(sim, dtype=np.float64)
    for j in range(m):
        for k in range(m):
            if j != k and sim[j, k] >= sigma:
                out[j, k] = sim[j, k]
    return out


def random_orthogonal(d: int, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=dtype))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def min_gap_to(values: np.ndarray, sigma: float) -> float:
    """Distance of the closest value to the threshold (to keep piecewise-constant masks stable)."""
    return float(np.abs(np.asarray(values, dtype=np.float64) - sigma).min())


def pick_sigma(sims: np.ndarray, lo: float, hi: float) -> float:
    """A threshold in [lo, hi] in the middle of the widest gap between the off-diagonal values."""
    m = sims.shape[-1]
    off = ~np.eye(m, dtype=bool)
    vals = np.sort(np.concatenate([s[off] for s in sims.reshape(-1, m, m)]))
    vals = vals[(vals > lo - 0.2) & (vals < hi + 0.2)]
    best, where = -1.0, (lo + hi) / 2
    for a, b in zip(vals[:-1], vals[1:]):
        mid = (a + b) / 2
        if lo <= mid <= hi and b - a > best:
            best, where = b - a, mid
    return float(where)


# ----------------------------------------------------------------------------- losses
def naive_gsa(e: np.ndarray, global_sim: np.ndarray, sigma: float, mask: str, reduction: str) -> float:
    """Eq. 10 for one client by a double loop over j != k; e [m, d] already normalised."""
    m = e.shape[0]
    total, count = 0.0, 0
    for j in range(m):
        for k in range(m):
            if j == k:
                continue
            s = float(np.dot(e[j], e[k]))
            local, glob = s >= sigma, global_sim[j, k] >= sigma
            w = {"local": local, "global": glob, "union": local or glob}[mask]
            if w:
                total += (s - float(global_sim[j, k])) ** 2
                count += 1
    if reduction == "mean":
        return total / count if count else 0.0
    return total


def _logsumexp(x: list[float]) -> float:
    mx = max(x)
    return mx + float(np.log(sum(np.exp(v - mx) for v in x)))


def naive_ica_anchor(e: np.ndarray, labels: np.ndarray, a: int, tau: float) -> float | None:
    """-mean_{p in P(a)} log( exp(s_ap/tau) / sum_{k != a} exp(s_ak/tau) ); None without positives."""
    m = e.shape[0]
    positives = [p for p in range(m) if p != a and labels[p] == labels[a]]
    if not positives:
        return None
    logits = {k: float(np.dot(e[a], e[k])) / tau for k in range(m) if k != a}
    denom = _logsumexp(list(logits.values()))
    return -float(np.mean([logits[p] - denom for p in positives]))


def naive_ica(e: np.ndarray, labels: np.ndarray, tau: float, tau0: float, anchors=None) -> float:
    """(tau/tau0) * mean over anchors with >= 1 positive; `anchors` defaults to all items."""
    anchors = range(e.shape[0]) if anchors is None else anchors
    vals = [v for a in anchors if (v := naive_ica_anchor(e, labels, int(a), tau)) is not None]
    return (tau / tau0) * float(np.mean(vals)) if vals else 0.0


def naive_loss_torch(
    table: torch.Tensor,
    labels: torch.Tensor | None,
    global_sim: torch.Tensor | None,
    alpha: float,
    beta: float,
    tau: float,
    tau0: float,
    sigma: float,
    centre: bool,
    mask: str,
    reduction: str,
    anchors: list[int] | None = None,
) -> tuple[torch.Tensor, dict]:
    """alpha * ICA + beta * GSA of ONE client's table [m, d] in plain torch (differentiable), with
    per-anchor / per-pair Python loops written from the formulas."""
    x = table - table.mean(dim=0, keepdim=True) if centre else table
    e = x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
    m = e.shape[0]
    terms: dict[str, torch.Tensor] = {}
    if labels is not None:
        per = []
        for a in range(m) if anchors is None else anchors:
            pos = [p for p in range(m) if p != a and int(labels[p]) == int(labels[a])]
            if not pos:
                continue
            others = [k for k in range(m) if k != a]
            logits = torch.stack([e[a] @ e[k] for k in others]) / tau
            denom = torch.logsumexp(logits, dim=0)
            per.append(-torch.stack([(e[a] @ e[p]) / tau - denom for p in pos]).mean())
        terms["ica"] = (tau / tau0) * torch.stack(per).mean() if per else table.sum() * 0
    if global_sim is not None:
        total, count = table.sum() * 0, 0
        for j in range(m):
            for k in range(m):
                if j == k:
                    continue
                s = e[j] @ e[k]
                local, glob = bool(s.detach() >= sigma), bool(global_sim[j, k] >= sigma)
                w = {"local": local, "global": glob, "union": local or glob}[mask]
                if w:
                    total = total + (s - global_sim[j, k]) ** 2
                    count += 1
        terms["gsa"] = total / max(count, 1) if reduction == "mean" else total
    value = sum((alpha if k == "ica" else beta) * v for k, v in terms.items())
    return value, terms


def central_fd(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of the scalar f at x (float64)."""
    x = np.array(x, dtype=np.float64)
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + eps
        up = f(x)
        x[i] = old - eps
        down = f(x)
        x[i] = old
        g[i] = (up - down) / (2 * eps)
    return g


# ----------------------------------------------------------------------------- communities
def brute_ari(a, b) -> float:
    """Adjusted Rand index by counting every pair of items (Hubert & Arabie)."""
    a, b = list(a), list(b)
    n = len(a)
    both = same_a = same_b = 0
    for i in range(n):
        for j in range(i + 1, n):
            sa, sb = a[i] == a[j], b[i] == b[j]
            same_a += sa
            same_b += sb
            both += sa and sb
    total = n * (n - 1) / 2
    expected = same_a * same_b / total if total else 0.0
    maximum = (same_a + same_b) / 2
    if maximum == expected:
        return 1.0
    return (both - expected) / (maximum - expected)


def planted_blocks(n_blocks: int, size: int, seed: int, p_drop: float = 0.1, p_cross: float = 0.03):
    """Symmetric similarity [n, n] with planted blocks: within ~0.8 (a share dropped to ~0.1),
    between ~0.1 (a share raised to ~0.6, above sigma = 0.5); zero diagonal. Returns (sim, truth)."""
    rng = np.random.default_rng(seed)
    n = n_blocks * size
    truth = np.repeat(np.arange(n_blocks), size)
    same = truth[:, None] == truth[None, :]
    sim = np.where(same, 0.8 + rng.uniform(-0.1, 0.1, (n, n)), 0.1 + rng.uniform(-0.1, 0.1, (n, n)))
    drop = same & (rng.uniform(size=(n, n)) < p_drop)
    cross = ~same & (rng.uniform(size=(n, n)) < p_cross)
    sim = np.where(drop, 0.1 + rng.uniform(-0.05, 0.05, (n, n)), sim)
    sim = np.where(cross, 0.6 + rng.uniform(-0.05, 0.05, (n, n)), sim)
    sim = np.triu(sim, 1)
    sim = sim + sim.T
    perm = rng.permutation(n)
    return sim[np.ix_(perm, perm)], truth[perm]


def np_adjacency(sim: np.ndarray, sigma: float) -> np.ndarray:
    """Weighted adjacency by a loop: A[j,k] = sim[j,k] for j != k with sim >= sigma and sim > 0."""
    n = sim.shape[0]
    a = np.zeros((n, n))
    for j in range(n):
        for k in range(j + 1, n):
            if sim[j, k] >= sigma and sim[j, k] > 0:
                a[j, k] = a[k, j] = sim[j, k]
    return a


def np_modularity(adj: np.ndarray, labels, resolution: float = 1.0) -> float:
    """Q = 1/(2W) sum_ij [A_ij - gamma k_i k_j / (2W)] delta(c_i, c_j)."""
    labels = np.asarray(labels)
    k = adj.sum(axis=1)
    two_w = adj.sum()
    delta = labels[:, None] == labels[None, :]
    return float(((adj - resolution * np.outer(k, k) / two_w) * delta).sum() / two_w)


# ----------------------------------------------------------------------------- shared inputs
F64 = torch.float64
CPU = torch.device("cpu")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tables(c: int, m: int, d: int, seed: int, dtype=F64) -> torch.Tensor:
    return torch.randn(c, m, d, generator=gen(seed), dtype=dtype)


def np_e(table: torch.Tensor, centre: bool) -> list[np.ndarray]:
    """Independent normalisation of every client's table."""
    return [np_normalise(t.detach().numpy(), centre) for t in table]


def random_global(m: int, seed: int, sigma: float) -> torch.Tensor:
    """A symmetric S_g [m, m] in [0, 1], zero diagonal, a share of zeros and one entry exactly sigma."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(0.0, 1.0, (m, m))
    s[rng.uniform(size=(m, m)) < 0.3] = 0.0
    s = np.triu(s, 1)
    s[0, 1] = sigma
    s = s + s.T
    return torch.from_numpy(s)


LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 3, 4, 5, 1, 6, 2])  # 3 singletons (3, 4, 5, 6 = 4)


def shuffled_labels(seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.as_tensor(rng.permutation(LABELS), dtype=torch.long)
