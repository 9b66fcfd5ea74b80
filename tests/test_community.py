"""Community detection on the similarity graph and the adjusted Rand index (METHOD.md section 3, step 2).

Every expectation is computed independently (numpy or plain loops in `tests/alignment_helpers.py`),
never with the function under test. Tables are stacked over clients: [C, m, d].
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from alignment_helpers import (
    brute_ari,
    np_adjacency,
    np_modularity,
    planted_blocks,
)

from src.alignment.graph import graph_mask, knn_pairs
from src.alignment.neighbours import nearest_mask
from src.server.communities import adjusted_rand_index, detect, relabel, weighted_graph


# ============================================================================ 6. communities
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adjusted_rand_index_matches_pair_counting(seed):
    rng = np.random.default_rng(seed)
    for n, ka, kb in [(2, 1, 2), (7, 3, 2), (25, 4, 6), (40, 2, 9), (30, 30, 1), (12, 12, 12)]:
        a = rng.integers(0, ka, n)
        b = rng.integers(0, kb, n)
        assert adjusted_rand_index(a, b) == pytest.approx(brute_ari(a, b), abs=1e-12)
        # invariant to renaming, 1 on identical partitions
        assert adjusted_rand_index(a, (b + 5) * 3) == pytest.approx(brute_ari(a, b), abs=1e-12)
        assert adjusted_rand_index(a, a) == pytest.approx(1.0)
    a = rng.integers(0, 4, 30)
    b = np.where(rng.uniform(size=30) < 0.3, rng.integers(0, 4, 30), a)  # partly agreeing
    assert adjusted_rand_index(a, b) == pytest.approx(brute_ari(a, b), abs=1e-12)


def test_relabel_first_appearance():
    labels = np.array([7, 7, 3, 9, 3, 0, 9, 7, 12])
    out = relabel(labels)
    assert out.tolist() == [0, 0, 1, 2, 1, 3, 2, 0, 4]
    assert out.dtype == np.int64
    rng = np.random.default_rng(0)
    x = rng.integers(0, 20, 50)
    out = relabel(x)
    seen: dict[int, int] = {}
    expected = [seen.setdefault(int(v), len(seen)) for v in x]
    assert out.tolist() == expected
    assert relabel(out).tolist() == out.tolist()


PLANTED = planted_blocks(4, 15, seed=0)


@pytest.mark.parametrize("method", ["igraph", "leidenalg", "leidenalg_rb"])
def test_detect_recovers_planted_blocks(method):
    sim_np, truth = PLANTED
    sim = torch.from_numpy(sim_np).float()
    sigma = 0.5
    comms = detect(sim, sigma=sigma, method=method, resolution=1.0, seed=0)
    labels = comms.labels
    assert labels.shape == (60,)
    assert brute_ari(labels, truth) > 0.9
    assert adjusted_rand_index(labels, truth) == pytest.approx(brute_ari(labels, truth), abs=1e-12)
    # labels canonical: 0..K-1 in order of first appearance
    seen: dict[int, int] = {}
    assert labels.tolist() == [seen.setdefault(int(v), len(seen)) for v in labels]
    assert comms.sizes.sum() == 60
    # modularity from the weighted adjacency, independently
    adj = np_adjacency(sim.double().numpy(), sigma)
    assert comms.modularity == pytest.approx(np_modularity(adj, labels), abs=1e-9)
    assert comms.modularity > 0.5
    # edge count: pairs j < k with sim >= sigma and sim > 0
    s = sim.double().numpy()
    edges = sum(1 for j in range(60) for k in range(j + 1, 60) if s[j, k] >= sigma and s[j, k] > 0)
    assert comms.edges == edges == int((adj > 0).sum()) // 2
    # same seed, same labels
    again = detect(sim, sigma=sigma, method=method, resolution=1.0, seed=0)
    assert np.array_equal(again.labels, labels) and again.modularity == comms.modularity


def test_detect_modularity_with_resolution_and_isolated_items():
    sim_np, _ = PLANTED
    sim = sim_np.copy()
    sim[:3, :] = 0.1  # three items without any edge -> singleton communities
    sim[:, :3] = 0.1
    np.fill_diagonal(sim, 0.0)
    for method, res in [("leidenalg_rb", 0.8), ("igraph", 1.3), ("leidenalg", 1.0)]:
        comms = detect(torch.from_numpy(sim), sigma=0.5, method=method, resolution=res, seed=3)
        adj = np_adjacency(sim, 0.5)
        assert comms.modularity == pytest.approx(np_modularity(adj, comms.labels, res), abs=1e-9)
        sizes = comms.sizes
        for i in range(3):
            assert sizes[comms.labels[i]] == 1


def test_similarity_graph_edges_and_weights():
    rng = np.random.default_rng(4)
    n = 20
    s = rng.uniform(-0.5, 1.0, (n, n))
    s = np.triu(s, 1)
    s = s + s.T
    s[2, 3] = s[3, 2] = 0.5  # exactly at sigma: an edge
    for sigma in (0.5, 0.0, -0.2):  # a negative sigma must still give only positive weights
        g = weighted_graph(torch.from_numpy(s), sigma)
        expected = {(j, k): s[j, k] for j in range(n) for k in range(j + 1, n) if s[j, k] >= sigma and s[j, k] > 0}
        got = {tuple(sorted(e.tuple)): w for e, w in zip(g.es, g.es["weight"])}
        assert g.vcount() == n and not g.is_directed()
        assert set(got) == set(expected)
        for key, w in got.items():
            assert w == pytest.approx(expected[key], abs=0) and w > 0
        mask = graph_mask(torch.from_numpy(s), sigma, None).numpy()  # what GSA aligns to on the graph
        assert {(j, k) for j, k in zip(*np.nonzero(mask)) if j < k} == set(expected)
        assert (mask == mask.T).all() and not mask.diagonal().any()


def test_detect_empty_graph():
    sim = torch.full((6, 6), 0.1)
    comms = detect(sim, sigma=0.5, method="leidenalg", resolution=1.0, seed=0)
    assert comms.edges == 0 and comms.modularity == 0.0
    assert comms.labels.tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("method", ["igraph", "leidenalg", "leidenalg_rb"])
def test_detect_seeded_on_structureless_graph(method):
    """Without planted structure the partition depends on the seed: the same seed must reproduce it,
    whatever ran in between (no hidden global RNG state), and other seeds must be able to differ."""
    rng = np.random.default_rng(5)
    s = np.triu(rng.uniform(0.0, 1.0, (80, 80)), 1)
    sim = torch.from_numpy(s + s.T)
    first = detect(sim, sigma=0.5, method=method, resolution=1.0, seed=0).labels
    others = [detect(sim, sigma=0.5, method=method, resolution=1.0, seed=k).labels for k in range(1, 6)]
    torch.rand(3)
    np.random.rand(3)
    again = detect(sim, sigma=0.5, method=method, resolution=1.0, seed=0).labels
    assert np.array_equal(first, again)
    assert any(not np.array_equal(first, o) for o in others)  # the seed matters here (test is sensitive)


def test_knn_graph_joins_each_item_to_its_k_most_similar():
    """`ablation.graph=knn`: the edge set is the union over items of their k largest positive entries (brute force)."""
    rng = np.random.default_rng(11)
    m, k = 15, 3
    s = rng.uniform(-0.5, 1.0, (m, m))
    s = (s + s.T) / 2
    np.fill_diagonal(s, 0.0)
    expected = set()
    for j in range(m):
        order = [i for i in np.argsort(-s[j]) if i != j][:k]
        expected |= {(min(j, i), max(j, i)) for i in order if s[j, i] > 0}
    g = weighted_graph(torch.from_numpy(s), 0.5, knn=k)
    got = {tuple(sorted(e.tuple)) for e in g.es}
    assert got == expected and g.vcount() == m
    mask = graph_mask(torch.from_numpy(s), 0.5, k).numpy()
    assert {(j, i) for j, i in zip(*np.nonzero(mask)) if j < i} == expected and (mask == mask.T).all()
    for e, w in zip(g.es, g.es["weight"]):
        assert w == pytest.approx(s[e.tuple])
    comms = detect(torch.from_numpy(s), sigma=0.99, method="igraph", resolution=1.0, seed=0, knn=k)
    assert comms.edges == len(expected)  # the knn graph, not the (nearly empty) threshold graph


@pytest.mark.parametrize("block", [2048, 4])
def test_knn_graph_breaks_ties_to_the_lower_index(block):
    """With 2-bit values most entries tie: each item keeps, of equal values, the lower-indexed ones (a sort in
    plain Python on (-value, index)), whatever block of rows it is found in."""
    rng = np.random.default_rng(5)
    m, k = 23, 4
    s = np.round(rng.uniform(0, 1, (m, m)) * 3) / 3
    s = (s + s.T) / 2
    expected = set()
    for j in range(m):
        order = sorted((i for i in range(m) if i != j), key=lambda i: (-s[j, i], i))[:k]
        expected |= {(min(j, i), max(j, i)) for i in order if s[j, i] > 0}
    src, dst = knn_pairs(torch.from_numpy(s), k, block=block)
    assert set(zip(src.tolist(), dst.tolist())) == expected
    assert (src < dst).all()


@pytest.mark.parametrize("k", [1, 3, 7, 9])
def test_nearest_mask_is_the_head_of_a_stable_descending_sort(k):
    """Each row keeps exactly min(k, m) entries: those a stable sort in plain Python puts first."""
    rng = np.random.default_rng(k)
    scores = rng.integers(0, 3, (6, 7)).astype(np.float32)
    got = nearest_mask(torch.from_numpy(scores), k).numpy()
    for row, kept in zip(scores, got):
        head = sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]
        assert set(np.nonzero(kept)[0]) == set(head)


def test_a_rounds_community_statistics_count_the_labels_by_hand():
    """`communities`' round statistics against counts over the labels by loops: planted blocks of 15 and 5 items
    with no edge (5 singletons), and the ARI against an earlier partition by pair counting."""
    from src.server.global_similarity import communities

    blocks, _ = planted_blocks(4, 15, seed=0)
    sim = np.zeros((65, 65))
    sim[:60, :60] = blocks
    previous = np.random.default_rng(1).integers(0, 3, 65)
    comms, stats = communities(torch.from_numpy(sim).float(), 0.5, "igraph", 1.0, 0, torch.from_numpy(previous))
    sizes: dict[int, int] = {}
    for label in comms.labels.tolist():
        sizes[label] = sizes.get(label, 0) + 1
    assert stats["community/count"] == len(sizes) >= 4 + 5
    assert stats["community/largest"] == max(sizes.values()) >= 15
    assert stats["community/singletons"] == sum(1 for n in sizes.values() if n == 1) >= 5
    assert stats["community/non_singleton"] == sum(1 for n in sizes.values() if n > 1) >= 4
    assert stats["community/ari_prev"] == pytest.approx(brute_ari(previous, comms.labels), abs=1e-12)
    adj = np_adjacency(sim, 0.5)
    assert stats["community/modularity"] == pytest.approx(np_modularity(adj, comms.labels), abs=1e-9)
    assert stats["community/edges"] == int((adj > 0).sum()) // 2
