"""`compute.compile=true`: the compiled kernels against the eager ones on real tables (after a round of a
real-data subset): uploads with exactly the same pairs and entry counts, sums within 1e-6 relative; the fused
alignment's values and gradient within float rounding."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from alignment_helpers import gen
from conftest import requires_real_data
from test_fast_grad import module_after

from src.alignment.release import ReleaseSpec, release_blocks, tiles
from src.server.global_similarity import SimilaritySum


def summed(tables: torch.Tensor, spec: ReleaseSpec) -> tuple[SimilaritySum, torch.Tensor]:
    """The server's sum of these clients' uploads (with support counts) and each client's entry count."""
    sums = SimilaritySum(tables.shape[1], support=True)
    count = torch.zeros(tables.shape[0], dtype=torch.long)
    for blk in release_blocks(tables, spec, held=True):
        sums.add_block(blk)
        count[blk.first : blk.first + len(blk.count)] += blk.count
    return sums, count


@requires_real_data
@pytest.mark.parametrize("dataset", ["ml-100k", pytest.param("lastfm-2k", marks=pytest.mark.slow)])
def test_compiled_upload_sums_keep_the_same_pairs(compose_cfg, dataset, one_thread):
    module = module_after(compose_cfg, dataset, 1, [])
    tables = module.state["items"]
    eager = ReleaseSpec(0.5, True, block=1 << 20)
    (s1, n1), (s2, n2) = summed(tables, eager), summed(tables, dataclasses.replace(eager, compile=True))
    assert int(n1.sum()) > 0  # real uploads, not empty ones
    assert torch.equal(n2, n1) and torch.equal(s2.support, s1.support)
    assert torch.equal(s2.upper != 0, s1.upper != 0)
    torch.testing.assert_close(s2.upper, s1.upper, rtol=1e-6, atol=1e-6)  # fp32 sums in another order


@requires_real_data
def test_compiled_fused_alignment_matches_eager(compose_cfg, one_thread):
    module = module_after(compose_cfg, "ml-100k", 1, [])
    loss, b = module.method.loss, module.broadcast
    t = module.state["items"][:6].clone()
    m = t.shape[1]
    anchors = torch.stack([torch.randperm(m, generator=gen(95 + i))[:64] for i in range(6)])
    valid = torch.ones(6, 64, dtype=torch.bool)
    valid[2, 40:] = False
    eager = dataclasses.replace(loss, fast_kernel="fused", compile=False, fast_block=3 * 64 * m, native_threads=0)
    v1, g1 = eager.value_and_grad(t, anchors, valid, b)
    for block in (3 * 64 * m, 2 * 64 * m):  # sub-chunks of 3, then 2 and 2 and 2 clients: shapes change
        v2, g2 = dataclasses.replace(eager, compile=True, fast_block=block).value_and_grad(t, anchors, valid, b)
        for key in v1:
            torch.testing.assert_close(v2[key], v1[key], rtol=1e-5, atol=1e-7)
        assert (g2 - g1).abs().max() <= 1e-5 * g1.abs().max()


def test_compiling_applies_on_the_cpu_only(compose_cfg):
    """`compute.compile` is measured on the CPU only: another device keeps the eager kernels."""
    from src.methods.base import build_method

    cfg = compose_cfg(["dataset=synthetic", "compute.compile=true"])
    on_cpu, on_gpu = build_method(cfg, torch.device("cpu")), build_method(cfg, torch.device("cuda"))
    assert on_cpu.loss.compile and on_cpu.spec.compile
    assert not on_gpu.loss.compile and not on_gpu.spec.compile


@pytest.mark.parametrize("m,rows,cols", [(1, 128, None), (5, 2, None), (300, 128, None), (300, 128, 64), (70, 16, 7)])
def test_tiles_cover_each_row_blocks_columns_once(m, rows, cols):
    """`release.tiles` (both the eager and the compiled sums walk it): every entry (i, j) with j at or right of
    the start of i's row block exactly once, and a block of clients within `block` elements unless it is one."""
    block = 5000
    seen = np.zeros((m, m), dtype=int)
    for r0, b, c0, w, per in tiles(m, rows, cols, block):
        seen[r0 : r0 + b, c0 : c0 + w] += 1
        assert per == 1 or per * b * w <= block
    want = np.array([[int(j >= (i // rows) * rows) for j in range(m)] for i in range(m)])
    np.testing.assert_array_equal(seen, want)
