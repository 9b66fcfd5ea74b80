"""The stacked cohort trains every client exactly as a per-client nn.Module + torch.optim loop.

`src/clients/reference.py` (re-exported by `tests/reference.py`) is an independent per-client
implementation (nn.Embedding, nn.Linear, nn.BCELoss / BCEWithLogitsLoss, torch.optim.SGD / Adam
created fresh per client and round, the PFedRec two-optimiser engine for `optim.alternate`). Both
consume the same round samples and batch layout; after one round every parameter of every client
must agree.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from reference import client_batches, make_client, train_client

from src.clients import cohort
from src.clients.cohort import OptimSpec, batch_layout, sample_round, touched_rows, train_cohort
from src.clients.model import ModelSpec, init_params
from src.data.protocols import NegativeSampler
from src.server.aggregation import MeanAggregator

N_ITEMS, DIM, BATCH, NEGATIVES = 40, 8, 4, 4
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threading only adds overhead (log_sigmoid takes ~10 ms a call with 2
    threads on some CPU builds, which would make the logits_bce cases take most of a minute)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_problem(positives: list[int], seed: int = 0):
    """CSR training positives (distinct items per client) and a sampler excluding them."""
    rng = np.random.default_rng(seed)
    n_users = len(positives)
    excluded = np.zeros((n_users, N_ITEMS), dtype=bool)
    items = []
    for u, k in enumerate(positives):
        chosen = rng.choice(N_ITEMS, size=k, replace=False)
        excluded[u, chosen] = True
        items.append(torch.as_tensor(chosen, dtype=torch.long))
    ptr = torch.zeros(n_users + 1, dtype=torch.long)
    ptr[1:] = torch.cumsum(torch.tensor(positives), 0)
    return ptr, torch.cat(items), NegativeSampler(excluded)


def run_round(cfg, positives, rows, epochs, batch_size=BATCH, dtype=torch.float32, seed=0):
    """One round: stacked params of `rows`, samples, layout, trained copy and per-client references."""
    ptr, items, sampler = make_problem(positives, seed)
    samples = sample_round(ptr, items, sampler, NEGATIVES, seed + 1, 1)
    # train_cohort uses the labels' dtype as given (float32 from sample_round): match the params
    samples.labels = samples.labels.to(dtype)
    rows = torch.as_tensor(rows, dtype=torch.long)
    layout = batch_layout(samples, rows, epochs, batch_size, seed + 1, 1)
    init = init_params(ModelSpec.from_cfg(cfg.model), len(positives), N_ITEMS, torch.Generator().manual_seed(seed + 2))
    init = {k: v[rows].to(dtype) for k, v in init.items()}
    trained = copy.deepcopy(init)
    losses = train_cohort(trained, samples, layout, OptimSpec.from_cfg(cfg.optim), N_ITEMS, cfg.model.loss)
    return init, trained, samples, layout, losses


def reference(cfg, init, samples, layout, row, max_steps=None):
    client = make_client(cfg.model, N_ITEMS, init, row)
    losses = train_client(client, client_batches(samples, layout, row, max_steps), cfg.optim, N_ITEMS)
    return client.to_stacked(), losses


def assert_row_equal(trained, ref, row, label=""):
    assert set(ref) == set(trained), (sorted(ref), sorted(trained))
    for k, v in ref.items():
        torch.testing.assert_close(trained[k][row], v, **TOL, msg=lambda m, k=k: f"{label} client row {row}, {k}: {m}")


OPTIMS = {
    "sgd_alternate": ["optim=sgd", "optim.lr=0.1", "optim.item_lr_eta=1"],
    "sgd_joint": ["optim=sgd", "optim.lr=0.1", "optim.item_lr_eta=1", "optim.alternate=false"],
    "sgd_lineage_eta80": ["optim=sgd"],
    "sgd_joint_eta80": ["optim=sgd", "optim.alternate=false"],
    "adam": ["optim=adam"],
    "adam_alternate": ["optim=adam", "optim.alternate=true"],
    "adam_eight_ops": ["optim=adam", "optim.fused=false"],
    "adam_every_row": ["optim=adam", "optim.touched_rows=false"],
    "adam_alternate_eight_ops": ["optim=adam", "optim.alternate=true", "optim.fused=false"],
}
MODELS = {
    "linear": [],
    "user_mlp": ["model.user_embedding=true", "model.score_hidden=[6]"],
}
# 7 clients; 5 samples per positive, batch 4, 2 epochs -> steps 2 * ceil(5k / 4): 4 ... 24
POSITIVES = [3, 1, 9, 2, 5, 1, 4]
# layout rows are a permuted subset, as a chunk of a real round
ROWS = [2, 0, 6, 1, 4, 3, 5]


def double_round(cfg, epochs: int):
    """One round of the POSITIVES clients in float64 (samples, batch layout of ROWS, their initial stacked rows): the
    problem the loss tests train on, stacked and per client."""
    ptr, items, sampler = make_problem(POSITIVES)
    samples = sample_round(ptr, items, sampler, NEGATIVES, 1, 1)
    samples.labels = samples.labels.double()
    rows = torch.as_tensor(ROWS)
    layout = batch_layout(samples, rows, epochs, BATCH, 1, 1)
    init = init_params(ModelSpec.from_cfg(cfg.model), len(POSITIVES), N_ITEMS, torch.Generator().manual_seed(2))
    return samples, layout, {k: v[rows].double() for k, v in init.items()}


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("loss", ["sigmoid_bce", "logits_bce"])
@pytest.mark.parametrize("optim", list(OPTIMS))
def test_cohort_matches_per_client_reference(compose_cfg, optim, loss, model):
    cfg = compose_cfg([*OPTIMS[optim], *MODELS[model], f"model.dim={DIM}", f"model.loss={loss}"])
    init, trained, samples, layout, losses = run_round(cfg, POSITIVES, ROWS, epochs=2)
    steps = layout.steps.tolist()
    assert min(steps) == 4 and max(steps) == 24, steps
    ref_losses = []
    for row in range(len(ROWS)):
        ref, row_losses = reference(cfg, init, samples, layout, row)
        if not all(torch.isfinite(v).all() for v in ref.values()):
            pytest.skip(f"{optim}: the reference itself diverges (non-finite parameters)")
        assert_row_equal(trained, ref, row, f"{optim}/{loss}/{model}")
        ref_losses += row_losses
    # the returned loss is the mean over active client-steps of the loss of the item step
    assert losses["bce"] == pytest.approx(sum(ref_losses) / len(ref_losses), rel=1e-5, abs=1e-6)
    # every client actually trained
    for row in range(len(ROWS)):
        assert not torch.equal(trained["items"][row], init["items"][row])


@pytest.mark.parametrize("optim", ["sgd_alternate", "sgd_joint", "adam", "adam_alternate", "adam_eight_ops"])
def test_short_clients_are_not_moved_by_padding_steps(compose_cfg, optim):
    """A 1-step client (and a 0-step client) in a cohort whose longest client runs many steps."""
    cfg = compose_cfg([*OPTIMS[optim], f"model.dim={DIM}"])
    # batch 5 and 1 epoch: one positive + 4 negatives is exactly one step; 9 positives -> 9 steps
    positives = [1, 9, 0, 3]
    init, trained, samples, layout, _ = run_round(cfg, positives, [0, 1, 2, 3], epochs=1, batch_size=5)
    assert layout.steps.tolist() == [1, 9, 0, 3]
    ref, _ = reference(cfg, init, samples, layout, 0)
    assert_row_equal(trained, ref, 0, "1-step client")
    # the same client given one more (empty-gradient) step would differ for Adam: the test is sharp
    if cfg.optim.name == "adam":
        client = make_client(cfg.model, N_ITEMS, init, 0)
        opt = torch.optim.Adam(client.parameters(), lr=float(cfg.optim.lr))
        ((items, labels),) = client_batches(samples, layout, 0)
        for step in range(2):
            opt.zero_grad()
            if step == 0:
                client.loss(items, labels).backward()
            else:
                for p in client.parameters():
                    p.grad = torch.zeros_like(p)
            opt.step()
        padded = client.to_stacked()
        assert not torch.allclose(padded["items"], trained["items"][0], **TOL)
    # a client with no sample this round keeps its parameters bit for bit
    for k in init:
        assert torch.equal(trained[k][2], init[k][2]), k
    for row in (1, 3):
        ref, _ = reference(cfg, init, samples, layout, row)
        assert_row_equal(trained, ref, row)


def test_touched_rows_are_each_clients_set_of_batch_items():
    """Brute force: a client's rows are the sorted set of its valid batch items; a sample's slot points back to
    its item."""
    gen = torch.Generator().manual_seed(0)
    items = torch.randint(0, 30, (5, 4, 6), generator=gen)
    valid = torch.rand(5, 4, 6, generator=gen) < 0.6
    valid[:, 2] = False  # a client with no sample
    rows, slots = touched_rows(items, valid, 30)
    for c in range(4):
        own = sorted({int(i) for i in items[:, c][valid[:, c]]})
        assert rows[c, : len(own)].tolist() == own and bool((rows[c, len(own) :] == -1).all())
        picked = rows[c][slots[:, c]]
        assert torch.equal(picked[valid[:, c]], items[:, c][valid[:, c]])
    assert rows.shape[1] == max(len({int(i) for i in items[:, c][valid[:, c]]}) for c in range(4))


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("loss", ["sigmoid_bce", "logits_bce"])
@pytest.mark.parametrize("optim", ["adam", "adam_eight_ops", "adam_alternate"])
def test_touched_rows_give_the_every_row_tables_bit_for_bit(compose_cfg, monkeypatch, optim, loss, model):
    """Adam on the touched rows only (it does run: `touched_rows` is called once per chunk) leaves every table and
    the losses as Adam on every row does."""
    calls = []

    def spy(*args):
        calls.append(1)
        return touched_rows(*args)

    monkeypatch.setattr(cohort, "touched_rows", spy)
    outs = []
    for touched in ("true", "false"):
        overrides = [*OPTIMS[optim], *MODELS[model], f"model.loss={loss}", f"model.dim={DIM}"]
        cfg = compose_cfg([*overrides, f"optim.touched_rows={touched}"])
        outs.append(run_round(cfg, POSITIVES, ROWS, epochs=2))
        assert len(calls) == 1, (touched, calls)
    (init, a, _, _, loss_a), (_, b, _, _, loss_b) = outs
    untouched = (a["items"] == init["items"]).all(dim=2)
    assert untouched.any() and not untouched.all()  # the test is sharp: some rows stay, others move
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert loss_a == loss_b


def test_layout_uses_every_sample_once_per_epoch():
    ptr, items, sampler = make_problem(POSITIVES)
    samples = sample_round(ptr, items, sampler, NEGATIVES, 3, 1)
    rows = torch.as_tensor(ROWS)
    layout = batch_layout(samples, rows, 2, BATCH, 3, 1)
    for c, u in enumerate(ROWS):
        own = set(range(int(samples.ptr[u]), int(samples.ptr[u + 1])))
        per_epoch = math.ceil(len(own) / BATCH)
        assert int(layout.steps[c]) == 2 * per_epoch
        for e in range(2):
            idx = layout.index[c, e * per_epoch : (e + 1) * per_epoch].reshape(-1)
            idx = idx[idx >= 0].tolist()
            assert sorted(idx) == sorted(own)
        assert bool((layout.index[c, 2 * per_epoch :] < 0).all())
        # only the last batch of an epoch can be short
        sizes = (layout.index[c, : 2 * per_epoch] >= 0).sum(1).tolist()
        assert all(s == BATCH for i, s in enumerate(sizes) if (i + 1) % per_epoch)
    # samples: each positive followed by NEGATIVES negatives, never the client's own positives
    for u in range(len(POSITIVES)):
        block = samples.items[samples.ptr[u] : samples.ptr[u + 1]].view(-1, 1 + NEGATIVES)
        lab = samples.labels[samples.ptr[u] : samples.ptr[u + 1]].view(-1, 1 + NEGATIVES)
        assert torch.equal(block[:, 0], items[ptr[u] : ptr[u + 1]])
        assert bool((lab[:, 0] == 1).all()) and bool((lab[:, 1:] == 0).all())
        assert not bool(sampler.excluded[u, block[:, 1:]].any())


def test_mean_aggregator_chunked_equals_plain_mean():
    gen = torch.Generator().manual_seed(0)
    n = 9
    params = {
        "items": torch.randn(n, 5, 3, generator=gen),
        "b0": torch.randn(n, 1, generator=gen),
        "w0": torch.randn(n, 3, 1, generator=gen),
    }
    uploaded = torch.tensor([True, False, True, False, False, True, True, False, True])
    chunks = [[0, 1, 2], [3, 4, 7], [5, 6], [8]]  # the second chunk has nobody uploading
    agg = MeanAggregator()
    for rows in chunks:
        rows = torch.tensor(rows)
        sent = uploaded[rows]
        agg.add({k: params[k][rows][sent] for k in ("items", "b0")}, int(sent.sum()))
    previous = {"items": torch.zeros(5, 3), "b0": torch.zeros(1)}
    out = agg.result(previous)
    assert set(out) == {"items", "b0"}
    for k in ("items", "b0"):
        expected = params[k][uploaded].double().mean(0)
        assert out[k].dtype == previous[k].dtype
        torch.testing.assert_close(out[k].double(), expected, atol=1e-6, rtol=1e-6)
    assert agg.count == int(uploaded.sum())


def test_mean_aggregator_nobody_uploads_keeps_previous():
    params = {"items": torch.randn(4, 5, 3)}
    agg = MeanAggregator()
    nobody = torch.zeros(4, dtype=torch.bool)
    agg.add({"items": params["items"][nobody]}, 0)
    agg.add({"items": params["items"][nobody]}, 0)
    previous = {"items": torch.randn(5, 3)}
    out = agg.result(previous)
    assert set(out) == {"items"}
    assert torch.equal(out["items"], previous["items"])
    assert MeanAggregator().result(previous)["items"] is previous["items"]


@pytest.mark.parametrize("mask", ["local", "global", "union"])
@pytest.mark.parametrize(
    "kernel, optim",
    # every optimiser with the two fast backends; the spec itself (against the loop-written loss, slow) with Adam
    [(k, o) for k in ("fused", "blocked") for o in ("sgd_alternate", "adam", "adam_eight_ops")]
    + [("reference", "adam")],
)
def test_exact_alignfedrec_round_matches_per_client_reference(compose_cfg, optim, mask, kernel):
    """BCE + alpha ICA + beta GSA (exact mode, stacked: the fused kernel with every item an anchor, the blocked
    cluster-sum algebra, or the autograd spec) trains every client as the per-client loop with the loss written
    plainly (the spec per client; against the spec itself, the loss written as per-anchor and per-pair loops)."""
    from reference import ExactAlignment

    from src.alignment.broadcast import Broadcast
    from src.methods.alignfedrec import build

    cfg = compose_cfg(
        [
            *OPTIMS[optim],
            f"model.dim={DIM}",
            "ablation=full",
            "model.alignment=exact",
            f"compute={'reference' if kernel == 'reference' else 'fused'}",
            "ablation.alpha=0.3",
            "ablation.beta=2.0",
            "ablation.tau=0.2",
            "ablation.tau0=0.5",
            "ablation.sigma=0.3",
            f"ablation.gsa_mask={mask}",
            "model.align_chunk=3",
        ]
    )
    samples, layout, init = double_round(cfg, epochs=1)
    labels = torch.arange(N_ITEMS) % 6
    labels[:3] = torch.tensor([6, 7, 8])  # three singleton clusters: their anchors are skipped
    global_sim = torch.rand(N_ITEMS, N_ITEMS, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    global_sim = (global_sim + global_sim.T) / 2
    global_sim.fill_diagonal_(0)
    method = build(cfg, torch.device("cpu"))
    if kernel == "blocked":  # the blocked algebra, what the exact mode runs where m^2 > EXACT_FUSED_MAX (Lastfm-2k)
        method = dataclasses.replace(method, loss=dataclasses.replace(method.loss, exact_fused_max=0))
    dense = method.dense_loss(Broadcast(labels, global_sim, float(cfg.ablation.sigma)))
    trained = copy.deepcopy(init)
    losses = train_cohort(trained, samples, layout, OptimSpec.from_cfg(cfg.optim), N_ITEMS, cfg.model.loss, dense)
    assert losses["ica"] > 0 and losses["gsa"] > 0
    m = cfg.ablation
    plain = ExactAlignment(
        float(m.alpha),
        float(m.beta),
        float(m.tau),
        float(m.tau0),
        float(m.sigma),
        bool(m.centre),
        mask,
        m.gsa_reduction,
        labels,
        global_sim,
    )
    if kernel == "reference":  # the stacked side runs the spec itself: the per-client loss is the loop version
        from alignment_helpers import naive_loss_torch

        args = (labels, global_sim, *(float(m[k]) for k in ("alpha", "beta", "tau", "tau0", "sigma")), bool(m.centre))

        def plain(table: torch.Tensor) -> torch.Tensor:
            return naive_loss_torch(table, *args, mask, m.gsa_reduction)[0]

    for row in range(len(ROWS)):
        client = make_client(cfg.model, N_ITEMS, init, row)
        train_client(client, client_batches(samples, layout, row), cfg.optim, N_ITEMS, plain)
        assert_row_equal(trained, client.to_stacked(), row, f"{optim}/{mask}")
    # and the alignment moved the tables: without it the result differs
    bce_only = copy.deepcopy(init)
    train_cohort(bce_only, samples, layout, OptimSpec.from_cfg(cfg.optim), N_ITEMS, cfg.model.loss)
    assert (bce_only["items"] - trained["items"]).abs().max() > 1e-3


@pytest.mark.parametrize("optim", ["sgd_alternate", "sgd_joint", "adam"])
def test_a_new_methods_dense_loss_by_autograd_trains_as_the_per_client_loop(compose_cfg, optim):
    """`autograd_dense`, how a new method adds a loss of its own: terms written plainly per client, one weighted and
    one not, train every client as the per-client loop that adds the same loss written for one table."""
    cfg = compose_cfg([*OPTIMS[optim], f"model.dim={DIM}", "ablation=local"])
    samples, layout, init = double_round(cfg, epochs=2)
    weight = 0.3

    def terms(tables: torch.Tensor, batch_items: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"l2": (tables**2).sum((1, 2)), "spread": torch.log1p((tables.mean(1) ** 2).sum(-1))}

    def plain(table: torch.Tensor) -> torch.Tensor:  # one client's [m, d] table
        return weight * (table**2).sum() + torch.log1p((table.mean(0) ** 2).sum())

    trained = copy.deepcopy(init)
    dense = cohort.autograd_dense(terms, {"l2": weight})
    losses = train_cohort(trained, samples, layout, OptimSpec.from_cfg(cfg.optim), N_ITEMS, cfg.model.loss, dense)
    assert losses["l2"] > 0 and losses["spread"] > 0
    for row in range(len(ROWS)):
        client = make_client(cfg.model, N_ITEMS, init, row)
        train_client(client, client_batches(samples, layout, row), cfg.optim, N_ITEMS, plain)
        assert_row_equal(trained, client.to_stacked(), row, optim)
    bce_only = copy.deepcopy(init)
    train_cohort(bce_only, samples, layout, OptimSpec.from_cfg(cfg.optim), N_ITEMS, cfg.model.loss)
    assert (bce_only["items"] - trained["items"]).abs().max() > 1e-3


def test_autograd_dense_names_a_misspelt_weight_and_a_term_of_the_wrong_shape():
    tables = torch.randn(3, 5, 2, dtype=torch.float64)
    items, valid = torch.zeros(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.bool)
    l2 = cohort.autograd_dense(lambda t, i, v: {"l2": (t**2).sum((1, 2))}, {"L2": 0.5})
    with pytest.raises(ValueError, match=r"weights for \['L2'\], which the terms do not return \(\['l2'\]\)"):
        l2(tables, items, valid)
    scalar = cohort.autograd_dense(lambda t, i, v: {"l2": (t**2).sum()}, {})
    with pytest.raises(ValueError, match=r"term 'l2' has shape \(\); expected one value a client, \(3,\)"):
        scalar(tables, items, valid)
    # a term that reads only the batch (no tables) pulls nothing: a zero gradient, its values logged
    count = cohort.autograd_dense(lambda t, i, v: {"n": v.sum(1).to(t.dtype)}, {})
    values, grad = count(tables, items, valid)
    assert values["n"].tolist() == [4.0, 4.0, 4.0] and not grad.any()
