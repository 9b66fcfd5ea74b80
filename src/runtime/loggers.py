"""Run logging: Lightning loggers (`conf/logger/*.yaml`, instantiated by Hydra) and a progress bar over rounds.

The module logs each round with `self.log_dict` (step = round); `RoundCSVLogger` writes `<run>/csv/metrics.csv`,
`ResumableWandbLogger` a W&B run (offline unless keyed) that a resumed run continues.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig
from torch import Tensor
from tqdm import tqdm

from src.runtime.results import DEFAULT_SELECT, atomic_write_text, best_round

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

    Call before creating the Trainer; the warnings are silenced separately, around `trainer.fit`
    (`quiet_fit`).
    """
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropBanners) for f in rank_zero.filters):
        rank_zero.addFilter(_DropBanners())


@contextmanager
def quiet_fit() -> Iterator[None]:
    """Around `trainer.fit`: silence the warnings that do not apply to a round-per-epoch module (one dummy batch,
    so no data-loader workers; manual optimisation, so `configure_optimizers` returns None) and `LEAFSPEC_WARNING`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*configure_optimizers.*")
        warnings.filterwarnings("ignore", **LEAFSPEC_WARNING)
        yield


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
    """dataset-ablation-protocol-seed: the audit's folder name, in the form conf/logger/wandb.yaml names the W&B run
    (tests/test_engine.py checks the two agree)."""
    return f"{cfg.dataset.name}-{cfg.ablation.name}-{cfg.protocol.name}-s{cfg.seed}"


def make_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    """The Lightning loggers of `cfg.logger` (each entry with a `_target_`), instantiated with the run folder."""
    return [instantiate(spec, save_dir=str(run_dir)) for spec in cfg.logger.values() if "_target_" in spec]


def finish_loggers(loggers: list[Logger], payload: dict | None) -> None:
    """Write the best round and its metrics (results.json `payload`) as W&B summary and close every W&B run so
    multirun jobs stay separate.

    `payload=None`: the run failed; its W&B run is closed with a non-zero exit code.
    """
    summary = (
        None
        if payload is None
        else {"best_round": payload["best_round"], **payload["best_val"], **payload["test_at_best"]}
    )
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            if summary is None and logger._experiment is None:
                continue  # never started
            if summary is not None:
                logger.experiment.summary.update(summary)
            logger.experiment.finish(exit_code=0 if summary is not None else 1)


class ResumableWandbLogger(WandbLogger):
    """Lightning's WandbLogger whose run id is kept in `<run_dir>/wandb_run_id`, so a resumed run continues the same
    W&B run, and whose `mode=auto` is offline unless an API key is configured."""

    def __init__(self, save_dir: str, mode: str = "auto", **kwargs: Any):
        id_file = Path(save_dir) / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        atomic_write_text(id_file, run_id)
        super().__init__(
            id=run_id, resume="allow", save_dir=save_dir, mode=wandb_mode(mode), reinit="finish_previous", **kwargs
        )


def history_csv(history: list[dict]) -> str:
    """The round history as CSV text: a `round` column first, then every key in order of first use."""
    keys = ["round"] + list(dict.fromkeys(k for row in history for k in row if k != "round"))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


class RoundWriter:
    """The rows of `metrics.csv`, one per round, rewritten atomically on every save.

    It starts from the rows already in the file (a resumed run); a round logged again (a resumed run redoes
    the rounds after its checkpoint) replaces that row and drops every later one, so no round is ever listed twice.
    """

    NAME_METRICS_FILE = "metrics.csv"

    def __init__(self, log_dir: str):
        self.path = Path(log_dir) / self.NAME_METRICS_FILE
        self.rows: list[dict[str, Any]] = []
        if self.path.is_file():
            with open(self.path, newline="") as fh:
                self.rows = [{**row, "round": int(row["round"])} for row in csv.DictReader(fh)]

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Record round `step` (default: the next round)."""
        step = len(self.rows) + 1 if step is None else int(step)
        self.rewind(step - 1)
        values = {k: v.item() if isinstance(v, Tensor) else v for k, v in metrics.items()}
        self.rows.append({"round": step, **values})

    def rewind(self, rounds: int) -> None:
        """Keep the rows of the first `rounds` rounds."""
        self.rows = [row for row in self.rows if row["round"] <= rounds]

    def restore(self, history: list[dict[str, Any]]) -> None:
        """Start from a restored checkpoint's history: exactly its rounds, whatever the file held (a process killed
        between a round's checkpoint and its row, or after rows the checkpoint does not hold)."""
        self.rows = [dict(row) for row in history]

    def log_hparams(self, params: dict[str, Any]) -> None:
        """The config is in `config_resolved.yaml`; nothing to write here."""

    def save(self) -> None:
        atomic_write_text(self.path, history_csv(self.rows))


class RoundCSVLogger(CSVLogger):
    """Lightning's CSVLogger writing `<save_dir>/csv/metrics.csv` with one row per round, never a round twice
    (`RoundWriter`), atomically (nothing half-written)."""

    def __init__(self, save_dir: str, name: str = "", version: str = "csv"):
        super().__init__(save_dir, name=name, version=version)

    @property
    @rank_zero_experiment
    def experiment(self) -> RoundWriter:
        if self._experiment is None:
            self._experiment = RoundWriter(self.log_dir)
        return self._experiment

    def restore(self, history: list[dict[str, Any]]) -> None:
        """The rows of a restored history (the rounds a resumed run starts after), saved."""
        self.experiment.restore(history)
        self.experiment.save()


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
