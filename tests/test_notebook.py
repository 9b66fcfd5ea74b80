"""notebooks/analysis.ipynb runs end to end on a tiny run folder and writes its table and figures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from src.cli.train import train
from tests.wandb_records import finished_contents

REPO = Path(__file__).resolve().parents[1]


def test_analysis_notebook_executes(compose_cfg, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("wandb")
    for key, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true")):
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    runs = tmp_path / "runs"
    for ablation, logger in (("full", "logger=wandb"), ("backbone", "logger=csv")):
        train(
            compose_cfg(["dataset=synthetic", f"ablation={ablation}", "fl.rounds=2", "fl.checkpoint_every=0", logger]),
            runs / ablation,
            progress=False,
        )
    offline = sorted(runs.rglob("run-*.wandb"))
    assert len(offline) == 1, offline
    finished_contents(offline[0])  # wandb-core writes the run's records a moment after finish() returns
    out = tmp_path / "out"
    monkeypatch.setenv("ALIGNFEDREC_RUNS", str(runs))
    monkeypatch.setenv("ALIGNFEDREC_NOTEBOOK_OUT", str(out))
    monkeypatch.setenv("PYTHONPATH", f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    nb = nbformat.read(REPO / "notebooks" / "analysis.ipynb", as_version=4)
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    ).execute()
    # the W&B cell reads the offline run file: the full run's best round and its test metrics
    cell = next(c for c in nb.cells if "run-*.wandb" in c.source)
    shown = " ".join(str(o.get("data", {}).get("text/plain", "")) for o in cell.outputs)
    assert "best_round" in shown and "test/hit@10" in shown, shown
    names = {p.name for p in out.iterdir()}
    assert {
        "table.md",
        "table.csv",
        "curves_synthetic_clean.png",
        "communities_synthetic_clean.png",
        "val_hit10_all_runs.png",
        "communication_synthetic_clean.png",
    } <= names
    assert "| synthetic | full | clean | 1 | 2 |" in (out / "table.md").read_text()
