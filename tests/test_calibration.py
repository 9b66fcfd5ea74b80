"""Calibration baselines against brute-force computations written with numpy loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from src.methods.calibration import ItemKNNScorer, PopularityScorer, knn_similarity


def tiny_data(compose_cfg):
    from src.data.dataset import load

    return load(compose_cfg(["dataset=synthetic", "dataset.n_users=30", "dataset.n_items=300"]))


def test_popularity_counts_training_positives(compose_cfg):
    data = tiny_data(compose_cfg)
    scorer = PopularityScorer(data, torch.device("cpu"))
    counts = np.zeros(data.n_items)
    for u in range(data.n_users):
        for i in data.train_items[data.train_ptr[u] : data.train_ptr[u + 1]]:
            counts[i] += 1
    items = torch.tensor([[0, 5, 7], [1, 2, 3]])
    assert np.array_equal(scorer.score(torch.tensor([0, 1]), items).numpy(), counts[items.numpy()])
    assert np.array_equal(scorer.score(torch.tensor([4]), None)[0].numpy(), counts)


def brute_knn(x: np.ndarray, k: int) -> np.ndarray:
    """Dense top-k cosine neighbours per item, computed pair by pair."""
    m = x.shape[1]
    sim = np.zeros((m, m))
    for i in range(m):
        cos = np.full(m, -1.0)
        for j in range(m):
            if j != i:
                both = float((x[:, i] & x[:, j]).sum())
                cos[j] = both / max(np.sqrt(x[:, i].sum() * x[:, j].sum()), 1e-12)
        for j in np.argsort(-cos, kind="stable")[:k]:
            if cos[j] > 0:
                sim[i, j] = cos[j]
    return sim


def test_itemknn_matches_brute_force():
    rng = np.random.default_rng(1)
    x = rng.random((25, 17)) < 0.3
    k = 4
    got = knn_similarity(torch.from_numpy(x), k, block=5).to_dense().numpy()
    want = brute_knn(x, k)
    assert ((got > 0).sum(axis=1) <= k).all()
    # the kept entries, row by row: where the k-th and the (k+1)-th cosine differ, exactly the brute force's
    # neighbours; where they tie (float rounding may order equal cosines either way), the same values, each kept
    # neighbour among the items at or above the k-th cosine
    clear = 0
    for i in range(x.shape[1]):
        cos = np.array([(x[:, i] & x[:, j]).sum() / np.sqrt(x[:, i].sum() * x[:, j].sum()) for j in range(x.shape[1])])
        cos[i] = -1.0
        ordered = np.sort(cos)[::-1]
        if ordered[k - 1] - ordered[k] > 1e-6:
            assert np.allclose(got[i], want[i], atol=1e-6)
            clear += 1
        else:
            assert np.allclose(np.sort(got[i]), np.sort(want[i]), atol=1e-6)
            assert (cos[got[i] > 0] >= ordered[k - 1] - 1e-6).all()
    assert clear >= 5  # the data leaves rows without a tie at the k-th neighbour, so positions are checked


def test_itemknn_scores_sum_neighbours_of_the_users_items(compose_cfg):
    data = tiny_data(compose_cfg)
    scorer = ItemKNNScorer.pooled(data, 10, torch.device("cpu"))
    sim = scorer.sim.to_dense().numpy()
    train = data.train_matrix()
    rows = torch.tensor([0, 3, 7])
    full = scorer.score(rows, None).numpy()
    for r, u in enumerate(rows.tolist()):
        want = np.array([sum(sim[i, j] for j in np.flatnonzero(train[u])) for i in range(data.n_items)])
        assert np.allclose(full[r], want, atol=1e-5)
    items = torch.tensor([[1, 2], [3, 4], [5, 6]])
    assert np.allclose(scorer.score(rows, items).numpy(), np.take_along_axis(full, items.numpy(), 1))


def numpy_hit_ndcg(scores: np.ndarray, target: np.ndarray, negatives: np.ndarray, margin: float) -> tuple[float, float]:
    """hit@10 and ndcg@10 of each user's held-out item among its negatives, scores [users, m] written out: a
    negative counts against the item when it scores at least the item's score minus `margin` (margin > 0: float
    rounding resolved against the item, < 0: for it)."""
    hits, gains = [], []
    for u in range(len(target)):
        rank = 1 + int((scores[u, negatives[u]] >= scores[u, target[u]] - margin).sum())
        hits.append(rank <= 10)
        gains.append(1 / np.log2(1 + rank) if rank <= 10 else 0.0)
    return float(np.mean(hits)), float(np.mean(gains))


def test_scorer_ablations_score_what_numpy_scores(compose_cfg, tmp_path):
    """The pooled scorers run end to end (one round, test metrics at the best round) and their test hit@10 and
    ndcg@10 are those of the same scores computed with numpy: training popularity counts, and the sums of the
    brute-force item-kNN neighbours over a user's training items (ties resolved either way bound the figure)."""
    from src.cli.train import train
    from src.data.dataset import load

    overrides = ["dataset=synthetic", "dataset.n_users=30", "dataset.n_items=300", "fl.rounds=1"]
    data = load(compose_cfg(overrides))
    x = data.train_matrix().astype(bool)
    target, negatives = np.asarray(data.test_items), np.asarray(data.test_negatives)
    for name in ("popularity", "itemknn"):
        cfg = compose_cfg([*overrides, f"ablation={name}"])
        got = train(cfg, tmp_path / name, progress=False)["test_at_best"]
        if name == "popularity":
            scores = np.tile(x.sum(axis=0).astype(float), (len(x), 1))
            want = numpy_hit_ndcg(scores, target, negatives, 0.0)
            assert (got["test/hit@10"], got["test/ndcg@10"]) == pytest.approx(want, abs=1e-12)
            continue
        sim = brute_knn(x, int(cfg.ablation.k))
        scores = x.astype(float) @ sim.T  # score(u, i) = sum over j in train(u) of S_k[i, j]
        low = numpy_hit_ndcg(scores, target, negatives, 1e-5)
        high = numpy_hit_ndcg(scores, target, negatives, -1e-5)
        assert low[0] - 1e-12 <= got["test/hit@10"] <= high[0] + 1e-12
        assert low[1] - 1e-12 <= got["test/ndcg@10"] <= high[1] + 1e-12
        assert high[0] - low[0] < 0.2  # the bound is tight enough to mean something
