"""`ablation=fed_itemknn` (this project's method): the neighbour kernel against a brute-force top-k, and a
simulated run against a numpy client: S_g is the mean of every client's thresholded cosine, and a client
scores with item-kNN on the S_g it held during the round (the previous round's), summed over its training items."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from alignment_helpers import np_normalise

from src.cli.config import ConfigError
from src.data.dataset import load
from src.methods.fed_itemknn import neighbour_kernel
from src.rounds.simulator import FederatedModule


def brute_kernel(sim: np.ndarray, k: int) -> np.ndarray:
    """Row i keeps its k largest positive entries other than sim[i, i], found by sorting each row in Python."""
    out = np.zeros_like(sim)
    for i, row in enumerate(sim):
        ranked = sorted(((row[j], j) for j in range(len(row)) if j != i and row[j] > 0), reverse=True)
        for value, j in ranked[:k]:
            out[i, j] = value
    return out


def brute_kernel_ties_low_index(sim: np.ndarray, k: int) -> np.ndarray:
    """As brute_kernel, equal values kept in order of their index (the rule that makes the choice unique)."""
    out = np.zeros_like(sim)
    for i, row in enumerate(sim):
        ranked = sorted((-row[j], j) for j in range(len(row)) if j != i and row[j] > 0)
        for value, j in ranked[:k]:
            out[i, j] = -value
    return out


def test_neighbour_kernel_breaks_ties_by_index_and_the_masked_broadcast_keeps_it():
    """With 3-bit values most entries tie; the kernel keeps the lower indices, and the broadcast restricted to the
    pairs some item keeps gives every client the kernel of the whole S_g."""
    rng = np.random.default_rng(3)
    m, k = 40, 6
    sim = np.round(rng.random((m, m)) * 7) / 7
    sim = np.triu(sim, 1) + np.triu(sim, 1).T
    got = neighbour_kernel(torch.from_numpy(sim).float(), k).to_dense().double().numpy()
    np.testing.assert_allclose(got, brute_kernel_ties_low_index(sim, k), atol=1e-6)
    kept = got > 0
    masked = np.where(kept | kept.T, sim, 0.0)
    again = neighbour_kernel(torch.from_numpy(masked).float(), k).to_dense().double().numpy()
    np.testing.assert_array_equal(again, got)


def test_neighbour_kernel_keeps_each_items_k_largest_entries():
    rng = np.random.default_rng(0)
    m, k = 23, 4
    sim = np.where(rng.random((m, m)) < 0.4, rng.random((m, m)), 0.0)
    sim = (sim + sim.T) / 2  # symmetric like S_g, with many zeros and distinct values
    got = neighbour_kernel(torch.from_numpy(sim).float(), k).to_dense().double().numpy()
    np.testing.assert_allclose(got, brute_kernel(sim, k), atol=1e-7)
    assert (np.diag(got) == 0).all() and ((got > 0).sum(axis=1) <= k).all()


def numpy_global_sim(tables: np.ndarray, sigma: float, centre: bool) -> np.ndarray:
    """The paper's S_g: mean over all clients of cos(e_j, e_k) where it is >= sigma (0 elsewhere, 0 diagonal)."""
    out = np.zeros((tables.shape[1],) * 2)
    for table in tables:
        e = np_normalise(table, centre)
        sim = e @ e.T
        np.fill_diagonal(sim, 0.0)
        out += np.where(sim >= sigma, sim, 0.0) / len(tables)
    return out


def test_a_run_scores_by_item_knn_on_the_held_broadcast(compose_cfg):
    k = 5
    cfg = compose_cfg(["dataset=synthetic", "ablation=fed_itemknn", "model.dim=8", f"ablation.k={k}"])
    data = load(cfg)
    module = FederatedModule(cfg, data)
    first = module.state["items"].numpy()
    assert not np.allclose(first[0], first[1])  # one random initialisation per client
    stats = module.run_round()
    assert stats["val/hit@10"] == 0.0  # no broadcast yet: every candidate ties with the held-out item
    assert not any(k.startswith(("loss/ica", "loss/gsa", "community/")) for k in stats)
    s_g = numpy_global_sim(module.state["items"].double().numpy(), float(cfg.ablation.sigma), bool(cfg.ablation.centre))
    kept = brute_kernel(s_g, k) > 0
    kept |= kept.T  # the broadcast: S_g on the pairs some item keeps among its k nearest
    np.testing.assert_allclose(module.broadcast.global_sim.double().numpy(), np.where(kept, s_g, 0.0), atol=1e-5)
    np.testing.assert_allclose(
        brute_kernel(module.broadcast.global_sim.double().numpy(), k), brute_kernel(s_g, k), atol=1e-5
    )
    assert module.broadcast.labels is None  # no communities
    np.testing.assert_allclose(module.server_sim.double().numpy(), s_g, atol=1e-5)  # the server's whole S_g
    held = module.broadcast.global_sim.double().numpy()
    stats = module.run_round()  # evaluated with round 1's S_g, the one the clients held in round 2
    kernel = brute_kernel(held, k)
    train = data.train_matrix()

    def numpy_score(rows: torch.Tensor, items: torch.Tensor | None) -> torch.Tensor:
        full = np.array([[kernel[i, np.flatnonzero(train[u])].sum() for i in range(data.n_items)] for u in rows])
        full = torch.from_numpy(full)
        return full if items is None else full.gather(1, items)

    chunks = [torch.arange(data.n_users)]
    want = module.evaluator.run(numpy_score, chunks)
    for key, value in want.items():
        assert stats[key] == pytest.approx(value, abs=1e-9), key
    assert stats["test/hit@10"] > 0


@pytest.mark.parametrize("override, key", [(["ablation.k=0"], "ablation.k"), (["ablation.ica=true"], "ablation.ica")])
def test_bad_values_are_refused_before_any_work(compose_cfg, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_cfg(["dataset=synthetic", "ablation=fed_itemknn", *override])


def test_a_one_shot_low_rank_release_is_kept_by_the_clients(compose_cfg):
    """`ablation.upload_round=2 ablation.rank=2`: nothing is uploaded in round 1 (no broadcast: chance-free zero
    scores), round 2's S_g is released as its best rank-2 approximation (numpy eigh, the two eigenpairs of largest
    magnitude, zero diagonal), and in rounds 3-4, with no uploads, the clients keep and score with that broadcast."""
    k = 5
    overrides = ["dataset=synthetic", "ablation=fed_itemknn", "model.dim=8", f"ablation.k={k}", "fl.rounds=4"]
    cfg = compose_cfg([*overrides, "ablation.upload_round=2", "ablation.rank=2"])
    data = load(cfg)
    module = FederatedModule(cfg, data)

    def step() -> dict[str, float]:
        """One round recorded as the Lightning step records it (the round index the method's upload rule reads)."""
        row = {"round": module.current_round(), **module.run_round()}
        module.history.append(row)
        return row

    assert step()["val/hit@10"] == 0.0 and module.broadcast.global_sim is None
    step()
    s_g = numpy_global_sim(module.state["items"].double().numpy(), float(cfg.ablation.sigma), bool(cfg.ablation.centre))
    values, vectors = np.linalg.eigh(s_g)
    top = np.argsort(-np.abs(values))[:2]
    approx = (vectors[:, top] * values[top]) @ vectors[:, top].T
    np.fill_diagonal(approx, 0.0)
    np.testing.assert_allclose(module.server_sim.double().numpy(), approx, atol=1e-5)
    kept = brute_kernel(approx, k) > 0
    kept |= kept.T
    held = module.broadcast.global_sim.double().numpy()
    np.testing.assert_allclose(held, np.where(kept, np.clip(approx, 0.0, None), 0.0), atol=1e-5)
    kernel, train = brute_kernel(held, k), data.train_matrix()

    def numpy_score(rows: torch.Tensor, items: torch.Tensor | None) -> torch.Tensor:
        full = np.array([[kernel[i, np.flatnonzero(train[u])].sum() for i in range(data.n_items)] for u in rows])
        full = torch.from_numpy(full)
        return full if items is None else full.gather(1, items)

    want = module.evaluator.run(numpy_score, [torch.arange(data.n_users)])
    for _ in range(2):
        stats = step()
        np.testing.assert_array_equal(module.broadcast.global_sim.double().numpy(), held)
        for key, value in want.items():
            assert stats[key] == pytest.approx(value, abs=1e-9), key


def test_an_8_bit_run_broadcasts_the_quantised_mean_of_the_quantised_uploads(compose_cfg):
    """`encoding=csr8`: each upload is sent as 8-bit codes over [sigma, 1], S_g is the mean of the decoded uploads,
    and the broadcast is S_g as 8-bit codes over [0, 1] on the pairs some item keeps among its k largest (the
    quantised values tie often: ties to the lower index). All written out in numpy."""
    k = 5
    cfg = compose_cfg(["dataset=synthetic", "ablation=fed_itemknn", "model.dim=8", f"ablation.k={k}", "encoding=csr8"])
    module = FederatedModule(cfg, load(cfg))
    module.run_round()
    sigma, centre = float(cfg.ablation.sigma), bool(cfg.ablation.centre)
    lo = float(np.float32(sigma))
    s_g = np.zeros((module.state["items"].shape[1],) * 2)
    for table in module.state["items"].double().numpy():
        e = np_normalise(table, centre)
        sim = e @ e.T
        np.fill_diagonal(sim, 0.0)
        codes = np.round((np.clip(sim, sigma, 1.0) - sigma) / (1.0 - sigma) * 255)
        s_g += np.where(sim >= sigma, lo + codes * ((1.0 - lo) / 255), 0.0) / len(module.state["items"])
    got = module.server_sim.double().numpy()
    # a cosine within float32 rounding of a code boundary may take the next code: one client's step at most, rarely
    step = (1.0 - lo) / 255 / len(module.state["items"])
    np.testing.assert_allclose(got, s_g, atol=step + 1e-6)
    assert (np.abs(got - s_g) > 1e-6).mean() < 1e-3
    sent = np.round(np.clip(got, 0.0, 1.0) * 255) / 255  # the broadcast of the server's S_g, as the receiver decodes
    assert len(np.unique(sent)) < sent.size / 10  # the codes tie: the kernel's rule decides
    kept = brute_kernel_ties_low_index(sent, k) > 0
    np.testing.assert_allclose(
        module.broadcast.global_sim.double().numpy(), np.where(kept | kept.T, sent, 0.0), atol=1e-6
    )
