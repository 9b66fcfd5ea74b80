"""The results.json contract and atomic file writes.

Fields (later work may add, never remove): config, dataset, protocol, ablation, seed, summary,
history (per round: validation and test metrics, losses, timings), select (the validation metric
that picks the best round, `eval.select`; files without it used val/hit@10), best_round (highest
select metric, earliest on ties), best_val, test_at_best, timings, resources (device, CPU or GPU
model, torch threads, peak resident and GPU memory of the process that finished the run; empty for a
Flower run, which spans processes and hosts), finished,
communication (bytes over the run: upload and download totals, mean upload per client and round, and
the embedding-sharing size for comparison), chance (a random scorer's expected test metrics on the run's split),
privacy (the epsilon spent by the last round, when noise is on);
code (the commit each process ran, from which round: `src.run` and the Flower ServerApp) and, from `src.run`,
resumes (the resumable keys each resume changed).

A run folder's results.json holds its history as rows (one object per round); a stored record (`results/runs/`,
`compact_json`) holds it as columns (key -> one value per round, null where a round lacks the key), each key written
once: half the bytes, which keeps the repository small enough to travel to a lent machine. `read_results` gives the
rows whichever way a file holds them; every reader of a history goes through it.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from src.runtime.atomic import atomic_write_text
from src.runtime.published import published

# the validation metric that picks the best round when `eval.select` is not set (and in results.json
# files written before the key existed)
DEFAULT_SELECT = "val/hit@10"
SELECT_PATTERN = re.compile(r"val/(hit|ndcg)@([1-9][0-9]*)")


def select_key(cfg: DictConfig) -> str:
    """`eval.select` of a config: the validation metric that picks the best round (default val/hit@10).

    Configs written before the key existed lack it: they selected by val/hit@10.
    """
    return str(OmegaConf.select(cfg, "eval.select", default=None) or DEFAULT_SELECT)


def select_cutoff(select: str) -> int:
    """K of a selection metric `val/hit@K` or `val/ndcg@K`; ValueError for any other name."""
    match = SELECT_PATTERN.fullmatch(str(select))
    if match is None:
        raise ValueError(f"selection metric {select!r}: expected val/hit@K or val/ndcg@K")
    return int(match.group(2))


def selection_of(payload: dict[str, Any]) -> str:
    """The selection metric of a results.json payload: its `select`, else its config's `eval.select`,
    else val/hit@10 (files written before either existed)."""
    if payload.get("select"):
        return str(payload["select"])
    config = payload.get("config")
    evaluation = config.get("eval") if isinstance(config, dict) else None
    if isinstance(evaluation, dict) and evaluation.get("select"):
        return str(evaluation["select"])
    return DEFAULT_SELECT


def publish_report(out: str | Path, report: dict[str, Any], text: str) -> None:
    """A command's report: its table printed, the same figures as JSON written atomically to `out`."""
    path = Path(str(out))
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    print(text)
    print(f"\nwrote {path}")


def best_round(history: list[dict], select: str = DEFAULT_SELECT) -> dict | None:
    """The round with the highest `select` metric (earliest on ties) among the rounds that have it; test data plays no
    part.

    The one best-round rule: results.json, the report's `--rounds` cut and early stopping
    (`eval.patience`) all call it.
    """
    scored = [r for r in history if select in r]  # a Flower round whose replies all failed evaluated no one
    if not scored:
        return None
    return max(scored, key=lambda r: (r[select], -r["round"]))


def at_best(history: list[dict], select: str) -> dict[str, Any]:
    """results.json's `best_round`, `best_val` (its validation metrics) and `test_at_best` (its test metrics) of a
    history: the fields a finished run and the report's `--rounds` cut both derive from `best_round`."""
    best = best_round(history, select)
    return {
        "best_round": best["round"] if best else None,
        "best_val": {k: v for k, v in best.items() if k.startswith("val")} if best else {},
        "test_at_best": {k: v for k, v in best.items() if k.startswith("test")} if best else {},
    }


def rounds_without_improvement(history: list[dict], select: str = DEFAULT_SELECT) -> int:
    """Rounds since the best round (`best_round`); early stopping (`eval.patience`) stops when it reaches the
    patience, in the simulator's callback and in the Flower ServerApp alike."""
    best = best_round(history, select)
    return 0 if best is None else history[-1]["round"] - best["round"]


def communication_totals(history: list[dict]) -> dict[str, float]:
    """Bytes moved over the whole run, from the per-round `comm/*` figures."""
    if not history or "comm/upload_bytes_total" not in history[0]:
        return {}
    up = sum(r.get("comm/upload_bytes_total", 0.0) for r in history)
    senders = sum(r.get("comm/uploaders", 0.0) for r in history)
    out = {
        "upload_bytes_total": up,
        "download_bytes_total": sum(r.get("comm/download_bytes_total", 0.0) for r in history),
        "upload_bytes_mean_per_client_round": up / senders if senders else 0.0,
        "embedding_bytes_per_client_round": history[0]["comm/embedding_bytes"],
    }
    out["upload_vs_embedding"] = out["upload_bytes_mean_per_client_round"] / out["embedding_bytes_per_client_round"]
    return out


def build_results(
    cfg: DictConfig,
    summary: dict,
    history: list[dict],
    timings: dict[str, float],
    finished: bool,
    resources: dict[str, Any] | None = None,
    chance: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Assemble the results.json payload from the run's config, data summary and round history
    (`resources`: what ran it and its peak memory, `src.runtime.device.run_resources`; `chance`: a random scorer's
    expected test metrics on this split, `Evaluator.chance`)."""
    select = select_key(cfg)
    return {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "dataset": cfg.dataset.name,
        "protocol": cfg.protocol.name,
        "ablation": cfg.ablation.name,
        "seed": int(cfg.seed),
        "summary": summary,
        "history": history,
        "select": select,
        **at_best(history, select),
        "timings": timings,
        "resources": resources or {},
        "chance": chance or {},
        "finished": finished,
        "communication": communication_totals(history),
        "privacy": {k.split("/", 1)[1]: v for k, v in history[-1].items() if k.startswith("privacy/")}
        if history
        else {},
    }


def history_columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The per-round rows as columns: key -> its value in every round, None where a round lacks the key (so a row may
    hold no None itself: ValueError)."""
    if any(value is None for row in rows for value in row.values()):
        raise ValueError("a history row holds a null value; expected numbers (null marks a key a round lacks)")
    keys = dict.fromkeys(key for row in rows for key in row)
    return {key: [row.get(key) for row in rows] for key in keys}


def history_rows(history: list[dict[str, Any]] | dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The per-round rows of a history held as rows (returned as it is) or as columns (`history_columns`; a round's
    null entries left out, as rows never hold nulls); ValueError for a column that is not a list or columns of unequal
    length."""
    if not isinstance(history, dict):
        return history
    if not all(isinstance(column, list) for column in history.values()):
        raise ValueError("a history column is not a list; expected key -> one value per round")
    lengths = {len(column) for column in history.values()}
    if len(lengths) > 1:
        raise ValueError(f"history columns of unequal length ({sorted(lengths)} rounds)")
    rounds = lengths.pop() if lengths else 0
    return [{k: column[i] for k, column in history.items() if column[i] is not None} for i in range(rounds)]


def read_results(path: Path) -> dict[str, Any]:
    """A results.json (a run folder's or a stored record's) with its history as rows; ValueError for a file that is
    not JSON or whose history columns are malformed, naming the file."""
    try:
        payload = json.loads(Path(path).read_text())
        if isinstance(payload, dict) and isinstance(payload.get("history"), dict):
            payload["history"] = history_rows(payload["history"])
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path}: not a readable results.json ({err})") from err
    return payload


def compact_json(payload: dict[str, Any]) -> str:
    """A stored record's results.json: no whitespace, the history as columns (`read_results` reads it back)."""
    if "history" in payload:
        payload = {**payload, "history": history_columns(history_rows(payload["history"]))}
    return json.dumps(payload, separators=(",", ":"))


def write_results(run_dir: Path, payload: dict[str, Any]) -> Path:
    """Write results.json atomically into the run folder."""
    path = Path(run_dir) / "results.json"
    atomic_write_text(path, json.dumps(payload, indent=2))
    return path


def chance_level(k: int, candidates: int) -> dict[str, float]:
    """hit@K and ndcg@K of a random scorer: the held-out item's rank uniform on 1..`candidates`.

    hit@K = min(K, n) / n and ndcg@K = (1/n) * sum over r = 1..min(K, n) of 1 / log2(r + 1), exactly
    (the metrics of `src.evaluation.metrics.rank_metrics` averaged over every rank).
    """
    if k < 1 or candidates < 1:
        raise ValueError(f"chance_level needs K >= 1 and candidates >= 1, got K={k}, candidates={candidates}")
    top = min(int(k), int(candidates))
    return {
        f"hit@{k}": top / candidates,
        f"ndcg@{k}": math.fsum(1.0 / math.log2(r + 1) for r in range(1, top + 1)) / candidates,
    }


def _pair(metrics: dict[str, Any], prefix: str, k: int) -> str:
    """`hit@K 0.1234 ndcg@K 0.0567` from `metrics` (`-` for a value the run does not have)."""

    def num(key: str) -> str:
        value = metrics.get(f"{prefix}{key}@{k}")
        return "-" if value is None else f"{value:.4f}"

    return f"hit@{k} {num('hit')} ndcg@{k} {num('ndcg')}"


def meaning_lines(payload: dict[str, Any]) -> list[str]:
    """The best round's test metrics beside what they mean: the chance level of the sampled metric
    (1 held-out item among 1 + protocol.eval_negatives) and, with full ranking, the run's recorded `chance` (each
    user's held-out item among the items it did not train on); under the paper protocol, the published hit@10 /
    ndcg@10 of this dataset and method."""
    config = payload.get("config") or {}
    protocol = config.get("protocol") or {}
    test = payload.get("test_at_best") or {}
    k = select_cutoff(selection_of(payload))
    parts = []
    negatives = protocol.get("eval_negatives")
    if negatives:
        n = 1 + int(negatives)
        parts.append(
            f"sampled {_pair(test, 'test/', k)} vs {_pair(chance_level(k, n), '', k)} at random (1 of {n} candidates)"
        )
    if protocol.get("full_ranking"):
        part = f"full ranking {_pair(test, 'test_full/', k)}"
        if f"test_full/hit@{k}" in (payload.get("chance") or {}):  # runs written before it was recorded have none
            chance = _pair(payload["chance"], "test_full/", k)
            part += f" vs {chance} at random (among the items each user did not train on)"
        parts.append(part)
    lines = ["test at best round: " + "; ".join(parts)] if parts else []
    if payload.get("protocol") == "paper":
        dataset, ablation = payload.get("dataset"), payload.get("ablation")
        ref = published().get(ablation, {}).get(dataset)
        if ref is None:
            lines.append(f"published (paper protocol): none for {ablation} on {dataset} (experiments/published.yaml)")
        else:
            lines.append(
                f"published (paper protocol, {ablation} on {dataset}): hit@10 {ref[0] / 100:.4f} "
                f"ndcg@10 {ref[1] / 100:.4f}; this run: {_pair(test, 'test/', 10)}"
            )
    return lines


def report_best(payload: dict[str, Any], run_dir: Path, log: logging.Logger) -> float:
    """Log the best round of a finished run and what its test metrics mean; return its value of the
    selection metric (`eval.select`, the objective of sweeps)."""
    select = selection_of(payload)
    k = select_cutoff(select)
    best = payload["best_val"].get(select, 0.0)
    test = payload["test_at_best"]
    log.info(
        "best round %s: %s %.4f, test %s -> %s",
        payload["best_round"],
        select,
        best,
        _pair(test, "test/", k),
        Path(run_dir) / "results.json",
    )
    for line in meaning_lines(payload):
        log.info(line)
    return best
