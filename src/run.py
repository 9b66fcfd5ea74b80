"""`python -m src.run [overrides]`: one federated experiment, written to its Hydra run folder.

The folder receives .hydra/ (composed config), config_resolved.yaml, csv/metrics.csv (per round),
checkpoints/last.ckpt and results.json (see `results.py`).
"""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from src.checkpoint import AtomicCheckpoint
from src.config import validate
from src.data.dataset import load
from src.federated import FederatedModule
from src.loggers import RoundCSV, RoundProgress, finish_loggers, make_loggers
from src.results import atomic_write_text, build_results, report_best, write_results

log = logging.getLogger(__name__)


def resume_path(cfg: DictConfig, run_dir: Path) -> Path | None:
    """`resume=true`: this run folder's last checkpoint; `resume=<run folder or .ckpt>`: that one."""
    if cfg.resume in (False, None):
        return None
    target = run_dir if cfg.resume is True else Path(str(cfg.resume))
    path = target if target.suffix == ".ckpt" else target / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"resume={cfg.resume!r}: no checkpoint at {path}; pass hydra.run.dir=<the run "
                                f"folder> resume=true, or resume=<path to last.ckpt>")
    return path


def train(cfg: DictConfig, run_dir: Path, progress: bool = True) -> dict:
    """Build the data and the federated module, run all rounds, write results.json; return it."""
    validate(cfg)
    ckpt_path = resume_path(cfg, run_dir)  # fail before any work when the checkpoint is missing
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    torch.manual_seed(int(cfg.seed))
    t0 = time.perf_counter()
    data = load(cfg)
    module = FederatedModule(cfg, data)
    t_setup = time.perf_counter() - t0
    ckpt = AtomicCheckpoint(run_dir / "checkpoints", int(cfg.fl.checkpoint_every))
    loggers = make_loggers(cfg, run_dir)
    trainer = L.Trainer(
        max_epochs=int(cfg.fl.rounds), logger=loggers,
        callbacks=[RoundProgress(int(cfg.fl.rounds), progress), RoundCSV(run_dir / "csv" / "metrics.csv"), ckpt],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, accelerator="gpu" if module.compute_device.type == "cuda" else "cpu",
        devices=1, default_root_dir=str(run_dir), log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*configure_optimizers.*")
        try:
            # our own checkpoint (client tables, RNG state, history): trusted, so no weights_only
            trainer.fit(module, ckpt_path=ckpt_path, weights_only=False if ckpt_path else None)
        except BaseException:
            finish_loggers(loggers, None)
            raise
    timings = {"setup_s": t_setup, "total_s": time.perf_counter() - t0,
               "mean_round_s": sum(r["time/round"] for r in module.history) / max(len(module.history), 1)}
    payload = build_results(cfg, data.summary(), module.history, timings, finished=True)
    write_results(run_dir, payload)
    summary = {"best_round": payload["best_round"], **payload["best_val"], **payload["test_at_best"]}
    finish_loggers(loggers, summary)
    return payload


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the best validation hit@10 (the objective of sweeps)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    return report_best(train(cfg, run_dir), run_dir, log)


if __name__ == "__main__":
    main()
