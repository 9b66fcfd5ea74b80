"""Communication accounting and privacy: byte counts equal real encodings, the server aggregates
what it would decode, top-k and delta behave as specified, Laplace noise has the stated scale, and
a run reports its traffic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from alignment_helpers import np_cosine, np_upload
from uploads import Uploads

from src.cli.train import train
from src.comm.codec import (
    Encoding,
    Ledger,
    decode_upper,
    delta_bytes,
    embedding_bytes,
    encode_upper,
    index_bytes,
    labels_bytes,
    quantise,
    sparse_bytes,
)
from src.comm.privacy import epsilon_spent, laplace, laplace_scale

CPU = torch.device("cpu")


def random_upload(m: int, density: float, seed: int, lo: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    upper = np.triu((rng.random((m, m)) < density) * rng.uniform(lo, 1.0, (m, m)), 1)
    return upper + upper.T


def test_index_bytes_is_the_smallest_unsigned_type():
    assert [index_bytes(n) for n in (1, 256, 257, 65536, 65537, 2**32, 2**32 + 1)] == [1, 1, 2, 2, 4, 4, 8]


@pytest.mark.parametrize("fmt", ["csr", "coo"])
@pytest.mark.parametrize("bits", [32, 16, 8, 4])
@pytest.mark.parametrize("m,density", [(9, 0.0), (40, 0.3), (300, 0.02), (300, 0.9)])
def test_byte_formula_equals_a_real_encoding_which_decodes(fmt, bits, m, density):
    mat = random_upload(m, density, seed=m + bits)
    payload = encode_upper(mat, fmt, bits, lo=0.5, hi=1.0)
    nnz = int(np.count_nonzero(np.triu(mat, 1)))
    assert len(payload) == sparse_bytes(nnz, m, fmt, bits)
    back = decode_upper(payload)
    step = {32: 1e-7, 16: 1e-3, 8: 0.5 / 255 / 2 + 1e-7, 4: 0.5 / 15 / 2 + 1e-7}[bits]
    np.testing.assert_allclose(back, mat, atol=step)
    # the simulation's quantiser decodes to the same values as the wire format
    sim_vals = quantise(torch.as_tensor(mat[mat != 0]), 0.5, 1.0, bits).numpy()
    np.testing.assert_allclose(back[mat != 0], sim_vals, atol=1e-6)


def test_sizes_are_what_the_formats_imply():
    m = 1682  # ML-100K: column indices fit uint16, COO linear indices need uint32
    assert sparse_bytes(1000, m, "csr", 32) == 9 + (m + 1) * 2 + 1000 * 2 + 4000
    assert sparse_bytes(1000, m, "coo", 8) == 9 + 1000 * 4 + 1000 + 8
    assert sparse_bytes(1001, m, "coo", 4) == 9 + 1001 * 4 + 501 + 8
    assert embedding_bytes(m, 32) == m * 32 * 4


@pytest.mark.parametrize("n_labels,width", [(0, 1), (1, 1), (256, 1), (257, 2), (65536, 2), (65537, 4)])
def test_labels_bytes_is_a_count_and_one_smallest_integer_a_label(n_labels, width):
    """Community labels as sent: a uint32 count, then each of the m labels in the narrowest unsigned numpy type
    that holds label n_labels - 1 (one byte up to 256 communities, two up to 65,536)."""
    m = 1682
    labels = np.arange(m) % max(n_labels, 1)
    dtype = next(t for t in (np.uint8, np.uint16, np.uint32) if max(n_labels - 1, 0) <= np.iinfo(t).max)
    wire = np.uint32(m).tobytes() + labels.astype(dtype).tobytes()
    assert np.dtype(dtype).itemsize == width
    assert labels_bytes(m, n_labels) == len(wire) == 4 + width * m


def upload_matrices(tabs: torch.Tensor, sigma: float, centre: bool) -> list[np.ndarray]:
    return [np_upload(np_cosine(t, centre), sigma) for t in tabs.double().numpy()]


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_server_sums_what_it_would_decode(bits):
    c, m, d, sigma = 5, 14, 3, 0.4
    tabs = torch.randn(c, m, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    agg = Uploads(m, sigma, True, block=50, rows=4, bits=bits)
    agg.add(tabs, torch.ones(c, dtype=torch.bool))
    decoded = [decode_upper(encode_upper(u, "csr", bits, lo=sigma, hi=1.0)) for u in upload_matrices(tabs, sigma, True)]
    np.testing.assert_allclose(agg.mean().double().numpy(), np.mean(decoded, axis=0), atol=1e-6)
    assert agg.nnz == sum(int(np.count_nonzero(u)) for u in upload_matrices(tabs, sigma, True))


def test_topk_keeps_the_k_largest_of_each_row_or_column():
    c, m, d, sigma, k = 3, 16, 4, 0.0, 2
    tabs = torch.randn(c, m, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    agg = Uploads(m, sigma, True, block=64, rows=5, topk=k)
    agg.add(tabs, torch.ones(c, dtype=torch.bool))
    expected = []
    for up in upload_matrices(tabs, sigma, True):
        cos = up.copy()
        keep = np.zeros_like(cos, dtype=bool)
        for j in range(m):
            row = np.where(np.arange(m) == j, -np.inf, cos[j])
            keep[j, np.argsort(-row)[:k]] = True
        keep = (keep | keep.T) & (up != 0)
        expected.append(np.where(keep, up, 0.0))
        assert (keep.sum(1) >= 1).all() and keep.sum() < (up != 0).sum()
    np.testing.assert_allclose(agg.mean().double().numpy(), np.mean(expected, axis=0), atol=1e-9)


def test_delta_upload_sends_only_what_changed():
    m, enc = 50, Encoding("coo", None, 32, True)
    ledger = Ledger(enc, m)
    idx = torch.tensor([3, 10, 57, 400])
    val = torch.tensor([0.6, 0.7, 0.8, 0.9])
    # by hand, m = 50: 1,225 pairs, so a position takes 2 bytes; a 9-byte header, 4-byte fp32 values, a 1-byte flag
    first = ledger.similarity_uploads([7], torch.tensor([8]), [(idx, val)])
    assert first.tolist() == [9 + 4 * 2 + 4 * 4 + 1]  # the whole upload: 34
    same = ledger.similarity_uploads([7], torch.tensor([8]), [(idx, val)])
    assert same.tolist() == [9 + 4 + 1]  # an empty delta: header, the uint32 removal count, the flag
    # one value changed (10), one entry dropped (57), one added (900): 2 upserts and 1 removal
    idx2, val2 = torch.tensor([3, 10, 400, 900]), torch.tensor([0.6, 0.75, 0.9, 0.55])
    third = ledger.similarity_uploads([7], torch.tensor([8]), [(idx2, val2)])
    assert third.tolist() == [9 + 2 * 2 + 2 * 4 + 4 + 1 * 2 + 1]  # the delta (27 bytes) beats the whole upload (33)
    assert (sparse_bytes(4, m, "coo", 32), delta_bytes(2, 1, m, "coo", 32)) == (33, 27)


def test_laplace_noise_has_the_stated_scale_and_epsilon_accounting():
    b = 0.3
    x = laplace((400_000,), b, torch.Generator().manual_seed(0), CPU).double()
    assert abs(float(x.mean())) < 0.005
    assert float(x.abs().mean()) == pytest.approx(b, rel=0.01)  # E|X| = b for Laplace(0, b)
    assert float(x.var()) == pytest.approx(2 * b * b, rel=0.02)
    scale, eps = laplace_scale(4.0, None, 2.0)
    assert (scale, eps) == (0.5, 4.0)
    assert laplace_scale(None, 0.001, 2.0) == (0.001, pytest.approx(2000.0))
    assert laplace_scale(None, None, 2.0) == (0.0, None)
    spent = epsilon_spent(4.0, rounds=10, n_items=5)
    assert spent["privacy/epsilon_total_entry"] == 40.0 and spent["privacy/epsilon_total_matrix"] == 400.0


def test_an_uploads_noise_has_the_configured_laplace_scale():
    """One client's noisy upload minus its plain one (sigma -1: every entry sent), on entries whose noisy value the
    [-1, 1] clamp cannot reach: mean |noise| = b and variance 2 b^2, the Laplace(0, b) the release is told to add."""
    m, b = 200, 0.05
    tabs = torch.randn(1, m, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    noisy = Uploads(m, -1.0, True, block=1 << 20, rows=64, noise=b, generator=torch.Generator().manual_seed(0))
    noisy.add(tabs, torch.ones(1, dtype=torch.bool))
    plain = Uploads(m, -1.0, True, block=1 << 20, rows=64)
    plain.add(tabs, torch.ones(1, dtype=torch.bool))
    upper = torch.triu(torch.ones(m, m, dtype=torch.bool), 1)
    clean, diff = plain.mean()[upper].double(), (noisy.mean() - plain.mean())[upper].double()
    diff = diff[clean.abs() < 0.5]
    assert len(diff) > 5_000
    assert float(diff.abs().mean()) == pytest.approx(b, rel=0.05)
    assert float(diff.var()) == pytest.approx(2 * b * b, rel=0.1)


def test_noise_changes_the_upload_and_the_seed_fixes_it():
    c, m, d = 4, 12, 3
    tabs = torch.randn(c, m, d, generator=torch.Generator().manual_seed(3))
    means = []
    for seed in (0, 0, 1):
        agg = Uploads(m, 0.5, True, block=40, rows=4, noise=0.2, generator=torch.Generator().manual_seed(seed))
        agg.add(tabs, torch.ones(c, dtype=torch.bool))
        means.append(agg.mean())
    plain = Uploads(m, 0.5, True, block=40, rows=4)
    plain.add(tabs, torch.ones(c, dtype=torch.bool))
    assert torch.equal(means[0], means[1]) and not torch.equal(means[0], means[2])
    assert not torch.allclose(means[0], plain.mean())
    assert torch.equal(means[0], means[0].T) and float(means[0].max()) <= 1.0


@pytest.mark.parametrize(
    "ablation,extra",
    [
        ("full", ["comm.bits=8", "comm.format=coo", "comm.delta=true"]),
        ("knn_ica", ["ablation.aggregate=support_mean", "comm.bits=8", "comm.format=coo", "comm.delta=true"]),
        ("backbone", []),
        ("fedavg", []),
    ],
)
def test_a_run_reports_its_traffic(compose_cfg, tmp_path, ablation, extra):
    cfg = compose_cfg(
        [
            "dataset=synthetic",
            f"ablation={ablation}",
            "fl.rounds=2",
            "fl.checkpoint_every=0",
            "model.alignment=fast",
            "optim=adam",
            *extra,
        ]
    )
    payload = train(cfg, tmp_path)
    m, d = payload["summary"]["items"], int(cfg.model.dim)
    last = payload["history"][-1]
    assert last["comm/embedding_bytes"] == embedding_bytes(m, d)
    totals = payload["communication"]
    assert totals["upload_bytes_total"] == sum(r["comm/upload_bytes_total"] for r in payload["history"])
    if ablation == "backbone":
        assert last["comm/upload_bytes_mean"] == embedding_bytes(m, d) and totals["upload_vs_embedding"] == 1.0
    elif ablation == "fedavg":  # the item table and the score layer (d weights and a bias), fp32, each way
        assert last["comm/upload_bytes_mean"] == last["comm/download_bytes_mean"] == 4 * (m * d + d + 1)
    else:
        first = payload["history"][0]
        # round 1 has no previous upload: whole uploads of n = nnz/2 upper-triangle entries, by hand for the split's
        # m items (m(m-1)/2 pairs between 2^8 and 2^16: 2-byte positions) at 8 bits: a 9-byte header, 2n + n bytes,
        # lo and hi as two fp32, and the 1-byte flag: 18 + 3n bytes, linear in n, so the mean is that of the mean n
        assert 2**8 < m * (m - 1) // 2 <= 2**16
        nnz_half = first["comm/upload_nnz_mean"] / 2
        assert first["comm/upload_bytes_mean"] == pytest.approx(18 + 3 * nnz_half, rel=1e-12)
        assert last["comm/download_bytes_mean"] > 0 and totals["download_bytes_total"] > 0


def test_tables_as_changed_rows_count_what_differs(compose_cfg):
    """`comm.tables=rows`, against the tables themselves: an uploader sends the rows of its trained table that differ
    from the server's table it started from; a chosen client receives the rows of the server's table that differ
    from the one it last received (all rows the first time); each message is never larger than the dense table."""
    from src.comm.codec import HEADER_BYTES, index_bytes
    from src.data.dataset import load
    from src.rounds.simulator import FederatedModule

    cfg = compose_cfg(["dataset=synthetic", "ablation=backbone", "comm.tables=rows", "fl.client_fraction=0.5"])
    module = FederatedModule(cfg, load(cfg))
    plans = []
    configure = module.strategy.configure_fit
    module.strategy.configure_fit = lambda r: plans.append(configure(r)) or plans[-1]
    held: dict[int, torch.Tensor] = {}
    m, d = module.server["items"].shape

    def size(rows: int) -> float:
        return float(min(HEADER_BYTES + rows * (index_bytes(m) + 4 * d), 4 * m * d))

    for _ in range(4):
        start = module.server["items"].clone()
        row = module.run_round()
        clients = plans[-1].clients.tolist()
        up = [size(int((module.state["items"][c] != start).any(1).sum())) for c in clients]
        down = [size(m if c not in held else int((held[c] != start).any(1).sum())) for c in clients]
        held.update({c: start for c in clients})
        assert row["comm/upload_bytes_total"] == pytest.approx(sum(up))
        assert row["comm/download_bytes_total"] == pytest.approx(sum(down))
        assert row["comm/upload_bytes_mean"] < 4 * m * d


@pytest.mark.parametrize("delta", [False, True])
def test_the_download_is_the_broadcast_encoded_by_hand(compose_cfg, delta):
    """Each round's download per client, from the broadcast the server sends at the round's end: S_g's strict upper
    triangle as 8-bit COO (a 9-byte header, 2-byte positions for m(m-1)/2 between 2^8 and 2^16 pairs, one byte a
    value, lo and hi as two fp32) and one byte a community label after a 4-byte count; over the round's clients."""
    from src.data.dataset import load
    from src.rounds.simulator import FederatedModule

    extra = ["comm.bits=8", "comm.format=coo", f"comm.delta={str(delta).lower()}", "fl.client_fraction=0.5"]
    cfg = compose_cfg(["dataset=synthetic", "ablation=full", *extra])
    module = FederatedModule(cfg, load(cfg))
    m = module.data.n_items
    assert 2**8 < m * (m - 1) // 2 <= 2**16
    for _ in range(2):
        stats = module.run_round()
        sent = module.broadcast.global_sim.double().numpy()
        n = sum(1 for j in range(m) for k in range(j + 1, m) if sent[j, k] != 0)
        labels = len(set(module.broadcast.labels.tolist()))
        assert labels < 256
        per_client = 9 + 2 * n + n + 8 + (4 + m)
        assert stats["comm/download_bytes_mean"] == per_client
        assert stats["comm/download_bytes_total"] == per_client * stats["clients"]
