"""The selection metric (`eval.select`), the one best-round rule, early stopping, and the closing
summary of a run: chance levels of the metrics and the published row."""

from __future__ import annotations

import json
import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from src.analysis.report import truncate
from src.cli.config import ConfigError
from src.cli.train import train
from src.data.dataset import load
from src.evaluation.evaluator import Evaluator
from src.evaluation.metrics import full_ranks, rank_metrics, sampled_ranks
from src.runtime.results import (
    DEFAULT_SELECT,
    best_round,
    chance_level,
    meaning_lines,
    report_best,
    rounds_without_improvement,
    select_cutoff,
    select_key,
    selection_of,
)

SYNTHETIC = ["dataset=synthetic", "fl.checkpoint_every=0"]


# --- chance levels -------------------------------------------------------------------------------


@pytest.mark.parametrize("k, n", [(1, 1), (5, 100), (10, 100), (20, 100), (10, 7), (10, 10), (10, 2059), (50, 3)])
def test_chance_level_is_the_metric_averaged_over_every_rank(k, n):
    """Brute force: every rank 1..n once (a uniform rank), through the metrics the runs use."""
    exact = rank_metrics(torch.arange(1, n + 1), ks=(k,))
    chance = chance_level(k, n)
    assert chance[f"hit@{k}"] == pytest.approx(exact[f"hit@{k}"], abs=1e-12)
    assert chance[f"ndcg@{k}"] == pytest.approx(exact[f"ndcg@{k}"], abs=1e-12)
    assert chance[f"hit@{k}"] == min(k, n) / n


def test_chance_level_of_the_sampled_metric_matches_random_scores():
    """Simulation: random scores for the held-out item and 99 negatives, ranked as the evaluator ranks."""
    rng = np.random.default_rng(0)
    users, negatives = 40_000, 99
    scores = torch.from_numpy(rng.random((users, 1 + negatives)))
    ranks = sampled_ranks(scores[:, 0], scores[:, 1:])
    sim = rank_metrics(ranks, ks=(5, 10, 20))
    for k in (5, 10, 20):
        chance = chance_level(k, 1 + negatives)
        # hit@K is a mean of Bernoulli(p): 5 standard errors
        tol = 5 * math.sqrt(chance[f"hit@{k}"] * (1 - chance[f"hit@{k}"]) / users)
        assert sim[f"hit@{k}"] == pytest.approx(chance[f"hit@{k}"], abs=tol)
        assert sim[f"ndcg@{k}"] == pytest.approx(chance[f"ndcg@{k}"], abs=tol)
    assert chance_level(10, 100)["hit@10"] == 0.1


def test_chance_level_of_full_ranking_matches_random_permutations():
    """Random scores ranked by `full_ranks` among the items a user has not trained on (a random 200 of 1,682
    excluded per user, never the target) score what `chance_level` says of the 1,482 candidates left."""
    rng = np.random.default_rng(1)
    n_items, users, excluded = 1682, 5_000, 200
    scores = torch.from_numpy(rng.random((users, n_items)))
    target = torch.from_numpy(rng.integers(0, n_items, size=users))
    keys = rng.random((users, n_items))
    keys[np.arange(users), target.numpy()] = 2.0  # the target sorts last: never excluded
    exclude = torch.zeros(users, n_items, dtype=torch.bool)
    exclude.scatter_(1, torch.from_numpy(np.argsort(keys, axis=1)[:, :excluded]), True)
    sim = rank_metrics(full_ranks(scores, target, exclude), ks=(10,))
    chance = chance_level(10, n_items - excluded)
    assert chance["hit@10"] == 10 / (n_items - excluded)
    tol = 5 * math.sqrt(chance["hit@10"] / users)
    assert sim["hit@10"] == pytest.approx(chance["hit@10"], abs=tol)
    assert sim["ndcg@10"] == pytest.approx(chance["ndcg@10"], abs=tol)


def test_chance_level_refuses_empty_inputs():
    with pytest.raises(ValueError):
        chance_level(0, 100)
    with pytest.raises(ValueError):
        chance_level(10, 0)


# --- the selection metric ------------------------------------------------------------------------


def test_select_defaults_to_validation_hit_at_10(compose_cfg):
    cfg = compose_cfg(SYNTHETIC)
    assert cfg.eval.select == select_key(cfg) == DEFAULT_SELECT == "val/hit@10"
    old = OmegaConf.create({"eval": {"ks": [5, 10, 20]}})  # a config from before the key existed
    assert select_key(old) == DEFAULT_SELECT
    assert select_key(compose_cfg([*SYNTHETIC, "eval.select=val/ndcg@5"])) == "val/ndcg@5"
    assert select_cutoff("val/ndcg@20") == 20
    with pytest.raises(ValueError):
        select_cutoff("test/hit@10")


@pytest.mark.parametrize(
    "overrides",
    [
        ["eval.select=val/ndcg@10"],
        ["eval.select=val/hit@5"],
        ["eval.select=val/ndcg@20"],
        ["eval.ks=[5,20]", "eval.select=val/hit@5"],
        ["eval.ks=[1]", "eval.select=val/ndcg@1"],
    ],
)
def test_valid_selection_is_accepted(compose_cfg, overrides):
    compose_cfg(overrides)


@pytest.mark.parametrize(
    "overrides, key, expected",
    [
        (["eval.select=val/hit@50"], "eval.select", "eval.ks"),  # K not evaluated
        (["eval.select=test/hit@10"], "eval.select", "val/hit@K"),  # test data never selects
        (["eval.select=val/mrr@10"], "eval.select", "val/hit@K"),
        (["eval.select=val_full/hit@10"], "eval.select", "val/hit@K"),
        (["eval.select=val/hit@0"], "eval.select", "val/hit@K"),
        (["eval.select=5"], "eval.select", "val/hit@K"),
        (["eval.ks=[5,20]"], "eval.ks", "contains 10"),  # the default's K must be evaluated
    ],
)
def test_bad_selection_is_named(compose_cfg, overrides, key, expected):
    with pytest.raises(ConfigError) as err:
        compose_cfg(overrides)
    msg = str(err.value)
    assert msg.startswith(f"{key}=") and expected in msg, msg


def rows(values: list[float], key: str = "val/hit@10") -> list[dict]:
    return [{"round": i + 1, key: v, "test/hit@10": 0.01 * (i + 1)} for i, v in enumerate(values)]


def test_best_round_is_the_highest_selection_metric_earliest_on_ties():
    history = rows([0.1, 0.3, 0.3, 0.2])
    assert best_round(history)["round"] == 2
    for r, ndcg in zip(history, [0.5, 0.1, 0.1, 0.5]):
        r["val/ndcg@10"] = ndcg
    assert best_round(history, "val/ndcg@10")["round"] == 1
    assert best_round([]) is None
    # a round that evaluated no one (a Flower round whose replies all failed) has no metric: never the best, but
    # it counts as a round without improvement
    unscored = [*history, {"round": 5}]
    assert best_round(unscored)["round"] == 2 and rounds_without_improvement(unscored) == 3
    assert best_round([{"round": 1}]) is None


def test_results_without_the_key_select_on_validation_hit_at_10():
    old = {"config": {"eval": {"ks": [5, 10, 20], "patience": None}}, "history": rows([0.1, 0.2])}
    assert selection_of(old) == "val/hit@10"
    assert selection_of({"config": {"eval": {"select": "val/ndcg@5"}}}) == "val/ndcg@5"
    assert selection_of({"select": "val/hit@5", "config": {}}) == "val/hit@5"
    assert selection_of({}) == "val/hit@10"


def test_report_rounds_cut_selects_on_the_runs_selection_metric(tmp_path):
    history = rows([0.1, 0.3, 0.2])
    for r, ndcg in zip(history, [0.2, 0.1, 0.3]):
        r["val/ndcg@10"] = ndcg
    payload = {"path": str(tmp_path), "config": {"eval": {"select": "val/ndcg@10"}}, "history": history}
    assert truncate(payload, 2)["test_at_best"] == {"test/hit@10": 0.01}  # round 1 by ndcg
    assert truncate(payload, 3)["test_at_best"] == {"test/hit@10": 0.03}  # round 3
    old = {"path": str(tmp_path), "config": {}, "history": rows([0.1, 0.3, 0.2])}
    assert truncate(old, 3)["test_at_best"] == {"test/hit@10": 0.02}  # val/hit@10: round 2
    # the cut run's best round and validation figures are its own, not the whole run's
    cut = truncate({**payload, "best_round": 3, "best_val": {"val/ndcg@10": 0.3}}, 2)
    assert cut["best_round"] == 1 and cut["best_val"] == {"val/hit@10": 0.1, "val/ndcg@10": 0.2}
    # an unscored round (a Flower round that lost a node) is skipped; a cut with no scored round is refused
    unscored = {"path": str(tmp_path), "config": {}, "history": [{"round": 1}, *rows([0.1, 0.3])[1:]]}
    assert truncate(unscored, 3)["best_round"] == 2
    with pytest.raises(ValueError, match="no round among the first 1 has val/hit@10"):
        truncate(unscored, 1)


def test_a_run_selects_on_eval_select(compose_cfg, tmp_path):
    payload = train(compose_cfg([*SYNTHETIC, "fl.rounds=3", "eval.select=val/ndcg@5"]), tmp_path / "r", progress=False)
    best = max(payload["history"], key=lambda r: (r["val/ndcg@5"], -r["round"]))  # the earliest of a tie
    assert payload["select"] == "val/ndcg@5" and payload["best_round"] == best["round"]
    assert payload["config"]["eval"]["select"] == "val/ndcg@5"
    assert payload["best_val"]["val/ndcg@5"] == best["val/ndcg@5"]
    assert payload["test_at_best"] == {k: v for k, v in best.items() if k.startswith(("test/", "test_full/"))}


# --- early stopping (eval.patience) ----------------------------------------------------------------


def stop_round_before(values: list[float], patience: int) -> int:
    """The rule as it was before it called best_round: index of the best (earliest on ties) over the
    rows so far, stop when the last row is `patience` or more rows past it."""
    history: list[dict] = []
    for v in values:
        history.append({"val/hit@10": v})
        best = max(range(len(history)), key=lambda i: (history[i]["val/hit@10"], -i))
        if len(history) - 1 - best >= patience:
            return len(history)
    return len(values)


def stop_round_now(cfg, data, values: list[float], key: str = "val/hit@10") -> int:
    """The round the run's early-stopping callback (conf/callbacks/, instantiated as the run does) stops after,
    when the rounds log `values` for `key`."""
    callback = instantiate(cfg.callbacks.early_stopping)
    module = SimpleNamespace(history=[])
    trainer = SimpleNamespace(should_stop=False, lightning_module=module, current_epoch=0)
    for epoch, value in enumerate(values):
        trainer.current_epoch = epoch
        module.history.append({"round": epoch + 1, "val/hit@10": 0.0, key: value})
        callback._run_early_stopping_check(trainer)
        if trainer.should_stop:
            return epoch + 1
    return len(values)


@pytest.mark.parametrize(
    "values",
    [
        [0.1, 0.2, 0.2, 0.2, 0.2],
        [0.3, 0.1, 0.2, 0.3, 0.3],
        [0.1, 0.2, 0.3, 0.4, 0.5],
        [0.5, 0.5, 0.5, 0.5, 0.5],
        [0.2, 0.1, 0.3, 0.2, 0.1, 0.4, 0.4, 0.1],
    ],
)
@pytest.mark.parametrize("patience", [1, 2, 3])
def test_patience_stops_where_it_stopped_before(compose_cfg, values, patience):
    cfg = compose_cfg([*SYNTHETIC, f"eval.patience={patience}"])
    data = load(cfg)
    assert stop_round_now(cfg, data, values) == stop_round_before(values, patience)


def test_patience_follows_eval_select(compose_cfg):
    cfg = compose_cfg([*SYNTHETIC, "eval.patience=2", "eval.select=val/ndcg@10"])
    data = load(cfg)
    # val/hit@10 stays 0 every round (it would stop after round 3); ndcg@10 keeps improving
    assert stop_round_now(cfg, data, [0.1, 0.2, 0.3, 0.4, 0.5], "val/ndcg@10") == 5
    assert stop_round_now(cfg, data, [0.5, 0.4, 0.3, 0.2, 0.1], "val/ndcg@10") == 3


def test_patience_in_a_real_run(compose_cfg, tmp_path):
    overrides = ["dataset=synthetic", "fl.checkpoint_every=100", "fl.rounds=8", "eval.patience=1"]
    payload = train(compose_cfg(overrides), tmp_path / "p", progress=False)
    values = [h["val/hit@10"] for h in payload["history"]]
    assert len(values) == stop_round_before(values, 1)
    # the round early stopping ends on is checkpointed (the checkpoint callback runs after early stopping decides)
    record = json.loads((tmp_path / "p" / "checkpoints" / "last.json").read_text())
    assert len(values) < 8 and record["round"] == len(values)
    # resumed for longer under the same patience it stays stopped, as an unbroken run of 12 rounds would have
    again = train(compose_cfg([*overrides, "fl.rounds=12", "resume=true"]), tmp_path / "p", progress=False)
    assert [h["val/hit@10"] for h in again["history"]] == values


# --- the closing summary ---------------------------------------------------------------------------


def payload_of(protocol: str, dataset: str = "filmtrust", ablation: str = "full", **extra) -> dict:
    full = protocol == "clean"
    test = {"test/hit@10": 0.5, "test/ndcg@10": 0.25}
    if full:
        test |= {"test_full/hit@10": 0.05, "test_full/ndcg@10": 0.02}
    return {
        "config": {
            "protocol": {"name": protocol, "eval_negatives": 99, "full_ranking": full},
            "eval": {"ks": [5, 10, 20]},
        },
        "dataset": dataset,
        "protocol": protocol,
        "ablation": ablation,
        "summary": {"items": 2071},
        "best_round": 3,
        "best_val": {"val/hit@10": 0.6},
        "test_at_best": test,
        **extra,
    }


def test_clean_summary_shows_the_chance_levels():
    chance = {"test_full/hit@10": 0.0123, "test_full/ndcg@10": 0.0056}
    lines = meaning_lines(payload_of("clean", chance=chance))
    assert len(lines) == 1
    sampled = chance_level(10, 100)
    assert (
        f"hit@10 {sampled['hit@10']:.4f} ndcg@10 {sampled['ndcg@10']:.4f} at random (1 of 100 candidates)" in lines[0]
    )
    assert "full ranking hit@10 0.0500 ndcg@10 0.0200 vs hit@10 0.0123 ndcg@10 0.0056 at random" in lines[0]
    # a run written before its chance was recorded shows its full-ranking figures alone (1 of n_items was wrong)
    old = meaning_lines(payload_of("clean"))[0]
    assert old.endswith("full ranking hit@10 0.0500 ndcg@10 0.0200") and "2071" not in old


def test_the_recorded_chance_is_what_random_ranks_among_each_users_candidates_score(compose_cfg):
    """Full ranking ranks a user's test item among the items it did not train on, less its validation item: a
    constant scorer (ties against the held-out item) ranks it last, at exactly that count; the chance level is the
    mean over users of the metrics of every rank 1..count, computed here rank by rank."""
    data = load(compose_cfg(["dataset=synthetic", "protocol=clean"]))
    evaluator = Evaluator(data, (5, 10), full_ranking=True)
    counts = evaluator.full_candidates()
    ranks = evaluator.ranks(
        lambda rows, items: torch.zeros(len(rows), data.n_items if items is None else items.shape[1]),
        [torch.arange(data.n_users)],
    )
    assert torch.equal(ranks["test_full"], counts) and counts.max() < data.n_items
    assert torch.equal(counts, torch.as_tensor(data.n_items - np.diff(data.train_ptr) - 1))
    per_user = [rank_metrics(torch.arange(1, int(c) + 1), (5, 10)) for c in counts]
    chance = evaluator.chance()
    for name in ("hit@5", "ndcg@5", "hit@10", "ndcg@10"):
        assert chance[f"test_full/{name}"] == pytest.approx(np.mean([m[name] for m in per_user]), rel=1e-12)
        assert chance[f"test/{name}"] == pytest.approx(rank_metrics(torch.arange(1, 101), (5, 10))[name], rel=1e-12)
    assert chance["test_full/hit@10"] > 10 / data.n_items  # what "1 of n_items" understated


def test_paper_summary_shows_the_published_row_or_says_there_is_none():
    lines = meaning_lines(payload_of("paper"))
    assert len(lines) == 2 and "1 of 100 candidates" in lines[0] and "full ranking" not in lines[0]
    assert "published (paper protocol, full on filmtrust): hit@10 0.9894 ndcg@10 0.9525" in lines[1]
    assert "this run: hit@10 0.5000 ndcg@10 0.2500" in lines[1]
    none = meaning_lines(payload_of("paper", ablation="local"))
    assert "published (paper protocol): none for local on filmtrust" in none[1]


def test_report_best_logs_and_returns_the_selection_metric(caplog):
    log = logging.getLogger("test.report_best")
    with caplog.at_level(logging.INFO, logger="test.report_best"):
        assert report_best(payload_of("clean"), "run", log) == 0.6
    assert "best round 3: val/hit@10 0.6000, test hit@10 0.5000 ndcg@10 0.2500" in caplog.text
    assert "at random (1 of 100 candidates)" in caplog.text
    payload = payload_of("clean", select="val/ndcg@5", best_val={"val/ndcg@5": 0.4})
    payload["test_at_best"] |= {"test/hit@5": 0.3, "test/ndcg@5": 0.2}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="test.report_best"):
        assert report_best(payload, "run", log) == 0.4
    assert "val/ndcg@5 0.4000, test hit@5 0.3000 ndcg@5 0.2000" in caplog.text
