"""The co-occurrence bound against a brute-force count over every item pair."""

from __future__ import annotations

import itertools

import numpy as np

from src.analysis.cooccurrence import pair_shares


def test_pair_shares_match_brute_force():
    """40 users: a share k/40 lands exactly on each threshold (8, 4 and 2 holders), so "at or above" is tested;
    the brute force counts holders in integers."""
    rng = np.random.default_rng(0)
    x = rng.random((40, 23)) < 0.35
    thresholds = (0.2, 0.1, 0.05)
    got = pair_shares(x, thresholds, block=5)  # blocks that do not divide the item count
    holders = [int((x[:, j] & x[:, k]).sum()) for j, k in itertools.combinations(range(x.shape[1]), 2)]
    assert abs(got["max_share"] - max(holders) / 40) < 1e-6
    for t, count in zip(thresholds, (8, 4, 2), strict=True):
        assert any(h == count for h in holders)  # some pair sits on the threshold
        assert got[f"pairs>={t}"] == sum(h >= count for h in holders)
