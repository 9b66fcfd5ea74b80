"""The rules of a run folder: one run at a time, never two runs' files mixed, resume only the same config.

A run folder holds one run. `claim` locks it for this process (an advisory `flock`, released by
the kernel when the process ends, however it ends) and refuses a folder that already holds a run
unless the run is being resumed. Which configs are one run (resume, campaign identity) is
`src/config/identity.py`.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from src.runtime.errors import UserError, reported

T = TypeVar("T")
LOCK_NAME = ".run.lock"
# Hydra's own files in a folder it has just created for a job (and its `<job name>.log`): no run yet
HYDRA_FILES = {LOCK_NAME, ".hydra", "multirun.yaml"}


# the longest a multirun folder's tag of swept values may be before it is cut (its hash then tells cut tags apart)
TAG_LIMIT = 64


def path_segment(text: str) -> str:
    """`text` as one folder name: each character but ASCII letters, digits and `._=,+-` made `-` (a `/` in an
    override's value would nest folders). The one character rule of the names runs are written under: multirun
    folders (`sweep_tag`, which also bounds their length) and the campaign's stored variants (src/cli/store.py
    `variant_name`)."""
    return re.sub(r"[^A-Za-z0-9._=,+-]", "-", text)


def sweep_tag(override_dirname: str) -> str:
    """`_<the job's other overrides>` for a multirun folder's name ('' when none): Hydra's `override_dirname`
    (`ablation.alpha=0.005,fl.rounds=50`) as one `path_segment`; one over TAG_LIMIT characters keeps its whole
    overrides that fit (never a value cut short) and a hash of the whole after `~`."""
    if not override_dirname:
        return ""
    tag = path_segment(override_dirname)
    if len(tag) > TAG_LIMIT:
        head = tag[: TAG_LIMIT - 9]
        head = head[: head.rfind(",") + 1] if "," in head else ""
        tag = f"{head}~{hashlib.sha1(override_dirname.encode()).hexdigest()[:8]}"
    return f"_{tag}"


class RunFolderError(UserError, RuntimeError):
    """The run folder cannot be used for this run; the message says why and what to do."""


def holds_run(run_dir: Path) -> bool:
    """True when the folder has anything a run writes (results, checkpoints, metrics, its config)."""
    if not run_dir.is_dir():
        return False
    return any(p.name not in HYDRA_FILES and not (p.is_file() and p.suffix == ".log") for p in run_dir.iterdir())


def claim(run_dir: Path, resuming: bool) -> int:
    """Lock `run_dir` for this process and check it may take this run; returns the lock's file descriptor.

    Refused: a folder another process is running in, and (without `resuming`) a folder that already
    holds a run, finished or not.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = try_lock(run_dir)
    if fd is None:
        raise RunFolderError(
            f"run folder {run_dir} is in use by another run (locked: {run_dir / LOCK_NAME}); "
            f"wait for it to end or choose another folder (hydra.run.dir=..., or hydra.sweep.dir=... for a multirun)"
        ) from None
    if not resuming and holds_run(run_dir):
        os.close(fd)
        finished = (run_dir / "results.json").is_file()
        what = "a finished run (results.json)" if finished else "an unfinished run"
        raise RunFolderError(
            f"run folder {run_dir} already holds {what}; rerunning into it would mix two runs. "
            f"Continue it with resume=true, or choose another folder "
            f"(hydra.run.dir=..., or hydra.sweep.dir=... for a multirun)"
        )
    return fd


def try_lock(run_dir: Path) -> int | None:
    """The folder's lock for this process (its descriptor), or None when another process holds it.

    The lock file is the one at its path when the lock is taken: a lock won on a file that a refused run's clean-up
    has just removed would lock nothing, so that case takes the new file's lock instead.
    """
    path = run_dir / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def release(fd: int) -> None:
    """Unlock the folder (closing the descriptor drops the flock)."""
    os.close(fd)


def remove_if_empty_of_runs(run_dir: Path) -> None:
    """Delete a folder Hydra created for a run that was refused before writing anything of its own, holding its
    lock while it does: a folder another process has locked (still loading its data, say) is never touched."""
    if not run_dir.is_dir() or holds_run(run_dir):
        return
    try:
        fd = try_lock(run_dir)
    except OSError:
        return
    if fd is None:
        return
    try:
        if not holds_run(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        os.close(fd)


def write_hydra_files(run_dir: Path, cfg: Any) -> None:
    """Hydra's `.hydra/` (config, overrides, hydra), written by the run once its checks have passed.

    Hydra's own copy is turned off (`hydra.output_subdir: null`) because Hydra writes it before the
    run starts, which would overwrite the files of a run that a refused resume must leave untouched.
    """
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from src.runtime.atomic import atomic_write_text

    if not HydraConfig.initialized():
        return  # called outside a Hydra app (tests, notebooks): there is no composed Hydra config to keep
    hc = HydraConfig.get()
    folder = run_dir / ".hydra"
    atomic_write_text(folder / "config.yaml", OmegaConf.to_yaml(cfg))
    atomic_write_text(folder / "overrides.yaml", OmegaConf.to_yaml(list(hc.overrides.task)))
    atomic_write_text(folder / "hydra.yaml", OmegaConf.to_yaml({"hydra": hc}))


def checked_in(run_dir: Path, work: Callable[[], T]) -> T:
    """`work()` (a run's checks and set-up in `run_dir`): a user error becomes one line (`reported`), and a refused
    run leaves no folder behind."""
    try:
        with reported():
            return work()
    except BaseException:
        remove_if_empty_of_runs(run_dir)
        raise
