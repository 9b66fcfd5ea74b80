"""ICA and GSA alignment losses: plain, blocked exact and fast forms, and AlignmentLoss (METHOD.md section 3).

Every expectation is computed independently (numpy or plain loops in `tests/alignment_helpers.py`),
never with the function under test. Tables are stacked over clients: [C, m, d].
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from alignment_helpers import (
    F64,
    LABELS,
    central_fd,
    gen,
    min_gap_to,
    naive_gsa,
    naive_ica,
    naive_loss_torch,
    np_cosine,
    np_e,
    np_normalise,
    pick_sigma,
    random_global,
    shuffled_labels,
    tables,
)
from loss_factory import ALPHA, BETA, TAU, TAU0, make_loss

from src.alignment import spec
from src.alignment.broadcast import Broadcast
from src.alignment.losses import gsa_pairs, ica_batch
from src.alignment.similarity import normalised

# ============================================================================ 3. GSA
MASKS = ("local", "global", "union")
REDUCTIONS = ("sum", "mean")


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("centre", [True, False])
def test_gsa_exact_matches_double_loop(mask, reduction, centre):
    c, m, d, sigma = 3, 13, 4, 0.45
    t = tables(c, m, d, seed=10)
    gs = random_global(m, seed=11, sigma=sigma)
    es = np_e(t, centre)
    e = torch.from_numpy(np.stack(es))
    got = spec.gsa(e, gs, sigma, mask, reduction)
    assert got.shape == (c,)
    for i in range(c):
        expected = naive_gsa(es[i], gs.numpy(), sigma, mask, reduction)
        assert got[i].item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert (got > 0).all()


def test_gsa_masks_differ_and_nest():
    """Sanity on the test data: union >= local, union >= global (sum), and local != global."""
    sigma = 0.45
    t = tables(3, 13, 4, seed=10)
    e = normalised(t, True)
    gs = random_global(13, seed=11, sigma=sigma)
    loc, glo, uni = (spec.gsa(e, gs, sigma, k, "sum") for k in MASKS)
    assert (uni >= loc - 1e-12).all() and (uni >= glo - 1e-12).all()
    assert not torch.allclose(loc, glo)


def tables_with_sigma(c: int, m: int, d: int, seed: int, lo: float, hi: float):
    """Random tables, their centred cosines (numpy) and a sigma in [lo, hi] far from every cosine."""
    t = tables(c, m, d, seed=seed)
    cos = np.stack([np_cosine(x, True) for x in t.numpy()])
    return t, cos, pick_sigma(cos, lo, hi)


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gsa_gradient_matches_finite_differences(mask, reduction):
    c, m, d = 2, 12, 4
    t, cos, sigma = tables_with_sigma(c, m, d, 12, 0.3, 0.6)
    assert min_gap_to(cos[:, ~np.eye(m, dtype=bool)], sigma) > 1e-4  # no local mask entry can flip
    gs = random_global(m, seed=13, sigma=sigma)
    x = t.clone().requires_grad_()
    val = spec.gsa(normalised(x, True), gs, sigma, mask, reduction)
    (grad,) = torch.autograd.grad(val.sum(), x)
    assert grad.abs().max() > 1e-3
    gsn = gs.numpy()

    def f(arr):  # independent: own normalisation + double loop
        return sum(naive_gsa(np_normalise(arr[i], True), gsn, sigma, mask, reduction) for i in range(c))

    fd = central_fd(f, t.numpy(), eps=1e-6)
    np.testing.assert_allclose(grad.numpy(), fd, rtol=1e-4, atol=1e-4 * np.abs(fd).max())


def test_gsa_reaches_the_table_it_is_computed_from():
    """METHOD.md section 7: circulating code computes GSA from E.detach(), so it never moves E; ours has the gradient
    of the GSA written independently (numpy normalisation and a double loop), by finite differences."""
    c, m, d = 2, 12, 4
    t, cos, sigma = tables_with_sigma(c, m, d, 14, 0.3, 0.6)
    assert min_gap_to(cos[:, ~np.eye(m, dtype=bool)], sigma) > 1e-4  # no local mask entry can flip
    gs = random_global(m, seed=15, sigma=sigma)
    x = t.clone().requires_grad_()
    (g_ours,) = torch.autograd.grad(spec.gsa(normalised(x, True), gs, sigma, "local", "mean").sum(), x)
    assert g_ours.abs().max() > 1e-3
    gsn = gs.numpy()
    fd = central_fd(
        lambda arr: sum(naive_gsa(np_normalise(arr[i], True), gsn, sigma, "local", "mean") for i in range(c)),
        t.numpy(),
        eps=1e-6,
    )
    np.testing.assert_allclose(g_ours.numpy(), fd, rtol=1e-4, atol=1e-4 * np.abs(fd).max())


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gsa_pairs_equals_exact_with_global_mask(reduction):
    c, m, d, sigma = 3, 16, 5, 0.5
    t = tables(c, m, d, seed=16).requires_grad_()
    gs = random_global(m, seed=17, sigma=sigma)
    gsn = gs.numpy()
    # pairs j < k with S_g >= sigma, by a loop
    pj, pk, tg = [], [], []
    for j in range(m):
        for k in range(j + 1, m):
            if gsn[j, k] >= sigma:
                pj.append(j)
                pk.append(k)
                tg.append(gsn[j, k])
    pairs = torch.tensor([pj, pk], dtype=torch.long)
    targets = torch.tensor(tg, dtype=F64)
    assert 0 < pairs.shape[1] < m * (m - 1) // 2
    e = normalised(t, True)
    fast = gsa_pairs(e, pairs, targets, sigma, "global", reduction)
    exact = spec.gsa(e, gs, sigma, "global", reduction)
    np.testing.assert_allclose(fast.detach().numpy(), exact.detach().numpy(), rtol=1e-12)
    for i, x in enumerate(np_e(t, True)):
        assert fast[i].item() == pytest.approx(naive_gsa(x, gsn, sigma, "global", reduction), rel=1e-10)
    g_fast = torch.autograd.grad(fast.sum(), t, retain_graph=True)[0]
    g_exact = torch.autograd.grad(exact.sum(), t)[0]
    np.testing.assert_allclose(g_fast.numpy(), g_exact.numpy(), rtol=1e-9, atol=1e-12)


def test_gsa_pairs_local_mask_is_local_and_global():
    """Documented behaviour of the fast path with mask=local: pairs above sigma in both S_g and S_u."""
    c, m, d, sigma = 2, 14, 4, 0.4
    t = tables(c, m, d, seed=18)
    gs = random_global(m, seed=19, sigma=sigma)
    gsn = gs.numpy()
    iu = [(j, k) for j in range(m) for k in range(j + 1, m) if gsn[j, k] >= sigma]
    pairs = torch.tensor(iu, dtype=torch.long).T
    targets = torch.tensor([gsn[j, k] for j, k in iu], dtype=F64)
    es = np_e(t, True)
    got = gsa_pairs(torch.from_numpy(np.stack(es)), pairs, targets, sigma, "local", "sum")
    for i, x in enumerate(es):
        exp = sum(2 * (float(x[j] @ x[k]) - gsn[j, k]) ** 2 for j, k in iu if float(x[j] @ x[k]) >= sigma)
        assert got[i].item() == pytest.approx(exp, rel=1e-10)


# ============================================================================ 4. ICA


@pytest.mark.parametrize("centre", [True, False])
def test_ica_exact_matches_per_anchor_formula(centre):
    c, m, d = 3, len(LABELS), 5
    t = tables(c, m, d, seed=20)
    labels = shuffled_labels(21)
    sizes = torch.bincount(labels)
    assert (sizes == 1).sum() >= 3  # singleton clusters present (skipped anchors)
    es = np_e(t, centre)
    got = spec.ica(torch.from_numpy(np.stack(es)), labels, TAU, TAU0)
    assert got.shape == (c,)
    for i in range(c):
        assert got[i].item() == pytest.approx(naive_ica(es[i], labels.numpy(), TAU, TAU0), rel=1e-10)


def test_ica_exact_all_singletons_is_zero_and_one_cluster():
    m, d = 10, 4
    t = tables(2, m, d, seed=22)
    es = np_e(t, True)
    e = torch.from_numpy(np.stack(es))
    singles = torch.arange(m)
    assert torch.count_nonzero(spec.ica(e, singles, TAU, TAU0)) == 0
    one = torch.zeros(m, dtype=torch.long)
    got = spec.ica(e, one, TAU, TAU0)
    for i in range(2):
        assert got[i].item() == pytest.approx(naive_ica(es[i], one.numpy(), TAU, TAU0), rel=1e-10)


def test_ica_batch_all_anchors_equals_exact():
    c, m, d = 3, len(LABELS), 5
    t = tables(c, m, d, seed=23)
    labels = shuffled_labels(24)
    sizes = torch.bincount(labels)
    e = normalised(t, True)
    anchors = torch.stack([torch.randperm(m, generator=gen(25 + i)) for i in range(c)])
    valid = torch.ones(c, m, dtype=torch.bool)
    got = ica_batch(e, anchors, valid, labels, sizes, TAU, TAU0)
    np.testing.assert_allclose(got.numpy(), spec.ica(e, labels, TAU, TAU0).numpy(), rtol=1e-12)
    for i, x in enumerate(np_e(t, True)):
        assert got[i].item() == pytest.approx(naive_ica(x, labels.numpy(), TAU, TAU0), rel=1e-10)


def test_ica_batch_subset_of_anchors_and_invalid_ones():
    c, m, d, b = 3, len(LABELS), 5, 7
    t = tables(c, m, d, seed=26)
    labels = shuffled_labels(27)
    sizes = torch.bincount(labels)
    single = int(torch.nonzero(sizes[labels] == 1)[0])
    rng = np.random.default_rng(28)
    rows = []
    for _ in range(c):
        rest = [a for a in rng.permutation(m).tolist() if a != single][: b - 1]
        rows.append(rest[:3] + [single] + rest[3:])  # every client also gets a singleton anchor
    anchors = torch.tensor(rows, dtype=torch.long)
    valid = torch.ones(c, b, dtype=torch.bool)
    es = np_e(t, True)
    e = torch.from_numpy(np.stack(es))
    got = ica_batch(e, anchors, valid, labels, sizes, TAU, TAU0)
    for i in range(c):
        assert got[i].item() == pytest.approx(naive_ica(es[i], labels.numpy(), TAU, TAU0, rows[i]), rel=1e-10)
    # padding anchors (anchor_valid False) are ignored, not averaged in
    valid[0, -2:] = False
    valid[2, 0] = False
    got = ica_batch(e, anchors, valid, labels, sizes, TAU, TAU0)
    for i in range(c):
        kept = [a for a, v in zip(rows[i], valid[i].tolist()) if v]
        assert got[i].item() == pytest.approx(naive_ica(es[i], labels.numpy(), TAU, TAU0, kept), rel=1e-10)
    # a client with no valid anchor at all contributes 0
    valid[1] = False
    assert ica_batch(e, anchors, valid, labels, sizes, TAU, TAU0)[1].item() == 0.0


@pytest.mark.parametrize("centre", [True, False])
def test_ica_gradient_matches_finite_differences(centre):
    c, m, d = 2, 12, 4
    t = tables(c, m, d, seed=29)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 3, 3, 4, 0])
    x = t.clone().requires_grad_()
    val = spec.ica(normalised(x, centre), labels, TAU, TAU0)
    (grad,) = torch.autograd.grad(val.sum(), x)
    assert grad.abs().max() > 1e-3

    def f(arr):
        return sum(naive_ica(np_normalise(arr[i], centre), labels.numpy(), TAU, TAU0) for i in range(c))

    fd = central_fd(f, t.numpy(), eps=1e-6)
    np.testing.assert_allclose(grad.numpy(), fd, rtol=1e-4, atol=1e-4 * np.abs(fd).max())


# ============================================================================ 5. AlignmentLoss
def test_alignment_loss_inactive_before_a_broadcast():
    loss = make_loss()
    t = tables(5, 12, 4, seed=30)
    empty = Broadcast.empty(0.45)
    assert loss.active(empty) is False
    assert loss.terms(t, empty) == {}
    anchors = torch.zeros(5, 3, dtype=torch.long)
    values, grad = loss.value_and_grad(t, anchors, torch.ones(5, 3, dtype=torch.bool), empty)
    assert values == {} and grad.shape == t.shape and torch.count_nonzero(grad) == 0
    # only what an enabled term needs makes it active
    gs = random_global(12, seed=31, sigma=0.45)
    labels_only, sim_only = Broadcast(torch.zeros(12, dtype=torch.long), None, 0.45), Broadcast(None, gs, 0.45)
    both = Broadcast(torch.zeros(12, dtype=torch.long), gs, 0.45)
    only_gsa = make_loss(use_ica=False)
    assert only_gsa.active(labels_only) is False and only_gsa.terms(t, labels_only) == {}
    assert only_gsa.active(sim_only) is True and set(only_gsa.terms(t, sim_only)) == {"gsa"}
    only_ica = make_loss(use_gsa=False)
    assert only_ica.active(sim_only) is False
    assert only_ica.active(both) is True and set(only_ica.terms(t, both)) == {"ica"}


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_alignment_value_and_grad_equals_per_client_autograd(mask, reduction):
    c, m, d = 5, 14, 4
    t, _, sigma = tables_with_sigma(c, m, d, 32, 0.35, 0.6)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 3, 3, 4, 0, 5, 2])
    gs = random_global(m, seed=33, sigma=sigma)
    loss = make_loss(mask=mask, reduction=reduction, chunk=2, sigma=sigma)
    b = Broadcast(labels, gs, sigma)
    assert loss.active(b)
    anchors = torch.stack([torch.randperm(m, generator=gen(34 + i))[:6] for i in range(c)])
    values, grad = loss.value_and_grad(t, anchors, torch.ones(c, 6, dtype=torch.bool), b)
    assert set(values) == {"ica", "gsa"} and values["ica"].shape == (c,)
    for i in range(c):
        x = t[i].clone().requires_grad_()
        total, terms = naive_loss_torch(x, labels, gs, ALPHA, BETA, TAU, TAU0, sigma, True, mask, reduction)
        (g,) = torch.autograd.grad(total, x)
        assert values["ica"][i].item() == pytest.approx(terms["ica"].item(), rel=1e-10)
        assert values["gsa"][i].item() == pytest.approx(terms["gsa"].item(), rel=1e-10, abs=1e-14)
        np.testing.assert_allclose(grad[i].numpy(), g.numpy(), rtol=1e-8, atol=1e-12)
    # the sub-chunks change nothing: `chunk` clients at a time on the paths that read it (the blocked algebra, the
    # autograd specification) and one client per `block` of the fused kernel's every-item-an-anchor form
    valid = torch.ones(c, 6, dtype=torch.bool)
    for kernel in ({"exact_fused_max": 0}, {"fast_kernel": "reference"}):
        for chunk in (2, 5):
            _, other = dataclasses.replace(loss, **kernel, chunk=chunk).value_and_grad(t, anchors, valid, b)
            np.testing.assert_allclose(other.numpy(), grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=f"{kernel} {chunk}")
    _, one = dataclasses.replace(loss, block=m * m).value_and_grad(t, anchors, valid, b)
    np.testing.assert_allclose(one.numpy(), grad.numpy(), rtol=1e-12, atol=1e-15)
    # and terms() agrees with value_and_grad's values
    terms_all = loss.terms(t, b)
    for k in values:
        np.testing.assert_allclose(terms_all[k].detach().numpy(), values[k].numpy(), rtol=1e-12)


@pytest.mark.parametrize("fast_block", [None, 4 * 14, 2 * 4 * 14 + 1])  # whole chunk, 1 and 2 clients at once
def test_alignment_fast_mode_equals_per_client_with_batch_anchors(fast_block):
    c, m, d, k = 5, 14, 4, 4
    t = tables(c, m, d, seed=35)
    sigma = 0.5
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 3, 3, 4, 0, 5, 2])
    gs = random_global(m, seed=36, sigma=sigma)
    loss = make_loss(
        mode="fast",
        mask="global",
        reduction="mean",
        chunk=2,
        sigma=sigma,
        fast_anchors=k,
        fast_gsa="pairs",
        fast_block=fast_block,
    )
    anchors = torch.stack([torch.randperm(m, generator=gen(37 + i))[:7] for i in range(c)])
    valid = torch.ones(c, 7, dtype=torch.bool)
    valid[3, 1] = False
    values, grad = loss.value_and_grad(t, anchors, valid, Broadcast(labels, gs, sigma))
    for i in range(c):
        used = [int(a) for a, v in zip(anchors[i, :k], valid[i, :k]) if v]  # only the first k anchors
        x = t[i].clone().requires_grad_()
        total, terms = naive_loss_torch(
            x, labels, gs, ALPHA, BETA, TAU, TAU0, sigma, True, "global", "mean", anchors=used
        )
        (g,) = torch.autograd.grad(total, x)
        assert values["ica"][i].item() == pytest.approx(terms["ica"].item(), rel=1e-10)
        assert values["gsa"][i].item() == pytest.approx(terms["gsa"].item(), rel=1e-10)
        np.testing.assert_allclose(grad[i].numpy(), g.numpy(), rtol=1e-8, atol=1e-12)


def test_broadcast_builds_upper_pairs_of_global_mask():
    m, sigma = 15, 0.5
    gs = random_global(m, seed=38, sigma=sigma)
    loss = Broadcast(torch.zeros(m, dtype=torch.long), gs, sigma)
    got = sorted(zip(loss.pairs[0].tolist(), loss.pairs[1].tolist()))
    gsn = gs.numpy()
    expected = [(j, k) for j in range(m) for k in range(j + 1, m) if gsn[j, k] >= sigma]
    assert got == expected and (0, 1) in got  # the entry exactly at sigma is a pair
    for (j, kk), v in zip(zip(loss.pairs[0].tolist(), loss.pairs[1].tolist()), loss.targets.tolist()):
        assert v == gsn[j, kk]


# ============================================================================ blocked exact algebra
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("rows", [1, 4, 64])
@pytest.mark.parametrize("kernel", ["blocked", "fused"])
def test_blocked_exact_matches_plain_autograd(mask, reduction, rows, kernel):
    """The blocked value-and-gradient (no m x m per client; what m^2 above `exact_fused_max` runs, blocks of `rows`
    item rows) and the fused kernel with every item an anchor (m^2 small; 1, 2 or 3 clients per block) equal
    the plain autograd loss, fp32 within 1e-4."""

    c, m, d = 3, 23, 5
    table = torch.randn(c, m, d, generator=gen(40), dtype=torch.float32)
    labels = torch.randint(0, 5, (m,), generator=gen(41))
    labels[0] = 9  # a singleton
    g = torch.rand(m, m, generator=gen(42)) * 0.9
    g = (g + g.T) / 2
    g.fill_diagonal_(0)
    block = rows * 2 * m if kernel == "blocked" else {1: 1, 4: 2, 64: 3}[rows] * m * m
    loss = make_loss("exact", mask, reduction, sigma=0.35, block=block)
    if kernel == "blocked":
        loss = dataclasses.replace(loss, exact_fused_max=0)
    b = Broadcast(labels, g, 0.35)
    values, grad = loss.value_and_grad(
        table, torch.zeros(c, 1, dtype=torch.long), torch.ones(c, 1, dtype=torch.bool), b
    )
    # plain: dense m x m autograd in float64
    t64 = table.double().requires_grad_()
    e = normalised(t64, True)
    ica = spec.ica(e, labels, TAU, TAU0)
    gsa = spec.gsa(e, g.double(), 0.35, mask, reduction)
    (ref_grad,) = torch.autograd.grad((ALPHA * ica + BETA * gsa).sum(), t64)
    torch.testing.assert_close(values["ica"].double(), ica.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(values["gsa"].double(), gsa.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-5)
    assert float(ref_grad.abs().max()) > 1e-3


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gsa_over_every_item_as_an_anchor_once_equals_gsa_over_all_rows(mask, reduction):
    """The specification's anchor-row form (what the fast mode estimates) with every item an anchor once, in any
    order, is the whole Eq. 10, values and gradient."""
    c, m, d = 3, 13, 4
    t, _, sigma = tables_with_sigma(c, m, d, 50, 0.35, 0.6)
    gs = random_global(m, seed=51, sigma=sigma)
    anchors = torch.stack([torch.randperm(m, generator=gen(52 + i)) for i in range(c)])
    x1 = t.clone().requires_grad_()
    x2 = t.clone().requires_grad_()
    rows = spec.gsa(normalised(x1, True), gs, sigma, mask, reduction, anchors, torch.ones(c, m, dtype=torch.bool))
    full = spec.gsa(normalised(x2, True), gs, sigma, mask, reduction)
    torch.testing.assert_close(rows, full, rtol=1e-10, atol=1e-12)
    (g1,) = torch.autograd.grad(rows.sum(), x1)
    (g2,) = torch.autograd.grad(full.sum(), x2)
    torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("mask", MASKS)
def test_gsa_over_anchor_rows_equals_a_plain_loop_over_those_rows(mask):
    """The specification's GSA over some anchor rows (one padded) against a loop over those rows' masked pairs: the
    mean over the mask entries, and the sum scaled by m / (valid anchors)."""
    c, m, d = 3, 12, 4
    t, cos, sigma = tables_with_sigma(c, m, d, 53, 0.35, 0.6)
    gs = random_global(m, seed=54, sigma=sigma).numpy()
    anchors = torch.stack([torch.randperm(m, generator=gen(55 + i))[:5] for i in range(c)])
    valid = torch.ones(c, 5, dtype=torch.bool)
    valid[1, 2] = False
    got_mean = spec.gsa(normalised(t, True), torch.from_numpy(gs), sigma, mask, "mean", anchors, valid)
    got_sum = spec.gsa(normalised(t, True), torch.from_numpy(gs), sigma, mask, "sum", anchors, valid)
    for i in range(c):
        total, count, used = 0.0, 0, 0
        for r, a in enumerate(anchors[i].tolist()):
            if not valid[i, r]:
                continue
            used += 1
            for k in range(m):
                if k == a:
                    continue
                loc, glo = cos[i][a, k] >= sigma, gs[a, k] >= sigma
                w = {"local": loc, "global": glo, "union": loc or glo}[mask]
                if w:
                    total += (cos[i][a, k] - gs[a, k]) ** 2
                    count += 1
        assert got_mean[i].item() == pytest.approx(total / max(count, 1), rel=1e-9)
        assert got_sum[i].item() == pytest.approx(total * m / used, rel=1e-9)


@pytest.mark.parametrize("fast_gsa", ["rows", "pairs"])
def test_fast_sub_chunks_give_the_whole_chunk_values(fast_gsa):
    """Cache-sized sub-chunks (`model.fast_block`) only regroup independent clients: same values and gradient."""
    c, m, d = 7, 20, 4
    t = tables(c, m, d, seed=50)
    labels = torch.randint(0, 4, (m,), generator=gen(51))
    b = Broadcast(labels, random_global(m, seed=52, sigma=0.4), 0.4)
    anchors = torch.stack([torch.randperm(m, generator=gen(53 + i))[:9] for i in range(c)])
    valid = torch.rand(c, 9, generator=gen(60)) > 0.2
    whole = make_loss(mode="fast", sigma=0.4, fast_anchors=6, fast_gsa=fast_gsa)
    ref_values, ref_grad = whole.value_and_grad(t, anchors, valid, b)
    for block in (1, 6 * m, 3 * 6 * m):
        values, grad = dataclasses.replace(whole, fast_block=block).value_and_grad(t, anchors, valid, b)
        assert set(values) == {"ica", "gsa"}
        for key in values:
            torch.testing.assert_close(values[key], ref_values[key], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
