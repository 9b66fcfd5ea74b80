"""Differential privacy of the similarity upload: the Laplace mechanism and its accounting.

Each client adds Laplace(0, b) noise to every entry of its similarity matrix before the threshold
(post-processing keeps the guarantee). An entry is a cosine in [-1, 1], so its L1 sensitivity is
`privacy.sensitivity` = 2 by default, whatever one interaction changes. With `privacy.epsilon` = ε
per round, b = sensitivity / ε protects **each entry** (entry-level ε); the upper triangle has
P = m(m-1)/2 entries computed from the same data, so the whole matrix is only (P ε)-DP per round
(basic composition), and T rounds give T ε per entry and T P ε for the matrix. Both are reported.
`privacy.scale` sets b directly instead (the lineage's FedCIA uses b = 0.001), ε then = sensitivity / b.
The noise is drawn from a CPU generator on every device, so a seed gives the same noise on a GPU (at the
cost of one host-to-device copy per similarity block, `laplace` below). Each client of each round draws from
its own stream (`NoiseStreams`), so its noise is the same whichever chunk, cohort or Flower node trains it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from src.runtime.device import to_device


@dataclass(frozen=True)
class NoiseStreams:
    """The noise of one round's uploads: one CPU generator per client, seeded by (run seed, round, client id)."""

    seed: int
    round: int

    def for_clients(self, users: torch.Tensor) -> list[torch.Generator]:
        """A fresh generator for each client id of `users` [C], in that order."""
        base = (self.seed * 1_000_003 + self.round) * 1_000_033
        return [torch.Generator().manual_seed((base + int(u)) % 2**63) for u in users.tolist()]


def laplace_scale(epsilon: float | None, scale: float | None, sensitivity: float) -> tuple[float, float | None]:
    """(b, per-entry ε per round) from `privacy.epsilon` or `privacy.scale`; (0, None) when both are off."""
    if epsilon is not None:
        return sensitivity / epsilon, epsilon
    if scale is not None and scale > 0:
        return scale, sensitivity / scale
    return 0.0, None


def epsilon_spent(eps_round: float | None, rounds: int, n_items: int) -> dict[str, float]:
    """Total ε after `rounds` releases by basic composition, per entry and for the whole matrix."""
    if eps_round is None:
        return {}
    pairs = n_items * (n_items - 1) // 2
    return {
        "privacy/epsilon_round_entry": eps_round,
        "privacy/epsilon_total_entry": rounds * eps_round,
        "privacy/epsilon_total_matrix": rounds * eps_round * pairs,
    }


def laplace(shape: tuple[int, ...], scale: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Laplace(0, scale) samples by the inverse CDF of uniforms drawn from `generator` (reproducible).

    The uniforms come from the CPU generator and are copied to `device` block by block: one host-to-device
    copy per noisy block on a GPU. Kept so, because a device generator would draw other numbers (results
    would then depend on the device); the noise is only drawn with `privacy.*` on.
    """
    u = to_device(torch.rand(shape, generator=generator), device) - 0.5
    return -scale * torch.sign(u) * torch.log1p(-2 * u.abs())
