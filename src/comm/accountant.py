"""The privacy loss of user-level DP over a run, from a maintained accountant (Google's `dp-accounting`).

A run releases the round's noisy sum (`src/comm/user_dp.py`) once per round in which some client uploads; each
release is a Gaussian mechanism with noise multiplier z (the noise's std over the L2 sensitivity C of one user),
so `releases` of them are one `SelfComposedDpEvent`. Neighbouring datasets differ by adding or removing one
user; every client is chosen every round (`fl.client_fraction=1`, checked in src/cli/config.py: a fixed-size draw
would let one user displace another, twice the sensitivity), so no amplification by sampling is claimed or needed.
`rdp` is the Renyi accountant (Mironov 2017), `pld` the privacy-loss-distribution accountant (tighter).
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import dp_accounting

ACCOUNTANTS = ("rdp", "pld")


# dp_accounting (and the scipy it pulls in, seconds of start-up) is imported when epsilon is first computed, not by
# every command that reads the config schema
def _accountant(name: str) -> dp_accounting.PrivacyAccountant:
    from dp_accounting import pld, rdp

    if name not in ACCOUNTANTS:
        raise ValueError(f"privacy accountant {name!r}; expected one of {ACCOUNTANTS}")
    return rdp.RdpAccountant() if name == "rdp" else pld.PLDAccountant()


def gaussian_releases(noise_multiplier: float, releases: int) -> dp_accounting.DpEvent:
    """`releases` Gaussian mechanisms of noise multiplier z, composed."""
    import dp_accounting

    return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise_multiplier), releases)


@cache
def epsilon(noise_multiplier: float, releases: int, delta: float, accountant: str = "rdp") -> float:
    """The epsilon spent at `delta` after `releases` releases of noise multiplier z (0 before the first)."""
    if releases == 0:
        return 0.0
    acc = _accountant(accountant)
    acc.compose(gaussian_releases(noise_multiplier, releases))
    return float(acc.get_epsilon(delta))


@cache
def calibrate(target_epsilon: float, releases: int, delta: float, accountant: str = "rdp") -> float:
    """The smallest noise multiplier z (to 1e-4) whose `releases` releases spend at most `target_epsilon` at
    `delta`, by the library's bracketing search (PLD searched from half the Renyi answer up: it is tighter, and
    its discretised loss is too large to build for a tiny z)."""
    import dp_accounting

    lower, guess = 1e-3, 1.0
    if accountant == "pld":
        guess = calibrate(target_epsilon, releases, delta, "rdp")
        lower = guess / 2
    z = dp_accounting.calibrate_dp_mechanism(
        lambda: _accountant(accountant),
        lambda z: gaussian_releases(z, releases),
        target_epsilon,
        delta,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(lower, guess),
        tol=1e-4,
    )
    return float(z)
