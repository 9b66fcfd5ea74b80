"""`make gpu-check` on the CPU with tiny data: the check runs every path and notices a difference."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import src.gpucheck as command
from src.perf import gpucheck

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_every_path_on_cpu(tmp_path):
    """Through the script `make gpu-check` and the GPU session run (a check that runs nothing must not pass)."""
    out = tmp_path / "gc.json"
    args = ["--device", "cpu", "--datasets", "synthetic", "--no-full", "--out", str(out)]
    env = {**os.environ, "PY": sys.executable, "WHEELS": str(tmp_path / "no-wheels")}  # this Python, as it is
    done = subprocess.run(["bash", "deploy/gpu_check.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True)
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


WHEELS_BYTES = 8_815_998  # the .whl/ of deploy/gpu_session.sh's header, measured 2026-12-07 (docs/gpu.md)
CALL_LIMIT = 64 * 2**20  # what one call to the lent machine takes: tracked tree + carried paths


def test_the_gpu_session_travels_within_a_calls_limit():
    """The tracked tree, the data files the session's header carries and its wheels within 64 MiB: stored runs grow
    the tree, and past the limit the prepared GPU session would not even start."""
    header = (ROOT / "deploy" / "gpu_session.sh").read_text()
    carry = json.loads(re.search(r"#\s+carry: (\[.*\])", header).group(1))
    data = [p for p in carry if p.startswith(".data/")]
    assert ".whl" in carry and len(carry) <= 8 and len(data) == 5
    shared = ROOT.parent / "shared" / "data"
    if not shared.is_dir():
        pytest.skip(f"real datasets not found at {shared}")
    # what travels: tracked files and untracked ones git does not ignore
    listing = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    listed = subprocess.run(listing, cwd=ROOT, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    tracked = sum((ROOT / p).stat().st_size for p in listed.stdout.decode().split("\0") if p and (ROOT / p).is_file())
    carried = sum((shared / p.removeprefix(".data/")).stat().st_size for p in data)
    total = tracked + carried + WHEELS_BYTES
    assert total <= CALL_LIMIT, (
        f"the GPU session would carry {total / 2**20:.1f} MiB (tracked {tracked / 2**20:.1f}, data "
        f"{carried / 2**20:.1f}, wheels {WHEELS_BYTES / 2**20:.1f}); expected at most 64 MiB: carry less or store less"
    )
