"""`compute.native`: the server's upload sums by the C kernel (src/alignment/native_sums.py) against a float64
brute force and against the torch path on real tables: the same pairs, entry counts and support counts, sums
within float rounding."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import requires_real_data
from test_compiled import summed
from test_fast_grad import BIG, module_after

from src.alignment import native_align, native_sums
from src.alignment.release import NATIVE_BAND, ReleaseSpec, release_blocks
from src.alignment.similarity import normalised
from src.cli.config import REPLACED_KEYS, ConfigError
from src.config import schema
from src.runtime import native
from src.runtime.native import compiler


def brute_force(tables: torch.Tensor, sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64, client by client: the strict upper triangle of entries >= sigma summed [m, m], how many clients
    send each pair [m, m], and each client's entry count [C]."""
    e = normalised(tables.double(), True).numpy()
    m = e.shape[1]
    total, held, counts = np.zeros((m, m)), np.zeros((m, m), dtype=int), []
    for client in e:
        s = np.triu(client @ client.T, k=1)
        keep = (s >= sigma) & np.triu(np.ones((m, m), dtype=bool), k=1)
        total += np.where(keep, s, 0.0)
        held += keep
        counts.append(int(keep.sum()))
    return total, held, np.array(counts)


pytestmark = pytest.mark.skipif(compiler() is None, reason="no C compiler on PATH")
KERNEL = native_sums.kernel  # the build of any vector width (the tests below patch `kernel` to one)


@pytest.mark.parametrize(
    "clients,m,threads",
    [(1, 1, 1), (3, 33, 1), (4, 130, 2), (2, NATIVE_BAND + 300, 3), (5, 257, 2)],
)
def test_native_sums_match_a_float64_brute_force(clients, m, threads):
    """Every band, tile and register-tile edge (m not a multiple of 8, 32, 128 or the band; one item; more
    threads than tiles): the pairs of the float64 oracle but those within 1e-6 of sigma, sums within 1e-5."""
    g = torch.Generator().manual_seed(m)
    tables = torch.randn(m, 8, generator=g) + 0.7 * torch.randn(clients, m, 8, generator=g)
    sigma = 0.5
    spec = ReleaseSpec(sigma, True, native=True, threads=threads)
    sums, count = summed(tables, spec)
    total, held, counts = brute_force(tables, sigma)
    upper = normalised(tables.double(), True)
    near = np.zeros((m, m), dtype=bool)
    for client in upper.numpy():
        near |= np.abs(client @ client.T - sigma) < 1e-6
    far = ~near
    assert np.array_equal(sums.support.numpy()[far], held[far])
    assert np.abs(count.numpy() - counts).max() <= near.sum()
    if m > 1:
        assert held.sum() > 0  # real uploads, not empty ones
    np.testing.assert_allclose(sums.upper.numpy()[far], total[far], rtol=1e-5, atol=1e-5)
    assert not sums.upper.numpy()[np.tril_indices(m)].any()  # the strict upper triangle only


@pytest.mark.parametrize("lanes", [16, 8, 4])
def test_every_vector_width_sends_the_pairs_of_the_brute_force(lanes, monkeypatch):
    """The kernel built for 16 (AVX-512), 8 (AVX2) and 4 lanes, whatever this CPU has: each register-tile shape
    sends the oracle's pairs with its sums (m spans two bands, tiles and a partial register tile)."""
    monkeypatch.setattr(native_sums, "kernel", lambda: KERNEL((f"VL={lanes}",)))
    m, sigma = NATIVE_BAND + 45, 0.5
    g = torch.Generator().manual_seed(lanes)
    tables = torch.randn(m, 8, generator=g) + 0.7 * torch.randn(3, m, 8, generator=g)
    sums, count = summed(tables, ReleaseSpec(sigma, True, native=True, threads=2))
    total, held, counts = brute_force(tables, sigma)
    near = np.zeros((m, m), dtype=bool)
    for client in normalised(tables.double(), True).numpy():
        near |= np.abs(client @ client.T - sigma) < 1e-6
    assert held.sum() > 0 and np.array_equal(sums.support.numpy()[~near], held[~near])
    assert np.abs(count.numpy() - counts).max() <= near.sum()
    np.testing.assert_allclose(sums.upper.numpy()[~near], total[~near], rtol=1e-5, atol=1e-5)


def test_native_bands_are_blocks_the_server_adds():
    """The kernel's blocks are what `SimilaritySum.add_block` takes: bands of rows, each from its first row on."""
    tables = torch.randn(3, NATIVE_BAND + 40, 8, generator=torch.Generator().manual_seed(1))
    spec = ReleaseSpec(0.3, True, native=True)
    blocks = list(release_blocks(tables, spec, held=True))
    assert [(b.r0, b.col, tuple(b.total.shape)) for b in blocks] == [
        (0, 0, (NATIVE_BAND, NATIVE_BAND + 40)),
        (NATIVE_BAND, NATIVE_BAND, (40, 40)),
    ]
    assert all(b.held is not None and b.count.shape == (3,) for b in blocks)


def test_native_band_must_start_on_a_tile():
    e = torch.zeros(1, 300, 8)
    rows, cols = native_sums.padded(e)
    with pytest.raises(ValueError, match="multiple of 128"):
        native_sums.band_sums(rows, cols, 300, 0.5, 64, 300, False, 1)


@requires_real_data
@pytest.mark.parametrize("dataset", ["ml-100k", "filmtrust", *BIG])
def test_native_sums_keep_the_torch_pairs_on_real_tables(compose_cfg, dataset, one_thread):
    """Real tables after an aligning round: exactly the eager fp32 path's pairs, entry and support counts, sums
    within 1e-6 relative (fp32 sums over the chunk's clients in another order)."""
    module = module_after(compose_cfg, dataset, 2, ["compute=fused"])
    tables = module.state["items"]
    eager = ReleaseSpec(0.5, True, block=1 << 20)
    (s1, n1), (s2, n2) = summed(tables, eager), summed(tables, dataclasses.replace(eager, native=True, threads=2))
    assert int(n1.sum()) > 0
    assert torch.equal(n2, n1) and torch.equal(s2.support, s1.support)
    assert torch.equal(s2.upper != 0, s1.upper != 0)
    torch.testing.assert_close(s2.upper, s1.upper, rtol=1e-6, atol=1e-6)


def test_native_applies_to_the_cpu_only_and_when_asked(compose_cfg, monkeypatch):
    """compute=native (the default): on a CPU with AVX-512 when the kernels build; never on another device;
    compute=fused and compute=reference: never."""
    from src.methods.base import build_method

    cfg = compose_cfg(["dataset=synthetic"])
    assert cfg.compute.kernel == "native"
    assert build_method(cfg, torch.device("cpu")).spec.native == native.fast_cpu()  # measured on AVX-512 only
    assert not build_method(cfg, torch.device("cuda")).spec.native
    for other in ("fused", "reference"):
        assert not build_method(compose_cfg(["dataset=synthetic", f"compute={other}"]), torch.device("cpu")).spec.native
    monkeypatch.setattr(native, "fast_cpu", lambda: True)
    assert build_method(cfg, torch.device("cpu")).spec.native
    monkeypatch.setattr(native, "usable", lambda *sources: False)  # no C compiler: the torch path, no error
    assert not build_method(cfg, torch.device("cpu")).spec.native


def test_the_replaced_keys_name_their_successor(compose_cfg):
    """Every key retired from the schema (stored runs read it at its old value) names its successor when overridden."""
    assert set(REPLACED_KEYS) == set(schema.RETIRED)
    for old in ("compute.native=true", "model.fast_kernel=autograd"):
        with pytest.raises(ConfigError, match=r"was replaced .*; expected compute="):
            compose_cfg(["dataset=synthetic", old])


def test_the_kernel_is_a_speed_key():
    """A run's identity ignores it (resume, campaign, report rows): every kernel computes the same values."""
    from src.config.identity import SPEED_KEYS

    assert {"compute.kernel", "compute.native", "model.fast_kernel"} <= set(SPEED_KEYS)


def test_auto_falls_back_where_the_kernel_sources_are_missing(compose_cfg, monkeypatch, tmp_path):
    """A Flower FAB carries Python and YAML only: `auto` then keeps the torch path on that node."""
    from src.methods.base import build_method

    monkeypatch.setattr(native, "fast_cpu", lambda: True)  # a CPU the kernels are for: only the sources decide
    cfg = compose_cfg(["dataset=synthetic"])
    if native.usable(native_sums.SOURCE, native_align.SOURCE):  # where they build, the kernels run
        method = build_method(cfg, torch.device("cpu"))
        assert method.spec.native and method.loss.native_threads > 0
    for module in (native_sums, native_align):
        with monkeypatch.context() as patch:
            patch.setattr(module, "SOURCE", tmp_path / "absent.c")
            method = build_method(cfg, torch.device("cpu"))
            assert not method.spec.native and method.loss.native_threads == 0, module.__name__


def test_a_negative_threshold_is_refused():
    rows, cols = native_sums.padded(torch.zeros(1, 40, 8))
    with pytest.raises(ValueError, match="sigma must be > 0"):
        native_sums.band_sums(rows, cols, 40, -0.1, 0, 40, False, 1)
