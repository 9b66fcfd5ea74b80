"""Campaigns through Hydra launchers (`hydra/sweeper=campaign`, hydra_plugins/alignfedrec_campaign): joblib and
submitit's local executor run a real campaign slice and store it; a second campaign skips what is stored or claimed;
the SLURM launcher config makes the sbatch script a cluster would receive (no cluster needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from src.cli import campaign
from src.cli.jobs import compose_config

REPO = Path(__file__).resolve().parents[1]


def sweep(tmp_path: Path, launcher: str, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m src.run -m hydra/sweeper=campaign hydra/launcher=<launcher> experiment=campaign_smoke ...`."""
    env = {**os.environ, "ALIGNFEDREC_CACHE": str(tmp_path / "cache")}
    cmd = [
        sys.executable,
        "-m",
        "src.run",
        "-m",
        "hydra/sweeper=campaign",
        f"hydra/launcher={launcher}",
        "experiment=campaign_smoke",
        f"hydra.sweeper.runs={tmp_path / 'runs'}",
        f"hydra.sweeper.work={tmp_path / 'work'}",
        "hydra.sweeper.compile=false",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        *overrides,
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def stored(tmp_path: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "runs").rglob("run.json"))]


def test_a_campaign_through_joblib_stores_its_runs_and_skips_them_again(tmp_path):
    """`python -m src.run -m hydra/sweeper=campaign hydra/launcher=campaign_joblib` stores the runs; the campaign
    command with `hydra/launcher=` hands the same runs to the sweeper, which finds them stored."""
    first = sweep(tmp_path, "campaign_joblib", "seed=0")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stored 2 partial 0 pending 0 cut 0 failed 0 of 2 runs" in first.stdout
    runs = stored(tmp_path)
    assert sorted((r["overrides"][1:]) for r in runs) == sorted(
        [f"ablation={a}", "protocol=clean", "seed=0"] for a in ("backbone", "local")
    )
    assert all(r["rounds"] == 3 and len(r["key"]) == 20 for r in runs)
    env = {**os.environ, "ALIGNFEDREC_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "src.campaign", "experiment=campaign_smoke", "seed=0"]
    cmd += ["hydra/launcher=campaign_joblib", "--no-compile"]
    cmd += ["--runs", str(tmp_path / "runs"), "--work", str(tmp_path / "work")]
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "hydra/sweeper=campaign" in again.stdout and "2 runs, 2 stored, 0 to launch" in again.stderr + again.stdout
    assert len(stored(tmp_path)) == 2
    budget = subprocess.run(cmd + ["--budget-min", "5"], cwd=REPO, env=env, capture_output=True, text=True)
    assert budget.returncode == 2 and budget.stderr.startswith("error: --budget-min, --git-commit and --device")


def test_a_run_claimed_by_another_campaign_is_left_to_it(tmp_path):
    (tmp_path / "work").mkdir()
    runs = campaign.plan(["campaign_smoke"], ["ablation=backbone", "seed=0"], tmp_path / "runs")
    (held,) = runs
    lock = campaign.claim(tmp_path / "work", held)
    assert lock is not None
    try:
        out = sweep(tmp_path, "campaign_joblib", "ablation=backbone", "seed=0")
    finally:
        os.close(lock)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "elsewhere" in out.stdout and stored(tmp_path) == []


@pytest.mark.slow  # the same sweeper as through joblib (fast suite), another launcher plugin
def test_a_campaign_through_submitit_local_stores_its_run(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    out = sweep(tmp_path, "campaign_local", "ablation=backbone", "seed=0")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "stored 1 partial 0 pending 0 cut 0 failed 0 of 1 runs" in out.stdout
    assert len(stored(tmp_path)) == 1


def test_the_slurm_launcher_config_makes_an_sbatch_script(tmp_path):
    """The parameters `hydra/launcher=campaign_slurm` hands submitit, mapped as hydra_submitit_launcher maps them,
    give one task of one CPU with the time limit and memory of the config (a mocked cluster: no sbatch runs)."""
    submitit = pytest.importorskip("submitit")
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from submitit.slurm.test_slurm import mocked_slurm

    cfg = compose_config(["hydra/sweeper=campaign", "hydra/launcher=campaign_slurm"], hydra_node=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    with mocked_slurm():
        executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path)
        executor.update_parameters(
            **{
                k if k in base else f"slurm_{k}": v
                for k, v in params.items()
                if k not in ("submitit_folder", "max_num_timeout", "_target_")
            }
        )
        script = executor._executor._make_submission_file_text("python -m src.run", "uid")
    for line in (
        "#SBATCH --cpus-per-task=1",
        "#SBATCH --time=240",
        "#SBATCH --mem=16GB",
        "#SBATCH --ntasks-per-node=1",
    ):
        assert line in script, script
