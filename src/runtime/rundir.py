"""The rules of a run folder: one run at a time, never two runs' files mixed, resume only the same config.

A run folder holds one run. `claim` locks it for this process (an advisory `flock`, released by
the kernel when the process ends, however it ends) and refuses a folder that already holds a run
unless the run is being resumed. `resume_mismatch` lists the config keys in which a resume
differs from the checkpointed run; only keys that cannot change the computed rounds may differ.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from src.runtime.errors import UserError, reported

T = TypeVar("T")
LOCK_NAME = ".run.lock"
# Hydra's own files in a folder it has just created for a job (and its `<job name>.log`): no run yet
HYDRA_FILES = {LOCK_NAME, ".hydra", "multirun.yaml"}
# Keys that say where a run reads, writes and logs, or which tool looks at it: never what it computes.
WHERE_KEYS = (
    "resume",
    "diag.",
    "experiment_name",
    "logger.",
    "trainer.",
    "callbacks.",
    "data.root",
    "data.cache_dir",
    "bench.",
    "audit.",
    "flower.",
    "hydra.",
)
# Keys that change only how fast a run computes: `model.fast_block` leaves results bit-identical; the fused and
# compiled kernels compute the same math with another float rounding, as another device does (each has a test
# saying so, with its tolerance).
SPEED_KEYS = (
    "model.fast_block",
    "model.fast_kernel",
    "compute.compile",
    "compute.native",
    "compute.kernel",
    "optim.fused",
    "optim.touched_rows",
    "compute.keep_heap",
)
# Keys a resume may change: the above, and how long to go on.
RESUMABLE_KEYS = (*WHERE_KEYS, *SPEED_KEYS, "fl.rounds", "fl.checkpoint_every", "eval.patience")


# Keys added to the config after runs were made, with the value every run before them had. A config
# that lacks such a key and one that holds this value describe the same run (resume checks, campaign
# identity); list each new key that can change results here, with its neutral default.
ADDED_KEYS = {
    "data.verify": True,
    "eval.select": "val/hit@10",
    "compute.deterministic": True,
    "compute.matmul_precision": "highest",
    "fl.max_auto_chunk": 1024,
    "compute.gpu_block_scale": 64,
    "model.fast_block": None,
    "model.fast_kernel": "autograd",
    "compute.compile": False,
    "optim.fused": False,
    "optim.touched_rows": False,
    "compute.keep_heap": False,
    "compute.native": False,
    "server.graph": "threshold",
    "server.graph_sigma": None,
    "server.graph_k": 10,
    "server.aggregate": "mean",
    "server.gsa_on_graph": False,
    "comm.tables": "dense",
    "ablation.upload_round": None,
    "ablation.rank": None,
    "privacy.clip": None,
    "privacy.noise_multiplier": None,
    "privacy.target_epsilon": None,
    "privacy.delta": None,
    "privacy.accountant": "pld",
    "privacy.server_noise": "seeded",
}


# Keys fixed by others, so runs made before they existed match: each ablation name has one method module, and the
# method's yaml names its engine and the keys it never reads (labels of the computation, not part of it).
DERIVED_KEYS = ("ablation.method", "ablation.engine", "ablation.unread")


def normalised(config: dict) -> dict[str, Any]:
    """A resolved config flattened, without the derived keys, the added keys that hold their neutral default
    and the keys the run's method never reads (the groups its yaml lists under `ablation.unread`)."""
    flat = flatten(config)
    unread = flat.get("ablation.unread")
    if unread is None:  # a record from before the label (src.migrate adds it): a central method never read optim.
        unread = ("optim.",) if flat.get("ablation.central") is True else ()
    return {
        k: v
        for k, v in flat.items()
        if k not in DERIVED_KEYS and not (k in ADDED_KEYS and ADDED_KEYS[k] == v) and not k.startswith(tuple(unread))
    }


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
            f"wait for it to end or choose another folder (hydra.run.dir=...)"
        ) from None
    if not resuming and holds_run(run_dir):
        os.close(fd)
        finished = (run_dir / "results.json").is_file()
        what = "a finished run (results.json)" if finished else "an unfinished run"
        raise RunFolderError(
            f"run folder {run_dir} already holds {what}; rerunning into it would mix two runs. "
            f"Continue it with resume=true, or choose another folder (hydra.run.dir=...)"
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


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {"a.b.c": leaf}; lists stay leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}."))
    if not tree and prefix:
        out[prefix[:-1]] = {}
    return {k.rstrip("."): v for k, v in out.items()}


def resume_mismatch(saved: dict, current: dict) -> list[str]:
    """`key: saved -> current` for every key that differs, except those in `RESUMABLE_KEYS`."""
    a, b = normalised(saved), normalised(current)
    out = []
    for key in sorted(a.keys() | b.keys()):
        if any(key == k or key.startswith(k) for k in RESUMABLE_KEYS if k.endswith(".")) or key in RESUMABLE_KEYS:
            continue
        missing = "<absent>"
        if a.get(key, missing) != b.get(key, missing):
            out.append(f"{key}: {a.get(key, missing)!r} -> {b.get(key, missing)!r}")
    return out


def resume_changes(saved: dict, current: dict) -> dict[str, list]:
    """{key: [before, now]} for the keys a resume may change that change what or how the rounds compute (speed
    keys, length, checkpoints, patience; not where the run writes): results.json records them per resume."""
    a, b = normalised(saved), normalised(current)
    keys = (*SPEED_KEYS, "fl.rounds", "fl.checkpoint_every", "eval.patience")
    return {k: [a.get(k), b.get(k)] for k in sorted(a.keys() | b.keys()) if k in keys and a.get(k) != b.get(k)}


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


# Keys that cannot change a run's results: where it reads and writes, how fast it computes, how its clients are
# chunked (a chunk trains its clients as they would train alone) and on which device.
NOT_IDENTITY = (*WHERE_KEYS, *SPEED_KEYS, "fl.checkpoint_every", "fl.chunk_size", "fl.memory_fraction", "device")


def identity(config: dict[str, Any]) -> str:
    """sha256 of the resolved config without the keys that cannot change the results: one key per computation
    (the campaign's run identity; the report counts one run per key)."""
    flat = {k: v for k, v in normalised(config).items() if not k.startswith(NOT_IDENTITY) and k not in NOT_IDENTITY}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:20]


def checked_in(run_dir: Path, work: Callable[[], T]) -> T:
    """`work()` (a run's checks and set-up in `run_dir`): a user error becomes one line (`reported`), and a refused
    run leaves no folder behind."""
    try:
        with reported():
            return work()
    except BaseException:
        remove_if_empty_of_runs(run_dir)
        raise
