"""Lightning callbacks of a run that Hydra instantiates (`conf/callbacks/`)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping

from src.runtime.results import best_round, rounds_without_improvement


class RoundEarlyStopping(EarlyStopping):
    """Lightning's EarlyStopping with the rule results.json uses: stop once the selection metric (`monitor`) has
    not improved for `patience` rounds, the best round read from the module's whole history (`best_round`), so a
    resumed run stops where an unbroken one would. `patience=None`: never stop early."""

    def __init__(self, monitor: str, patience: int | None):
        super().__init__(monitor=monitor, patience=patience or 0, mode="max", check_on_train_epoch_end=True)
        self.enabled = patience is not None

    def _run_early_stopping_check(self, trainer: L.Trainer) -> None:
        history = trainer.lightning_module.history
        if not self.enabled or not history:
            return
        self.best_score = torch.tensor(best_round(history, self.monitor)[self.monitor])
        self.wait_count = rounds_without_improvement(history, self.monitor)
        if self.wait_count >= self.patience:
            self.stopped_epoch = trainer.current_epoch
            trainer.should_stop = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A resumed run that had stopped early stays stopped: Lightning keeps no `should_stop` in a checkpoint, and
        the rule read from the restored history stops it before another round."""
        self._run_early_stopping_check(trainer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the state is read from the history, and a resume may change `patience`."""
