"""Evaluation negatives and training-negative pools of the paper and clean protocols."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from src.clients.streams import ClientStream
from src.data.protocols import (
    TRAIN_NEGATIVE_POOLS,
    NegativeSampler,
    draw_eval_negatives,
    excluded_for_training,
)


def draws(users: torch.Tensor, seed: int = 0) -> tuple[ClientStream, torch.Tensor]:
    """A stream and distinct positions for every entry of `users`."""
    return ClientStream(seed, 1, "test"), torch.arange(users.numel()).reshape(users.shape)


def random_interactions(n_users: int, n_items: int, density: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((n_users, n_items)) < density


@pytest.mark.parametrize("chunk", [7, 1024])
def test_eval_negatives_distinct_and_never_interacted(chunk: int):
    interacted = random_interactions(50, 80, 0.4, seed=1)
    interacted[:, :5] = True  # items everyone has seen
    count = 20
    neg = draw_eval_negatives(interacted, count, seed=3, chunk=chunk)
    assert neg.shape == (50, count)
    for u in range(50):
        row = neg[u].tolist()
        assert len(set(row)) == count, f"user {u}: repeated negatives"
        assert all(0 <= i < 80 for i in row)
        assert not any(interacted[u, i] for i in row), f"user {u}: an interacted item was drawn"


def test_eval_negatives_can_take_every_available_item():
    interacted = np.zeros((3, 10), dtype=bool)
    interacted[:, :4] = True
    neg = draw_eval_negatives(interacted, 6, seed=0)
    for row in neg:
        assert sorted(row.tolist()) == [4, 5, 6, 7, 8, 9]


def test_eval_negatives_too_few_items_is_an_error():
    interacted = np.zeros((4, 10), dtype=bool)
    interacted[2, :8] = True
    with pytest.raises(ValueError, match="user index 2"):
        draw_eval_negatives(interacted, 3, seed=0)


def test_eval_negatives_fixed_by_seed():
    interacted = random_interactions(30, 60, 0.3, seed=5)
    a = draw_eval_negatives(interacted, 10, seed=11)
    b = draw_eval_negatives(interacted, 10, seed=11)
    c = draw_eval_negatives(interacted, 10, seed=12)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


def test_eval_negatives_roughly_uniform_over_allowed_items():
    n_users, n_items, count = 3000, 50, 5
    interacted = np.zeros((n_users, n_items), dtype=bool)
    interacted[:, :10] = True
    neg = draw_eval_negatives(interacted, count, seed=0, chunk=512)
    allowed = np.arange(10, 50)
    all_counts = np.bincount(neg.ravel(), minlength=n_items)
    assert all_counts[:10].sum() == 0
    # 40 cells, expected 375 each; 39 degrees of freedom: mean 39, sd ~8.8 -> 100 is very loose
    assert chi_square(all_counts[allowed]) < 100
    # the order is random too: the first position alone is uniform over the allowed items
    first = np.bincount(neg[:, 0], minlength=n_items)[allowed]
    assert chi_square(first) < 100


def test_negative_sampler_never_returns_excluded_and_covers_the_rest():
    excluded = random_interactions(20, 40, 0.6, seed=2)
    excluded[:, 0] = False  # nobody is left without an item
    sampler = NegativeSampler(excluded)
    users = torch.arange(20).repeat_interleave(500).reshape(100, 100)
    items = sampler.sample(users, *draws(users))
    assert items.shape == users.shape
    u, i = users.reshape(-1).numpy(), items.reshape(-1).numpy()
    assert not excluded[u, i].any()
    for user in range(20):
        drawn = set(i[u == user].tolist())
        assert drawn == set(np.flatnonzero(~excluded[user]).tolist())  # 500 draws cover <= 40 items


def test_negative_sampler_rejects_user_without_items():
    excluded = np.zeros((3, 5), dtype=bool)
    excluded[1] = True
    with pytest.raises(ValueError):
        NegativeSampler(excluded)


@pytest.fixture
def toy_split():
    """5 users, 30 items: training positives, one val and one test item, and 6 eval negatives each."""
    rng = np.random.default_rng(0)
    n_users, n_items = 5, 30
    train = np.zeros((n_users, n_items), dtype=bool)
    val = np.empty(n_users, dtype=np.int64)
    test = np.empty(n_users, dtype=np.int64)
    for u in range(n_users):
        perm = rng.permutation(n_items)
        train[u, perm[:6]] = True
        val[u], test[u] = perm[6], perm[7]
    interacted = train.copy()
    interacted[np.arange(n_users), val] = True
    interacted[np.arange(n_users), test] = True
    negatives = draw_eval_negatives(interacted, 6, seed=1)
    return train, interacted, val, test, negatives


def test_paper_pool_excludes_held_out_items(toy_split):
    train, interacted, val, test, negatives = toy_split
    excl = excluded_for_training("non_interacted", train, interacted, negatives)
    for u in range(len(val)):
        assert excl[u, val[u]] and excl[u, test[u]]
        assert excl[u, train[u]].all()
        assert not excl[u, negatives[u]].any()  # the leak: eval negatives stay drawable
    assert excl.sum() == interacted.sum()
    sampler = NegativeSampler(excl)
    users = torch.arange(5).repeat_interleave(2000)
    items = sampler.sample(users, *draws(users)).numpy()
    u = users.numpy()
    assert not np.any(items == val[u]) and not np.any(items == test[u])


def test_clean_pool_allows_held_out_items(toy_split):
    train, interacted, val, test, negatives = toy_split
    excl = excluded_for_training("non_train", train, interacted, negatives)
    assert np.array_equal(excl, train)
    for u in range(len(val)):
        assert not excl[u, val[u]] and not excl[u, test[u]]
    sampler = NegativeSampler(excl)
    users = torch.arange(5).repeat_interleave(2000)
    items = sampler.sample(users, *draws(users)).numpy()
    u = users.numpy()
    assert not train[u, items].any()
    for user in range(5):
        drawn = items[u == user]
        # 24 allowed items, 2000 draws: each held-out item is drawn ~83 times
        assert (drawn == test[user]).sum() > 20, "held-out test item never drawn as a training negative"
        assert (drawn == val[user]).sum() > 20, "held-out val item never drawn as a training negative"


def test_non_train_non_candidates_pool_excludes_every_candidate(toy_split):
    train, interacted, val, test, negatives = toy_split
    excl = excluded_for_training("non_train_non_candidates", train, interacted, negatives)
    for u in range(len(val)):
        assert excl[u, train[u]].all()
        assert excl[u, val[u]] and excl[u, test[u]]
        assert excl[u, negatives[u]].all()
        expected = set(np.flatnonzero(train[u])) | {val[u], test[u]} | set(negatives[u].tolist())
        assert set(np.flatnonzero(excl[u]).tolist()) == expected
    sampler = NegativeSampler(excl)
    users = torch.arange(5).repeat_interleave(500)
    items = sampler.sample(users, *draws(users)).numpy()
    assert not excl[users.numpy(), items].any()


def test_excluded_for_training_inputs_not_modified_and_unknown_pool(toy_split):
    train, interacted, val, test, negatives = toy_split
    before = (train.copy(), interacted.copy())
    for pool in TRAIN_NEGATIVE_POOLS:
        excluded_for_training(pool, train, interacted, negatives)[:] = True
    assert np.array_equal(train, before[0]) and np.array_equal(interacted, before[1])
    with pytest.raises(ValueError, match="non_interacted"):
        excluded_for_training("everything", train, interacted, negatives)


def test_synthetic_build_under_clean_protocol_leaves_held_out_items_drawable(compose_cfg):
    """End to end on the synthetic dataset: clean pool allows held-out items, paper pool forbids them."""
    from src.data.dataset import build

    cfg = compose_cfg(["dataset=synthetic"])  # 300 items, 20 per user: room for 2 x 99 negatives
    data = build(cfg.dataset, cfg.protocol, cfg.seed, cfg.data.root, cfg.data.cache_dir)
    train = np.zeros((data.n_users, data.n_items), dtype=bool)
    for u in range(data.n_users):
        train[u, data.train_items[data.train_ptr[u] : data.train_ptr[u + 1]]] = True
    interacted = train.copy()
    rows = np.arange(data.n_users)
    interacted[rows, data.val_items] = True
    interacted[rows, data.test_items] = True
    cands = np.concatenate([data.val_negatives, data.test_negatives], axis=1)
    assert not interacted[rows[:, None], cands].any()

    clean = excluded_for_training(cfg.protocol.train_negative_pool, train, interacted, cands)
    paper = excluded_for_training("non_interacted", train, interacted, cands)
    assert not clean[rows, data.test_items].any() and paper[rows, data.test_items].all()
    users = torch.arange(data.n_users).repeat_interleave(400)
    items = NegativeSampler(clean).sample(users, *draws(users)).numpy()
    hit_test = items == data.test_items[users.numpy()]
    assert hit_test.any()


@pytest.mark.parametrize("protocol", ["clean", "paper"])
def test_synthetic_dataset_builds_with_default_protocols(compose_cfg, protocol):
    from src.data.dataset import build

    cfg = compose_cfg(["dataset=synthetic", f"protocol={protocol}"])
    data = build(cfg.dataset, cfg.protocol, cfg.seed, cfg.data.root, cfg.data.cache_dir)
    assert data.val_negatives.shape == (data.n_users, 99)
