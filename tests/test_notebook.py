"""notebooks/analysis.ipynb runs end to end on a tiny run folder and writes its table and figures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from src.cli.train import train

REPO = Path(__file__).resolve().parents[1]


def test_analysis_notebook_executes(compose_cfg, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    runs = tmp_path / "runs"
    for ablation in ("full", "backbone"):
        train(
            compose_cfg(["dataset=synthetic", f"ablation={ablation}", "fl.rounds=2", "fl.checkpoint_every=0"]),
            runs / ablation,
            progress=False,
        )
    out = tmp_path / "out"
    monkeypatch.setenv("ALIGNFEDREC_RUNS", str(runs))
    monkeypatch.setenv("ALIGNFEDREC_NOTEBOOK_OUT", str(out))
    monkeypatch.setenv("PYTHONPATH", f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    nb = nbformat.read(REPO / "notebooks" / "analysis.ipynb", as_version=4)
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    ).execute()
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
