"""Checkpoints every N rounds, each with a record of what it is: digest, config, data, round, time spent.

`last.ckpt` is written through a temporary file and renamed; its record `last.json` (written the
same way, right after) holds the checkpoint's sha256, the resolved config and the data digest it
was trained with, the rounds done and the seconds spent over all processes so far. A resume reads
the record first: it refuses another config before anything is loaded or written, and a
corrupted or truncated checkpoint before Lightning reads it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import time
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from src.runtime.atomic import atomic_path, atomic_write_text
from src.runtime.errors import UserError

RECORD_FORMAT = 1
log = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or its record is missing, unreadable or does not match; the message says what to do."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_path(ckpt: Path) -> Path:
    """`last.ckpt` -> `last.json`."""
    return ckpt.with_suffix(".json")


def read_record(ckpt: Path) -> dict[str, Any]:
    """The record of checkpoint `ckpt`, or CheckpointError naming the file."""
    path = record_path(ckpt)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {ckpt} has no record {path.name} (written by an older version, or "
            f"copied without it), so its config cannot be checked; restart the run without "
            f"resume in a new folder"
        ) from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint record {path} is unreadable ({exc}); restart the run without resume in a new folder"
        ) from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT or "sha256" not in record:
        raise CheckpointError(
            f"checkpoint record {path} is not a format-{RECORD_FORMAT} record; restart the run "
            f"without resume in a new folder"
        )
    return record


def verify(ckpt: Path, record: dict[str, Any]) -> dict[str, Any]:
    """The record of the checkpoint's bytes: `record`, or the save before it that `record` keeps (`previous`) when a
    process died between the two renames of a save (the new record in place, the checkpoint still the old one);
    refuse a checkpoint whose bytes neither describes."""
    found = sha256_file(ckpt)
    previous = record.get("previous")
    if found != record["sha256"] and isinstance(previous, dict) and previous.get("sha256") == found:
        cut, kept = record["round"], previous["round"]
        log.warning("checkpoint %s is round %s's (the save of round %s was cut): resuming after it", ckpt, kept, cut)
        record = previous
    if found != record["sha256"]:
        raise CheckpointError(
            f"checkpoint {ckpt} is corrupted or truncated: sha256 {found}, its record {record_path(ckpt).name} "
            f"expects {record['sha256']}. Resume from an intact copy (resume=<path to last.ckpt>) or restart "
            f"the run without resume in a new folder"
        )
    try:  # a torch checkpoint is a zip archive: a truncated or damaged one fails here, before torch reads it
        with zipfile.ZipFile(ckpt) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile) as exc:
        bad = str(exc)
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {ckpt} matches its record but is not a readable torch checkpoint ({bad}); resume from an "
            f"intact copy (resume=<path to last.ckpt>) or restart the run without resume in a new folder"
        )
    return record


class AtomicCheckpoint(Checkpoint):
    """Save `<dir>/last.ckpt` and its record every `every` rounds, after the last round and on SIGTERM.

    A Lightning `Checkpoint`: Lightning calls it after the other callbacks of a round (early stopping has decided
    whether this round is the last), and adds no checkpoint callback of its own.

    `config` and `data_digest` go into every record; `prior_s`/`processes` carry the time spent and
    the number of processes of the run before this one (a resume), `start` is this process's start; `code` the commit
    each process ran (`src.cli.store.git_commit`) and the first round it ran.
    """

    def __init__(
        self,
        dirpath: Path,
        every: int,
        config: dict,
        data_digest: str,
        start: float,
        prior_s: float = 0.0,
        processes: int = 1,
        resumes: list[dict] | None = None,
        code: list[dict] | None = None,
    ):
        self.dirpath, self.every = Path(dirpath), int(every)
        self.config, self.data_digest = config, data_digest
        self.start, self.prior_s, self.processes = start, prior_s, processes
        self.resumes = list(resumes or [])
        self.code = list(code or [])
        self.monitor = str(config["eval"]["select"])
        self.saved_round = 0

    @property
    def last(self) -> Path:
        return self.dirpath / "last.ckpt"

    def elapsed(self) -> float:
        """Seconds spent on this run by every process so far."""
        return self.prior_s + time.perf_counter() - self.start

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        """Drop temporary files left by a process killed while saving (the run folder is locked to this one)."""
        for stale in self.dirpath.glob(".last.*.tmp"):
            stale.unlink(missing_ok=True)

    def save(self, trainer: L.Trainer, done: int) -> None:
        """Checkpoint and record written to temporary siblings first, the checkpoint synced, then the record and the
        checkpoint renamed into place one after the other: a failed write (a full disk) leaves the previous pair
        intact and ends the run with one line."""
        try:
            with atomic_path(self.last) as tmp:
                trainer.save_checkpoint(tmp, weights_only=False)
                digest = sha256_file(tmp)
                with open(tmp, "rb") as fh:  # synced before the record moves, so the two renames follow at once
                    os.fsync(fh.fileno())
                record = self.record(trainer, done, digest)
                if self.last.is_file():  # the save this one replaces, in case the checkpoint's rename never happens
                    record["previous"] = {k: v for k, v in read_record(self.last).items() if k != "previous"}
                atomic_write_text(record_path(self.last), json.dumps(record, indent=1))
        except OSError as exc:
            raise CheckpointError(
                f"could not write checkpoint {self.last} after round {done} ({exc.strerror or exc}); the previous "
                f"checkpoint is intact; expected free space and write access in {self.dirpath}"
            ) from None
        self.saved_round = done

    def record(self, trainer: L.Trainer, done: int, digest: str) -> dict[str, Any]:
        """What the checkpoint of round `done` (sha256 `digest`) was trained with, to check a resume against."""
        return {
            "format": RECORD_FORMAT,
            "round": done,
            "sha256": digest,
            "config": self.config,
            "data": self.data_digest,
            "elapsed_s": self.elapsed(),
            "processes": self.processes,
            "resumes": self.resumes,  # each resume: after which round, and the resumable keys it changed
            "code": self.code,  # each process: the commit it ran and its first round
            "curve": [row[self.monitor] for row in trainer.lightning_module.history],  # to check a patience change
        }

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        done = trainer.current_epoch + 1
        if self.every > 0 and (
            done % self.every == 0 or done == trainer.max_epochs or trainer.should_stop or trainer.received_sigterm
        ):
            self.save(trainer, done)

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        """A SIGTERM that lands after this round's save decision is raised by Lightning once the round is complete
        (`trainer.current_epoch` counts it): checkpoint that round, so a stopped run always resumes."""
        done = trainer.current_epoch
        complete = len(getattr(module, "history", ())) == done  # the module holds exactly the rounds counted
        if isinstance(exception, SIGTERMException) and self.every > 0 and done > self.saved_round and complete:
            self.save(trainer, done)


def full_load(trainer: L.Trainer, ckpt: str | None) -> dict[str, bool]:
    """`trainer.fit`'s keyword that loads our own checkpoint whole (client tables, RNG state, history; its digest
    is checked before): `weights_only=False` where Lightning takes it (2.6+); older ones load whole already."""
    if ckpt is None or "weights_only" not in inspect.signature(trainer.fit).parameters:
        return {}
    return {"weights_only": False}
