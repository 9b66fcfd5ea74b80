"""Graph diagnostics against brute-force rank correlation and edge counting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from src.server.diagnostics import GraphDiagnostics, average_ranks, spearman


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
    sigma = 1.5 / 30  # an edge: a pair two or more of the 30 clients hold
    diag = GraphDiagnostics(data, sigma=sigma)
    x = data.train_matrix().astype(float)
    share = x.T @ x / data.n_users
    first = torch.from_numpy(share).float()  # S_g equal to the co-occurrence share itself: rho = 1
    out = diag(first)
    iu = np.triu_indices(data.n_items, 1)
    assert abs(out["diag/spearman_cooccurrence"] - 1.0) < 1e-9
    edges = int((share[iu] >= sigma).sum())
    assert edges > 3 and out["diag/edges"] == float(edges)
    later = torch.zeros_like(first)
    old, new = np.flatnonzero(share[iu] >= sigma)[:3], np.flatnonzero(share[iu] < sigma)[:3]
    for j in (old, new):
        later[iu[0][j], iu[1][j]] = 0.9  # three round-1 edges kept, three new ones
    out = diag(later)
    assert out["diag/edges"] == 6.0 and out["diag/edges_from_round1"] == 0.5


def brute_nmi(a, b):
    """NMI from the definition, pair counts by loops."""
    n = len(a)
    ua, ub = sorted(set(a)), sorted(set(b))
    pa = {x: sum(1 for v in a if v == x) / n for x in ua}
    pb = {y: sum(1 for v in b if v == y) / n for y in ub}
    mi = 0.0
    for x in ua:
        for y in ub:
            pxy = sum(1 for i in range(n) if a[i] == x and b[i] == y) / n
            if pxy > 0:
                mi += pxy * np.log(pxy / (pa[x] * pb[y]))
    ha = -sum(p * np.log(p) for p in pa.values())
    hb = -sum(p * np.log(p) for p in pb.values())
    return 2 * mi / (ha + hb)


def test_nmi_matches_the_definition():
    from src.server.diagnostics import nmi

    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 4, 60), rng.integers(0, 3, 60)
    assert abs(nmi(a, b) - brute_nmi(list(a), list(b))) < 1e-12
    assert abs(nmi(a, a * 7 + 1) - 1.0) < 1e-12  # a relabelling carries all the information


def test_genres_of_ml100k_items(real_build):
    from src.data.genres import item_genres

    data = real_build("ml-100k", "clean")
    genres = item_genres(data)
    assert genres.shape == (data.n_items,)
    # Toy Story (item 1): Animation|Children's|Comedy -> counted under its first flag, Animation (u.genre 3)
    toy = int(np.flatnonzero(data.item_ids == 1)[0])
    golden = int(np.flatnonzero(data.item_ids == 2)[0])  # GoldenEye: Action|Adventure|Thriller -> Action (1)
    assert genres[toy] != genres[golden]
    first_flags = {}
    for line in (Path(data.folder) / "u.item").read_text(encoding="latin-1").splitlines():
        parts = line.split("|")
        first_flags[int(parts[0])] = next(i for i, f in enumerate(parts[5:]) if f == "1")
    animation = {i for i, g in first_flags.items() if g == 3}  # u.genre: Animation|3
    assert {int(i) for i in data.item_ids[genres == genres[toy]]} == animation


def test_graph_diagnostics_count_the_knn_graph_the_communities_use(compose_cfg):
    """With `ablation.graph=knn` the edges are those of the k-nearest-neighbour graph (brute force here)."""
    from src.data.dataset import load

    data = load(compose_cfg(["dataset=synthetic", "dataset.n_users=30"]))
    m, k = data.n_items, 2
    sim = torch.rand(m, m, generator=torch.Generator().manual_seed(3))
    sim = (sim + sim.T) / 2
    sim.fill_diagonal_(0)
    s = sim.numpy()
    edges = set()
    for j in range(m):
        for x in np.argsort(-s[j])[:k]:
            edges.add((min(j, int(x)), max(j, int(x))))
    diag = GraphDiagnostics(data, sigma=0.5, knn=k)
    out = diag(sim)
    assert out["diag/edges"] == float(len(edges)) and out["diag/edges_from_round1"] == 1.0
    # later, only the pairs (2i, 2i + 1) are positive: each item's one neighbour; some were round-1 edges
    pairs = {(j, j + 1) for j in range(0, m - 1, 2)}
    later = torch.zeros(m, m)
    for j, x in pairs:
        later[j, x] = later[x, j] = 0.9
    out = diag(later)
    assert out["diag/edges"] == float(len(pairs))
    assert out["diag/edges_from_round1"] == pytest.approx(len(pairs & edges) / len(pairs))
    assert 0 < len(pairs & edges) < len(pairs)


def test_a_run_counts_the_edges_of_its_own_community_graph(compose_cfg):
    """`diag.graph=true` in a run: diag/edges are the community graph's edges (kNN or its own threshold)."""
    from src.data.dataset import load
    from src.rounds.simulator import FederatedModule

    for extra in (["ablation=knn_ica", "ablation.graph_k=3"], ["ablation=full", "ablation.graph_sigma=0.3"]):
        cfg = compose_cfg(["dataset=synthetic", "model.dim=8", "diag.graph=true", *extra])
        stats = FederatedModule(cfg, load(cfg)).run_round()
        assert stats["diag/edges"] == stats["community/edges"] > 0, extra


def test_round1_edges_restore_from_old_and_new_checkpoints(compose_cfg):
    """Checkpoints before the kNN graph was counted held positions in the upper triangle's flat order."""
    from src.data.dataset import load

    data = load(compose_cfg(["dataset=synthetic", "dataset.n_users=30"]))
    m = data.n_items
    sim = torch.rand(m, m, generator=torch.Generator().manual_seed(4))
    sim = (sim + sim.T) / 2
    diag = GraphDiagnostics(data, sigma=0.9)
    diag(sim)
    iu = np.triu_indices(m, 1)
    old_positions = np.flatnonzero(sim.numpy()[iu] >= 0.9)
    expected = iu[0][old_positions] * m + iu[1][old_positions]  # keys j * m + k of the pairs at or above 0.9
    assert len(expected) > 0
    np.testing.assert_array_equal(diag.first_edges, expected)
    for fed in ({"diag_first_edges": old_positions}, {"diag_first_edge_keys": expected.copy()}):
        again = GraphDiagnostics(data, sigma=0.9)
        again.restore(fed)
        np.testing.assert_array_equal(again.first_edges, expected)


def test_fed_itemknn_diagnostics_count_the_pairs_it_broadcasts(compose_cfg):
    """`ablation=fed_itemknn` has no communities: diag/edges are the neighbour pairs its broadcast holds."""
    from src.data.dataset import load
    from src.rounds.simulator import FederatedModule

    cfg = compose_cfg(["dataset=synthetic", "model.dim=8", "diag.graph=true", "ablation=fed_itemknn", "ablation.k=3"])
    module = FederatedModule(cfg, load(cfg))
    stats = module.run_round()
    sent = module.broadcast.global_sim
    assert stats["diag/edges"] == float(torch.count_nonzero(torch.triu(sent, diagonal=1))) > 0
    assert "diag/nmi_genre" not in stats
    # Spearman of the server's S_g with the training co-occurrence share over the pairs j < k: the Pearson
    # correlation of their average ranks (ties share the mean of their positions), computed in numpy
    x = module.data.train_matrix().astype(float)
    iu = np.triu_indices(x.shape[1], 1)

    share = (x.T @ x / x.shape[0])[iu]
    want = np.corrcoef(brute_ranks(module.server_sim.double().numpy()[iu]), brute_ranks(share))[0, 1]
    assert stats["diag/spearman_cooccurrence"] == pytest.approx(want, abs=1e-9)
