"""Run logging: a per-round CSV always, Weights & Biases when `logger=wandb`, a progress bar over rounds."""

from __future__ import annotations

import csv
import io
import logging
import os
import uuid
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from src.results import DEFAULT_SELECT, atomic_write_text, best_round

# Lightning's start-up lines that say nothing about the run (`rank_zero_info` of the Trainer): the
# accelerators it found (`device` says which one runs) and an advertisement for its cloud logger
LIGHTNING_BANNERS = ("GPU available:", "TPU available:", "💡 Tip: For seamless cloud logging")
# torch deprecated LeafSpec, which Lightning's own _pytree.py still uses: not ours to fix
LEAFSPEC_WARNING = {
    "message": r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    "category": FutureWarning,
    "module": r"lightning\.pytorch\.utilities\._pytree",
}


class _DropBanners(logging.Filter):
    """Drops the records of `LIGHTNING_BANNERS`; every other message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(LIGHTNING_BANNERS)


def quiet_lightning() -> None:
    """Silence Lightning's start-up banners (idempotent); its other messages and all warnings stay.

    Call before creating the Trainer; the LeafSpec deprecation is silenced separately, around
    `trainer.fit`, with `warnings.filterwarnings("ignore", **LEAFSPEC_WARNING)`.
    """
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropBanners) for f in rank_zero.filters):
        rank_zero.addFilter(_DropBanners())


def wandb_mode(requested: str) -> str:
    """`auto`: $WANDB_MODE when set, else online only when an API key is configured (env or netrc), else offline."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = (
        bool(os.environ.get("WANDB_API_KEY"))
        or (Path.home() / ".netrc").is_file()
        and "api.wandb.ai" in (Path.home() / ".netrc").read_text(errors="ignore")
    )
    return "online" if has_key else "offline"


def run_name(cfg: DictConfig) -> str:
    """dataset-ablation-protocol-seed: how runs are named in every logger."""
    return f"{cfg.dataset.name}-{cfg.ablation.name}-{cfg.protocol.name}-s{cfg.seed}"


def make_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    """W&B (offline unless keyed) grouped by experiment (`experiment_name`), or none; the CSV is written by `RoundCSV`.

    The W&B run id is kept in `<run_dir>/wandb_run_id`, so a resumed run continues the same W&B run.
    """
    loggers: list[Logger] = []
    if cfg.logger.wandb:
        id_file = Path(run_dir) / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        atomic_write_text(id_file, run_id)
        loggers.append(
            WandbLogger(
                id=run_id,
                resume="allow",
                project=cfg.logger.project,
                entity=cfg.logger.entity,
                name=run_name(cfg),
                group=cfg.logger.group,
                tags=list(cfg.logger.tags),
                save_dir=str(run_dir),
                mode=wandb_mode(cfg.logger.mode),
                config=OmegaConf.to_container(cfg, resolve=True),
                reinit="finish_previous",
            )
        )
    return loggers


def finish_loggers(loggers: list[Logger], summary: dict | None) -> None:
    """Write best-round metrics as W&B summary and close every W&B run so multirun jobs stay separate.

    `summary=None`: the run failed; its W&B run is closed with a non-zero exit code.
    """
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            if summary is None and logger._experiment is None:
                continue  # never started
            if summary is not None:
                logger.experiment.summary.update(summary)
            logger.experiment.finish(exit_code=0 if summary is not None else 1)


def history_csv(history: list[dict]) -> str:
    """The round history as CSV text: a `round` column first, then every key in order of first use."""
    keys = ["round"] + list(dict.fromkeys(k for row in history for k in row if k != "round"))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


class RoundCSV(L.Callback):
    """`<run_dir>/csv/metrics.csv`, one row per round, rewritten atomically from `module.history`.

    Rewriting from the history (which a checkpoint restores) rather than appending keeps the file
    free of duplicated rounds after a resume: rounds logged after the last checkpoint of a killed
    run are dropped at the start of the resumed run and written again when they are redone.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def write(self, module: L.LightningModule) -> None:
        atomic_write_text(self.path, history_csv(module.history))

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.write(module)

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.write(module)


class RoundProgress(L.Callback):
    """A tqdm bar over rounds showing the latest and the best value of the selection metric (`eval.select`)."""

    def __init__(self, rounds: int, enabled: bool = True, select: str = DEFAULT_SELECT):
        self.rounds, self.enabled, self.select, self.bar = rounds, enabled, select, None

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.enabled:
            self.bar = tqdm(
                total=self.rounds, initial=trainer.current_epoch, desc="rounds", unit="round", dynamic_ncols=True
            )

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.bar is not None and module.history:
            last = module.history[-1]
            best = best_round(module.history, self.select)[self.select]
            self.bar.set_postfix(
                {self.select: f"{last[self.select]:.4f}", "best": f"{best:.4f}", "s/round": f"{last['time/round']:.2f}"}
            )
            self.bar.update(1)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()
