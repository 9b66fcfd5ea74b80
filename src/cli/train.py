"""`python -m src.run [overrides]`: one federated experiment, written to its Hydra run folder.

The folder receives .hydra/ (composed config), config_resolved.yaml, csv/metrics.csv (per round),
checkpoints/last.ckpt with its record last.json, and results.json (see `results.py`). Every check
(config values, the folder's lock, a resume's config, checkpoint and data digests) runs before the
run writes anything into the folder.
"""

from __future__ import annotations

import hashlib
import logging
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate, to_absolute_path
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from src.cli import memory_wait
from src.cli.config import simulator_checks, validate
from src.cli.store import git_commit, refuse_unreportable, store, stored_trial, trial_variant
from src.config.identity import resume_changes, resume_mismatch
from src.data.dataset import FedData, load
from src.rounds.simulator import FederatedModule
from src.runtime import checkpoint, rundir
from src.runtime.atomic import atomic_write_text
from src.runtime.checkpoint import AtomicCheckpoint
from src.runtime.device import run_resources
from src.runtime.errors import UserError, reported
from src.runtime.loggers import RoundProgress, finish_loggers, make_loggers, quiet_fit, quiet_lightning
from src.runtime.results import build_results, report_best, rounds_without_improvement, select_key, write_results

log = logging.getLogger(__name__)
SIGTERM_EXIT = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM


class ResumeError(UserError, RuntimeError):
    """A resume that would continue a run under another config or other data; names what differs."""


class NoCheckpoint(UserError, FileNotFoundError):
    """`resume=` names a folder or file that holds no checkpoint."""


def resume_path(cfg: DictConfig, run_dir: Path) -> Path | None:
    """`resume=true`: this run folder's last checkpoint; `resume=<run folder or .ckpt>`: that one."""
    if cfg.resume in (False, None):
        return None
    target = run_dir if cfg.resume is True else Path(str(cfg.resume))
    path = target if target.suffix == ".ckpt" else target / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise NoCheckpoint(
            f"resume={cfg.resume!r}: no checkpoint at {path}; expected hydra.run.dir=<the run folder> resume=true, "
            f"or resume=<path to last.ckpt>"
        )
    return path


def data_digest(data: FedData) -> str:
    """sha256 over the split a run trains and evaluates on (sizes, positives, held-out items, negatives)."""
    h = hashlib.sha256(f"{data.name}/{data.protocol}/{data.seed}/{data.n_users}/{data.n_items}".encode())
    for arr in (
        data.train_ptr,
        data.train_items,
        data.val_items,
        data.test_items,
        data.val_negatives,
        data.test_negatives,
    ):
        h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
    return h.hexdigest()


@dataclass
class Prepared:
    """A run that passed every check: its config, folder (locked), data and what it resumes from."""

    cfg: DictConfig
    run_dir: Path
    lock: int
    data: FedData
    digest: str
    start: float
    setup_s: float
    ckpt: Path | None
    record: dict | None
    resumes: list[dict]  # each resume of the run: the round it went on after and the resumable keys it changed
    code: list[dict]  # each process of the run: the commit it ran (`git_commit`, read as it starts) and its first round


def prepare(cfg: DictConfig, run_dir: Path, checked: bool = False) -> Prepared:
    """Check the config (unless the caller did: `checked`), claim the folder, check a resume against its checkpoint,
    load the data; write nothing."""
    start = time.perf_counter()
    commit = git_commit()  # the code this process runs, read before anything else
    if not checked:
        validate(cfg)
        simulator_checks(cfg)
    ckpt = resume_path(cfg, run_dir)
    # only the folder's own checkpoint continues a run in it; resume=<another run> needs a folder without a run
    own = ckpt is not None and ckpt.resolve() == (run_dir / "checkpoints" / "last.ckpt").resolve()
    lock = rundir.claim(run_dir, resuming=own)
    try:
        record = None
        if ckpt is not None:
            # the record of the checkpoint's bytes (the previous save's when the last save was cut), checked below
            record = checkpoint.verify(ckpt, checkpoint.read_record(ckpt))
            differ = resume_mismatch(record["config"], OmegaConf.to_container(cfg, resolve=True))
            if differ:
                raise ResumeError(
                    f"resume refused: checkpoint {ckpt} was trained with another config; "
                    f"differing keys (checkpoint -> now): {'; '.join(differ)}. Resume with the run's "
                    f"own overrides (see {ckpt.parents[1] / '.hydra' / 'overrides.yaml'}), or start "
                    f"a new run in a new folder"
                )
            check_resume_length(cfg, ckpt, record)
        torch.manual_seed(int(cfg.seed))
        data = load(cfg)
        digest = data_digest(data)
        if record is not None and record["data"] != digest:
            raise ResumeError(
                f"resume refused: the data split differs from the one checkpoint {ckpt} was trained "
                f"on (split digest {record['data'][:16]}... then, {digest[:16]}... now); restore "
                f"the original data files or start a new run in a new folder"
            )
    except BaseException:
        rundir.release(lock)
        raise
    resumes = list((record or {}).get("resumes", []))
    first = 1 if record is None else int(record["round"]) + 1
    # a checkpoint written before runs recorded their commit: its rounds ran at a commit no one kept
    before = [] if record is None else record.get("code", [{"commit": "unrecorded", "from_round": 1}])
    code = [*before, {"commit": commit, "from_round": first}]
    if record is not None:
        changed = resume_changes(record["config"], OmegaConf.to_container(cfg, resolve=True))
        if changed:
            resumes.append({"after_round": int(record["round"]), "changed": changed})
    return Prepared(cfg, run_dir, lock, data, digest, start, time.perf_counter() - start, ckpt, record, resumes, code)


def check_resume_length(cfg: DictConfig, ckpt: Path, record: dict) -> None:
    """A resume may go on longer, never shorter: `fl.rounds` below the rounds already run, or an `eval.patience`
    that would have stopped the run before them, is refused (the run would be labelled with a length it did not
    run)."""
    done = int(record["round"])
    if int(cfg.fl.rounds) < done:
        raise ResumeError(
            f"resume refused: checkpoint {ckpt} has run {done} rounds and fl.rounds={cfg.fl.rounds} is fewer; "
            f"expected fl.rounds >= {done} (or a new run in a new folder)"
        )
    before = OmegaConf.select(OmegaConf.create(record["config"]), "eval.patience", default=None)
    patience = cfg.eval.patience
    if patience == before or patience is None:
        return
    before = "null" if before is None else before  # as it is written on the command line
    curve = record.get("curve")
    if curve is None:
        raise ResumeError(
            f"resume refused: eval.patience {before} -> {patience}, and checkpoint {ckpt} keeps no curve to check "
            f"that the new patience would not have stopped the run earlier; expected eval.patience={before}"
        )
    select = select_key(cfg)
    rows = [{"round": r + 1, select: v} for r, v in enumerate(curve)]
    for r in range(1, done):
        if rounds_without_improvement(rows[:r], select) >= int(patience):
            raise ResumeError(
                f"resume refused: eval.patience={patience} would have stopped this run at round {r}, and checkpoint "
                f"{ckpt} has {done} rounds; expected eval.patience={before} (as run) or a new run in a new folder"
            )


def fit(run: Prepared, progress: bool = True) -> dict:
    """Run all rounds of a prepared run, write results.json; return it. Releases the folder's lock."""
    cfg, run_dir = run.cfg, run.run_dir
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
        if run.ckpt is None:  # a resume relabels the folder only once it has run (a failed one leaves it as it was)
            label_folder(cfg, run_dir)
        module = FederatedModule(cfg, run.data)
        prior = run.record or {}
        ckpt = AtomicCheckpoint(
            run_dir / "checkpoints",
            int(cfg.fl.checkpoint_every),
            config,
            run.digest,
            run.start,
            float(prior.get("elapsed_s", 0.0)),
            int(prior.get("processes", 0)) + 1,
            run.resumes,
            run.code,
        )
        loggers = make_loggers(cfg, run_dir)
        quiet_lightning()
        callbacks = [instantiate(spec) for spec in cfg.callbacks.values() if "_target_" in spec]
        # the checkpoint (a Lightning Checkpoint: called after early stopping has decided whether the round is the last)
        callbacks += [RoundProgress(int(cfg.fl.rounds), progress, select_key(cfg)), ckpt]
        trainer = instantiate(
            cfg.trainer,
            logger=loggers,
            callbacks=callbacks,
            accelerator="gpu" if module.compute_device.type == "cuda" else "cpu",
            default_root_dir=str(run_dir),
        )
        with quiet_fit():
            try:
                trainer.fit(module, ckpt_path=run.ckpt, **checkpoint.full_load(trainer, run.ckpt))
            except SIGTERMException:
                finish_loggers(loggers, None)
                print(stopped_message(run_dir, ckpt), file=sys.stderr, flush=True)
                raise SystemExit(SIGTERM_EXIT) from None
            except BaseException:
                finish_loggers(loggers, None)
                raise
        timings = {
            "setup_s": run.setup_s,
            "total_s": ckpt.elapsed(),
            "processes": ckpt.processes,
            "this_process_s": time.perf_counter() - run.start,
            "mean_round_s": sum(r["time/round"] for r in module.history) / max(len(module.history), 1),
        }
        resources = run_resources(module.compute_device)
        chance = module.evaluator.chance()
        payload = build_results(cfg, run.data.summary(), module.history, timings, True, resources, chance)
        payload["resumes"] = run.resumes
        payload["code"] = run.code
        if run.ckpt is not None:
            label_folder(cfg, run_dir)
        write_results(run_dir, payload)
        finish_loggers(loggers, payload)
        return payload
    finally:
        rundir.release(run.lock)


def label_folder(cfg: DictConfig, run_dir: Path) -> None:
    """The run folder's config: config_resolved.yaml and Hydra's .hydra/ (within a Hydra app)."""
    atomic_write_text(run_dir / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    rundir.write_hydra_files(run_dir, cfg)


def stopped_message(run_dir: Path, ckpt: AtomicCheckpoint) -> str:
    """What a run stopped by SIGTERM prints: where its last checkpoint is and the command that resumes it."""
    if not ckpt.last.is_file():
        return "stopped by SIGTERM; no checkpoint was written (fl.checkpoint_every=0), so the run cannot resume"
    try:
        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("resume=", "hydra.run.dir="))]
    except ValueError:
        overrides = ["<the run's overrides>"]
    cmd = shlex.join(["python", "-m", "src.run", *overrides, f"hydra.run.dir={run_dir}", "resume=true"])
    return f"stopped by SIGTERM after round {ckpt.saved_round or '?'}; its checkpoint {ckpt.last} resumes with:\n{cmd}"


def train(cfg: DictConfig, run_dir: Path, progress: bool = True) -> dict:
    """Check, then run: `prepare` and `fit` (what the tests and tools call without Hydra)."""
    return fit(prepare(cfg, run_dir), progress)


def hydra_job(cfg: DictConfig) -> float:
    """One job of `python -m src.run` in its Hydra run folder; returns the best round's value of the selection
    metric (`eval.select`, by default validation hit@10: the objective of sweeps)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    store_root = None if cfg.search.store is None else Path(to_absolute_path(str(cfg.search.store)))
    validate(cfg)  # a config the run would refuse is refused before a stored trial is read or a launcher's job waits
    simulator_checks(cfg)
    if store_root is not None:
        with reported():  # a trial the store would refuse is refused before it trains, as the campaign does
            refuse_unreportable(OmegaConf.to_container(cfg, resolve=True), "search.store")
        if (found := stored_trial(OmegaConf.to_container(cfg, resolve=True), store_root)) is not None:
            folder, payload = found
            log.info("this computation is stored (%s): its result is read, not run again", folder)
            return report_best(payload, folder, log)
    with memory_wait.held(run_dir, f"{cfg.experiment_name} {run_dir.name}"):
        run = rundir.checked_in(run_dir, lambda: prepare(cfg, run_dir, checked=True))
        with reported():
            best = report_best(fit(run), run_dir, log)
    if store_root is not None:
        overrides = list(HydraConfig.get().overrides.task)
        folder = store(run_dir, str(cfg.experiment_name), overrides, store_root, trial_variant(overrides))
        log.info("trial stored -> %s", folder)
    return best
