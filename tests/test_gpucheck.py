"""`make gpu-check` on the CPU with tiny data: the check runs every path and notices a difference."""

from __future__ import annotations

import json

import torch

from src.perf import gpucheck


def test_gpu_check_runs_every_path_on_cpu(tmp_path):
    out = tmp_path / "gc.json"
    assert gpucheck.main(["--device", "cpu", "--datasets", "synthetic", "--no-full", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["ok"] and [r["path"] for r in report["results"]] == ["pfedrec", "fast", "exact", "fed_itemknn"]
    fast = report["results"][1]
    assert {"state/items", "S_g", "loss/bce"} <= fast["diffs"].keys()
    assert fast["community_ari"] > 0.99 and fast["seconds"]["train"] > 0


def test_gpu_check_fails_on_a_difference(monkeypatch, tmp_path):
    real = gpucheck.build

    def other_seed_on_device(overrides, device, chunk):
        return real([*overrides, "seed=1"] if chunk == "auto" else overrides, device, chunk)

    monkeypatch.setattr(gpucheck, "build", other_seed_on_device)
    report = gpucheck.check(["synthetic"], "cpu", 24, 1e-4, False, [])
    assert not report["ok"] and all(not r["ok"] for r in report["results"])


def test_rel_diff():
    a = torch.tensor([1.0, 2.0, -4.0])
    assert gpucheck.rel_diff(a, a) == 0.0
    assert abs(gpucheck.rel_diff(a + torch.tensor([0.0, 0.004, 0.0]), a) - 1e-3) < 1e-6
