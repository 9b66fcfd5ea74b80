"""The specification (src/alignment/spec.py, `compute=reference`) against the paper's formulas written as loops per
client and anchor, and every faster backend (the fused torch kernel, the blocked algebra, the C kernel) against the
specification on real-data tables."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from alignment_helpers import gen
from conftest import requires_real_data
from loss_factory import ALPHA, BETA, TAU, TAU0
from test_fast_grad import case, make, module_after, oracle

from src.alignment import native_align, spec
from src.alignment.similarity import normalised
from src.runtime import native


@pytest.mark.parametrize(
    ("mask", "reduction", "centre"), itertools.product(["local", "global", "union"], ["mean", "sum"], [True, False])
)
def test_the_specification_is_the_formula(mask, reduction, centre):
    """Values and autograd gradients of alpha ICA + beta GSA over the anchor rows, and over every item."""
    t, b, anchors, valid = case()
    sigma = float(b.sigma)
    for rows, ok in ((anchors, valid), (None, None)):
        part = t.clone().requires_grad_()
        e = normalised(part, centre)
        ica = spec.ica(e, b.labels, TAU, TAU0, rows, ok)
        gsa = spec.gsa(e, b.global_sim, sigma, mask, reduction, rows, ok)
        (grad,) = torch.autograd.grad((ALPHA * ica + BETA * gsa).sum(), part)
        for c in range(t.shape[0]):
            every = torch.arange(t.shape[1])
            a, v = (every, torch.ones_like(every, dtype=torch.bool)) if rows is None else (rows[c], ok[c])
            x = t[c].clone().requires_grad_()
            total, terms = oracle(x, a, v, b.labels, b.global_sim, sigma, centre, mask, reduction)
            torch.testing.assert_close(ica[c], terms["ica"].detach(), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(gsa[c], terms["gsa"].detach(), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(grad[c], torch.autograd.grad(total, x)[0], rtol=1e-9, atol=1e-12)


def backends(loss, table: torch.Tensor) -> dict[str, object]:
    """The faster backends of `loss` that apply to these tables (the C kernel where it builds)."""
    out = {"fused": dataclasses.replace(loss, fast_kernel="fused", native_threads=0)}
    if loss.mode == "exact":
        out["blocked"] = dataclasses.replace(loss, exact_fused_max=0, native_threads=0)
    if native.usable(native_align.SOURCE) and native_align.applies(table):  # both modes: exact has its own kernel
        out["native"] = dataclasses.replace(loss, fast_kernel="fused", native_threads=1)
    return out


@requires_real_data
@pytest.mark.parametrize("dataset", ["ml-100k", "filmtrust"])
@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_every_backend_computes_the_specification_on_real_tables(compose_cfg, dataset, mode, one_thread):
    """One step's values and gradient on real tables after a round, against the broadcast it made: each backend
    within 1e-5 of the largest gradient entry of the specification (fp32 rounding)."""
    module = module_after(compose_cfg, dataset, 1, ["compute=reference", f"model.alignment={mode}"])
    reference, b = module.method.loss, module.broadcast
    assert reference.fast_kernel == "reference"
    t = module.state["items"][:3].clone()
    m = t.shape[1]
    anchors = torch.stack([torch.randperm(m, generator=gen(90 + i))[:64] for i in range(3)])
    valid = torch.ones(3, 64, dtype=torch.bool)
    want_v, want_g = reference.value_and_grad(t, anchors, valid, b)
    assert set(want_v) == {"ica", "gsa"} and want_g.abs().max() > 0
    for name, loss in backends(reference, t).items():
        got_v, got_g = loss.value_and_grad(t, anchors, valid, b)
        for key in want_v:
            torch.testing.assert_close(got_v[key], want_v[key], rtol=1e-4, atol=1e-6, msg=f"{name} {key}")
        scale = float(want_g.abs().max())
        torch.testing.assert_close(got_g, want_g, rtol=0, atol=1e-5 * scale, msg=f"{name} gradient")


def test_make_reference_kernel_in_the_factory():
    """The tests' factory builds the reference loss too (`fast_kernel=reference`)."""
    t, b, anchors, valid = case()
    ref = make("reference", "union", "mean", True, True, True, 0.4, 6)
    fused = dataclasses.replace(ref, fast_kernel="fused")
    (v1, g1), (v2, g2) = ref.value_and_grad(t, anchors, valid, b), fused.value_and_grad(t, anchors, valid, b)
    for key in v1:
        torch.testing.assert_close(v1[key], v2[key], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)
