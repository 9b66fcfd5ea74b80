"""Ranks with ties counted against the held-out item, hit@K and ndcg@K, against hand values and loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hand_split import hand_split

from src.evaluation.metrics import full_ranks, rank_metrics, sampled_ranks


def brute_sampled_rank(pos: float, negs: list[float]) -> int:
    """1 + #negatives scoring above or equal to the positive."""
    return 1 + sum(1 for s in negs if s >= pos)


def brute_full_rank(row: list[float], target: int, exclude: list[bool]) -> int:
    """1 + #other items, not excluded, scoring above or equal to the target."""
    rank = 1
    for j, s in enumerate(row):
        if j == target or exclude[j]:
            continue
        if s >= row[target]:
            rank += 1
    return rank


def test_sampled_ranks_hand_values():
    pos = torch.tensor([0.5, 0.9, 0.1, 0.3])
    neg = torch.tensor(
        [
            [0.9, 0.5, 0.1],  # one above, one tie -> 3
            [0.1, 0.2, 0.3],  # none above -> 1
            [0.2, 0.3, 0.4],  # all above -> 4
            [0.3, 0.3, 0.3],
        ]
    )  # all tied -> 4 (ties against the positive)
    assert sampled_ranks(pos, neg).tolist() == [3, 1, 4, 4]


def test_full_ranks_hand_values():
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.9, 0.2], [0.1, 0.5, 0.5, 0.9, 0.2]])
    target = torch.tensor([1, 1])
    exclude = torch.tensor(
        [[False, False, False, False, False], [False, True, False, True, False]]
    )  # target excluded: still ranked
    # row 0: items 2 (tie) and 3 (above) count -> 3; row 1: item 3 excluded, 2 ties -> 2
    assert full_ranks(scores, target, exclude).tolist() == [3, 2]


def test_rank_metrics_hand_values():
    ranks = torch.tensor([1, 3, 10, 11])
    m = rank_metrics(ranks, ks=(1, 3, 10))
    assert m["hit@1"] == pytest.approx(1 / 4)
    assert m["hit@3"] == pytest.approx(2 / 4)
    assert m["hit@10"] == pytest.approx(3 / 4)
    assert m["ndcg@1"] == pytest.approx(1 / 4)
    assert m["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert m["ndcg@10"] == pytest.approx((1 + 0.5 + 1 / math.log2(11)) / 4)
    assert set(m) == {f"{k}@{c}" for k in ("hit", "ndcg") for c in (1, 3, 10)}


def test_rank_metrics_prefix_and_bad_cutoff():
    m = rank_metrics(torch.tensor([2]), ks=(5,), prefix="test_")
    assert m == {"test_hit@5": 1.0, "test_ndcg@5": pytest.approx(1 / math.log2(3))}
    with pytest.raises(ValueError, match="positive"):
        rank_metrics(torch.tensor([1]), ks=(0,))


def test_constant_scorer_ranks_positive_last_and_never_hits():
    n, k = 50, 99
    pos = torch.zeros(n)
    neg = torch.zeros(n, k)
    ranks = sampled_ranks(pos, neg)
    assert torch.all(ranks == k + 1)
    m = rank_metrics(ranks, ks=(1, 10, 20))
    assert m["hit@10"] == 0.0 and m["hit@1"] == 0.0 and m["ndcg@10"] == 0.0

    scores = torch.full((n, 300), 3.0)
    exclude = torch.zeros(n, 300, dtype=torch.bool)
    exclude[:, :40] = True
    target = torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(0))
    ranks = full_ranks(scores, target, exclude)
    expected = [300 - 40 + (1 if t < 40 else 0) for t in target.tolist()]  # all candidates tie
    assert ranks.tolist() == expected
    assert rank_metrics(ranks, ks=(10,))["hit@10"] == 0.0


def test_random_scorer_hits_top10_of_100_about_ten_percent():
    n = 20000
    g = torch.Generator().manual_seed(1234)
    pos = torch.rand(n, generator=g, dtype=torch.float64)
    neg = torch.rand(n, 99, generator=g, dtype=torch.float64)
    m = rank_metrics(sampled_ranks(pos, neg), ks=(10,))
    assert m["hit@10"] == pytest.approx(0.10, abs=0.01)
    # rank is uniform on 1..100, so E[ndcg@10] = sum_{r<=10} 1/log2(1+r) / 100
    expected_ndcg = sum(1 / math.log2(1 + r) for r in range(1, 11)) / 100
    assert m["ndcg@10"] == pytest.approx(expected_ndcg, abs=0.006)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_ranks_match_brute_force_with_ties(seed: int):
    rng = np.random.default_rng(seed)
    n, k = 200, 30
    pos = rng.integers(0, 5, n).astype(np.float32)
    neg = rng.integers(0, 5, (n, k)).astype(np.float32)  # few values -> many ties
    got = sampled_ranks(torch.from_numpy(pos), torch.from_numpy(neg)).tolist()
    want = [brute_sampled_rank(float(pos[i]), neg[i].tolist()) for i in range(n)]
    assert got == want


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_ranks_match_brute_force_with_ties_and_exclusions(seed: int):
    rng = np.random.default_rng(seed)
    n, m = 100, 60
    scores = rng.integers(0, 6, (n, m)).astype(np.float32)
    target = rng.integers(0, m, n)
    exclude = rng.random((n, m)) < 0.3
    exclude[: n // 4, :] |= np.eye(m, dtype=bool)[target[: n // 4]]  # some targets marked excluded
    got = full_ranks(torch.from_numpy(scores), torch.from_numpy(target), torch.from_numpy(exclude)).tolist()
    want = [brute_full_rank(scores[i].tolist(), int(target[i]), exclude[i].tolist()) for i in range(n)]
    assert got == want


def test_rank_metrics_match_brute_force():
    rng = np.random.default_rng(7)
    ranks = rng.integers(1, 101, 500)
    m = rank_metrics(torch.from_numpy(ranks), ks=(5, 10, 20))
    for k in (5, 10, 20):
        hit = sum(1 for r in ranks if r <= k) / len(ranks)
        ndcg = sum(1 / math.log2(1 + r) for r in ranks if r <= k) / len(ranks)
        assert m[f"hit@{k}"] == pytest.approx(hit)
        assert m[f"ndcg@{k}"] == pytest.approx(ndcg)


def test_a_nan_score_on_either_side_counts_against_the_held_out_item():
    """Hand values: a NaN positive ranks below every negative; a NaN negative ranks above the positive, as a tie
    does; the full ranking the same, excluded items aside."""
    nan = float("nan")
    pos = torch.tensor([nan, 0.5, 0.5, 0.5])
    neg = torch.tensor([[0.1, 0.2, 0.3], [nan, 0.1, 0.2], [0.5, 0.1, nan], [0.1, 0.2, 0.3]])
    assert sampled_ranks(pos, neg).tolist() == [4, 2, 3, 1]
    scores = torch.tensor([[nan, 0.1, 0.2, 0.3], [0.5, nan, 0.1, 0.9]])
    exclude = torch.tensor([[False, False, False, False], [False, False, False, True]])
    # user 0: its target (item 0) is NaN: last of 4; user 1: the NaN item 1 counts, the larger item 3 is excluded
    assert full_ranks(scores, torch.tensor([0, 0]), exclude).tolist() == [4, 2]


def test_the_evaluator_ranks_a_hand_built_split():
    """Two users, six items, fixed scores; ranks worked out by hand: sampled among each split's negatives, full
    among all items but the user's training items and the other split's held-out item (ties against the item)."""
    from src.evaluation.evaluator import Evaluator

    # user 0 trains on items 0, 1; user 1 on item 5
    data = hand_split(6, [[0, 1], [5]], [2, 0], [3, 1], [[4, 5], [2, 3]], [[4, 5], [3, 4]])
    scores = torch.tensor([[9.0, 8.0, 5.0, 7.0, 6.0, 1.0], [3.0, 2.0, 7.0, 1.0, 2.0, 9.0]])

    def score(rows: torch.Tensor, items: torch.Tensor | None) -> torch.Tensor:
        return scores[rows] if items is None else scores[rows].gather(1, items)

    evaluator = Evaluator(data, (1, 2), full_ranking=True)
    ranks = evaluator.ranks(score, [torch.tensor([0]), torch.tensor([1])])
    # user 0, val 2 (5): item 4 (6) above; full: 0, 1 trained, 3 (7) the test item, all left out -> 2
    # user 0, test 3 (7): first; full: 2 is the val item -> 1
    # user 1, val 0 (3): 2 (7) above; full: 5 (9) trained, 1 the test item -> 2
    # user 1, test 1 (2): item 4 ties (2) -> 2; full: 2 (7) above, 4 ties, 0 (3) is the val item -> 3
    assert {k: v.tolist() for k, v in ranks.items()} == {
        "val": [2, 2],
        "test": [1, 2],
        "val_full": [2, 2],
        "test_full": [1, 3],
    }
    metrics = evaluator.metrics(ranks)
    assert metrics["test/hit@1"] == 0.5 and metrics["test_full/ndcg@2"] == pytest.approx(0.5)


@pytest.mark.parametrize("ablation", ["backbone", "local"])
def test_a_runs_logged_metrics_are_each_clients_own_scores(compose_cfg, ablation):
    """The metrics a round logs, recomputed from every client's parameters after the round with a numpy forward
    pass and rank loops (ties against the held-out item), in cohorts smaller than the user count: a scorer that
    mixed clients up (another user's table, a rolled chunk) or candidate lists would differ."""
    from src.data.dataset import load
    from src.rounds.simulator import FederatedModule

    cfg = compose_cfg(["dataset=synthetic", f"ablation={ablation}", "optim=sgd", "protocol=clean", "fl.chunk_size=7"])
    data = load(cfg)
    module = FederatedModule(cfg, data)
    module.run_round()
    stats = module.run_round()
    p = {k: v.double().numpy() for k, v in module.state.items()}
    assert set(p) == {"items", "w0", "b0"}  # PFedRec's linear score on the item embedding
    train = data.train_matrix()
    want: dict[str, list[float]] = {k: [] for k in ("val/hit@10", "val/ndcg@10", "test/hit@10", "test/ndcg@10")}
    want |= {"test_full/hit@10": [], "test_full/ndcg@10": []}
    for u in range(data.n_users):
        logits = [float(p["items"][u, j] @ p["w0"][u, :, 0] + p["b0"][u, 0]) for j in range(data.n_items)]
        cases = {
            "val": brute_sampled_rank(logits[data.val_items[u]], [logits[j] for j in data.val_negatives[u]]),
            "test": brute_sampled_rank(logits[data.test_items[u]], [logits[j] for j in data.test_negatives[u]]),
        }
        exclude = [bool(train[u, j]) or j == data.val_items[u] for j in range(data.n_items)]
        cases["test_full"] = brute_full_rank(logits, int(data.test_items[u]), exclude)
        for split, rank in cases.items():
            want[f"{split}/hit@10"].append(float(rank <= 10))
            want[f"{split}/ndcg@10"].append(1 / math.log2(rank + 1) if rank <= 10 else 0.0)
    assert data.n_users > 2 * 7
    for key, values in want.items():
        assert stats[key] == pytest.approx(sum(values) / len(values), abs=1e-9), key
    assert 0 < stats["test/hit@10"] < 1
