"""A resumable Optuna search (`search.store`): every finished trial is stored as a run, and the same search started
again answers the stored trials from their records (no training) and goes on; a stored trial is found by its
computation (the identity key), so a trial that computes anything else is run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from src.cli.store import stored_trial

REPO = Path(__file__).resolve().parents[1]


def search(tmp_path: Path, trials: int, name: str, *extra: str) -> subprocess.CompletedProcess:
    """`python -m src.run -m hparams_search=optuna` on the synthetic data, one round per trial."""
    cmd = [
        sys.executable,
        "-m",
        "src.run",
        "-m",
        "hparams_search=optuna",
        "dataset=synthetic",
        "fl.rounds=1",
        "fl.checkpoint_every=0",
        f"hydra.sweeper.n_trials={trials}",
        f"search.store={tmp_path / 'runs'}",
        f"hydra.sweep.dir={tmp_path / name}",
        *extra,
    ]
    env = {**os.environ, "ALIGNFEDREC_CACHE": str(tmp_path / "cache")}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def trial_values(root: Path) -> dict[str, float]:
    """Stored trial folder name -> its best validation hit@10, read from each record."""
    return {
        p.parent.parent.name: json.loads(p.read_text())["best_val"]["val/hit@10"]
        for p in (root / "search").rglob("results.json")
    }


def test_a_search_cut_short_resumes_from_its_stored_trials(tmp_path):
    first = search(tmp_path, 1, "first")
    assert first.returncode == 0, first.stderr[-3000:]
    after_first = trial_values(tmp_path / "runs")
    assert len(after_first) == 1
    again = search(tmp_path, 2, "again")
    assert again.returncode == 0, again.stderr[-3000:]
    after = trial_values(tmp_path / "runs")
    assert len(after) == 2 and after_first.items() <= after.items()
    # the first trial was answered from the store (its job folder holds no results), the second was run
    jobs = sorted((tmp_path / "again").glob("[0-9]*_*"), key=lambda p: int(p.name.split("_")[0]))
    assert [(job / "results.json").is_file() for job in jobs] == [False, True]
    assert (again.stdout + again.stderr).count("this computation is stored") == 1
    # the study the sweeper reports is the whole search's: its best value is the best stored record
    best = yaml.safe_load((tmp_path / "again" / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(after.values())


def test_a_stored_search_refuses_a_cut_dataset_before_its_first_trial_trains(tmp_path):
    """The store refuses a run on a cut dataset; a search that stores its trials says so before training one."""
    out = search(tmp_path, 1, "cut", "data.max_users=5")
    assert out.returncode != 0
    assert "search.store: data.max_users=5 cuts the dataset, which no stored run may" in out.stderr
    assert "Traceback" not in out.stderr
    assert not list((tmp_path / "cut").rglob("results.json")) and not (tmp_path / "runs").exists()


def test_a_stored_trial_is_found_by_its_computation(compose_cfg, tmp_path):
    from src.cli.store import store
    from src.cli.train import train

    overrides = ["dataset=synthetic", "fl.rounds=1", "fl.checkpoint_every=0", "experiment_name=search"]
    cfg = compose_cfg(overrides)
    train(cfg, tmp_path / "run", progress=False)
    store(tmp_path / "run", "search", overrides, tmp_path / "runs", "trial")
    config = OmegaConf.to_container(cfg, resolve=True)
    found = stored_trial(config, tmp_path / "runs")
    assert found is not None and found[0] == tmp_path / "runs" / "search/synthetic/full/clean/trial/seed0"
    where = OmegaConf.to_container(compose_cfg([*overrides, "search.store=elsewhere", "logger=csv"]), resolve=True)
    assert stored_trial(where, tmp_path / "runs") is not None
    for other in ("ablation.alpha=0.002", "seed=1", "fl.rounds=2"):
        changed = OmegaConf.to_container(compose_cfg([*overrides, other]), resolve=True)
        assert stored_trial(changed, tmp_path / "runs") is None, other
    elsewhere = OmegaConf.to_container(compose_cfg([*overrides[:-1], "experiment_name=search_published"]), resolve=True)
    assert stored_trial(elsewhere, tmp_path / "runs") is None


def test_a_folder_holding_another_computation_is_kept(compose_cfg, tmp_path, capsys):
    """Two computations under one folder name (a fixed key changed between two stores): the first record stays, the
    second goes beside it, and both are found by their computation."""
    from src.cli.store import store
    from src.cli.train import train

    first = ["dataset=synthetic", "fl.rounds=1", "fl.checkpoint_every=0"]
    second = [*first, "ablation.tau0=0.7"]  # not in the folder's name
    folders = []
    for overrides in (first, second):
        cfg = compose_cfg(overrides)
        run = tmp_path / str(len(folders))
        train(cfg, run, progress=False)
        folders.append(store(run, "search", overrides, tmp_path / "runs", "trial"))
    assert folders[0].parent.name == "trial" and folders[1].parent.name.startswith("trial-")
    assert "holds another computation" in capsys.readouterr().err
    for overrides, folder in zip((first, second), folders):
        config = OmegaConf.to_container(compose_cfg([*overrides, "experiment_name=search"]), resolve=True)
        assert stored_trial(config, tmp_path / "runs")[0] == folder
