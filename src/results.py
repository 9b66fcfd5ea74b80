"""The results.json contract and atomic file writes.

Fields (later work may add, never remove): config, dataset, protocol, ablation, seed, summary,
history (per round: validation and test metrics, losses, timings), best_round (by validation
hit@10, earliest on ties), best_val, test_at_best, timings, finished, communication (bytes over
the run: upload and download totals, mean upload per client and round, and the embedding-sharing
size for comparison), privacy (the epsilon spent by the last round, when noise is on).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from src.atomic import atomic_write_text

SELECT_KEY = "val/hit@10"


def publish_report(out: str | Path, report: dict[str, Any], text: str) -> None:
    """A command's report: its table printed, the same figures as JSON written atomically to `out`."""
    path = Path(str(out))
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    print(text)
    print(f"\nwrote {path}")


def best_round(history: list[dict]) -> dict | None:
    """The round with the highest validation hit@10 (earliest on ties); test data plays no part."""
    if not history:
        return None
    return max(history, key=lambda r: (r[SELECT_KEY], -r["round"]))


def communication_totals(history: list[dict]) -> dict[str, float]:
    """Bytes moved over the whole run, from the per-round `comm/*` figures."""
    if not history or "comm/upload_bytes_total" not in history[0]:
        return {}
    up = sum(r.get("comm/upload_bytes_total", 0.0) for r in history)
    senders = sum(r.get("comm/uploaders", 0.0) for r in history)
    out = {"upload_bytes_total": up, "download_bytes_total": sum(r.get("comm/download_bytes_total", 0.0) for r in history),
           "upload_bytes_mean_per_client_round": up / senders if senders else 0.0,
           "embedding_bytes_per_client_round": history[0]["comm/embedding_bytes"]}
    out["upload_vs_embedding"] = out["upload_bytes_mean_per_client_round"] / out["embedding_bytes_per_client_round"]
    return out


def build_results(cfg: DictConfig, summary: dict, history: list[dict], timings: dict[str, float],
                  finished: bool) -> dict[str, Any]:
    """Assemble the results.json payload from the run's config, data summary and round history."""
    best = best_round(history)
    return {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "dataset": cfg.dataset.name, "protocol": cfg.protocol.name, "ablation": cfg.ablation.name,
        "seed": int(cfg.seed), "summary": summary, "history": history,
        "best_round": best["round"] if best else None,
        "best_val": {k: v for k, v in best.items() if k.startswith("val")} if best else {},
        "test_at_best": {k: v for k, v in best.items() if k.startswith("test")} if best else {},
        "timings": timings, "finished": finished,
        "communication": communication_totals(history),
        "privacy": {k.split("/", 1)[1]: v for k, v in history[-1].items() if k.startswith("privacy/")} if history else {},
    }


def write_results(run_dir: Path, payload: dict[str, Any]) -> Path:
    """Write results.json atomically into the run folder."""
    path = Path(run_dir) / "results.json"
    atomic_write_text(path, json.dumps(payload, indent=2))
    return path


def report_best(payload: dict[str, Any], run_dir: Path, log: logging.Logger) -> float:
    """Log the best round of a finished run; return its validation hit@10 (the objective of sweeps)."""
    best = payload["best_val"].get(SELECT_KEY, 0.0)
    test = payload["test_at_best"]
    log.info("best round %s: val hit@10 %.4f, test hit@10 %.4f ndcg@10 %.4f -> %s", payload["best_round"], best,
             test.get("test/hit@10", float("nan")), test.get("test/ndcg@10", float("nan")), Path(run_dir) / "results.json")
    return best
