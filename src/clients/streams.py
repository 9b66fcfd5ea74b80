"""Per-client random numbers that do not depend on who else trains alongside.

A client's draws (training negatives, batch shuffles) are a pure function of
(seed, round, purpose, user, position), computed by a counter-based hash (SplitMix64) in integer
tensor arithmetic. The same client therefore sees the same samples whether it trains in a stacked
cohort of a thousand, alone in a test, on another device, or in a Flower ClientApp, and on CPU or
GPU alike; resuming at round r needs no generator state.
"""

from __future__ import annotations

import hashlib

import torch

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed 64-bit integer
_MUL1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MUL2 = -7723592293110705685  # 0x94D049BB133111EB


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def mix(x: torch.Tensor) -> torch.Tensor:
    """The SplitMix64 finaliser: a bijection of 64-bit integers that scatters nearby inputs."""
    x = (x ^ _shr(x, 30)) * _MUL1
    x = (x ^ _shr(x, 27)) * _MUL2
    return x ^ _shr(x, 31)


def _i64(value: int) -> int:
    """A Python integer wrapped to a signed 64-bit value (as int64 tensor arithmetic wraps)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _key(text: str) -> int:
    """A stable signed 64-bit key for a purpose name (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)


class ClientStream:
    """Uniform draws of one purpose in one round, addressed by (user, position, attempt)."""

    def __init__(self, seed: int, round_: int, purpose: str):
        base = torch.tensor([_key(purpose) ^ int(seed)], dtype=torch.long)
        self.base = int(mix(mix(base) + _i64(int(round_) * _GOLDEN))[0])

    def uniform(self, users: torch.Tensor, index: torch.Tensor, attempt: int = 0) -> torch.Tensor:
        """Uniform [0, 1) float64 draws, one per element of the broadcast `users` x `index`."""
        users, index = torch.broadcast_tensors(users.long(), index.long())
        x = mix(users * _GOLDEN + self.base)
        x = mix(x + (index + 1) * _GOLDEN)
        if attempt:
            x = mix(x + _i64(attempt * _GOLDEN))
        return _shr(x, 11).double() * 2.0**-53

    def randint(self, high: int, users: torch.Tensor, index: torch.Tensor, attempt: int = 0) -> torch.Tensor:
        """Uniform integers in [0, high) from 53-bit uniforms (bias below high / 2^53)."""
        return (self.uniform(users, index, attempt) * high).long().clamp_(max=high - 1)
