"""A split written by hand (`FedData` from per-user lists), for tests that check counts and ranks against it."""

from __future__ import annotations

import numpy as np

from src.data.dataset import FedData


def hand_split(
    n_items: int,
    train: list,
    val: list,
    test: list,
    val_negatives: list,
    test_negatives: list,
    protocol: str = "clean",
) -> FedData:
    """User u trains on `train[u]` (item ids) and holds out `val[u]` and `test[u]`, each ranked among its negatives."""
    sizes = [len(items) for items in train]
    return FedData(
        name="hand",
        protocol=protocol,
        seed=0,
        n_users=len(train),
        n_items=n_items,
        train_ptr=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        train_items=np.concatenate([np.asarray(items, dtype=np.int64) for items in train]),
        val_items=np.asarray(val),
        test_items=np.asarray(test),
        val_negatives=np.asarray(val_negatives),
        test_negatives=np.asarray(test_negatives),
        folder="",
        exact=True,
    )
