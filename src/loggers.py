"""Run logging: CSV always, Weights & Biases when `logger=wandb`, and a progress bar over rounds."""
from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm


def wandb_mode(requested: str) -> str:
    """`auto` is online only when an API key is configured (env or netrc), otherwise offline."""
    if requested != "auto":
        return requested
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").is_file() and \
        "api.wandb.ai" in (Path.home() / ".netrc").read_text(errors="ignore")
    return "online" if has_key else "offline"


def run_name(cfg: DictConfig) -> str:
    """dataset-ablation-protocol-seed: how runs are named in every logger."""
    return f"{cfg.dataset.name}-{cfg.ablation.name}-{cfg.protocol.name}-s{cfg.seed}"


def make_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    """CSV into `<run_dir>/csv/metrics.csv`; W&B (offline unless keyed) grouped by dataset."""
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="csv", version="")]
    if cfg.logger.wandb:
        loggers.append(WandbLogger(
            project=cfg.logger.project, entity=cfg.logger.entity, name=run_name(cfg), group=cfg.logger.group,
            tags=list(cfg.logger.tags), save_dir=str(run_dir), mode=wandb_mode(cfg.logger.mode),
            config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous"))
    return loggers


def finish_loggers(loggers: list[Logger], summary: dict) -> None:
    """Write best-round metrics as W&B summary and close every W&B run so multirun jobs stay separate."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(summary)
            logger.experiment.finish()


class RoundProgress(L.Callback):
    """A tqdm bar over rounds showing the latest and best validation hit@10."""

    def __init__(self, rounds: int, enabled: bool = True):
        self.rounds, self.enabled, self.bar = rounds, enabled, None

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.enabled:
            self.bar = tqdm(total=self.rounds, initial=trainer.current_epoch, desc="rounds", unit="round",
                            dynamic_ncols=True)

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.bar is not None and module.history:
            last = module.history[-1]
            best = max(r["val/hit@10"] for r in module.history)
            self.bar.set_postfix({"val/hit@10": f"{last['val/hit@10']:.4f}", "best": f"{best:.4f}",
                                  "s/round": f"{last['time/round']:.2f}"})
            self.bar.update(1)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()
