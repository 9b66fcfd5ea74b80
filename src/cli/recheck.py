"""`python -m src.campaign recheck <stored run folder>... [--rounds 2]`: does today's code reproduce a stored run?

The tables average runs stored at many commits (each run.json names its own). A recheck composes a stored run's
overrides with today's config, refuses a run they no longer make (another identity: a default moved), reruns its
first rounds into a temporary folder (`python -m src.run`; `fl.rounds` only says how long a run goes) and compares
every per-round metric and loss with the stored history: the largest difference of each, and whether it is within
tolerance. Exit status 1 when a run differs.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from src.cli import memory_wait
from src.cli.config import refuse_replaced, renamed
from src.cli.jobs import compose_config, run_command
from src.cli.store import REPO
from src.config.identity import differing, identity, identity_values
from src.config.schema import override_key
from src.runtime.checks import ConfigError
from src.runtime.errors import UserError
from src.runtime.results import read_results

# config groups whose choice a stored config names (`<group>.name`): named explicitly when its overrides did not
STORED_CHOICES = ("dataset", "ablation", "protocol", "optim")
# the per-round values compared: ranking metrics (fractions of users) and the training losses
METRIC_PREFIXES = ("val/", "test/", "test_full/")
LOSS_PREFIX = "loss/"


class RecheckError(UserError, ValueError):
    """The folder holds no stored run, or today's config makes another run of its overrides."""


@dataclass
class Recheck:
    """A stored run against its rerun: rounds compared, the largest |difference| per key, the keys beyond tolerance."""

    folder: Path
    rounds: int
    largest: dict[str, float]
    beyond: list[str]

    @property
    def verdict(self) -> str:
        """`differs` when a key is beyond tolerance (or missing, or not finite), else `identical` when every
        difference is 0, else `within tolerance`."""
        if self.beyond:
            return "differs"
        return "identical" if not any(self.largest.values()) else "within tolerance"


def stored_record(folder: Path) -> tuple[list[str], dict[str, Any]]:
    """The overrides (run.json, moved keys under today's names) and the results of a stored run. A group the
    overrides left at its default then (`protocol`, `optim`, ...) is named as the run stored it: a default may have
    moved since."""
    try:
        meta = json.loads((folder / "run.json").read_text())
        payload = read_results(folder / "results.json")
    except (OSError, ValueError) as err:
        raise RecheckError(f"{folder} holds no stored run ({err}); expected a folder of results/runs/") from None
    overrides = renamed(meta["overrides"])
    given = {override_key(o) for o in overrides}
    config = payload["config"]
    for group in STORED_CHOICES:
        name = (config.get(group) or {}).get("name")
        if group not in given and name is not None:
            overrides.append(f"{group}={name}")
    return overrides, payload


def same_run(overrides: list[str], stored: dict[str, Any], folder: Path) -> None:
    """Refuse a run whose overrides compose, today, to another run than the one stored, or no longer compose."""
    try:
        refuse_replaced(overrides)
        today = OmegaConf.to_container(compose_config(overrides), resolve=True)
    except (HydraException, OmegaConfBaseException, ConfigError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RecheckError(
            f"{folder}: its overrides no longer compose ({first}); expected overrides today's config accepts"
        ) from None
    if identity(today) != identity(stored):
        differ = "; ".join(differing(identity_values(stored), identity_values(today)))
        raise RecheckError(
            f"{folder}: its overrides make another run today ({differ}); expected a run whose overrides still compose "
            "to its stored config"
        )


def rerun(
    overrides: list[str], rounds: int | None, out: Path, threads: int, work: Path, key: str, peak_gib: float | None
) -> list[dict[str, Any]]:
    """The history of the run of `overrides` cut to `rounds` rounds (None: as long as it is), run in `out` by
    `python -m src.run` (CSV logger). It starts once `peak_gib` (the stored run's peak memory) is free beside the
    campaigns sharing the work folder `work`, and holds a reservation there under `key` (src/cli/memory_wait.py)."""
    length = [] if rounds is None else [f"fl.rounds={rounds}"]
    args = [*overrides, *length, "logger=csv", f"hydra.run.dir={out}"]
    argv, env = run_command(args, threads)
    command = shlex.join(["python", *argv[1:]])

    def start() -> subprocess.Popen:
        return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    proc = memory_wait.start_when_free(work, key, peak_gib, command, start)
    try:
        _, stderr = proc.communicate()
    finally:  # interrupted (Ctrl-C): the rerun goes with the recheck, as `subprocess.run` would end it
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        memory_wait.unreserve(work, key)
    if proc.returncode != 0:
        raise RecheckError(f"the rerun `{command}` failed: {stderr.strip()[-2000:]}")
    return read_results(out / "results.json")["history"]


def compare(
    stored: list[dict[str, Any]], again: list[dict[str, Any]], atol: float, rtol: float
) -> tuple[dict[str, float], list[str]]:
    """The largest |stored - rerun| of each metric and loss of the stored rounds, matched by `round`, and the keys
    beyond tolerance (a metric: more than `atol`, a fraction of users; a loss: more than `rtol` of its stored value).
    A stored round or key the rerun lacks, and a difference that is not finite, count as beyond (`inf`)."""
    largest: dict[str, float] = {}
    beyond: set[str] = set()
    rerun_rounds = {row["round"]: row for row in again}
    for before in stored:
        now = rerun_rounds.get(before["round"], {})
        for key in sorted(before):
            if not key.startswith((*METRIC_PREFIXES, LOSS_PREFIX)):
                continue
            diff = abs(float(before[key]) - float(now[key])) if key in now else math.inf
            limit = rtol * abs(float(before[key])) if key.startswith(LOSS_PREFIX) else atol
            if not diff <= limit:  # NaN too
                diff = diff if math.isfinite(diff) else math.inf
                beyond.add(key)
            largest[key] = max(largest.get(key, 0.0), diff)
    return largest, sorted(beyond)


def rounds_to_rerun(config: dict[str, Any], history: list[dict[str, Any]], asked: int) -> int | None:
    """How many rounds the rerun goes: `asked` (at most the stored ones), or None for all of the stored run's
    `fl.rounds` when its computation reads them: noise the accountant calibrates over the rounds
    (`privacy.target_epsilon`), or a one-shot upload round (`ablation.upload_round`, below fl.rounds)."""
    if (config.get("privacy") or {}).get("target_epsilon") is not None:
        return None
    if (config.get("ablation") or {}).get("upload_round") is not None:
        return None
    return min(asked, len(history))


def recheck(
    folder: Path, rounds: int, atol: float, rtol: float, threads: int, work: Path, device: str | None = None
) -> Recheck:
    """Rerun the first `rounds` rounds of the stored run in `folder` (all of them where its computation reads
    fl.rounds: `rounds_to_rerun`) on `device` (None: the default), once the stored run's peak memory is free beside
    the campaigns of the work folder `work`, and compare them with its history."""
    overrides, payload = stored_record(folder)
    config = payload["config"]
    same_run(overrides, config, folder)
    history = payload["history"]
    if not history:
        raise RecheckError(f"{folder}: its history holds no round; expected a run with scored rounds")
    length = rounds_to_rerun(config, history, rounds)
    on = [] if device is None else [f"device={device}"]
    with tempfile.TemporaryDirectory(prefix="recheck-") as tmp:
        peak_gib = memory_wait.recorded_peak_gib(payload)
        again = rerun([*overrides, *on], length, Path(tmp) / "run", threads, work, f"recheck-{os.getpid()}", peak_gib)
    compared = history if length is None else history[:length]
    largest, beyond = compare(compared, again, atol, rtol)
    return Recheck(folder, len(compared), largest, beyond)


def summary(result: Recheck) -> str:
    """One line per run: verdict, rounds, the largest metric and loss differences."""
    metrics = {k: v for k, v in result.largest.items() if not k.startswith(LOSS_PREFIX)}
    losses = {k: v for k, v in result.largest.items() if k.startswith(LOSS_PREFIX)}

    def worst(values: dict[str, float]) -> str:
        """The key of the largest difference and its size; `none` when all are 0, `-` without keys."""
        if not values:
            return "-"
        key = max(values, key=lambda k: values[k])
        return f"{key} {values[key]:.2g}" if values[key] else "none"

    beyond = f"; beyond tolerance: {', '.join(result.beyond)}" if result.beyond else ""
    rounds = f"{result.rounds} round{'s' * (result.rounds != 1)}"
    return (
        f"{result.verdict:16} {result.folder} ({rounds}; largest difference: metric {worst(metrics)}, loss "
        f"{worst(losses)}){beyond}"
    )
