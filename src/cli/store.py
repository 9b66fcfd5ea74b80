"""The run store: finished runs kept compactly in the repository (`results/runs/`), one folder per computation.

    <root>/<experiment>/<dataset>/<ablation>/<protocol>/<variant>/seed<k>/
        results.json   the run's results with its whole history (compact JSON)
        config_resolved.yaml
        run.json       identity key, overrides, the commit(s) it ran at, device, seconds

A run is found again by its identity key (`src.config.identity`: the resolved config without the keys that cannot
change results), never by its folder name or commit: the campaign skips stored runs, and a resumable search
(`search.store`) answers a stored trial from its record.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from src.config.identity import NOT_IDENTITY, identity, only_where
from src.config.schema import current_name, override_key
from src.runtime.atomic import atomic_write_text
from src.runtime.errors import UserError
from src.runtime.results import compact_json, read_results
from src.runtime.rundir import path_segment

REPO = Path(__file__).resolve().parents[2]
RUNS = REPO / "results" / "runs"
# the grid axes that name a stored run's folder; every other override names its variant
AXES = ("dataset", "ablation", "protocol", "seed")


def unreportable(config: dict[str, Any]) -> list[str]:
    """The keys that make a run never a reported number: a cut dataset (`data.max_users`: smoke tests, Flower parity)
    or files not held to their digests (`data.verify=false`)."""
    data = config.get("data") or {}
    return [
        k
        for k, off in (
            ("data.max_users", data.get("max_users") is not None),
            ("data.verify", data.get("verify") is False),
        )
        if off
    ]


def refuse_unreportable(config: dict[str, Any], where: str) -> None:
    """The store, the campaign and a stored search refuse a run `unreportable` names (`where` names the run)."""
    keys = unreportable(config)
    if "data.max_users" in keys:
        raise UserError(
            f"{where}: data.max_users={config['data']['max_users']} cuts the dataset, which no stored run may; "
            "expected data.max_users=null"
        )
    if "data.verify" in keys:
        raise UserError(
            f"{where}: data.verify=false reads files not held to their digests, which no stored run may; expected "
            "data.verify=true"
        )


def variant_name(overrides: list[str], current: bool = True) -> str:
    """The overrides beyond the grid axes and the experiment, as a folder name ('default' when none); a moved key
    under today's name (`model.alpha=0.01` names the folder of `ablation.alpha=0.01`, the same run), or as written
    with `current=False` (how runs stored before the move were named: `src.migrate`)."""
    name = current_name if current else str
    extra = sorted(name(o) for o in overrides if override_key(o) not in (*AXES, "experiment"))
    return path_segment("_".join(extra) or "default")


def computation_overrides(overrides: list[str]) -> list[str]:
    """The overrides that name what a run computes: those of where it runs, reads, logs and how fast or on which
    device (`NOT_IDENTITY`, a key or its whole group: `logger=wandb`, `data.cache_dir=/x`) left out, the keys among
    them that change the numbers (`flower.secagg`) kept. What a stored run records and names its folder by, started
    by a campaign or by hand; a search's `hparams_search=` is kept (it composes the trial's config)."""
    return [
        o
        for o in overrides
        if not (only_where(k := override_key(o), NOT_IDENTITY) or ("." not in k and only_where(f"{k}.", NOT_IDENTITY)))
    ]


def run_overrides(run_dir: Path) -> list[str]:
    """The overrides a run was started with (its Hydra record, `.hydra/overrides.yaml`) that name its computation
    (`computation_overrides`), as a campaign records its own; [] without the record."""
    record = run_dir / ".hydra" / "overrides.yaml"
    if not record.is_file():
        return []
    given = yaml.safe_load(record.read_text()) or []
    if not isinstance(given, list):
        raise UserError(f"{record} holds a {type(given).__name__}; expected Hydra's list of overrides")
    return computation_overrides([str(o) for o in given])


def refuse_other_experiment(run_dir: Path, overrides: list[str], experiment: str) -> None:
    """A UserError when the run was started with an `experiment=` other than the one it is to be stored under (its
    folder and every table would name an overlay it did not run)."""
    named = [o.split("=", 1)[1] for o in overrides if override_key(o) == "experiment" and "=" in o]
    if named and named[-1] != experiment:
        raise UserError(
            f"{run_dir} was started with experiment={named[-1]}; expected --experiment {named[-1]} (not {experiment})"
        )


# results.json -> (device, inode, mtime, ctime, size) of the file read, and its identity key: a campaign asks for the
# stored runs before every run it starts (another campaign may have stored it since), and parsing every record each
# time took seconds
KEYS_READ: dict[Path, tuple[tuple[int, ...], str]] = {}


def record_key(results: Path) -> str:
    """The identity key of the stored record `results` (results.json), read again only when the file changed."""
    with open(results, "rb") as fh:
        st = os.fstat(fh.fileno())
        stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
        seen = KEYS_READ.get(results)
        if seen is not None and seen[0] == stamp:
            return seen[1]
        key = identity(json.loads(fh.read())["config"])
    KEYS_READ[results] = (stamp, key)
    return key


def stored_runs(root: Path = RUNS) -> dict[str, Path]:
    """identity key -> folder of every run stored under `root`, the key computed anew from each stored config
    (so runs stored before the identity rule last changed are still recognised)."""
    out = {}
    for meta in sorted(root.rglob("run.json")):
        try:
            out[record_key(meta.parent / "results.json")] = meta.parent
        except Exception as err:  # one unreadable record never stops a campaign's planning
            print(f"warning: skipped unreadable {meta.parent / 'results.json'} ({err})", file=sys.stderr)
    return out


def git_commit() -> str:
    """The checkout's commit, with `+dirty` when tracked source or config files differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "src", "conf"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def destination(root: Path, experiment: str, config: dict[str, Any], variant: str) -> Path:
    """Where a run of `config` is stored: <root>/<experiment>/<dataset>/<ablation>/<protocol>/<variant>/seed<k>."""
    names = (config["dataset"]["name"], config["ablation"]["name"], config["protocol"]["name"])
    return root.joinpath(experiment, *names, variant, f"seed{config['seed']}")


def stored_key(folder: Path) -> str | None:
    """The identity key of the run stored in `folder` (computed anew from its config), None when it holds none."""
    try:
        return record_key(folder / "results.json")
    except (OSError, ValueError, KeyError):
        return None


def commits_of(payload: dict[str, Any]) -> str | None:
    """The commits a run's processes ran (its results.json `code`, in order, each once, joined by ' + '); None for a
    run written before runs recorded them."""
    seen = [entry["commit"] for entry in payload.get("code") or []]
    return " + ".join(dict.fromkeys(seen)) or None


def store(
    run_dir: Path,
    experiment: str,
    overrides: list[str],
    root: Path = RUNS,
    variant: str | None = None,
    commit: str | None = None,
) -> Path:
    """Copy a finished run's results.json (compact), config and a run.json into `root`; return its folder. A folder
    of that name holding another computation (a fixed key changed since it was stored) is kept: the run goes into
    `<variant>-<key prefix of its config at seed 0>` beside it. The commit is the one the run recorded (each of its
    processes, `code`); `commit` names it only for a run written before runs recorded it ('unknown' without)."""
    if not (run_dir / "results.json").is_file():
        raise UserError(f"{run_dir} holds no results.json; expected the folder of a finished run")
    payload = read_results(run_dir / "results.json")
    if not payload.get("finished"):
        raise UserError(f"{run_dir}/results.json: the run did not finish, nothing stored; expected a finished run")
    if payload.get("engine") == "flower":
        raise UserError(
            f"{run_dir}: a Flower run is not stored beside the simulator's runs (its identity is the simulator run's "
            "config, and its rounds sum what the nodes that replied sent); expected a run of python -m src.run"
        )
    if payload.get("best_round") is None:
        raise UserError(f"{run_dir}/results.json: no round was scored, nothing stored; expected a run with test scores")
    config = payload["config"]
    refuse_unreportable(config, str(run_dir))
    key = identity(config)
    dest = destination(root, experiment, config, variant or variant_name(overrides))
    if (held := stored_key(dest)) is not None and held != key:  # the folder's name, another computation's record
        taken, seeds = dest, identity({**config, "seed": 0})[:8]  # one suffix for all seeds of this config
        dest = taken.parent.with_name(f"{taken.parent.name}-{seeds}") / taken.name
        print(f"warning: {taken} holds another computation; this run is stored in {dest}", file=sys.stderr)
    atomic_write_text(dest / "results.json", compact_json(payload))
    atomic_write_text(dest / "config_resolved.yaml", yaml.safe_dump(config, sort_keys=False))
    meta = {
        "key": key,
        "experiment": experiment,
        "overrides": overrides,
        "commit": commits_of(payload) or commit or "unknown",
        "code": payload.get("code", []),
        "device": config.get("device"),
        "rounds": len(payload["history"]),
        "total_s": payload.get("timings", {}).get("total_s"),
        "source": str(run_dir),
        "stored_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_text(dest / "run.json", json.dumps(meta, indent=1) + "\n")
    return dest


# keys of a search job's overrides that say how it was launched, not what it computes (left out of its variant)
LAUNCH_KEYS = ("hparams_search", "hydra.", "search.", "experiment_name")


def trial_variant(overrides: list[str]) -> str:
    """A search trial's folder name: its sampled and fixed overrides, without the ones that launched it."""
    return variant_name([o for o in overrides if not override_key(o).startswith(LAUNCH_KEYS)])


def stored_trial(config: dict[str, Any], root: Path) -> tuple[Path, dict[str, Any]] | None:
    """The stored run (folder, results) of this computation under `root/<experiment_name>`, if any: a search trial
    already run, possibly by an earlier search that was cut short."""
    folder = stored_runs(root / str(config["experiment_name"])).get(identity(config))
    if folder is None:
        return None
    return folder, read_results(folder / "results.json")
