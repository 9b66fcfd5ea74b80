"""`compute.native`: the fast alignment's C kernel (src/alignment/native_align.py) against the torch fused kernel
run in float64 (itself checked against a per-anchor oracle in tests/test_fast_grad.py) on every mask, reduction,
term and edge of its tiles, and against the float32 torch path on real tables and over an aligning round."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from alignment_helpers import gen, random_global, tables
from conftest import requires_real_data
from loss_factory import make_loss
from test_fast_grad import BIG, module_after

from src.alignment import native_align
from src.alignment.broadcast import Broadcast
from src.runtime import native
from src.runtime.native import compiler

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C compiler on PATH")
KERNEL = native_align.kernel  # the build of any vector width (a test below patches `kernel` to one)
# the loss weights of the direct calls of the kernel (the cases through `make_loss` use its own)
HYPER = dict(alpha=1.0, beta=1.0, tau=0.5, tau0=0.5, centre=True, mask="local", reduction="mean")


def case(c=4, m=45, k=13, seed=80, sigma=0.3):
    """Width-32 tables (m not a multiple of 16, K of 8), a singleton community, repeated anchors, invalid
    (padding) anchors and a client with none."""
    t = tables(c, m, 32, seed=seed) + 2.0 * tables(1, m, 32, seed=seed + 9)  # shared structure: pairs above sigma
    labels = torch.randint(0, 3, (m,), generator=gen(seed + 1))
    labels[0] = 5
    b = Broadcast(labels, random_global(m, seed=seed + 2, sigma=sigma), sigma)
    anchors = torch.randint(0, m, (c, k), generator=gen(seed + 3))
    anchors[0, :3] = 0  # the singleton, three times
    valid = torch.rand(c, k, generator=gen(seed + 4)) > 0.25
    valid[1] = False
    return t, b, anchors, valid


def both(loss, t, anchors, valid, b):
    """(values, grad) of the torch fused kernel on float64 tables and of the C kernel on their float32 copy."""
    want = dataclasses.replace(loss, native_threads=0).value_and_grad(t, anchors, valid, b)
    got = dataclasses.replace(loss, native_threads=2).value_and_grad(t.float(), anchors, valid, b)
    return want, got


def close(want, got, tol=1e-5):
    (v1, g1), (v2, g2) = want, got
    assert set(v1) == set(v2)
    for key in v1:
        assert v2[key].dtype == torch.float32
        torch.testing.assert_close(v2[key].double(), v1[key], rtol=tol, atol=tol * v1[key].abs().max().item())
    assert (g2.double() - g1).abs().max() <= tol * g1.abs().max()


@pytest.mark.parametrize(
    "mask,reduction,terms,centre",
    list(itertools.product(["local", "global", "union"], ["mean", "sum"], ["both", "ica", "gsa"], [True, False])),
)
def test_native_alignment_equals_the_float64_fused_kernel(mask, reduction, terms, centre):
    t, b, anchors, valid = case()
    loss = make_loss(
        mode="fast",
        mask=mask,
        reduction=reduction,
        use_ica=terms != "gsa",
        use_gsa=terms != "ica",
        centre=centre,
        sigma=0.3,
        fast_anchors=anchors.shape[1],
    )
    want, got = both(loss, t, anchors, valid, b)
    assert set(want[0]) == ({"ica", "gsa"} if terms == "both" else {terms})
    assert want[1].abs().max() > 0
    close(want, got)


@pytest.mark.parametrize("lanes", [16, 8, 4])
@pytest.mark.parametrize("mask", ["local", "union"])
def test_every_vector_width_equals_the_float64_fused_kernel(lanes, mask, monkeypatch):
    """The kernel built for 16 (AVX-512), 8 (AVX2) and 4 lanes, whatever this CPU has: each register-tile shape
    and lane count gives the values and gradient of the float64 torch kernel (m = 45: a partial vector)."""
    monkeypatch.setattr(native_align, "kernel", lambda: KERNEL((f"VL={lanes}",)))
    t, b, anchors, valid = case(seed=83 + lanes)
    loss = make_loss(mode="fast", mask=mask, sigma=0.3, fast_anchors=anchors.shape[1])
    close(*both(loss, t, anchors, valid, b))


@pytest.mark.parametrize("mask", ["global", "union"])
def test_native_alignment_on_the_server_graph(mask):
    """`ablation.gsa_on_graph`: GSA's global mask is the server graph (3 nearest neighbours), not S_g >= sigma."""
    t, b, anchors, valid = case(seed=81)
    loss = make_loss(mode="fast", mask=mask, sigma=0.3, fast_anchors=anchors.shape[1], gsa_graph=(0.3, 3))
    close(*both(loss, t, anchors, valid, b))


def test_native_alignment_in_exact_mode_every_item_an_anchor():
    """The exact mode runs the fused kernel with every item an anchor (K = m): the C kernel too."""
    t, b, _, _ = case(c=3, m=40, seed=82)
    loss = make_loss(mode="exact", sigma=0.3)
    anchors = torch.zeros(3, 1, dtype=torch.long)
    close(*both(loss, t, anchors, torch.ones(3, 1, dtype=torch.bool), b))


def test_native_applies_to_float32_width_32_cpu_tables_only():
    assert native_align.applies(torch.zeros(2, 5, 32))
    assert not native_align.applies(torch.zeros(2, 5, 32, dtype=torch.float64))
    assert not native_align.applies(torch.zeros(2, 5, 16))
    with pytest.raises(ValueError, match="float32 CPU tables"):
        native_align.value_and_grad(
            torch.zeros(1, 5, 16),
            torch.zeros(1, 2, dtype=torch.long),
            torch.ones(1, 2, dtype=torch.bool),
            labels=None,
            sizes=None,
            global_sim=None,
            sigma=0.5,
            **HYPER,
        )


@requires_real_data
@pytest.mark.parametrize("dataset", ["ml-100k", "filmtrust", *BIG])
def test_native_alignment_matches_the_torch_path_on_real_tables(compose_cfg, dataset, one_thread):
    """One step on real tables after a round, against its broadcast: values within 1e-5 of the float32 torch path
    and the gradient within 1e-5 of its largest entry; against the float64 torch path, an error of the same order
    as the float32 torch path's own (measured on ML-100K: 5.8e-7 and 3.8e-7 of the largest entry)."""
    module = module_after(compose_cfg, dataset, 1, ["compute=fused"])
    loss, b = module.method.loss, module.broadcast
    t = module.state["items"][:4].clone()
    m = t.shape[1]
    anchors = torch.stack([torch.randperm(m, generator=gen(90 + i))[:64] for i in range(4)])
    valid = torch.ones(4, 64, dtype=torch.bool)
    torch_path, c_path = dataclasses.replace(loss, native_threads=0), dataclasses.replace(loss, native_threads=2)
    v1, g1 = torch_path.value_and_grad(t, anchors, valid, b)
    v2, g2 = c_path.value_and_grad(t, anchors, valid, b)
    assert set(v1) == set(v2) == {"ica", "gsa"}
    for key in v1:
        torch.testing.assert_close(v2[key], v1[key], rtol=1e-5, atol=1e-7)
    assert (g2 - g1).abs().max() <= 1e-5 * g1.abs().max()
    _, g0 = torch_path.value_and_grad(t.double(), anchors, valid, b)
    err_c, err_torch = (g2.double() - g0).abs().max(), (g1.double() - g0).abs().max()
    assert err_c <= max(4 * err_torch, 1e-6 * g0.abs().max())


@requires_real_data
@pytest.mark.parametrize("dataset", ["ml-100k", "filmtrust", *BIG])
def test_an_aligning_round_with_the_native_kernels_matches_the_torch_path(
    compose_cfg, dataset, one_thread, monkeypatch
):
    """Two rounds (the second aligns) with both C kernels (the step and the server's sums) against the torch path.
    The two torch kernels share MKL's products, so their rounding agrees more closely than either's with float64;
    the C kernel rounds on its own, and Adam's m / (sqrt(v) + eps) turns gradient entries near eps = 1e-8, whose
    last bits differ, into steps up to lr apart: ML-100K, 12 clients: 176 of 646K entries above 1e-5, largest
    5.6e-4 (the torch kernels against each other: 12, largest 8e-5). Bounds: 1e-3 of the entries, 2e-3."""
    monkeypatch.setattr(native, "fast_cpu", lambda: True)  # the C kernels on any CPU, as on AVX-512
    plain = module_after(compose_cfg, dataset, 2, ["compute=fused"])
    fast = module_after(compose_cfg, dataset, 2, ["compute=native"])
    assert fast.method.spec.native and fast.method.loss.native_threads > 0
    assert not plain.method.spec.native and plain.method.loss.native_threads == 0
    sims, sims_f = plain.broadcast.global_sim, fast.broadcast.global_sim
    assert ((sims_f - sims).abs() > 1e-6).float().mean() <= 1e-5
    diff = (fast.state["items"] - plain.state["items"]).abs()
    assert diff.max() <= 2e-3
    assert (diff > 1e-5).float().mean() <= 1e-3


def test_out_of_range_anchors_are_refused_before_the_kernel():
    t, b, anchors, valid = case()
    kw = dict(labels=b.labels, sizes=b.sizes, global_sim=None, sigma=0.3, **HYPER)
    with pytest.raises(ValueError, match="anchors must index"):
        native_align.value_and_grad(t.float(), anchors + 100, valid, **kw)
