"""Waiting for, and checking, what an offline W&B run file holds (its reader: `src/analysis/wandb_records.py`)."""

from __future__ import annotations

import time
from pathlib import Path

from src.analysis.wandb_records import records, run_contents


def finished_contents(path: Path, timeout: float = 30.0) -> tuple[list[dict], dict, dict]:
    """`run_contents` once the file holds the run's `exit` record (wandb-core writes it last)."""
    deadline = time.monotonic() + timeout
    while True:
        kinds = [record.WhichOneof("record_type") for record in records(path)]
        if "exit" in kinds:
            return run_contents(path)
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: no exit record after {timeout:.0f} s (records so far: {kinds[-5:]})")
        time.sleep(0.1)


def assert_holds_the_run(path: Path, payload: dict) -> None:
    """The offline run file `path` holds the run whose results.json is `payload`: every round's metrics as its history
    has them (the step is the round), its resolved config, the best round and its test metrics as the summary."""
    history, config, summary = finished_contents(path)
    assert [row["trainer/global_step"] for row in history] == [row["round"] for row in payload["history"]]
    for logged, row in zip(history, payload["history"]):
        assert {k: logged[k] for k in row if k != "round"} == {k: v for k, v in row.items() if k != "round"}
    assert config["model"] == payload["config"]["model"] and config["seed"] == payload["config"]["seed"]
    assert summary["best_round"] == payload["best_round"]
    assert {k: summary[k] for k in payload["test_at_best"]} == payload["test_at_best"]
