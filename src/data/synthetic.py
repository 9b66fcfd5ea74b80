"""A small synthetic dataset with planted item communities, for unit tests only."""

from __future__ import annotations

import numpy as np

from src.data.raw import RawRatings


def planted_communities(
    n_users: int, n_items: int, n_communities: int, per_user: int, affinity: float, seed: int
) -> tuple[RawRatings, np.ndarray]:
    """Each user likes one community and draws a share `affinity` of its items from it.

    Returns the ratings (random time order) and the planted community of every item.
    """
    import pandas as pd

    rng = np.random.default_rng(seed)
    community = np.arange(n_items) % n_communities
    members = [np.flatnonzero(community == c) for c in range(n_communities)]
    users, items = [], []
    for u in range(n_users):
        liked = members[u % n_communities]
        n_in = min(len(liked), int(round(per_user * affinity)))
        inside = rng.choice(liked, n_in, replace=False)
        others = np.setdiff1d(np.arange(n_items), liked)
        outside = rng.choice(others, per_user - n_in, replace=False)
        chosen = np.concatenate([inside, outside])
        users.append(np.full(len(chosen), u))
        items.append(chosen)
    frame = pd.DataFrame({"user": np.concatenate(users), "item": np.concatenate(items)})
    frame = frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    frame["time"] = rng.integers(0, 10**6, len(frame))
    frame["row"] = np.arange(len(frame))
    return RawRatings(frame, folder=None, files=[], notes=["synthetic data with planted communities"]), community
