"""Client similarity and the thresholded upload, and the server's blocked aggregation (METHOD.md sections 1, 3).

Every expectation is computed independently (numpy or plain loops in `tests/alignment_helpers.py`),
never with the function under test. Tables are stacked over clients: [C, m, d].
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from alignment_helpers import (
    F64,
    gen,
    min_gap_to,
    np_cosine,
    np_normalise,
    np_upload,
    random_orthogonal,
    tables,
)
from uploads import Uploads

from src.alignment.similarity import normalised, similarity, thresholded_upload


# ============================================================================ 1. similarity
@pytest.mark.parametrize("centre", [False, True])
def test_similarity_matches_numpy_cosine(centre):
    t = tables(3, 12, 5, seed=0)
    s = similarity(t, centre)
    assert s.shape == (3, 12, 12)
    for c in range(3):
        np.testing.assert_allclose(s[c].numpy(), np_cosine(t[c].numpy(), centre), atol=1e-12)
    np.testing.assert_allclose(torch.diagonal(s, dim1=1, dim2=2).numpy(), 1.0, atol=1e-12)
    e = normalised(t, centre)
    np.testing.assert_allclose(e.norm(dim=-1).numpy(), 1.0, atol=1e-12)
    if centre:
        # each row: item-centred (optional), then unit length
        np.testing.assert_allclose(e[0].numpy(), np_normalise(t[0].numpy(), True), atol=1e-12)


@pytest.mark.parametrize("centre", [False, True])
def test_similarity_invariant_to_rotation_and_positive_scale(centre):
    t = tables(4, 20, 6, seed=1)
    s = similarity(t, centre)
    q = random_orthogonal(6, gen(2))
    np.testing.assert_allclose((q.T @ q).numpy(), np.eye(6), atol=1e-12)
    assert not torch.allclose(t @ q, t)
    np.testing.assert_allclose(similarity(t @ q, centre).numpy(), s.numpy(), atol=1e-12)
    # one scale per client, and one shared scale
    scale = torch.tensor([0.01, 0.7, 3.0, 250.0], dtype=F64).view(4, 1, 1)
    np.testing.assert_allclose(similarity(scale * t, centre).numpy(), s.numpy(), atol=1e-12)
    np.testing.assert_allclose(similarity(42.0 * t, centre).numpy(), s.numpy(), atol=1e-12)
    # rotation and scaling together
    np.testing.assert_allclose(similarity(scale * (t @ q), centre).numpy(), s.numpy(), atol=1e-12)


def test_similarity_translation_invariant_only_when_centred():
    t = tables(3, 16, 4, seed=3)
    shift = torch.randn(3, 1, 4, generator=gen(4), dtype=F64) * 3.0  # one row vector per client
    np.testing.assert_allclose(similarity(t + shift, True).numpy(), similarity(t, True).numpy(), atol=1e-12)
    # shared row vector, broadcast to every client and item
    row = torch.randn(4, generator=gen(5), dtype=F64) * 2.0
    np.testing.assert_allclose(similarity(t + row, True).numpy(), similarity(t, True).numpy(), atol=1e-12)
    # sanity: without centring a translation changes S
    diff = (similarity(t + shift, False) - similarity(t, False)).abs().max()
    assert diff > 1e-2


# ============================================================================ 2. upload + aggregation
def test_thresholded_upload_elementwise():
    sigma = 0.4
    sim = similarity(tables(3, 14, 4, seed=6), True)
    sim[0, 2, 5] = sim[0, 5, 2] = sigma  # exactly at the threshold: kept
    sim[1, 3, 7] = sim[1, 7, 3] = sigma - 1e-9  # just below: dropped
    up = thresholded_upload(sim, sigma)
    assert up.shape == sim.shape and up.dtype == sim.dtype
    for c in range(3):
        expected = np_upload(sim[c].numpy(), sigma)
        np.testing.assert_array_equal(up[c].numpy(), expected)
        assert np.all(np.diag(up[c].numpy()) == 0)
    assert up[0, 2, 5] == sigma and up[1, 3, 7] == 0
    s, u = sim.numpy(), up.numpy()
    off = ~np.eye(14, dtype=bool)[None].repeat(3, 0)
    assert np.all(u[(s < sigma)] == 0)
    assert np.array_equal(u[(s >= sigma) & off], s[(s >= sigma) & off])
    # negative similarities are always below a non-negative sigma
    assert np.all(u >= 0)


def np_aggregate(tabs: np.ndarray, uploaded: np.ndarray, sigma: float, centre: bool):
    """Plain loop: cosine, threshold, zero diagonal, average over the clients that uploaded."""
    m = tabs.shape[1]
    total, count, nnz = np.zeros((m, m)), 0, 0
    for c in range(tabs.shape[0]):
        if not uploaded[c]:
            continue
        up = np_upload(np_cosine(tabs[c], centre), sigma)
        total += up
        nnz += int((up != 0).sum())
        count += 1
    return (total / count if count else None), count, nnz


@pytest.mark.parametrize("sigma", [0.5, -0.2])
@pytest.mark.parametrize("centre", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_similarity_aggregator_matches_per_client_loop(centre, dtype, sigma):
    c, m, d = 7, 15, 4
    tabs = tables(c, m, d, seed=7, dtype=dtype)
    uploaded = torch.tensor([True, False, True, True, False, True, True])
    cos = np.stack([np_cosine(t, centre) for t in tabs.double().numpy()])
    assert min_gap_to(cos, sigma) > 1e-5  # no entry near the threshold: fp32 rounding cannot flip one
    expected, count, nnz = np_aggregate(tabs.double().numpy(), uploaded.numpy(), sigma, centre)
    agg = Uploads(m, sigma, centre, block=40, rows=4)
    agg.add(tabs, uploaded)
    mean = agg.mean()
    assert mean is not None and mean.shape == (m, m) and mean.dtype == torch.float32
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    np.testing.assert_allclose(mean.double().numpy(), expected, atol=max(tol, 1e-7))
    assert np.all(np.diag(mean.numpy()) == 0)
    assert agg.count == count == 5
    assert agg.nnz == nnz
    # every upload is symmetric, so is the mean
    np.testing.assert_array_equal(mean.numpy(), mean.numpy().T)


def test_similarity_aggregator_accumulates_over_calls_and_handles_nobody():
    c, m, d, sigma = 6, 12, 4, 0.5
    tabs = tables(c, m, d, seed=8)
    uploaded = torch.tensor([True, True, False, True, True, True])
    one = Uploads(m, sigma, True, block=80, rows=4)
    one.add(tabs, uploaded)
    two = Uploads(m, sigma, True, block=20, rows=4)
    two.add(tabs[:3], uploaded[:3])
    two.add(tabs[3:], uploaded[3:])
    expected, count, _ = np_aggregate(tabs.numpy(), uploaded.numpy(), sigma, True)
    np.testing.assert_allclose(two.mean().double().numpy(), expected, atol=1e-7)
    np.testing.assert_allclose(one.mean().double().numpy(), two.mean().double().numpy(), atol=1e-7)
    assert one.count == two.count == count == 5 and one.nnz == two.nnz
    nobody = Uploads(m, sigma, True, block=40, rows=4)
    assert nobody.mean() is None
    nobody.add(tabs, torch.zeros(c, dtype=torch.bool))
    assert nobody.mean() is None and nobody.count == 0 and nobody.nnz == 0


def test_support_mean_averages_each_pair_over_the_uploads_that_hold_it():
    """`ablation.aggregate=support_mean`: sum of the uploads / number of uploads holding the pair (0 where none),
    by a plain loop; decoded entries (Flower) and released blocks (simulator) count the same support."""
    from src.server.global_similarity import SimilaritySum

    c, m, d, sigma = 6, 14, 4, 0.4
    tabs = tables(c, m, d, seed=71)
    ups = [np_upload(np_cosine(t, True), sigma) for t in tabs.numpy()]
    total, held = np.sum(ups, axis=0), np.sum([u != 0 for u in ups], axis=0)
    expected = np.where(held > 0, total / np.maximum(held, 1), 0.0)
    blocks = Uploads(m, sigma, True, block=40, rows=4)
    blocks.sums.sims = SimilaritySum(m, support=True)
    blocks.add(tabs, torch.ones(c, dtype=torch.bool))
    np.testing.assert_allclose(blocks.sums.sims.support_mean().double().numpy(), expected, atol=1e-6)
    decoded = SimilaritySum(m, support=True)
    for u in ups:
        rows, cols = np.nonzero(np.triu(u, 1))
        decoded.add_entries(torch.from_numpy(rows), torch.from_numpy(cols), torch.from_numpy(u[rows, cols]))
    decoded.count = c
    np.testing.assert_allclose(decoded.support_mean().double().numpy(), expected, atol=1e-6)
    assert held.max() > 1 and (held == 1).any()  # both averaging cases occur
