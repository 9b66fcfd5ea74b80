"""The co-occurrence bound against a brute-force count over every item pair."""

from __future__ import annotations

import itertools

import numpy as np

from src.analysis.cooccurrence import pair_shares


def test_pair_shares_match_brute_force():
    rng = np.random.default_rng(0)
    x = rng.random((37, 23)) < 0.35
    thresholds = (0.2, 0.1, 0.05)
    got = pair_shares(x, thresholds, block=5)  # blocks that do not divide the item count
    shares = [(x[:, j] & x[:, k]).mean() for j, k in itertools.combinations(range(x.shape[1]), 2)]
    assert abs(got["max_share"] - max(shares)) < 1e-6
    for t in thresholds:
        assert got[f"pairs>={t}"] == sum(s >= t - 1e-7 for s in shares)
