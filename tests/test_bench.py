"""`python -m src.bench`: the report has every field, sane values, and both sides time the same work."""

from __future__ import annotations

import json
import math

import pytest
import torch

import src.perf.bench as bench_mod
from src.cli.config import ConfigError
from src.perf.bench import PHASES, main

FIELDS = [
    "dataset",
    "protocol",
    "ablation",
    "n_users",
    "n_items",
    "config",
    "overrides",
    "device",
    "torch_version",
    "rounds",
    "warmup_rounds",
    "setup_s",
    "seconds_per_round",
    "client_steps_per_round",
    "client_steps_per_second",
    "peak_rss_mib",
    "peak_gpu_mib",
    "host_device_per_round",
    "reference",
    "reference_note",
]
REFERENCE_FIELDS = [
    "clients",
    "chunks",
    "stacked_client_steps",
    "reference_client_steps",
    "stacked_padded_steps",
    "stacked_s",
    "reference_s",
    "stacked_s_per_client",
    "reference_s_per_client",
    "speedup",
    "bce_stacked",
    "bce_reference",
    "max_abs_param_diff",
    "alignment_included",
    "note",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def run_bench(cache_dir, tmp_path, *overrides: str) -> tuple[dict, dict, str]:
    out = tmp_path / "bench.json"
    returned = main(
        ["dataset=synthetic", "fl.rounds=1", f"bench.out='{out}'", f"data.cache_dir='{cache_dir}'", *overrides]
    )
    return json.loads(out.read_text()), returned, out.name


@pytest.mark.parametrize("ablation", ["backbone", "full"])
def test_bench_report(cache_dir, tmp_path, capsys, ablation):
    # AlignFedRec with the lineage SGD: a step is proportional to the gradient, so a wrong alignment gradient shows
    # in the end parameters (Adam's first step is about lr whatever the gradient: it would hide one)
    engine = ["optim=sgd"] if ablation == "full" else []
    report, returned, name = run_bench(cache_dir, tmp_path, f"ablation={ablation}", "model.alignment=exact", *engine)
    assert report == json.loads(json.dumps(returned))
    assert set(FIELDS) <= report.keys(), set(FIELDS) - report.keys()
    assert (report["dataset"], report["ablation"], report["rounds"], report["warmup_rounds"]) == (
        "synthetic",
        ablation,
        1,
        2,
    )
    phases = report["seconds_per_round"]
    assert set(phases) == {*PHASES, "round"}
    assert all(isinstance(v, float) and v >= 0 for v in phases.values()), phases
    assert phases["train"] > 0 and phases["round"] >= phases["train"]
    if ablation == "full":
        assert phases["community"] > 0
    # default config: every client, 1 epoch, batch 256 -> every synthetic client (<= 20 positives x 5) has 1 step
    assert report["client_steps_per_round"] == report["n_users"]
    assert report["client_steps_per_second"] > 0
    assert report["peak_rss_mib"] > 0
    assert report["peak_gpu_mib"] is None if report["device"]["type"] == "cpu" else report["peak_gpu_mib"] > 0
    assert report["device"]["name"] and report["device"]["torch_threads"] == 1
    # counted on the CPU as on a GPU: per chunk one read of the losses (the uploaders' count is known on the CPU)
    assert report["host_device_per_round"]["syncs"] == -(-report["n_users"] // report["config"]["chunk_size"])

    ref = report["reference"]
    assert report["reference_note"] is None
    assert set(REFERENCE_FIELDS) <= ref.keys(), set(REFERENCE_FIELDS) - ref.keys()
    assert ref["clients"] == 32  # bench.reference_clients default, fewer than the 60 synthetic clients
    speedup = ref["speedup"]
    assert isinstance(speedup, float) and math.isfinite(speedup) and speedup > 0
    assert ref["stacked_s"] > 0 and ref["reference_s"] > 0
    assert ref["stacked_s_per_client"] == pytest.approx(ref["stacked_s"] / 32)
    assert ref["speedup"] == pytest.approx(ref["reference_s"] / ref["stacked_s"])
    # the same work on both sides: as many client-steps, the same losses and end parameters
    assert ref["stacked_client_steps"] == ref["reference_client_steps"] == 32
    assert ref["bce_stacked"] == pytest.approx(ref["bce_reference"], rel=1e-5)
    assert ref["max_abs_param_diff"] < 1e-4
    # AlignFedRec: the stacked exact mode against the plainly written per-client loss
    assert ref["alignment_included"] is (ablation == "full")
    assert ("exact loss written plainly" in ref["note"]) == (ablation == "full")
    assert ref["stacked_alignment_mode"] == ("exact" if ablation == "full" else None)

    printed = capsys.readouterr().out
    for text in (
        "s/round",
        "client-steps per second",
        "peak resident memory",
        "host-device per round",
        "speed-up",
        name,
    ):
        assert text in printed, text


def test_bench_more_steps_and_chunks(cache_dir, tmp_path):
    """Several steps per client and several chunks: still the same client-steps on both sides."""
    report, _, _ = run_bench(
        cache_dir,
        tmp_path,
        "fl.batch_size=16",
        "fl.local_epochs=2",
        "fl.chunk_size=8",
        "bench.reference_clients=20",
        "optim=adam",
        "model.alignment=exact",
    )
    ref = report["reference"]
    assert ref["clients"] == 20 and ref["chunks"] == 3
    assert ref["stacked_client_steps"] == ref["reference_client_steps"] > 2 * 20
    assert ref["stacked_padded_steps"] >= ref["stacked_client_steps"]
    assert report["client_steps_per_round"] > 2 * report["n_users"]
    assert ref["bce_stacked"] == pytest.approx(ref["bce_reference"], rel=1e-5)


def test_bench_central_and_bad_config(cache_dir, tmp_path):
    report, _, _ = run_bench(cache_dir, tmp_path, "ablation=central")
    assert report["reference"] is None and "central" in report["reference_note"]
    assert all(v >= 0 for v in report["seconds_per_round"].values())
    with pytest.raises(ConfigError, match="bench.reference_clients"):
        run_bench(cache_dir, tmp_path, "bench.reference_clients=-1")


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_bench_refuses_missing_cuda_before_reading_any_data(compose_cfg, monkeypatch, device):
    def must_not_run(*args, **kwargs):
        raise AssertionError("data was read before the config was validated")

    monkeypatch.setattr(bench_mod, "load", must_not_run)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"device=.*CUDA is not available"):
        main(["dataset=synthetic", f"device={device}"])
    cfg = compose_cfg(["dataset=synthetic"])  # valid at compose time; bench() checks the config it is given
    cfg.device = device
    with pytest.raises(ConfigError, match="device"):
        bench_mod.bench(cfg, [])


def test_bench_times_a_baseline_side_by_side(cache_dir, tmp_path, capsys):
    """`bench.baseline` benches those overrides in a child process first; the report holds its figures and
    the ratio baseline / this for every phase and for the peak memory."""
    report, _, _ = run_bench(
        cache_dir, tmp_path, "ablation=full", "bench.reference_clients=0", 'bench.baseline=["model.fast_block=null"]'
    )
    base = report["baseline"]
    assert base["overrides"] == ["model.fast_block=null"] and base["ablation"] == "full"
    ratios = report["speedup_vs_baseline"]
    for phase, mine in report["seconds_per_round"].items():
        if mine > 0:
            assert ratios[f"{phase}_s"] == pytest.approx(base["seconds_per_round"][phase] / mine)
    assert ratios["peak_rss"] == pytest.approx(base["peak_rss_mib"] / report["peak_rss_mib"])
    assert "baseline: model.fast_block=null" in capsys.readouterr().out


def test_bench_refuses_a_baseline_that_is_not_overrides(compose_cfg):
    with pytest.raises(ConfigError, match="bench.baseline"):
        main(["dataset=synthetic", "bench.baseline=[fast]"])


def test_bench_roofline_counts_the_products_from_the_shapes(cache_dir, tmp_path):
    """The aggregate phase's FLOPs are every uploader's upper-triangle products, m (m + 1) d; the fast train
    phase's 6 K m d per client-step; the rates are those FLOPs over the phase's seconds; ceilings are positive."""
    report, _, _ = run_bench(cache_dir, tmp_path, "ablation=full", "bench.reference_clients=0", "model.dim=8")
    roof, m, n = report["roofline"], report["n_items"], report["n_users"]
    assert roof["copy_gb_s"] > 0
    assert roof["fma_peak_gflop_s"] is None or roof["fma_peak_gflop_s"] > 0
    agg, train = roof["aggregate"], roof["train"]
    assert agg["gflop_per_round"] == pytest.approx(n * m * (m + 1) * 8 / 1e9)
    assert train["gflop_per_round"] == pytest.approx(report["client_steps_per_round"] * 6 * 64 * m * 8 / 1e9)
    for phase, r in (("aggregate", agg), ("train", train)):
        assert r["peak_gflop_s"] > 0
        assert r["achieved_gflop_s"] == pytest.approx(r["gflop_per_round"] / report["seconds_per_round"][phase])
        assert r["compute_fraction"] == pytest.approx(r["achieved_gflop_s"] / r["peak_gflop_s"])
        if roof["fma_peak_gflop_s"] is not None:  # the multiply-add peak (needs a C compiler)
            assert r["fma_fraction"] == pytest.approx(r["achieved_gflop_s"] / roof["fma_peak_gflop_s"])
    backbone, _, _ = run_bench(cache_dir, tmp_path, "ablation=backbone", "bench.reference_clients=0")
    assert "train" not in backbone["roofline"] and "note" in backbone["roofline"]
