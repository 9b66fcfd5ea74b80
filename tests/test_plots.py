"""The report command turns run folders into CSV/Markdown tables and PNG/SVG figures."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from src.analysis.plots import MissingFieldError, main
from src.analysis.runs import encoding_label
from src.cli.train import train
from src.runtime.errors import UserError


@pytest.fixture(scope="module")
def runs(compose_cfg, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for i, extra in enumerate([["encoding=csr32"], ["encoding=csr8", "model.sigma=0.7"], ["privacy.epsilon=10"]]):
        cfg = compose_cfg(
            [
                "dataset=synthetic",
                "ablation=full",
                "fl.rounds=2",
                "fl.checkpoint_every=0",
                "model.alignment=fast",
                "optim=adam",
                *extra,
            ]
        )
        train(cfg, root / f"run{i}")
    return root


@pytest.mark.parametrize("kind", ["communication", "privacy", "curves"])
def test_each_kind_writes_its_files(runs, tmp_path, kind):
    out = main([kind, str(runs), "--out", str(tmp_path)])
    names = {p.name for p in out.iterdir()}
    stem = {
        "communication": "communication_synthetic_clean",
        "privacy": "privacy_synthetic_clean",
        "curves": "curves_synthetic_clean",
    }[kind]
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


def fake_run(folder: Path, history: list[dict] | None = None, **changes) -> Path:
    """A minimal finished results.json with what `curves` and `sensitivity` plot."""
    rows = history if history is not None else [{"round": r, "val/hit@10": 0.5, "test/hit@10": 0.4} for r in (1, 2)]
    payload = {
        "config": {"seed": 0, "optim": {"name": "adam"}, "model": {"alpha": 0.005}},
        "dataset": "synthetic",
        "protocol": "clean",
        "ablation": "backbone",
        "seed": 0,
        "history": rows,
        "test_at_best": {"test/hit@10": 0.4, "test/ndcg@10": 0.3},
        "communication": {},
        "privacy": {},
        "finished": True,
        **changes,
    }
    folder.mkdir(parents=True)
    path = folder / "results.json"
    path.write_text(json.dumps(payload))
    return path


def test_broken_results_json_is_named_and_skipped(tmp_path):
    fake_run(tmp_path / "runs" / "good")
    broken = tmp_path / "runs" / "broken" / "results.json"
    broken.parent.mkdir(parents=True)
    broken.write_text('{"finished": true, "history": [')
    with pytest.warns(UserWarning, match=str(broken)):
        out = main(["curves", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert (out / "curves_synthetic_clean.png").is_file()


def test_an_unscored_round_is_a_gap_in_the_curve(tmp_path):
    """A Flower round that lost a node has its metrics under subset/ only: the curve skips it, the run is drawn."""
    history = [
        {"round": 1, "val/hit@10": 0.2, "test/hit@10": 0.1},
        {"round": 2, "subset/val/hit@10": 0.9, "subset/test/hit@10": 0.9},
        {"round": 3, "val/hit@10": 0.3, "test/hit@10": 0.2},
    ]
    fake_run(tmp_path / "runs" / "r", history=history)
    out = main(["curves", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert (out / "curves_synthetic_clean.png").is_file()


@pytest.mark.parametrize(
    "kind, extra, field",
    [
        ("curves", [], "val/hit@10"),
        ("sensitivity", ["--param", "model.beta"], "config.ablation.beta"),  # a moved key reads as its new name
        ("communication", [], "config.comm"),
    ],
)
def test_missing_plotted_field_names_field_and_file(tmp_path, kind, extra, field):
    path = fake_run(tmp_path / "runs" / "r", history=[{"round": 1, "test/hit@10": 0.4}])
    with pytest.raises(MissingFieldError) as err:
        main([kind, str(tmp_path / "runs"), "--out", str(tmp_path / "out"), *extra])
    assert str(path) in str(err.value) and repr(field) in str(err.value), str(err.value)


def test_diagnostics_table_follows_the_logged_rounds(tmp_path):
    """`diagnostics`: one CSV row per logged round with the logged values (no edges: no kept share)."""
    hist = [
        {
            "round": 1,
            "val/hit@10": 0.1,
            "diag/spearman_cooccurrence": 0.01,
            "diag/edges": 40.0,
            "diag/edges_from_round1": 1.0,
            "diag/nmi_genre": 0.2,
            "diag/nmi_genre_random": 0.19,
        },
        {
            "round": 2,
            "val/hit@10": 0.2,
            "diag/spearman_cooccurrence": 0.05,
            "diag/edges": 50.0,
            "diag/edges_from_round1": 0.2,
            "diag/nmi_genre": 0.3,
            "diag/nmi_genre_random": 0.1,
        },
        {
            "round": 3,
            "val/hit@10": 0.3,
            "diag/spearman_cooccurrence": 0.07,
            "diag/edges": 0.0,
            "diag/edges_from_round1": 0.0,
        },
    ]
    fake_run(tmp_path / "runs" / "r", history=hist, ablation="knn_ica")
    out = main(["diagnostics", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert {"diagnostics_synthetic_clean.png", "diagnostics_synthetic_clean.svg"} <= {p.name for p in out.iterdir()}
    rows = list(csv.DictReader((out / "diagnostics.csv").open()))
    assert [r["round"] for r in rows] == ["1", "2", "3"]
    assert [r["edges_from_round1_share"] for r in rows] == ["1.0", "0.2", ""]
    assert rows[1]["nmi_genre"] == "0.3" and rows[2]["nmi_genre"] == "" and rows[2]["val_select"] == "0.3"


def test_diagnostics_without_logged_diagnostics_says_how(tmp_path):
    fake_run(tmp_path / "runs" / "r")
    with pytest.raises(UserError, match="diag.graph=true"):
        main(["diagnostics", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])


def test_a_figure_is_saved_byte_for_byte_the_same(tmp_path):
    """Regenerated figures of unchanged runs change nothing in the repository (no date, fixed SVG ids)."""
    import matplotlib.pyplot as plt

    from src.analysis.plots import save

    def draw(out):
        fig, ax = plt.subplots()
        ax.plot([1, 2, 3], [3, 1, 2], label="x")
        ax.legend()
        save(fig, out, "f")
        plt.close(fig)

    draw(tmp_path / "a")
    draw(tmp_path / "b")
    for ext in ("png", "svg"):
        assert (tmp_path / "a" / f"f.{ext}").read_bytes() == (tmp_path / "b" / f"f.{ext}").read_bytes()


def test_user_privacy_plots_the_seed_mean_per_epsilon(tmp_path):
    """One point per target epsilon (mean ± std over seeds, computed here by hand), `none` as a line."""
    root = tmp_path / "runs"
    for i, (eps, hit) in enumerate([(2.0, 0.40), (2.0, 0.44), (None, 0.60)]):
        folder = root / f"r{i}"
        folder.mkdir(parents=True)
        run = {
            "config": {"seed": i, "privacy": {"target_epsilon": eps}},
            "dataset": "synthetic",
            "protocol": "clean",
            "ablation": "private_itemknn",
            "seed": i,
            "history": [{"round": 1, "val/hit@10": 0.5}],
            "test_at_best": {"test/hit@10": hit, "test_full/hit@10": hit / 4},
            "finished": True,
        }
        (folder / "results.json").write_text(json.dumps(run))
    reference = tmp_path / "reference" / "r"
    reference.mkdir(parents=True)
    (reference / "results.json").write_text(
        json.dumps(
            {
                "config": {"seed": 0},
                "dataset": "synthetic",
                "protocol": "clean",
                "ablation": "backbone",
                "seed": 0,
                "history": [{"round": 1, "val/hit@10": 0.5}],
                "test_at_best": {"test/hit@10": 0.5},
                "finished": True,
            }
        )
    )
    out = main(["user_privacy", str(root), "--out", str(tmp_path / "out"), "--reference", str(reference.parent)])
    assert {"user_privacy_synthetic_clean.png", "user_privacy_synthetic_clean.svg"} <= {p.name for p in out.iterdir()}
    rows = list(csv.DictReader((out / "user_privacy.csv").open()))
    assert [r["epsilon"] for r in rows] == ["2.0", "inf"]
    assert float(rows[0]["test_hit@10"]) == pytest.approx(42.0)
    assert float(rows[0]["test_hit@10_std"]) == pytest.approx(2.8284, abs=1e-3)
    assert float(rows[1]["test_full_hit@10"]) == pytest.approx(15.0) and rows[1]["seeds"] == "1"


def test_other_runs_never_write_the_projects_pages(runs, tmp_path, monkeypatch):
    """results/ and the pages are generated from results/runs only: a sweep's or a test's runs draw into
    plots/<kind> by default and are refused where they would write a page (results/, results/runs, docs/, a top-level
    Markdown file, the results page's README.md), before anything is written; the stored runs may write there."""
    from src.analysis import report
    from src.analysis import runs as stored

    project = tmp_path / "project"  # a stand-in repository: a regression must not write the real one
    for folder in ("results/runs/table1", "docs"):
        (project / folder).mkdir(parents=True)
    monkeypatch.setattr(stored, "PROJECT", project)
    monkeypatch.setattr(stored, "STORED", project / "results" / "runs")
    monkeypatch.chdir(project)
    out = main(["curves", str(runs)])
    assert out == Path("plots") / "curves" and any(out.iterdir())
    refused = [
        (main, ["curves", str(runs), "--out", "results/curves"], r"^--out would write results/curves, one of the"),
        (main, ["curves", str(runs), "--out", "results/runs"], r"^--out would write results/runs, one of"),
        (report.main, [str(runs), "--out", "results"], r"^--out would write results/README\.md, one of"),
        (report.main, [str(runs), "--out", "."], r"^--out would write README\.md, one of"),
        (report.main, [str(runs), "--out", "docs", "--name", "x"], r"^--out would write docs/x\.md, one of"),
        (
            report.main,
            [str(runs), "--update", "README.md"],
            r"^--update would write README\.md.*only with results/runs$",
        ),
    ]
    # the results page's curves have one writer, src.report, whatever runs src.plots draws; by default, stored runs'
    # curves go beside them
    stored_run = project / "results" / "runs" / "table1" / "ml-100k" / "full" / "paper" / "default" / "seed0"
    shutil.copytree(next(p.parent for p in Path(runs).rglob("results.json")), stored_run)
    assert main(["curves", "results/runs/table1"]) == Path("results") / "curves_all"
    shutil.rmtree(project / "results" / "curves_all")
    shutil.rmtree(project / "results" / "runs" / "table1" / "ml-100k")
    page_curves = ["curves", "results/runs/table1", "--out", "results/curves"]
    refused.append((main, page_curves, r"^--out results/curves holds the results page's curves .*src\.report"))
    (project / "README.md").write_text("# the project\n")
    for command, args, message in refused:
        with pytest.raises(UserError, match=message):
            command(args)
    assert sorted(str(p.relative_to(project)) for p in project.rglob("*") if "plots" not in p.parts) == [
        "README.md",
        "docs",
        "results",
        "results/runs",
        "results/runs/table1",
    ]
    table = report.main([str(runs), "--out", "tables", "--name", "t"])  # elsewhere in the repository: fine
    assert table and (project / "tables" / "t.md").is_file()
