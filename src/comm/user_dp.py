"""User-level differential privacy of the similarity sum (this project's; not the paper's Laplace option).

The Gaussian mechanism of DP-FedAvg (McMahan et al. 2018) on similarity uploads:
- each client scales its whole upload (the strict upper triangle it sends, a vector of m(m-1)/2 entries) to L2
  norm at most C = `privacy.clip` (`src/alignment/release.py`, client side);
- the server adds N(0, (z C)^2) to every entry of the round's sum and divides by the round's number of chosen
  clients (public: the plan's size, not the count of uploads it received) instead of the uploads' count.
Adding or removing one user changes the sum by at most C in L2 when every client is chosen (`fl.client_fraction=1`,
required: with a fixed-size draw one user can displace another and the change is up to 2C), so each round's
release is a Gaussian mechanism of noise multiplier z (the number of users, the denominator, is public);
`src/comm/accountant.py` composes the rounds that release. The Flower server clips each decoded upload again
(`RoundSums.clipped`), so a node cannot break the bound. Everything downstream (S_g, communities, the broadcast,
the clients' scores) is post-processing. The noise is drawn at the server: it protects what the server releases
(the broadcast, S_g), not the uploads from the server itself, which still sees each clipped upload
(docs/communication-privacy.md). With C below every client's norm clipping is a normalisation: every client's
upload has norm C, and S_g scaled by 1/C is the same for every such C.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from src.comm import accountant
from src.runtime.device import to_device


@dataclass(frozen=True)
class UserLevelDP:
    """Clip norm C, noise multiplier z (0: clipping only), delta and the accountant reporting epsilon."""

    clip: float
    noise_multiplier: float
    delta: float
    accountant: str
    secret: bool = False  # the server's noise from the OS's randomness, not from the run seed

    def add_noise(self, upper: torch.Tensor, generator: torch.Generator) -> None:
        """Add N(0, (z C)^2) to every strict-upper-triangle entry of the round's sum `upper` [m, m] (fp64, in
        place); the noise comes from `generator` (CPU, so a seed gives the same noise on every device)."""
        if self.noise_multiplier > 0:
            m = upper.shape[0]
            noise = torch.randn(m, m, generator=generator, dtype=torch.float64).triu_(1)
            upper += to_device(noise, upper.device) * (self.noise_multiplier * self.clip)

    def spent(self, releases: int) -> dict[str, float]:
        """The round's privacy statistics after `releases` noisy releases (epsilon at `delta`)."""
        out = {
            "privacy/user_clip": self.clip,
            "privacy/user_noise_multiplier": self.noise_multiplier,
            "privacy/user_releases": float(releases),
        }
        if self.noise_multiplier > 0:
            eps = accountant.epsilon(self.noise_multiplier, releases, self.delta, self.accountant)
            out |= {"privacy/user_delta": self.delta, "privacy/user_epsilon": eps}
        return out

    @staticmethod
    def from_cfg(cfg: DictConfig, n_users: int, releases: int) -> UserLevelDP | None:
        """`privacy.clip` and the noise multiplier set, or calibrated by the accountant to `privacy.target_epsilon`
        over the run's `releases` rounds that upload, at `privacy.delta` (null: 1 / n_users); None when off."""
        p = cfg.privacy
        if p.clip is None:
            return None
        delta = 1.0 / n_users if p.delta is None else float(p.delta)
        z = 0.0 if p.noise_multiplier is None else float(p.noise_multiplier)
        if p.target_epsilon is not None:
            z = accountant.calibrate(float(p.target_epsilon), max(1, releases), delta, str(p.accountant))
        return UserLevelDP(float(p.clip), z, delta, str(p.accountant), p.server_noise == "secret")


def server_generator(seed: int, round_: int, secret: bool = False) -> torch.Generator:
    """The server's noise stream of a round: seeded by run seed and round (apart from the clients' streams), so a
    simulation is reproducible and the Flower deployment adds the simulator's noise, but anyone who knows the seed
    can subtract it; with `secret` (`privacy.server_noise=secret`, for a real deployment) from the OS's randomness."""
    if secret:
        return torch.Generator().manual_seed(secrets.randbits(63))
    return torch.Generator().manual_seed((seed * 1_000_003 + round_) * 7_919 + 104_729)
