"""Per-client random streams: a client's draws must not depend on who is sampled with it."""

from __future__ import annotations

import numpy as np
import torch

from src.clients.cohort import batch_layout, sample_round
from src.clients.streams import ClientStream, mix
from src.data.protocols import NegativeSampler


def problem(n_users: int = 12, n_items: int = 30, seed: int = 0):
    """Random positives per user (CSR) and a sampler that excludes them."""
    rng = np.random.default_rng(seed)
    excluded = np.zeros((n_users, n_items), dtype=bool)
    items, counts = [], []
    for u in range(n_users):
        k = int(rng.integers(3, 12))
        chosen = rng.choice(n_items, size=k, replace=False)
        excluded[u, chosen] = True
        items.append(chosen)
        counts.append(k)
    ptr = torch.as_tensor(np.r_[0, np.cumsum(counts)])
    return ptr, torch.as_tensor(np.concatenate(items)), NegativeSampler(excluded)


def client_view(samples, layout, row):
    """(items, labels) of each local step of the client at layout row `row`."""
    out = []
    for t in range(int(layout.steps[row])):
        idx = layout.index[row, t]
        idx = idx[idx >= 0]
        out.append((samples.items[idx].tolist(), samples.labels[idx].tolist()))
    return out


def test_uniform_is_uniform_and_decorrelated():
    s = ClientStream(0, 1, "x")
    u = s.uniform(torch.arange(1000).unsqueeze(1), torch.arange(200).unsqueeze(0)).reshape(-1)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    hist = torch.histc(u.float(), bins=20, min=0.0, max=1.0)
    expected = len(u) / 20
    assert float(((hist - expected) ** 2 / expected).sum()) < 60  # chi-square, 19 dof
    v = s.uniform(torch.arange(1000).unsqueeze(1), torch.arange(1, 201).unsqueeze(0)).reshape(-1)
    assert abs(float(np.corrcoef(u.numpy(), v.numpy())[0, 1])) < 0.01
    assert not torch.equal(
        ClientStream(0, 2, "x").uniform(torch.arange(5), torch.zeros(5)), s.uniform(torch.arange(5), torch.zeros(5))
    )
    assert not torch.equal(
        ClientStream(1, 1, "x").uniform(torch.arange(5), torch.zeros(5)), s.uniform(torch.arange(5), torch.zeros(5))
    )


def test_mix_matches_the_reference_splitmix64():
    def ref(z: int) -> int:
        z &= (1 << 64) - 1
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
        return z ^ (z >> 31)

    xs = [0, 1, 12345, 2**62 + 7, -5, -(2**63)]
    got = mix(torch.tensor(xs, dtype=torch.long)).tolist()
    assert [g & ((1 << 64) - 1) for g in got] == [ref(x) for x in xs]


def test_a_client_samples_the_same_alone_or_in_any_cohort():
    ptr, items, sampler = problem()
    full = sample_round(ptr, items, sampler, 4, seed=7, round_=3)
    everyone = torch.arange(12)
    full_layout = batch_layout(full, everyone, 2, 5, seed=7, round_=3)
    for group in ([4], [9, 4, 1], [11, 0, 4]):
        users = torch.tensor(group)
        part = sample_round(ptr, items, sampler, 4, seed=7, round_=3, users=users)
        layout = batch_layout(part, torch.arange(len(group)), 2, 5, seed=7, round_=3)
        row = group.index(4)
        assert client_view(part, layout, row) == client_view(full, full_layout, 4)


def test_draws_change_with_round_and_respect_the_pool():
    ptr, items, sampler = problem()
    a = sample_round(ptr, items, sampler, 4, seed=7, round_=1)
    b = sample_round(ptr, items, sampler, 4, seed=7, round_=2)
    assert not torch.equal(a.items, b.items)
    users = torch.repeat_interleave(a.users, (a.ptr[1:] - a.ptr[:-1]))
    negatives = a.labels == 0
    assert not sampler.excluded[users[negatives], a.items[negatives]].any()
    assert bool(sampler.excluded[users[~negatives], a.items[~negatives]].all())
