"""The privacy audit: its AUC is the pairwise definition, its recovery is exact when the whole
matrix is released and degrades with thresholding and noise, and the command runs end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import src.analysis.audit as audit_mod
from src.alignment.release import ReleaseSpec
from src.alignment.similarity import normalised
from src.analysis.audit import aligned_cosine, auc, complete_rank_d, decoded_upload, main
from src.cli.config import ConfigError


def test_auc_is_the_pairwise_probability_with_half_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    truth = rng.random(60) < 0.3
    pos, neg = scores[truth], scores[~truth]
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert auc(scores, truth) == brute
    assert auc(np.arange(10.0), np.arange(10) >= 5) == 1.0


def test_the_membership_scores_are_each_items_row_of_the_decoded_upload():
    """Row sum, row degree (nonzeros) and L1 distance from the server's S_g of each item's row, by loops, on a
    decoded upload and an S_g whose threshold cuts differ."""
    from src.analysis.audit import membership_scores

    rng = np.random.default_rng(4)
    m = 12
    upload = np.triu(np.where(rng.random((m, m)) < 0.4, rng.uniform(0.5, 1.0, (m, m)), 0.0), 1)
    upload = upload + upload.T
    global_sim = np.triu(np.where(rng.random((m, m)) < 0.5, rng.uniform(0.5, 1.0, (m, m)), 0.0), 1)
    global_sim = global_sim + global_sim.T
    scores = membership_scores(torch.from_numpy(upload).float(), torch.from_numpy(global_sim).float())
    for j in range(m):
        row = [float(np.float32(upload[j, k])) for k in range(m)]
        g = [float(np.float32(global_sim[j, k])) for k in range(m)]
        assert scores["row_sum"][j] == pytest.approx(sum(row), abs=1e-9)
        assert scores["row_degree"][j] == sum(1 for v in row if v != 0)
        assert scores["distance_from_global"][j] == pytest.approx(sum(abs(a - b) for a, b in zip(row, g)), abs=1e-9)
    assert set(scores) == {"row_sum", "row_degree", "distance_from_global"}
    assert set(membership_scores(torch.from_numpy(upload), None)) == {"row_sum", "row_degree"}


def test_recovery_is_exact_from_the_full_matrix_and_worse_from_a_thresholded_noisy_one():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(60, 4, generator=gen, dtype=torch.float64)
    target = normalised(table.unsqueeze(0), True)[0]
    full = decoded_upload(table, ReleaseSpec(-1.0, True), gen)  # sigma -1: every entry released
    recovered = complete_rank_d(full, 4, -1.0, 3)
    # exact up to a rotation: the same Gram matrix (every pairwise cosine), whatever the alignment says
    np.testing.assert_allclose((recovered @ recovered.T).numpy(), (target @ target.T).numpy(), atol=1e-4)
    assert aligned_cosine(recovered, target) > 0.999
    # the alignment itself: a rotated or reflected copy of the target aligns perfectly
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))
    assert aligned_cosine(target @ q, target) == pytest.approx(1.0, abs=1e-12)
    assert aligned_cosine(target @ torch.diag(torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=torch.float64)), target) == (
        pytest.approx(1.0, abs=1e-12)
    )
    noisy = decoded_upload(table, ReleaseSpec(0.5, True, noise=0.5), gen)
    assert aligned_cosine(complete_rank_d(noisy, 4, 0.5, 10), target) < 0.95
    # a random factor is far from the truth after the same alignment
    assert aligned_cosine(torch.randn(60, 4, generator=gen, dtype=torch.float64), target) < 0.8


@pytest.mark.parametrize(
    "ablation, extra",
    # the paper's construction; a server-graph variant; item-kNN on S_g
    [("full", []), ("knn_ica", ["ablation.aggregate=support_mean"]), ("fed_itemknn", [])],
)
def test_audit_command_runs_and_writes_its_report(compose_cfg, tmp_path, monkeypatch, ablation, extra):
    monkeypatch.chdir(tmp_path)
    compose_cfg()  # isolated split cache for the tests
    report = main(
        [
            "dataset=synthetic",
            f"ablation={ablation}",
            *extra,
            "fl.rounds=2",
            "model.alignment=fast",
            "optim=adam",
            "audit.clients=4",
            "audit.recovery_iters=2",
            "ablation.sigma=0.2",
            "privacy.epsilon=50",
        ]
    )
    (path,) = (tmp_path / "outputs" / "audit").glob(f"synthetic-{ablation}-clean-s0_*/audit.json")  # its own run folder
    written = json.loads(path.read_text())
    assert written["membership_auc"] == report["membership_auc"]
    assert set(report["membership_auc"]) == {"row_sum", "row_degree", "distance_from_global", "learned"}
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in report["membership_auc"].values())  # no NaN
    assert report["epsilon_round_entry"] == 50.0 and report["noise_scale"] == 2.0 / 50


def test_audit_validates_before_reading_any_data(compose_cfg, monkeypatch):
    """audit() itself validates the config it is given (recovery_iters, device, ...) before loading data."""

    def must_not_run(*args, **kwargs):
        raise AssertionError("data was read before the config was validated")

    monkeypatch.setattr(audit_mod, "load", must_not_run)
    cfg = compose_cfg(["dataset=synthetic", "ablation=full"])
    cfg.audit.recovery_iters = 0
    with pytest.raises(ConfigError, match=r"audit\.recovery_iters"):
        audit_mod.audit(cfg, [])
    with pytest.raises(ConfigError, match="uploads neither a similarity matrix nor an item table"):
        audit_mod.audit(compose_cfg(["dataset=synthetic", "ablation=local"]), [])
    with pytest.raises(ConfigError, match=r"audit\.clients=abc is invalid"):
        main(["dataset=synthetic", "ablation=full", "audit.clients=abc"])


def test_the_table_attack_scores_how_far_each_row_moved():
    """Against a numpy computation: a row's score is the L2 distance it moved from the table the server sent, and
    the rows a client trained (and only those) moved; with the trained rows as truth both scores reach AUC 1."""
    from src.analysis.audit import auc, table_scores

    rng = np.random.default_rng(3)
    start = rng.normal(size=(40, 8))
    upload = start.copy()
    trained = rng.choice(40, size=9, replace=False)
    upload[trained] += rng.normal(size=(9, 8))
    scores = table_scores(torch.from_numpy(upload), torch.from_numpy(start))
    np.testing.assert_allclose(scores["row_change"], np.sqrt(((upload - start) ** 2).sum(1)))
    truth = np.isin(np.arange(40), trained)
    assert np.array_equal(scores["row_changed"] > 0, truth)
    assert auc(scores["row_change"], truth) == 1.0 and auc(scores["row_changed"], truth) == 1.0


def test_audit_of_a_table_sharing_method_runs(compose_cfg, tmp_path):
    from src.analysis.audit import audit

    cfg = compose_cfg(["dataset=synthetic", "ablation=backbone", "fl.rounds=2", "audit.clients=5"])
    report = audit(cfg, ["ablation=backbone"])
    assert report["upload"] == "item table" and report["clients"] == 5
    assert set(report["membership_auc"]) == {"row_change", "row_changed", "learned"}
    assert all(0.5 < v <= 1.0 for v in report["membership_auc"].values())  # trained rows are the positives' and more


def test_the_learned_attack_reads_a_score_whichever_way_it_points():
    """One score points away from membership (as the row sum does on FilmTrust), one is noise: the learned attack,
    fitted on other clients, ranks held-out clients' items as well as the flipped score does; with no signal it is
    at chance."""
    from src.analysis.audit import learned_aucs

    rng = np.random.default_rng(0)
    truths = [rng.random(300) < 0.1 for _ in range(20)]
    informative = [
        np.stack([-t.astype(float) + rng.normal(0, 0.8, 300), rng.normal(0, 1, 300)], axis=1) for t in truths
    ]
    flipped = np.mean([auc(-f[:, 0], t) for f, t in zip(informative, truths, strict=True)])
    assert np.mean([auc(f[:, 0], t) for f, t in zip(informative, truths, strict=True)]) < 0.3
    learned = learned_aucs(informative, truths)
    assert not np.isnan(learned).any() and abs(np.mean(learned) - flipped) < 0.01
    noise = [rng.normal(0, 1, (300, 2)) for _ in truths]
    assert abs(np.mean(learned_aucs(noise, truths)) - 0.5) < 0.05


def test_the_logistic_fit_is_a_stationary_point_of_its_objective():
    """Finite differences of the class-balanced, ridge-penalised log-loss vanish at the fitted weights."""
    from src.analysis.audit import fit_logistic

    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (400, 3))
    y = (x @ np.array([1.0, -2.0, 0.5]) + rng.normal(0, 1, 400)) > 1.0
    w = fit_logistic(x, y, ridge=1e-3)

    def objective(v: np.ndarray) -> float:
        z = np.hstack([x, np.ones((400, 1))]) @ v
        weight = np.where(y, 0.5 / y.sum(), 0.5 / (~y).sum())
        return float((weight * (np.logaddexp(0, z) - y * z)).sum() + 0.5e-3 * v @ v)

    eps = 1e-6
    grad = [(objective(w + eps * e) - objective(w - eps * e)) / (2 * eps) for e in np.eye(4)]
    assert np.abs(grad).max() < 1e-6
