"""The jobs of a command line: compose each run's config from its overrides, expand a sweep into its jobs, and the
command and environment of a run's own process.

`src.run -m` checks every job of a multirun this way before the first starts, and the campaign plans with it.
"""

from __future__ import annotations

import copy
import difflib
import functools
import itertools
import os
import sys
from collections.abc import Callable

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from src.cli.config import CONF_DIR, ConfigError, refuse_misnamed, refuse_replaced, renamed, validate
from src.config.identity import flatten
from src.data.dataset import check_located
from src.runtime.checks import check_output_dir
from src.runtime.errors import reported

# hydra's flags that take no value and leave the config as it is; any other flag skips the check (Hydra's own)
MULTIRUN_FLAGS = ("-m", "--multirun")


def thread_env(threads: int) -> dict[str, str]:
    """The environment that gives a run's process `threads` torch threads (OpenMP and MKL read it at start)."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run_command(overrides: list[str], threads: int) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of one run's own process, `python -m src.run <overrides>` with `threads` torch
    threads: how the campaign launches a run and `recheck` reruns one."""
    return [sys.executable, "-m", "src.run", *overrides], {**os.environ, **thread_env(threads)}


def sweep_values(override: str) -> tuple[str, list[str]]:
    """`key=a,b` -> (key, ['a', 'b']); `key=a` -> (key, ['a'])."""
    parsed = OverridesParser.create().parse_overrides([override])[0]
    key = parsed.get_key_element()
    if parsed.is_sweep_override():
        return key, list(parsed.sweep_string_iterator())
    return key, [parsed.get_value_element_as_str()]


def compose_config(overrides: list[str], hydra_node: bool = False) -> DictConfig:
    """The composed config of a run's overrides (not yet validated), optionally with the hydra node. Inside a Hydra
    app (the campaign sweeper) the app's global Hydra is set aside for the compose and restored after."""
    running = GlobalHydra.instance()
    app = running.hydra if running.is_initialized() else None
    running.clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=overrides, return_hydra_config=hydra_node)
    finally:
        if app is not None:
            GlobalHydra.instance().clear()
            GlobalHydra.instance().initialize(app)


def value_overrides(overrides: list[str]) -> tuple[list[str], list[Override]]:
    """Split overrides into those Hydra must compose (config groups, `+`/`~`/`@`, hydra's own) and plain
    `key=value` changes of existing values, which Hydra applies to the composed config as `OmegaConf.update`."""
    composed, values = [], []
    for line, parsed in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        key = parsed.key_or_group
        plain = (
            parsed.type == OverrideType.CHANGE
            and parsed.package is None
            and not parsed.is_hydra_override()
            and not parsed.is_sweep_override()
        )
        if plain and not (CONF_DIR / key).is_dir():
            values.append(parsed)
        else:
            composed.append(line)
    return composed, values


def refuse_added_keys(overrides: list[str], cfg: DictConfig) -> None:
    """A `+key=value` that adds a key the config does not have (a typo such as `+fl.roundz=3` would otherwise be
    saved and change the run's identity) is refused, naming the closest known key; `+group=option` stays."""
    for line, parsed in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        key = parsed.key_or_group
        if parsed.type != OverrideType.ADD or parsed.is_hydra_override() or (CONF_DIR / key).is_dir():
            continue
        known = [k for k in flatten(OmegaConf.to_container(cfg, resolve=False)) if k != key]
        # the leaf first (a key may have moved to another group: +model.alpah means ablation.alpha), then the whole key
        leaves = {k.rsplit(".", 1)[-1]: k for k in known}
        leaf = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(leaves), n=1, cutoff=0.8)
        close = [leaves[leaf[0]]] if leaf else difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean {close[0]}={parsed.get_value_element_as_str()}?" if close else "see conf/config.yaml"
        raise ConfigError(f"override {line} adds a key the config does not have; expected a key of conf/ ({hint})")


@functools.lru_cache(maxsize=256)
def composed_once(composed: tuple[str, ...]) -> DictConfig:
    """The config of a set of group choices (and `+`/`~` overrides), composed by Hydra once per process (conf/ does
    not change while a process runs; a refused set is refused again each time). Callers take a deep copy."""
    return compose_config(list(composed))


def compose_runs(grid: list[list[str]], added_keys: bool = False) -> list[DictConfig]:
    """The config of each run's overrides, composing once per set of group choices (`composed_once`): a run's
    seed and other plain values are applied to a copy as Hydra applies them (struct mode: an unknown key is an
    error). A `+key=value` adding a key conf/ lacks is refused (`refuse_added_keys`) unless `added_keys` (the
    tools' `load_config`, whose `validate` names what such a key expects)."""
    out = []
    for overrides in grid:
        overrides = renamed(overrides)
        refuse_replaced(overrides)
        composed, values = value_overrides(overrides)
        cfg = copy.deepcopy(composed_once(tuple(composed)))
        if not added_keys:
            refuse_added_keys(composed, cfg)
        for parsed in values:
            try:
                OmegaConf.update(cfg, parsed.key_or_group, parsed.value(), merge=True)
            except (ConfigAttributeError, ConfigKeyError) as err:
                if parsed.key_or_group.startswith("ablation."):  # a method's keys are its yaml's (conf/ablation/)
                    name = cfg.ablation.name
                    raise ConfigError(
                        f"override {parsed.input_line}: ablation={name} has no key {parsed.key_or_group}; expected one "
                        f"of its keys ({', '.join(sorted(cfg.ablation))}; conf/ablation/{name}.yaml)"
                    ) from err
                raise ConfigError(
                    f"override {parsed.input_line}: no key {parsed.key_or_group} in the config; expected a key of "
                    f"conf/ (add a new one with +{parsed.input_line})"
                ) from err
            except OmegaConfBaseException as err:
                raise ConfigError(f"override {parsed.input_line}: {err}") from err
        refuse_misnamed(overrides, cfg)  # on the config as it runs: `ablation.name=` cannot relabel a method
        out.append(cfg)
    return out


def grid_jobs(params: dict[str, str], overrides: list[str]) -> list[list[str]]:
    """The jobs of a basic sweep: the overlay's `hydra.sweeper.params` with the command line's values replacing
    or adding axes, one list of `key=value` overrides per combination."""
    grid: dict[str, list[str]] = {k: sweep_values(f"{k}={v}")[1] for k, v in params.items()}
    for override in overrides:
        key, values = sweep_values(override)
        grid[key] = values
    return [[f"{k}={v}" for k, v in zip(grid, combo)] for combo in itertools.product(*grid.values())]


def command_jobs(argv: list[str]) -> list[list[str]] | None:
    """The overrides of each job a `src.run` command line starts (one job without -m), or None when the command
    line holds flags other than -m (--help, --cfg, --config-name, ...), which Hydra handles itself."""
    flags = [a for a in argv if a.startswith("-")]
    if any(f not in MULTIRUN_FLAGS for f in flags):
        return None
    overrides = [a for a in argv if not a.startswith("-")]
    if not flags:
        return [overrides]
    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed = [line for line, p in zip(overrides, parsed) if not p.is_sweep_override()]
    hydra = compose_config(fixed, hydra_node=True).hydra
    sweeper = str(OmegaConf.select(hydra, "sweeper._target_", default=""))
    if sweeper.endswith("CampaignSweeper") and not any(p.key_or_group == "experiment" for p in parsed):
        raise ConfigError(
            "hydra/sweeper=campaign runs experiment overlays; expected experiment=<overlay>[,<overlay>...] "
            "(conf/experiment/)"
        )
    if "BasicSweeper" not in sweeper:
        return [fixed]  # another sweeper (Optuna) draws its own values: check the config its values change
    params = hydra.sweeper.params
    grid = {} if params is None else OmegaConf.to_container(params, resolve=False)
    return grid_jobs({str(k): str(v) for k, v in grid.items()}, overrides)


def check_command_line(argv: list[str], checks: Callable[[DictConfig], None] | None = None) -> list[str]:
    """Compose and validate every job of a `src.run`-style command line before any starts; the first bad one ends
    the command with one line naming the job (`src.runtime.errors`). Returns the command line with moved keys under
    their new names (`renamed`), which the command then runs."""
    argv = renamed(argv)
    with reported():
        for arg in argv:
            key, _, value = arg.partition("=")
            if key in ("hydra.run.dir", "hydra.sweep.dir") and value:
                check_output_dir(key, value)
        jobs = command_jobs(argv)
    if jobs is None:
        return argv
    for num, job in enumerate(jobs):
        prefix = f"job {num} of {len(jobs)} ({' '.join(job)}): " if len(jobs) > 1 else ""
        with reported(prefix):
            check_job(compose_runs([job])[0], checks)
    return argv


def check_job(cfg: DictConfig, checks: Callable[[DictConfig], None] | None = None) -> None:
    """Everything a job is refused for before it starts: its config values, where its data is, and what the engine
    that runs it refuses (`checks`: the simulator's or the Flower app's); raises the first one-line error."""
    validate(cfg)
    check_located(cfg)
    if checks is not None:
        checks(cfg)
