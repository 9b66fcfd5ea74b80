"""`hydra/sweeper=campaign`: the campaign's planning and storing around whatever Hydra launcher runs the jobs.

    python -m src.run -m hydra/sweeper=campaign hydra/launcher=campaign_joblib experiment=table1 dataset=ml-100k

The sweeper keeps what only the campaign does (src/cli/campaign.py): it expands the experiment overlays' grids, skips
every run already stored in `runs` (identified by its resolved config) or claimed by another campaign (the run's
lock in `work`), resumes a run whose work folder holds a checkpoint, hands the rest to the configured launcher in
one batch (each job a plain `src.run` job in `<work>/<run key>`, which checkpoints and exits non-zero on SIGTERM, and
which waits for its expected peak memory beside the other runs of `work` before it starts: src/cli/memory_wait.py),
and stores each completed run compactly in `runs`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from src.cli import campaign, memory_wait
from src.cli.jobs import sweep_values, thread_env
from src.runtime.cache import default_cache_dir
from src.runtime.checks import ConfigError

log = logging.getLogger(__name__)


def finished(folder: Path) -> bool:
    """Whether a work folder holds a finished run's results.json."""
    try:
        return bool(json.loads((folder / "results.json").read_text()).get("finished"))
    except (OSError, ValueError):
        return False


class CampaignSweeper(Sweeper):
    """Plans a campaign from the command line's `experiment=` and axis overrides and launches its pending runs."""

    def __init__(
        self,
        runs: str | None = None,
        work: str | None = None,
        threads: int = 1,
        compile: bool = True,
        params: Any = None,
    ) -> None:
        self.runs = Path(runs) if runs else campaign.RUNS
        self.work = Path(work) if work else default_cache_dir() / "campaign"
        self.threads, self.compile = int(threads), bool(compile)
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list[Any]:
        experiments, axes = [], []
        for line, parsed in zip(arguments, OverridesParser.create().parse_overrides(arguments)):
            if parsed.key_or_group == "experiment":
                experiments += sweep_values(line)[1]
            else:
                axes.append(line)
        if not experiments:
            raise ConfigError(  # src.run refuses this before Hydra starts (src/cli/jobs.py:command_jobs)
                "hydra/sweeper=campaign runs experiment overlays; expected experiment=<overlay>[,<overlay>...] "
                "(conf/experiment/)"
            )
        runs = campaign.plan(experiments, axes, self.runs, self.threads)
        self.work.mkdir(parents=True, exist_ok=True)
        todo = []
        for run in runs:
            if run.status != "pending" or not campaign.take(self.work, run, self.runs):
                continue
            run.extra["resume"] = campaign.resumes(self.work, run)
            todo.append(run)
        # the jobs' processes (joblib workers, SLURM tasks) read their torch threads from the environment
        os.environ.update(thread_env(self.threads))
        batch = [self.job(run) for run in todo]
        log.info("campaign: %d runs, %d stored, %d to launch", len(runs), len(runs) - len(todo), len(todo))
        results, broken = [], None
        try:
            results = self.launcher.launch(batch, initial_job_idx=0) if batch else []
        except BaseException as err:  # a job ended abnormally (SIGTERM's SystemExit, a dead worker): the batch stops
            broken = err
        try:
            done = {id(run) for run, result in zip(todo, results) if result.status == JobStatus.COMPLETED}
            for run in todo:
                folder = campaign.work_dir(self.work, run)
                if id(run) in done or (broken is not None and finished(folder)):
                    run.stored = campaign.store(
                        folder, run.experiment, campaign.computation_overrides(run.overrides), self.runs, run.variant
                    )
                    run.status = "stored"
                else:
                    run.status = "partial" if campaign.checkpointed(folder) else "failed"
        finally:
            for run in todo:
                campaign.release(run)
        print(campaign.summary(runs, self.work), flush=True)
        if isinstance(broken, SystemExit):
            raise broken  # a job stopped by SIGTERM (143) or refused (2): the campaign exits with its status
        if broken is not None:
            raise RuntimeError(
                f"the launcher stopped the batch ({type(broken).__name__}: a job's process ended); the finished runs "
                "are stored, the others resume from their checkpoints in the next campaign"
            ) from broken
        failed = [run.label for run in todo if run.status == "failed"]
        if failed:
            raise RuntimeError(f"{len(failed)} run(s) failed: {', '.join(failed)}; their logs are in {self.work}")
        return [results]

    def job(self, run: campaign.Run) -> list[str]:
        """The overrides of a run's job: its own, its work folder `<work>/<key>`, a resume when it checkpointed, and
        its expected peak memory in the job's environment (empty when unknown), which the job waits for before it
        reads its data (`memory_wait.held`; Hydra sets the variable for the job and restores it after)."""
        speed = ["compute.compile=true"] if self.compile else []
        where = [f"hydra.sweep.dir={self.work}", f"hydra.sweep.subdir={run.key}"]
        peak = f"++hydra.job.env_set.{memory_wait.PEAK_ENV}={'' if run.mem_gib is None else round(run.mem_gib, 2)}"
        return [*run.overrides, *speed, *where, *(["resume=true"] if run.extra["resume"] else []), peak]
