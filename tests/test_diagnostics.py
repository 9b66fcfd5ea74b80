"""Graph diagnostics against brute-force rank correlation and edge counting."""

from __future__ import annotations

import numpy as np
import torch

from src.diagnostics import GraphDiagnostics, average_ranks, spearman


def brute_ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks by counting: 1 + #smaller + (#equal - 1) / 2."""
    return np.array([1 + (x < v).sum() + ((x == v).sum() - 1) / 2 for v in x])


def test_average_ranks_and_spearman_match_brute_force():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 40).astype(float)  # many ties
    y = x + rng.normal(0, 1, 40)
    assert np.allclose(average_ranks(x), brute_ranks(x))
    rx, ry = brute_ranks(x), brute_ranks(y)
    pearson = np.corrcoef(rx, ry)[0, 1]
    assert abs(spearman(y, rx) - pearson) < 1e-12
    assert spearman(np.ones(40), rx) == 0.0


def test_graph_diagnostics_on_a_split(compose_cfg):
    from src.data.dataset import load

    data = load(compose_cfg(["dataset=synthetic", "dataset.n_users=30"]))
    diag = GraphDiagnostics(data, sigma=0.5)
    x = data.train_matrix().astype(float)
    share = x.T @ x / data.n_users
    first = torch.from_numpy(share).float()  # S_g equal to the co-occurrence share itself: rho = 1
    out = diag(first)
    iu = np.triu_indices(data.n_items, 1)
    assert abs(out["diag/spearman_cooccurrence"] - 1.0) < 1e-9
    assert out["diag/edges"] == float(((share[iu] >= 0.5) & (share[iu] > 0)).sum())
    later = torch.zeros_like(first)
    j = np.flatnonzero(share[iu] < 0.5)[:3]
    later[iu[0][j], iu[1][j]] = 0.9  # three new edges, none from round 1
    out = diag(later)
    assert out["diag/edges"] == 3.0 and out["diag/edges_from_round1"] == 0.0
