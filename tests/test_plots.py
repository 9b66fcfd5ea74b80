"""The report command turns run folders into CSV/Markdown tables and PNG/SVG figures."""
from __future__ import annotations

import csv

import pytest

from src.plots import encoding_label, main
from src.run import train


@pytest.fixture(scope="module")
def runs(compose_cfg, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for i, extra in enumerate([["encoding=csr32"], ["encoding=csr8", "model.sigma=0.7"], ["privacy.epsilon=10"]]):
        cfg = compose_cfg(["dataset=synthetic", "ablation=full", "fl.rounds=2", "fl.checkpoint_every=0",
                           "model.alignment=fast", "optim=adam", *extra])
        train(cfg, root / f"run{i}")
    return root


@pytest.mark.parametrize("kind", ["communication", "privacy", "curves"])
def test_each_kind_writes_its_files(runs, tmp_path, kind):
    out = main([kind, str(runs), "--out", str(tmp_path)])
    names = {p.name for p in out.iterdir()}
    stem = {"communication": "communication_synthetic_clean", "privacy": "privacy_synthetic_clean",
            "curves": "curves_synthetic_clean"}[kind]
    assert {f"{stem}.png", f"{stem}.svg"} <= names
    if kind != "curves":
        rows = list(csv.DictReader((tmp_path / f"{kind}.csv").open()))
        assert len(rows) == 3 and all(r["run"].startswith(str(runs)) for r in rows)
    if kind == "communication":
        by_sigma = {(r["sigma"], r["encoding"]): float(r["upload_bytes_per_client_round"]) for r in rows}
        # a higher threshold and fewer bits cannot make the upload larger
        assert by_sigma[("0.7", "csr8")] < by_sigma[("0.5", "csr32")]


def test_encoding_label():
    assert encoding_label({"format": "csr", "bits": 8, "topk": 16, "delta": True}) == "top16 csr8+delta"
