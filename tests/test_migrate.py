"""`src.migrate`: stored records gain the method labels their yaml declares, and keep their identity."""

from __future__ import annotations

import json

import yaml
from omegaconf import OmegaConf

from src.cli.config import load_config
from src.cli.migrate import main
from src.config.identity import identity, resume_mismatch


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
    import pytest

    from src.cli.config import ConfigError

    for line in ("ablation.unread=[model.]", "ablation.engine=sgd"):
        with pytest.raises(ConfigError, match="sets a label of the method; expected it in the method's yaml only"):
            load_config([line])
