"""`make gpu-check` on the CPU with tiny data: the check runs every path and notices a difference."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch

import src.gpucheck as command
from src.perf import gpucheck

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_every_path_on_cpu(tmp_path):
    """Through the script `make gpu-check` and the GPU session run (a check that runs nothing must not pass)."""
    out = tmp_path / "gc.json"
    args = ["--device", "cpu", "--datasets", "synthetic", "--no-full", "--out", str(out)]
    done = subprocess.run(["bash", "deploy/gpu_check.sh", *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "ok   synthetic  fast" in done.stdout
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


def test_help_lists_every_option_of_the_parser():
    """`--help` prints the command's docstring before torch is imported: it must name every option."""
    options = [o for a in gpucheck.parser()._actions for o in a.option_strings if o not in ("-h", "--help")]
    assert options and [o for o in options if o not in command.__doc__] == []
