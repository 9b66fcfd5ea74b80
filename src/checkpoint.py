"""Atomic checkpoints every N rounds: written to a temporary file, then renamed over last.ckpt."""
from __future__ import annotations

import os
from pathlib import Path

import lightning as L


class AtomicCheckpoint(L.Callback):
    """Save `<dir>/last.ckpt` every `every` rounds and after the last round; never a half-written file."""

    def __init__(self, dirpath: Path, every: int):
        self.dirpath, self.every = Path(dirpath), int(every)

    @property
    def last(self) -> Path:
        return self.dirpath / "last.ckpt"

    def save(self, trainer: L.Trainer) -> None:
        """Write through a temporary sibling, then rename."""
        self.dirpath.mkdir(parents=True, exist_ok=True)
        tmp = self.dirpath / ".last.ckpt.tmp"
        trainer.save_checkpoint(tmp)
        os.replace(tmp, self.last)

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        done = trainer.current_epoch + 1
        if self.every > 0 and (done % self.every == 0 or done == trainer.max_epochs or trainer.should_stop):
            self.save(trainer)
