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

    @property
    def tmp(self) -> Path:
        return self.dirpath / ".last.ckpt.tmp"

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        """Drop a temporary file left by a run killed while it was saving (last.ckpt is intact)."""
        self.tmp.unlink(missing_ok=True)

    def save(self, trainer: L.Trainer) -> None:
        """Write through a temporary sibling, flush it to disk, then rename."""
        self.dirpath.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(self.tmp)
        with open(self.tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.last)

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        done = trainer.current_epoch + 1
        if self.every > 0 and (done % self.every == 0 or done == trainer.max_epochs or trainer.should_stop):
            self.save(trainer)
