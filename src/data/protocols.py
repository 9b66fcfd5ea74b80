"""Evaluation protocols: the saved evaluation negatives and the per-round training negative sampler.

`paper` reproduces the lineage: training negatives come from every item the user never
interacted with, so the held-out items are never drawn while their evaluation negatives are
(this leaks, see METHOD.md section 5). `clean` draws training negatives from everything that is
not a training positive, so nothing separates a held-out item from its evaluation negatives.
"""

from __future__ import annotations

import numpy as np
import torch

from src.clients.streams import ClientStream

TRAIN_NEGATIVE_POOLS = ("non_interacted", "non_train", "non_train_non_candidates")


def interaction_matrix(n_users: int, n_items: int, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Dense boolean user x item matrix with True at the given pairs."""
    mat = np.zeros((n_users, n_items), dtype=bool)
    mat[users, items] = True
    return mat


def all_interactions(
    n_users: int,
    n_items: int,
    train_users: np.ndarray,
    train_items: np.ndarray,
    val_items: np.ndarray,
    test_items: np.ndarray,
) -> np.ndarray:
    """Boolean [users, items]: training positives plus each user's validation and test item."""
    mat = interaction_matrix(n_users, n_items, train_users, train_items)
    rows = np.arange(n_users)
    mat[rows, val_items] = True
    mat[rows, test_items] = True
    return mat


class TooFewNegatives(ValueError):
    """A user has fewer never-interacted items (`available`) than the evaluation negatives asked for (`count`) and
    the items that must stay outside them."""

    def __init__(self, user: int, available: int, count: int, spare: int = 0) -> None:
        self.user, self.available, self.count = user, available, count
        super().__init__(
            f"user index {user} has only {available} never-interacted items; the protocol needs {count} evaluation "
            f"negatives" + (f" and {spare} more outside them" if spare else "")
        )


def check_available(available: np.ndarray, count: int, spare: int = 0) -> None:
    """Raise `TooFewNegatives` for the user with the fewest never-interacted items (`available` [users]) when it has
    fewer than the `count` evaluation negatives and the `spare` items that must stay outside them."""
    if available.min() < count + spare:
        raise TooFewNegatives(int(np.argmin(available)), int(available.min()), count, spare)


def draw_eval_negatives(interacted: np.ndarray, count: int, seed: int, chunk: int = 1024, spare: int = 0) -> np.ndarray:
    """Draw `count` distinct never-interacted items per user, uniformly, in a random order; `spare`: never-interacted
    items each user must keep outside them (a training-negative pool that excludes the candidates needs one).

    Random keys per (user, item), +inf on interacted items, the `count` smallest in key order:
    a uniform ordered sample without replacement, computed for all users at once.
    """
    n_users, n_items = interacted.shape
    check_available(n_items - interacted.sum(axis=1), count, spare)
    rng = np.random.default_rng(seed)
    out = np.empty((n_users, count), dtype=np.int64)
    for start in range(0, n_users, chunk):
        block = interacted[start : start + chunk]
        keys = rng.random(block.shape, dtype=np.float32)
        keys[block] = np.inf
        part = np.argpartition(keys, count - 1, axis=1)[:, :count]
        order = np.argsort(np.take_along_axis(keys, part, axis=1), axis=1)
        out[start : start + chunk] = np.take_along_axis(part, order, axis=1)
    return out


def excluded_for_training(pool: str, train: np.ndarray, interacted: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Boolean [users, items] matrix of items that must never be drawn as training negatives."""
    if pool == "non_interacted":
        return interacted.copy()
    if pool == "non_train":
        return train.copy()
    if pool == "non_train_non_candidates":
        excluded = interacted.copy()
        np.put_along_axis(excluded, candidates, True, axis=1)
        return excluded
    raise ValueError(f"protocol.train_negative_pool={pool!r}; expected one of {TRAIN_NEGATIVE_POOLS}")


class NegativeSampler:
    """Uniform training negatives per user from the items the protocol allows (rejection sampling)."""

    def __init__(self, excluded: np.ndarray):
        self.excluded = torch.as_tensor(excluded, dtype=torch.bool)
        self.n_items = excluded.shape[1]
        if bool((~self.excluded).sum(dim=1).min() == 0):
            raise ValueError("a user has no item left to draw as a training negative")

    def sample(self, users: torch.Tensor, stream: ClientStream, index: torch.Tensor) -> torch.Tensor:
        """One negative item per entry of `users` (any shape), drawn i.i.d. from that user's pool.

        Draw (u, i) comes from `stream` at position `index` (same shape: the draw's place among
        that user's draws), retried with the next attempt while it hits an excluded item, so a
        user's negatives do not depend on the other users sampled with it.
        """
        flat, pos = users.reshape(-1), index.reshape(-1)
        items = stream.randint(self.n_items, flat, pos)
        bad = self.excluded[flat, items]
        attempt = 0
        while bool(bad.any()):
            attempt += 1
            idx = bad.nonzero().squeeze(1)
            items[idx] = stream.randint(self.n_items, flat[idx], pos[idx], attempt)
            bad = torch.zeros_like(bad)
            bad[idx] = self.excluded[flat[idx], items[idx]]
        return items.reshape(users.shape)
