"""The run's Lightning loggers: the CSV keeps one row per round through a resume, atomically; every logger
config composes and instantiates."""

from __future__ import annotations

import csv

import pytest
import torch
from hydra.utils import instantiate

from src.runtime.loggers import RoundCSVLogger, make_loggers


def rows(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_a_round_logged_again_replaces_it_and_every_later_row(tmp_path):
    first = RoundCSVLogger(str(tmp_path))
    for r in range(1, 6):
        first.log_metrics({"val/hit@10": torch.tensor(r / 10, dtype=torch.float64), "loss": r}, step=r)
        first.save()
    path = tmp_path / "csv" / "metrics.csv"
    assert [int(r["round"]) for r in rows(path)] == [1, 2, 3, 4, 5]
    assert float(rows(path)[2]["val/hit@10"]) == 0.3

    # a resumed run (new process, new logger) whose checkpoint holds rounds 1-2 redoes round 3 on
    again = RoundCSVLogger(str(tmp_path))
    again.log_metrics({"val/hit@10": 0.9, "loss": 30, "new/key": 1.0}, step=3)
    again.save()
    found = rows(path)
    assert [int(r["round"]) for r in found] == [1, 2, 3]
    assert [r["loss"] for r in found] == ["1", "2", "30"] and found[0]["new/key"] == ""
    assert not list(path.parent.glob("*.tmp"))

    # a resumed run starts from its checkpoint's history: exactly those rounds, even one whose row the killed process
    # never wrote, and none after it
    history = [{"round": r, "val/hit@10": r / 10, "loss": float(r)} for r in (1, 2)]
    RoundCSVLogger(str(tmp_path)).restore(history)
    assert [(int(r["round"]), float(r["loss"])) for r in rows(path)] == [(1, 1.0), (2, 2.0)]


@pytest.mark.parametrize("logger", ["csv", "wandb"])
def test_every_logger_config_instantiates(compose_cfg, logger, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_cfg([f"logger={logger}"])
    made = make_loggers(cfg, tmp_path)
    assert type(made[0]) is RoundCSVLogger and made[0].log_dir == str(tmp_path / "csv")
    assert len(made) == (2 if logger == "wandb" else 1)


def test_trainer_and_callbacks_instantiate_from_conf(compose_cfg):
    cfg = compose_cfg(["fl.rounds=7", "eval.patience=3"])
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[instantiate(cfg.callbacks.early_stopping)])
    assert trainer.max_epochs == 7 and trainer.early_stopping_callback.patience == 3
