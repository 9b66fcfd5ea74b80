"""`server.sim_screen=true`: the plain uploads' products screened in bfloat16, the entries near sigma recomputed
in fp32. Against the fp32 computation: the same pairs, entry counts and support counts (but for a cosine
within 1e-6 of sigma, where fp32 rounding decides either way), sums within 1e-6, on real tables of every
dataset and on tables built to put many entries within 1e-3 of sigma."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from alignment_helpers import gen
from conftest import requires_real_data
from test_compiled import summed
from test_fast_grad import BIG, module_after

from src.alignment.release import ReleaseSpec
from src.alignment.similarity import normalised


def near_sigma_tables(clients: int, m: int, d: int, sigma: float, seed: int) -> torch.Tensor:
    """Tables [clients, m, d] whose consecutive items (2k, 2k + 1) have cosine sigma + u, u uniform in
    [-1e-3, 1e-3] (float64 construction, then float32), the rest random: the screen's hardest case."""
    rng = np.random.default_rng(seed)
    out = rng.standard_normal((clients, m, d))
    for c in range(clients):
        for k in range(0, m - 1, 2):
            a = out[c, k] / np.linalg.norm(out[c, k])
            o = out[c, k + 1] - (out[c, k + 1] @ a) * a
            o /= np.linalg.norm(o)
            cos = sigma + rng.uniform(-1e-3, 1e-3)
            out[c, k], out[c, k + 1] = a, cos * a + np.sqrt(1 - cos**2) * o
    return torch.from_numpy(out).float()


def assert_same_uploads(tables: torch.Tensor, sigma: float) -> torch.Tensor:
    """The screened sums against the fp32 ones; returns how many clients sent each pair [m, m] (upper).

    The same pairs, but where a client's cosine lies within 1e-6 of sigma (float64): there the fp32 product's
    rounding decides, and two fp32 computations may round either way (one entry of 1.4M on Lastfm-2k)."""
    fp32 = ReleaseSpec(sigma, False, block=1 << 16)
    (s1, n1), (s2, n2) = summed(tables, fp32), summed(tables, dataclasses.replace(fp32, screen=True))
    e = normalised(tables, False).double()
    moved = (s1.support != s2.support).nonzero().tolist()
    for i, j in moved:
        near = ((e[:, i] * e[:, j]).sum(-1) - sigma).abs() < 1e-6
        assert abs(int(s1.support[i, j]) - int(s2.support[i, j])) <= int(near.sum()) > 0, (i, j)
    assert int((n1 - n2).abs().sum()) <= len(moved) * tables.shape[0]
    same = torch.ones_like(s1.upper, dtype=torch.bool)
    for i, j in moved:
        same[i, j] = False
    assert torch.equal((s2.upper != 0) & same, (s1.upper != 0) & same)
    torch.testing.assert_close(s2.upper[same], s1.upper[same], rtol=1e-6, atol=1e-6)
    assert len(moved) <= 1e-5 * max(1, int((s1.support > 0).sum()))
    return s1.support


@pytest.mark.parametrize("sigma", [0.5, 0.3, 0.9])
def test_screen_keeps_the_pairs_next_to_sigma(sigma, one_thread):
    tables = near_sigma_tables(3, 300, 64, sigma, seed=int(sigma * 10))
    support = assert_same_uploads(tables, sigma)
    built = support[torch.arange(0, 300, 2), torch.arange(1, 300, 2)]
    assert 150 < int(built.sum()) < 300  # about half of the 3 x 150 built pairs pass sigma


def test_screen_on_random_tables_with_an_odd_width(one_thread):
    """Tiles whose entry count is not a multiple of the screen's group, and a client block of one."""
    tables = torch.randn(5, 203, 16, generator=gen(3)) + torch.randn(1, 203, 16, generator=gen(4))
    assert int(assert_same_uploads(tables, 0.5).sum()) > 0


@requires_real_data
@pytest.mark.parametrize("dataset", ["ml-100k", "filmtrust", *BIG])
def test_screen_keeps_the_same_pairs_on_real_tables(compose_cfg, dataset, one_thread):
    tables = module_after(compose_cfg, dataset, 1, []).state["items"]
    assert int(assert_same_uploads(tables, 0.5).sum()) > 0
