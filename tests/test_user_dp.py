"""User-level DP of the similarity sum: the accountant against the exact Gaussian-mechanism curve, the clip against
a numpy oracle of each client's upload, the server's noise scale against the accountant's, the one-shot upload,
and the config's refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from alignment_helpers import np_cosine, np_upload

from src.alignment.release import ReleaseSpec, release_entries
from src.cli.config import ConfigError
from src.cli.train import train
from src.comm import accountant
from src.comm.user_dp import UserLevelDP, server_generator

SYNTH = ["dataset=synthetic", "protocol=paper", "fl.rounds=3", "fl.checkpoint_every=0"]


def phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def exact_epsilon(z: float, releases: int, delta: float) -> float:
    """The tight epsilon of `releases` Gaussian mechanisms of noise multiplier z at `delta` (Balle & Wang 2018,
    Theorem 8; T compositions of N(0, z^2) at sensitivity 1 are one mechanism of mu = sqrt(T) / z), by bisection."""
    mu = math.sqrt(releases) / z

    def delta_at(eps: float) -> float:
        return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)

    lo, hi = 0.0, 200.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_at(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("z,releases", [(0.5, 1), (1.0, 1), (2.0, 10), (5.0, 100)])
def test_the_accountants_bound_the_exact_gaussian_curve(z, releases):
    """PLD is tight (within 1 % above the exact epsilon), RDP an upper bound, itself below the classical
    conversion of the Gaussian's Renyi curve (T alpha / 2 z^2 + log(1/delta) / (alpha - 1), minimised over alpha),
    which a correct RDP accountant improves on; calibration inverts both."""
    delta = 1 / 943
    exact = exact_epsilon(z, releases, delta)
    pld = accountant.epsilon(z, releases, delta, "pld")
    rdp = accountant.epsilon(z, releases, delta, "rdp")
    assert exact - 1e-6 <= pld <= exact * 1.01 + 1e-3
    alpha = np.linspace(1.001, 2000, 400_000)
    classical = float((releases * alpha / (2 * z * z) + math.log(1 / delta) / (alpha - 1)).min())
    assert pld - 1e-6 <= rdp <= classical
    for name in ("rdp", "pld"):
        back = accountant.calibrate(accountant.epsilon(z, releases, delta, name), releases, delta, name)
        assert back == pytest.approx(z, rel=2e-3)


def test_calibration_spends_at_most_the_target():
    for target, releases in ((1.0, 1), (8.0, 1), (4.0, 20)):
        z = accountant.calibrate(target, releases, 1e-3, "pld")
        assert exact_epsilon(z, releases, 1e-3) <= target + 1e-3
        assert accountant.epsilon(z * 0.98, releases, 1e-3, "pld") > target  # and no more noise than needed


def test_each_clipped_upload_is_the_oracle_upload_scaled_to_the_clip():
    c, m, d, sigma = 6, 30, 4, 0.3
    tabs = torch.randn(c, m, d, generator=torch.Generator().manual_seed(3))
    clip = 1.5
    uploads = release_entries(tabs, ReleaseSpec(sigma, True, block=200, rows=7, clip=clip))
    for table, (pos, vals) in zip(tabs.double().numpy(), uploads, strict=True):
        oracle = np.triu(np_upload(np_cosine(table, True), sigma), 1)
        norm = np.sqrt((oracle**2).sum())
        dense = np.zeros(m * m)
        dense[pos.numpy()] = vals.double().numpy()
        np.testing.assert_allclose(dense.reshape(m, m), oracle * min(1.0, clip / norm), atol=1e-6)
        assert np.sqrt((dense**2).sum()) <= clip + 1e-5


def test_the_server_noise_has_the_accountants_scale():
    """The noise added to the sum has std z C on the strict upper triangle (and nothing elsewhere), z being the
    accountant's answer for the target epsilon."""
    z = accountant.calibrate(4.0, 3, 1e-3, "rdp")
    dp = UserLevelDP(clip=0.5, noise_multiplier=z, delta=1e-3, accountant="rdp")
    upper = torch.zeros(400, 400, dtype=torch.float64)
    dp.add_noise(upper, server_generator(0, 1))
    strict = upper[torch.ones(400, 400, dtype=torch.bool).triu(1)]
    assert float(strict.std()) == pytest.approx(z * 0.5, rel=0.01)
    assert float(strict.mean()) == pytest.approx(0.0, abs=0.01)
    assert torch.count_nonzero(upper.tril()) == 0
    assert dp.spent(3)["privacy/user_epsilon"] == pytest.approx(4.0, abs=1e-3)


def test_a_run_logs_the_accountants_epsilon_and_the_one_shot_spends_it_once(compose_cfg, tmp_path):
    base = [*SYNTH, "ablation=fed_itemknn", "privacy.clip=1.0", "privacy.accountant=rdp"]
    every = train(compose_cfg([*base, "privacy.noise_multiplier=2.0"]), tmp_path / "every", progress=False)
    n_users = every["summary"]["users"]
    for row in every["history"]:
        assert row["privacy/user_epsilon"] == pytest.approx(accountant.epsilon(2.0, row["round"], 1 / n_users, "rdp"))
    assert every["privacy"]["user_epsilon"] == every["history"][-1]["privacy/user_epsilon"]
    once = train(
        compose_cfg([*base, "privacy.target_epsilon=4", "ablation.upload_round=2"]), tmp_path / "once", progress=False
    )
    hist = once["history"]
    assert [row["reported"] for row in hist] == [0.0, hist[0]["clients"], 0.0]
    assert [row["privacy/user_releases"] for row in hist] == [0.0, 1.0, 1.0]
    assert hist[-1]["privacy/user_epsilon"] == pytest.approx(4.0, abs=1e-3)


def test_with_every_client_clipped_the_shared_similarity_does_not_depend_on_the_clip(compose_cfg, tmp_path):
    """Clips below every client's norm normalise every upload: S_g / C is the same for C = 0.01 and C = 0.02."""
    from src.data.dataset import load
    from src.rounds.simulator import FederatedModule

    sims = []
    for clip in (0.01, 0.02):
        cfg = compose_cfg([*SYNTH, "ablation=fed_itemknn", "fl.rounds=1", f"privacy.clip={clip}"])
        module = FederatedModule(cfg, load(cfg))
        module.run_round()
        sims.append(module.strategy.global_sim / clip)
    torch.testing.assert_close(sims[0], sims[1], rtol=1e-5, atol=1e-6)
    assert float(sims[0].abs().max()) > 0


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["ablation=backbone", "privacy.clip=1"], "privacy.clip"),
        (["ablation=fed_itemknn", "privacy.clip=1", "encoding=csr8"], "privacy.clip"),
        (["ablation=fed_itemknn", "privacy.clip=1", "privacy.epsilon=1"], "privacy.clip"),
        (["ablation=fed_itemknn", "privacy.target_epsilon=1"], "privacy.clip"),
        (["privacy.clip=1", "privacy.target_epsilon=1", "privacy.noise_multiplier=1"], "privacy.target_epsilon"),
        (["privacy.clip=1", "privacy.accountant=moments"], "privacy.accountant"),
        (["ablation=fed_itemknn", "fl.rounds=5", "ablation.upload_round=5"], "ablation.upload_round"),
        (["ablation=fed_itemknn", "privacy.clip=1", "fl.client_fraction=0.5"], "fl.client_fraction"),
        (["ablation=fed_itemknn", "privacy.clip=1", "privacy.server_noise=os"], "privacy.server_noise"),
    ],
)
def test_user_dp_settings_that_cannot_run_are_refused_naming_the_key(compose_cfg, tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg = compose_cfg([*SYNTH, *overrides])
        train(cfg, tmp_path, progress=False)


@pytest.mark.parametrize("z", [0.3, 2.0])
def test_the_release_audit_measures_what_the_gaussian_mechanism_allows(compose_cfg, tmp_path, monkeypatch, z):
    """The worst-case release attack on the server's own noise reaches the Gaussian mechanism's AUC; the audit
    attacks the one-shot upload of its round (the run stops there)."""
    from src.analysis.audit import main

    monkeypatch.chdir(tmp_path)
    compose_cfg()
    report = main(
        [
            "dataset=synthetic",
            "ablation=fed_itemknn",
            "fl.rounds=4",
            "ablation.upload_round=2",
            "audit.clients=12",
            "audit.recovery_iters=2",
            "privacy.clip=1",
            f"privacy.noise_multiplier={z}",
            "privacy.accountant=rdp",
        ]
    )
    assert report["attacked_round"] == 2  # the one-shot upload's round, not fl.rounds
    expected = 0.5 * math.erfc(-1 / (2 * z))  # every synthetic upload is clipped to norm 1
    assert report["release_membership_auc_gaussian"] == pytest.approx(expected, abs=1e-6)
    # 0.06: about 2.6 standard errors of the mean AUC of 12 clients (25 noise draws per world each)
    assert report["release_membership_auc"] == pytest.approx(expected, abs=0.06)
    assert report["user_delta"] == 1 / 60  # delta = 1 / users: the synthetic split's 60 clients
    assert report["user_epsilon"] == pytest.approx(accountant.epsilon(z, 1, 1 / 60, "rdp"))


def test_removing_one_user_moves_the_sum_by_at_most_the_clip():
    """The sensitivity the accountant assumes, on the product's summed path: the round's sum over all clients and over
    all but one differ by that client's clipped upload, whose L2 norm is at most C."""
    from src.server.global_similarity import SimilaritySum

    c, m, d, clip = 7, 40, 4, 0.7
    tabs = torch.randn(c, m, d, generator=torch.Generator().manual_seed(5))
    spec = ReleaseSpec(0.2, True, block=300, rows=9, clip=clip)

    def total(tables: torch.Tensor) -> torch.Tensor:
        from src.alignment.release import release_blocks

        sums = SimilaritySum(m)
        for blk in release_blocks(tables, spec):
            sums.add_block(blk)
        return sums.upper

    whole = total(tabs)
    for u in range(c):
        moved = float((whole - total(torch.cat([tabs[:u], tabs[u + 1 :]]))).norm())
        oracle = np.sqrt((np.triu(np_upload(np_cosine(tabs[u].double().numpy(), True), 0.2), 1) ** 2).sum())
        assert moved == pytest.approx(min(clip, oracle), rel=1e-4)


def test_the_server_clips_a_decoded_upload_a_node_did_not_clip():
    """On Flower the server sums decoded uploads: one above the clip (a duplicated position counted once, summed) is
    scaled to norm C; one a node clipped is left as it is."""
    from src.methods.base import RoundSums

    sums = RoundSums(5, torch.device("cpu"), similarity=True)
    sums.clip = 1.0
    rows, cols = torch.tensor([0, 0, 1]), torch.tensor([1, 1, 3])
    sums.add_decoded(torch.tensor([0]), {}, [(rows, cols, torch.tensor([3.0, 1.0, 3.0]))])  # (4, 3): norm 5
    sums.add_decoded(torch.tensor([1]), {}, [(torch.tensor([2]), torch.tensor([4]), torch.tensor([0.6]))])
    upper = sums.sims.upper
    assert float(upper[0, 1]) == pytest.approx(0.8) and float(upper[1, 3]) == pytest.approx(0.6)
    assert float(upper[2, 4]) == pytest.approx(0.6)


def test_a_resume_that_would_recalibrate_the_noise_is_refused(compose_cfg, tmp_path):
    """More fl.rounds to spend the same target over would give later rounds less noise than the earlier ones had:
    the accountant's epsilon would be wrong, so the resume is refused naming what changed."""
    base = [*SYNTH, "ablation=fed_itemknn", "privacy.clip=1", "privacy.target_epsilon=4", "privacy.accountant=rdp"]
    train(compose_cfg([*base, "fl.rounds=2", "fl.checkpoint_every=1"]), tmp_path, progress=False)
    with pytest.raises(ConfigError, match="noise multiplier"):
        train(compose_cfg([*base, "fl.rounds=4", "fl.checkpoint_every=1", "resume=true"]), tmp_path, progress=False)


def test_secret_server_noise_is_not_the_seeded_stream():
    seeded = torch.randn(5, generator=server_generator(0, 1))
    assert torch.equal(seeded, torch.randn(5, generator=server_generator(0, 1)))
    assert not torch.equal(seeded, torch.randn(5, generator=server_generator(0, 1, secret=True)))
