"""`src.migrate`: stored records gain the method labels their yaml declares, and keep their identity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from src.cli.config import ConfigError, load_config
from src.cli.migrate import main
from src.cli.store import stored_runs, variant_name
from src.config.identity import identity, resume_mismatch
from src.runtime.errors import UserError
from src.runtime.results import compact_json, read_results

ROOT = Path(__file__).resolve().parents[1]


def stored(folder, overrides: list[str]) -> dict:
    """A stored run as a campaign left it before the labels existed: its resolved config without them, and its
    campaign key (which left out what the method never reads, as the labels now say)."""
    config = OmegaConf.to_container(load_config(overrides), resolve=True)
    key = identity(config)
    for key_name in ("engine", "unread"):
        del config["ablation"][key_name]
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"config": config, "finished": True}))
    (folder / "config_resolved.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (folder / "run.json").write_text(json.dumps({"key": key}))
    return config


def test_records_gain_the_labels_resolved_against_their_own_config(tmp_path):
    cases = {
        "central": (["ablation=central", "optim=sgd"], "central-adam", ["optim."]),
        "knn_full": (["ablation=knn_full", "optim=sgd"], "sgd+fast", []),
        "no_gsa": (["ablation=no_gsa", "model.alignment=exact"], "adam+exact", []),
        "backbone": (["ablation=backbone"], "adam", []),
        "popularity": (["ablation=popularity"], "none", ["optim."]),
    }
    for name, (overrides, _, _) in cases.items():
        stored(tmp_path / name, overrides)
    assert main([str(tmp_path)]) == len(cases)
    for name, (_, engine, unread) in cases.items():
        config = json.loads((tmp_path / name / "results.json").read_text())["config"]
        assert (config["ablation"]["engine"], config["ablation"]["unread"]) == (engine, unread)
        assert yaml.safe_load((tmp_path / name / "config_resolved.yaml").read_text()) == config
        meta = json.loads((tmp_path / name / "run.json").read_text())
        assert identity(config) == meta["key"] and len(meta["migrated"]) == 1
        bare = {k: v for k, v in config["ablation"].items() if k not in ("engine", "unread")}
        unlabelled = {**config, "ablation": bare}
        assert identity(unlabelled) == meta["key"]  # read by the rule the labels replace
        assert resume_mismatch(unlabelled, config) == []  # a checkpoint from before the labels resumes
    snapshot = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert main([str(tmp_path)]) == 0  # a second pass changes nothing
    assert snapshot == {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}


def test_an_override_of_a_method_label_is_refused():
    """`ablation.unread` decides which keys tell a method's runs apart: only its yaml sets it."""
    for line in ("ablation.unread=[model.]", "ablation.engine=sgd"):
        with pytest.raises(ConfigError, match="sets a label of the method; expected it in the method's yaml only"):
            load_config([line])


def stored_sweep_run(root, variant: str, overrides: list[str], seed: int = 0):
    """A run of the alpha sweep as the campaign stored it under `variant` (its overrides in run.json)."""
    folder = root / "sweep_alpha" / "ml-100k" / "full" / "paper" / variant / f"seed{seed}"
    stored(folder, ["ablation=full", *overrides, f"seed={seed}"])
    meta = {"key": "k", "overrides": ["experiment=sweep_alpha", "dataset=ml-100k", "ablation=full", *overrides]}
    (folder / "run.json").write_text(json.dumps({**meta, "overrides": [*meta["overrides"], f"seed={seed}"]}))
    return folder


def test_runs_stored_under_a_moved_keys_old_name_move_to_the_folder_named_as_today(tmp_path):
    assert variant_name(["model.alpha=0.01", "optim=sgd", "seed=1"]) == "ablation.alpha=0.01_optim=sgd"
    assert variant_name(["+model.tau=0.2"]) == "+ablation.tau=0.2"
    old = ["model.alpha=0.01", "optim=sgd"]
    for variant, overrides, seed in (
        ("model.alpha=0.01_optim=sgd", old, 0),
        ("model.alpha=0.01_optim=sgd", old, 1),
        ("model.alpha=0.05_optim=sgd-1a2b3c4d", ["model.alpha=0.05", "optim=sgd"], 0),  # the store's suffix
        ("my-variant", ["model.alpha=0.1", "optim=sgd"], 0),  # named by hand (store --variant)
        ("ablation.alpha=0.5_optim=sgd", ["ablation.alpha=0.5", "optim=sgd"], 0),  # named as today
    ):
        stored_sweep_run(tmp_path, variant, overrides, seed)
    keys = {key: folder.relative_to(tmp_path) for key, folder in stored_runs(tmp_path).items()}
    main([str(tmp_path)])
    sweep = tmp_path / "sweep_alpha" / "ml-100k" / "full" / "paper"
    assert sorted(p.name for p in sweep.iterdir()) == [
        "ablation.alpha=0.01_optim=sgd",
        "ablation.alpha=0.05_optim=sgd-1a2b3c4d",
        "ablation.alpha=0.5_optim=sgd",
        "my-variant",
    ]
    moved = {key: folder.relative_to(tmp_path) for key, folder in stored_runs(tmp_path).items()}
    assert moved.keys() == keys.keys()  # the same runs, found by their identity
    renamed = {str(keys[k]): str(moved[k]) for k in keys if keys[k] != moved[k]}
    assert renamed == {
        f"sweep_alpha/ml-100k/full/paper/model.alpha=0.01_optim=sgd/seed{s}": (
            f"sweep_alpha/ml-100k/full/paper/ablation.alpha=0.01_optim=sgd/seed{s}"
        )
        for s in (0, 1)
    } | {
        "sweep_alpha/ml-100k/full/paper/model.alpha=0.05_optim=sgd-1a2b3c4d/seed0": (
            "sweep_alpha/ml-100k/full/paper/ablation.alpha=0.05_optim=sgd-1a2b3c4d/seed0"
        )
    }
    meta = json.loads((sweep / "ablation.alpha=0.01_optim=sgd" / "seed1" / "run.json").read_text())
    assert "model.alpha=0.01" in meta["overrides"]  # as the run was started
    assert meta["migrated"][-1].startswith("moved from model.alpha=0.01_optim=sgd/seed1 by src.migrate")
    snapshot = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert main([str(tmp_path)]) == 0  # nothing left to move
    assert snapshot == {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}


def test_a_move_onto_a_folder_that_holds_a_run_is_refused_before_anything_changes(tmp_path):
    stored_sweep_run(tmp_path, "model.alpha=0.01_optim=sgd", ["model.alpha=0.01", "optim=sgd"])
    stored_sweep_run(tmp_path, "model.alpha=0.05_optim=sgd", ["model.alpha=0.05", "optim=sgd"])
    stored_sweep_run(tmp_path, "ablation.alpha=0.05_optim=sgd", ["ablation.alpha=0.05", "optim=sgd"])
    snapshot = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=r"ablation.alpha=0.05_optim=sgd/seed0 holds a run already; .*nothing was"):
        main([str(tmp_path)])
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == snapshot


def test_a_history_held_as_rows_is_rewritten_as_columns_and_read_back_as_the_same_rows(tmp_path):
    """Stored records hold their history by columns (each key once): the same rounds, values and missing keys."""
    config = OmegaConf.to_container(load_config(["ablation=backbone"]), resolve=True)
    rows = [
        {"round": 1, "val/hit@10": 0.1, "loss/bce": 0.69},
        {"round": 2, "val/hit@10": 0.25, "loss/bce": 0.5, "community/count": 3},  # a key only some rounds have
        {"round": 3, "loss/bce": 0.4, "val/hit@10": 0.3},  # another order
    ]
    folder = tmp_path / "run"
    folder.mkdir()
    record = {"config": config, "finished": True, "history": rows, "best_round": 3}
    (folder / "results.json").write_text(json.dumps(record, separators=(",", ":")))
    (folder / "run.json").write_text(json.dumps({"key": identity(config)}))
    before = (folder / "results.json").stat().st_size
    assert main([str(tmp_path)]) == 1
    raw = json.loads((folder / "results.json").read_text())
    assert raw["history"] == {
        "round": [1, 2, 3],
        "val/hit@10": [0.1, 0.25, 0.3],
        "loss/bce": [0.69, 0.5, 0.4],
        "community/count": [None, 3, None],
    }
    assert read_results(folder / "results.json") == record
    assert (folder / "results.json").stat().st_size < before
    assert json.loads((folder / "run.json").read_text()) == {"key": identity(config)}  # the same run: no note
    assert main([str(tmp_path)]) == 0
    run_folder = tmp_path / "outputs" / "run"  # a run folder (no run.json) keeps its rows
    run_folder.mkdir(parents=True)
    (run_folder / "results.json").write_text(json.dumps(record))
    assert main([str(tmp_path)]) == 0 and json.loads((run_folder / "results.json").read_text()) == record
    with pytest.raises(ValueError, match="a history row holds a null value"):
        compact_json({**record, "history": [{"round": 1, "val/hit@10": None}]})
    (folder / "results.json").write_text(json.dumps({**raw, "history": {"round": [1, 2], "loss/bce": [0.5]}}))
    with pytest.raises(ValueError, match=r"results.json: not a readable results.json \(history columns of unequal"):
        read_results(folder / "results.json")


def test_stored_records_are_about_half_the_bytes_as_columns(tmp_path):
    """What keeps results/ small enough to travel to a lent machine (64 MiB with the wheels and data carried)."""
    stored_record = ROOT / "results/runs/table2/ml-100k/full/clean/default/seed0/results.json"
    record = read_results(stored_record)
    assert len(record["history"]) == 100
    compact = compact_json(record)
    assert len(compact) < 0.6 * len(json.dumps(record, separators=(",", ":")))
    (tmp_path / "results.json").write_text(compact)
    assert read_results(tmp_path / "results.json") == record
