"""The report: mean ± std over seeds at the best validation round, the published number beside it."""

from __future__ import annotations

import csv
import json
import statistics
import warnings
from pathlib import Path

import pytest

from src.analysis.report import (
    block_folders,
    collect,
    fed_itemknn_verdict,
    load_runs,
    main,
    markdown,
    published,
    rows,
)
from src.cli.train import train


def test_published_numbers_are_the_papers():
    pub = published()
    assert pub["full"]["ml-100k"] == [86.85, 73.71] and pub["backbone"]["lastfm-2k"] == [82.06, 73.15]
    assert pub["no_gsa"]["ml-1m"] == [84.07, 71.73]


def test_report_rows_mean_std_published_and_runs(compose_cfg, tmp_path):
    payloads = [
        train(
            compose_cfg(
                ["dataset=synthetic", "ablation=backbone", "fl.rounds=2", "fl.checkpoint_every=0", f"seed={s}"]
            ),
            tmp_path / f"s{s}",
            progress=False,
        )
        for s in (0, 1)
    ]
    table = main([str(tmp_path), "--out", str(tmp_path / "out"), "--name", "t"])
    assert len(table) == 1
    row = table[0]
    hits = [100 * p["test_at_best"]["test/hit@10"] for p in payloads]
    assert row["test/hit@10"] == pytest.approx(statistics.mean(hits))
    assert row["test/hit@10 std"] == pytest.approx(statistics.stdev(hits))
    assert row["published hit@10"] is None and row["seeds"] == 2  # synthetic has no published row
    written = list(csv.DictReader((tmp_path / "out" / "t.csv").open()))
    assert written[0]["runs"].count(str(tmp_path)) == 2


def test_report_by_splits_variants_and_diffs_only_paper_rows(compose_cfg, tmp_path):
    for optim in ("sgd", "adam"):
        train(
            compose_cfg(
                ["dataset=synthetic", "ablation=backbone", "fl.rounds=1", "fl.checkpoint_every=0", f"optim={optim}"]
            ),
            tmp_path / optim,
            progress=False,
        )
    table = main([str(tmp_path), "--by", "optim.name"])
    assert sorted(r["variant"] for r in table) == ["optim.name=adam", "optim.name=sgd"]
    assert all(r["seeds"] == 1 and r["diff hit@10"] is None for r in table)


def test_report_rounds_cuts_runs_and_selects_on_validation_within(compose_cfg, tmp_path):
    payload = train(
        compose_cfg(["dataset=synthetic", "ablation=backbone", "fl.rounds=3", "fl.checkpoint_every=0"]),
        tmp_path / "r",
        progress=False,
    )
    table = main([str(tmp_path), "--rounds", "2"])
    first_two = payload["history"][:2]
    best = max(first_two, key=lambda h: (h["val/hit@10"], -h["round"]))
    assert table[0]["rounds"] == "2" and table[0]["test/hit@10"] == pytest.approx(100 * best["test/hit@10"])


def test_runs_differing_in_more_than_the_seed_are_never_averaged(compose_cfg, tmp_path):
    """Two overlays that both ran PFedRec (SGD 2 rounds, Adam 1 round) must give two rows, even without --by."""
    for seed, extra in ((0, ["optim=sgd", "fl.rounds=2"]), (1, ["optim=adam", "fl.rounds=1"])):
        train(
            compose_cfg(
                [
                    "dataset=synthetic",
                    "ablation=backbone",
                    "fl.checkpoint_every=0",
                    f"seed={seed}",
                    f"data.cache_dir={tmp_path / 'cache'}",
                    *extra,
                ]
            ),
            tmp_path / str(seed),
            progress=False,
        )
    table = main([str(tmp_path)])
    assert sorted(r["variant"] for r in table) == ["fl.rounds=1 optim.name=adam", "fl.rounds=2 optim.name=sgd"]
    assert all(r["seeds"] == 1 for r in table)


def fake_run(folder: Path, **changes) -> Path:
    """A minimal finished results.json (the fields the report reads) in `folder`."""
    payload = {
        "config": {"seed": 0},
        "dataset": "synthetic",
        "protocol": "clean",
        "ablation": "backbone",
        "seed": 0,
        "history": [{"round": 1, "val/hit@10": 0.5, "test/hit@10": 0.4, "test/ndcg@10": 0.3}],
        "test_at_best": {"test/hit@10": 0.4, "test/ndcg@10": 0.3},
        "finished": True,
        **changes,
    }
    folder.mkdir(parents=True)
    path = folder / "results.json"
    path.write_text(json.dumps(payload))
    return path


def test_runs_of_one_optimiser_with_two_learning_rates_or_two_engines_are_two_rows(tmp_path):
    """A group whose choice differs (sgd, adam) is labelled by the name, but two SGD learning rates are still two
    rows (they had been averaged as one row's seeds), and a Flower run is never a seed of the simulator's row."""
    runs = {
        "a": (0, "sgd", 0.1, {}),
        "b": (1, "sgd", 0.1, {}),
        "c": (0, "sgd", 0.01, {}),
        "d": (0, "adam", 0.05, {}),
        "e": (0, "sgd", 0.1, {"engine": "flower"}),
    }
    for name, (seed, optim, lr, extra) in runs.items():
        fake_run(tmp_path / name, seed=seed, config={"seed": seed, "optim": {"name": optim, "lr": lr}}, **extra)
    table = {r["variant"]: r["seeds"] for r in rows(collect([tmp_path]))}
    assert table == {
        "optim.lr=0.1 optim.name=sgd run.runner=simulator": 2,
        "optim.lr=0.01 optim.name=sgd run.runner=simulator": 1,
        "optim.lr=0.05 optim.name=adam run.runner=simulator": 1,
        "optim.lr=0.1 optim.name=sgd run.runner=flower": 1,
    }
    # with one learning rate per optimiser, the name alone labels the rows
    (tmp_path / "c" / "results.json").unlink()
    (tmp_path / "e" / "results.json").unlink()
    assert {r["variant"] for r in rows(collect([tmp_path]))} == {"optim.name=sgd", "optim.name=adam"}


def test_a_run_with_no_scored_round_is_named_and_not_counted_as_a_seed(tmp_path):
    fake_run(tmp_path / "good")
    fake_run(tmp_path / "unscored", history=[{"round": 1, "subset/val/hit@10": 0.9}], test_at_best={})
    with pytest.warns(UserWarning, match=r"unscored/results\.json: no round was scored"):
        table = main([str(tmp_path)])
    assert table[0]["seeds"] == 1 and table[0]["test/hit@10"] == pytest.approx(40.0)


def test_a_column_some_seeds_lack_says_how_many_it_averages(tmp_path):
    full = {"test/hit@10": 0.4, "test/ndcg@10": 0.3, "test_full/hit@10": 0.02, "test_full/ndcg@10": 0.01}
    fake_run(tmp_path / "s0", test_at_best=full)
    fake_run(tmp_path / "s1", seed=1, config={"seed": 1}, test_at_best={"test/hit@10": 0.2, "test/ndcg@10": 0.1})
    [row] = rows(collect([tmp_path]))
    assert row["seeds"] == 2 and row["test/hit@10 seeds"] == 2 and row["test_full/hit@10 seeds"] == 1
    line = markdown([row]).splitlines()[-1]
    assert "| 30.00 ± 14.14 | 20.00 ± 14.14 | 2.00 ± 0.00 (1 of 2 seeds) | 1.00 ± 0.00 (1 of 2 seeds) |" in line


def test_broken_results_are_named_and_skipped(tmp_path):
    fake_run(tmp_path / "good")
    text = (tmp_path / "good" / "results.json").read_text()
    columns = json.dumps({**json.loads(text), "history": {"round": 5}})  # a stored record's history, malformed
    bad = {"invalid": "{not json", "truncated": text[: len(text) // 2], "list": "[1, 2]", "columns": columns}
    for name, content in bad.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(content)
    history_missing = {k: v for k, v in json.loads(text).items() if k != "history"}
    (tmp_path / "no_history").mkdir()
    (tmp_path / "no_history" / "results.json").write_text(json.dumps(history_missing))
    fake_run(tmp_path / "no_round", history=[{"val/hit@10": 0.5}])
    fake_run(tmp_path / "running", finished=False)  # unfinished: skipped without a warning
    with pytest.warns(UserWarning) as caught:
        table = main([str(tmp_path)])
    messages = [str(w.message) for w in caught]
    for name in [*bad, "no_history", "no_round"]:
        assert any(str(tmp_path / name / "results.json") in m for m in messages), (name, messages)
    assert any("'history'" in m and "missing" in m for m in messages)
    assert not any("running" in m for m in messages)
    assert len(table) == 1 and table[0]["seeds"] == 1 and table[0]["runs"] == str(tmp_path / "good")
    with pytest.warns(UserWarning):
        assert [r["path"] for r in load_runs([tmp_path])] == [str(tmp_path / "good")]


def test_one_computation_stored_twice_counts_once(tmp_path):
    """A run stored under two experiments (same config and seed) is one seed, not two; another seed is another."""
    fake_run(tmp_path / "a" / "seed0", test_at_best={"test/hit@10": 0.4, "test/ndcg@10": 0.3})
    fake_run(tmp_path / "b" / "seed0", test_at_best={"test/hit@10": 0.9, "test/ndcg@10": 0.9})
    fake_run(
        tmp_path / "b" / "seed1", config={"seed": 1}, seed=1, test_at_best={"test/hit@10": 0.6, "test/ndcg@10": 0.5}
    )
    with pytest.warns(UserWarning, match=r"b/seed0 is the computation of .*a/seed0"):
        table = main([str(tmp_path)])
    assert len(table) == 1 and table[0]["seeds"] == 2
    assert table[0]["test/hit@10"] == pytest.approx(statistics.mean([40, 60]))


def test_rounds_skips_a_run_without_the_selection_metric(tmp_path):
    fake_run(tmp_path / "good")
    fake_run(tmp_path / "no_val", history=[{"round": 1, "test/hit@10": 0.4}])
    with pytest.warns(UserWarning, match=r"no_val/results\.json.*val/hit@10"):
        table = main([str(tmp_path), "--rounds", "1"])
    assert table[0]["seeds"] == 1


def test_paper_table_shows_every_cell_and_marks_missing_ones():
    from src.analysis.report import markdown, with_missing

    table = with_missing([], "table2")
    cells = {(r["dataset"], r["method"], r["protocol"]) for r in table}
    # ML-100K, ML-1M and FilmTrust (the campaign's, unpublished) x four methods x two protocols
    assert len(table) == len(cells) == 3 * 4 * 2
    assert all(r["seeds"] == 0 for r in table)
    unpublished = [r for r in table if r["dataset"] == "filmtrust"]
    assert len(unpublished) == 8 and all(r["published hit@10"] is None for r in unpublished)
    text = markdown(table)
    assert text.count("missing") == 5 * len(table) and "86.85 / 73.71" in text  # best val and the 4 metrics


def test_a_cells_rows_list_the_lineage_engine_first():
    """The engine that reproduces the published backbone (SGD) comes before Adam in each cell, whatever the order
    the rows arrive in or their variant names."""
    from src.analysis.report import with_missing

    def row(engine: str, variant: str) -> dict:
        return {"dataset": "ml-1m", "method": "backbone", "protocol": "paper", "engine": engine, "variant": variant}

    rows = [row("adam", "a"), row("sgd", "z"), row("sgd+fast", "b")]
    ordered = [r for r in with_missing(rows, "table1") if r["method"] == "backbone" and r["dataset"] == "ml-1m"]
    assert [r["engine"].split("+")[0] for r in ordered[:3]] == ["sgd", "sgd", "adam"]


def table_and_other_run(tmp_path, other: dict) -> None:
    """Two ML-100K `full` paper-protocol runs of 100 rounds: `table` (hit@10 0.4), and `other` (0.9) whose config
    differs by `other`, which a paper table must leave out."""
    for name, extra, hit in (("table", {}, 0.4), ("other", other, 0.9)):
        fake_run(
            tmp_path / name,
            config={"seed": 0, "fl": {"rounds": 100}, **extra},
            dataset="ml-100k",
            ablation="full",
            protocol="paper",
            test_at_best={"test/hit@10": hit, "test/ndcg@10": 0.3},
        )


def test_paper_table_keeps_its_100_round_runs_and_says_what_it_left_out(tmp_path):
    """A 30-round probe of a table's cell is not that cell's number: `--table` leaves it out, with a warning."""
    table_and_other_run(tmp_path, {"fl": {"rounds": 30}})
    with pytest.warns(UserWarning, match=r"left out 1 run\(s\) not of 100 rounds \(fl.rounds 30\)"):
        table = main([str(tmp_path), "--table", "table2"])
    (row,) = [r for r in table if (r["dataset"], r["method"], r["protocol"]) == ("ml-100k", "full", "paper")]
    assert row["seeds"] == 1 and row["test/hit@10"] == pytest.approx(40) and row["runs"] == str(tmp_path / "table")
    assert "variant" not in row


def test_paper_table_leaves_out_the_sensitivity_sweeps(tmp_path):
    """A sweep's off-default point (experiment sweep_*) is not the table's cell: `--table` leaves it out, saying so."""
    table_and_other_run(tmp_path, {"experiment_name": "sweep_alpha"})
    with pytest.warns(UserWarning, match=r"left out 1 run\(s\) of sensitivity sweeps, traffic counts and searches"):
        table = main([str(tmp_path), "--table", "table2"])
    (row,) = [r for r in table if (r["dataset"], r["method"], r["protocol"]) == ("ml-100k", "full", "paper")]
    assert row["seeds"] == 1 and row["test/hit@10"] == pytest.approx(40)


def test_paper_table_keeps_a_sweep_run_that_is_a_cells_computation(tmp_path):
    """The campaign runs a computation once, under whichever experiment plans it first: a sweep's default point
    stored before the table's cell is that cell's run (a table cell had stayed `missing`); an off-default point of
    the same sweep is still left out."""
    from omegaconf import OmegaConf

    from src.cli.config import load_config

    overrides = ["dataset=ml-100k", "ablation=full", "protocol=paper", "optim=sgd", "seed=1"]
    default = OmegaConf.to_container(load_config([*overrides, "experiment=sweep_alpha"]), resolve=True)
    off = OmegaConf.to_container(
        load_config([*overrides, "experiment=sweep_alpha", "ablation.alpha=0.05"]), resolve=True
    )
    assert default["ablation"]["alpha"] != 0.05 and default["experiment_name"] == "sweep_alpha"
    for name, config, hit in (("default", default, 0.4), ("off", off, 0.9)):
        fake_run(
            tmp_path / name,
            config=config,
            dataset="ml-100k",
            ablation="full",
            protocol="paper",
            seed=1,
            test_at_best={"test/hit@10": hit, "test/ndcg@10": 0.3},
        )
    with pytest.warns(UserWarning, match=r"left out 1 run\(s\) of sensitivity sweeps.*not a table cell's computation"):
        table = main([str(tmp_path), "--table", "table2"])
    (row,) = [r for r in table if (r["dataset"], r["method"], r["protocol"]) == ("ml-100k", "full", "paper")]
    assert row["seeds"] == 1 and row["test/hit@10"] == pytest.approx(40) and row["runs"] == str(tmp_path / "default")


def test_engine_names_what_trains_the_method():
    """The engine is the label the method's yaml resolves to (`ablation.engine`), '-' on a record without one."""
    from omegaconf import OmegaConf

    from src.analysis.report import engine
    from src.cli.config import load_config

    cases = {
        ("ablation=full",): "adam+fast",
        ("ablation=no_gsa", "optim=sgd", "model.alignment=exact"): "sgd+exact",
        ("ablation=backbone", "optim=sgd"): "sgd",
        ("ablation=central", "optim=sgd"): "central-adam",
        ("ablation=itemknn",): "none",
    }
    for overrides, name in cases.items():
        assert engine(OmegaConf.to_container(load_config(list(overrides)), resolve=True)) == name
    assert engine({"ablation": {"name": "full"}}) == "-"


def test_a_row_the_paper_has_no_number_for_is_listed_without_one():
    """experiments/published.yaml: null = the paper has no number (fedavg, local, knn_ica in Table 1); a null
    never hides another table's number for the same method (full is in both tables)."""
    from src.analysis.report import published, with_missing

    pub = published()
    assert pub["local"]["ml-100k"] is None and pub["knn_ica"]["filmtrust"] is None
    assert pub["full"]["ml-100k"] == [86.85, 73.71]
    rows = with_missing([], "table1")
    knn = [r for r in rows if r["method"] == "knn_ica"]
    assert len(knn) == 8 and all(r["published hit@10"] is None and r["seeds"] == 0 for r in knn)
    full = [r for r in rows if r["method"] == "full" and r["dataset"] == "ml-1m"]
    assert {r["published hit@10"] for r in full} == {86.21}


def test_paper_table_leaves_out_a_run_whose_config_names_no_rounds(tmp_path):
    """`fl.rounds` is compared as a number; a run without it is no table's cell and is named in the warning."""
    for name, fl in (("table", {"rounds": 100}), ("bare", {})):
        fake_run(
            tmp_path / name,
            config={"seed": 0, "fl": fl},
            dataset="ml-100k",
            ablation="full",
            protocol="paper",
            test_at_best={"test/hit@10": 0.4, "test/ndcg@10": 0.3},
        )
    with pytest.warns(UserWarning, match=r"left out 1 run\(s\) not of 100 rounds \(fl.rounds None\)"):
        table = main([str(tmp_path), "--table", "table2"])
    (row,) = [r for r in table if (r["dataset"], r["method"], r["protocol"]) == ("ml-100k", "full", "paper")]
    assert row["seeds"] == 1


def test_a_paper_table_whose_first_cell_is_missing_is_written_as_csv(tmp_path):
    """The missing cells' rows and the runs' rows go under one CSV header, whichever comes first."""
    fake_run(
        tmp_path / "run",
        config={"seed": 0, "fl": {"rounds": 100}},
        dataset="ml-100k",
        ablation="no_gsa",
        protocol="paper",
    )
    table = main([str(tmp_path), "--table", "table2", "--out", str(tmp_path / "out")])
    assert table[0]["seeds"] == 0  # Table 2's first cell (ML-100K full, paper) is not run
    written = list(csv.DictReader((tmp_path / "out" / "table.csv").open()))
    assert len(written) == len(table) and {r["test/hit@10 seeds"] for r in written} == {"0", "1"}


def test_a_runs_block_takes_folders_and_glob_patterns(tmp_path):
    for folder in ("a/x/s1", "a/y/s1", "a/y/s2", "b/z"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "a" / "w").mkdir()
    (tmp_path / "a" / "w" / "s1").write_text("a file, not a run folder")
    assert block_folders(tmp_path, "a/*/s1,b") == [tmp_path / "a/x/s1", tmp_path / "a/y/s1", tmp_path / "b"]
    assert block_folders(tmp_path, "a/y/s[0-9]") == [tmp_path / "a/y/s1", tmp_path / "a/y/s2"]
    assert block_folders(tmp_path, "nothing/*,b/z") == [tmp_path / "b/z"]


def test_the_fed_itemknn_claim_words_each_dataset_from_its_figures(tmp_path):
    """fed_itemknn (Adam) against PFedRec (SGD) under the clean protocol: level within 1 point or the seeds' summed
    std, otherwise the gap and its sign; a dataset without both stays out; paper-protocol runs are not read."""

    def run(dataset: str, ablation: str, engine: str, hits: list[float], protocol: str = "clean") -> None:
        for seed, hit in enumerate(hits):
            config = {"seed": seed, "fl": {"rounds": 100}, "dataset": {"name": dataset}}
            config |= {"protocol": {"name": protocol}, "ablation": {"name": ablation, "engine": engine}}
            config["optim"] = {"name": engine}
            fake_run(
                tmp_path / dataset / ablation / protocol / engine / f"s{seed}",
                config=config,
                dataset=dataset,
                ablation=ablation,
                protocol=protocol,
                seed=seed,
                test_at_best={"test/hit@10": hit, "test/ndcg@10": 0.0},
            )

    def verdict() -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fed_itemknn_verdict(rows(collect([tmp_path], planned=100)))

    assert verdict() == "has no clean-protocol run beside PFedRec's yet"
    run("ml-100k", "fed_itemknn", "adam", [0.556, 0.557, 0.557])
    run("ml-100k", "backbone", "sgd", [0.557, 0.558, 0.556])
    run("ml-100k", "backbone", "adam", [0.30])  # another engine: not PFedRec's figure here
    run("ml-1m", "fed_itemknn", "adam", [0.90], protocol="paper")  # the paper protocol: never compared
    run("ml-1m", "backbone", "sgd", [0.60])
    level = "is level with PFedRec under the clean protocol without sharing an embedding (ML-100K 55.67 vs 55.70)"
    assert verdict() == level
    # 2 points apart with one seed each (std 0): beyond the 1-point band, named with its sign
    run("ml-1m", "fed_itemknn", "adam", [0.58])
    run("filmtrust", "fed_itemknn", "adam", [0.90, 0.95])  # std 3.54: a 3-point gap is within the spread
    run("filmtrust", "backbone", "sgd", [0.895])
    assert verdict() == (
        "shares no embedding and, under the clean protocol, is level with PFedRec on ML-100K (55.67 vs 55.70), "
        "2.00 points below it on ML-1M (58.00 (1 seed) vs 60.00 (1 seed)) and level with it on FilmTrust "
        "(92.50 (2 seeds) vs 89.50 (1 seed))"
    )


def test_the_traffic_claim_reads_each_datasets_ratio_to_pfedrecs_changed_rows(tmp_path):
    """fed_itemknn's bytes per client and round over PFedRec's counted as changed rows, per dataset, by hand: uploads
    summed over the uploaders, downloads over the chosen clients; a dataset without PFedRec's rows run stays out."""
    from src.analysis.report import traffic_verdict

    def run(folder: str, dataset: str, ablation: str, up: float, down: float, tables: str | None = None) -> None:
        config = {"seed": 0, "fl": {"rounds": 100}, "dataset": {"name": dataset}, "ablation": {"name": ablation}}
        config |= {"protocol": {"name": "clean"}, "optim": {"name": "sgd"}, "comm": {"tables": tables}}
        history = [
            {"round": r, "val/hit@10": 0.5, "comm/uploaders": 4.0, "clients": 8.0}
            | {"comm/upload_bytes_total": 4 * up, "comm/download_bytes_total": 8 * down}
            for r in (1, 2)
        ]
        fake_run(tmp_path / folder, config=config, dataset=dataset, ablation=ablation, history=history)

    assert traffic_verdict(tmp_path, "fed_itemknn") == ""
    run("traffic/ml-100k/backbone/clean/rows/seed0", "ml-100k", "backbone", 100.0, 300.0, "rows")
    run("graph_variants/ml-100k/fed_itemknn/clean/default/seed0", "ml-100k", "fed_itemknn", 50.0, 750.0)
    run("graph_variants/filmtrust/fed_itemknn/clean/default/seed0", "filmtrust", "fed_itemknn", 10.0, 10.0)
    # ML-100K: (50 + 750) / (100 + 300) = 2; FilmTrust has no PFedRec rows run to compare with
    assert traffic_verdict(tmp_path, "fed_itemknn") == (
        "counted as sent, it moves 2.00 times (ML-100K) the bytes of PFedRec sending its changed rows"
    )
    run("traffic/filmtrust/backbone/clean/rows/seed0", "filmtrust", "backbone", 30.0, 50.0, "rows")
    assert traffic_verdict(tmp_path, "fed_itemknn").endswith(
        "2.00 times (ML-100K) and 0.25 times (FilmTrust) the bytes of PFedRec sending its changed rows"
    )


def test_a_run_on_a_cut_dataset_is_always_its_own_marked_row(tmp_path):
    """`data.max_users` (a smoke test's cut) and `data.verify=false` are named in the row even when every run of the
    group has them, and never averaged with full runs."""
    fake_run(tmp_path / "cut", config={"seed": 0, "data": {"max_users": 30, "verify": True}})
    with pytest.warns(UserWarning, match="data.max_users set"):
        table = main([str(tmp_path)])
    assert [r.get("variant") for r in table] == ["data.max_users=30"]
    fake_run(tmp_path / "full", config={"seed": 1, "data": {"max_users": None, "verify": True}})
    fake_run(tmp_path / "unverified", config={"seed": 2, "data": {"max_users": None, "verify": False}})
    with pytest.warns(UserWarning):
        table = main([str(tmp_path)])
    assert sorted(r.get("variant") for r in table) == [
        "data.max_users=30 data.verify=True",
        "data.max_users=None data.verify=False",
        "data.max_users=None data.verify=True",
    ]


def test_each_row_shows_the_validation_figure_that_chose_its_rounds(tmp_path):
    """The selection metric at each run's best round, mean ± std over seeds, beside the test figures read there:
    a report of a sweep is compared on validation, never on test (the metric named where it is not val/hit@10)."""
    for seed, val in ((0, 0.30), (1, 0.40)):
        fake_run(
            tmp_path / f"s{seed}", seed=seed, config={"seed": seed}, best_val={"val/hit@10": val}, select="val/hit@10"
        )
    table = main([str(tmp_path)])
    assert table[0]["best val"] == pytest.approx(35.0) and table[0]["best val std"] == pytest.approx(7.0710678)
    assert "| 35.00 ± 7.07 | 40.00 ± 0.00 |" in markdown(table)
    other = tmp_path / "ndcg"
    fake_run(other / "a", config={"seed": 0, "eval": {"select": "val/ndcg@10"}}, best_val={"val/ndcg@10": 0.25})
    assert "| val/ndcg@10 25.00 ± 0.00 |" in markdown(main([str(other)]))
