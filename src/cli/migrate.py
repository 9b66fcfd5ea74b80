"""`python -m src.migrate [FOLDER ...]`: bring stored run records up to the current method labels.

A method's yaml (`conf/ablation/<name>.yaml`) names what trains it (`ablation.engine`, e.g. `${optim.name}` or
`central-adam`) and the config keys it never reads (`ablation.unread`). Records stored before those keys existed
lack them; this adds them to each record's config (`results.json`, `config_resolved.yaml`), resolved against the
record's own config, and notes the migration in `run.json`. Both keys are labels, not part of the computation
(`src/config/identity.py:DERIVED_KEYS`): a record's identity is the same before and after (`normalised` reads a
record without them by the rule they replace). Records that have them are left as they are, so it can run after
every campaign. A stored record (a folder with its run.json) whose history is still held as rows is rewritten with
it as columns (`compact_json`, as the campaign stores today): the same values in about half the bytes. A run folder's
results.json keeps its rows.

It also moves a run stored under a variant folder that names a moved key by its old name (`model.alpha=0.01_optim=sgd`,
stored before the method's keys moved into its yaml, `schema.MOVED`) to the folder the store names it by today
(`ablation.alpha=0.01_optim=sgd`): the same run, found by its identity either way; its run.json keeps the overrides it
was started with and notes the move.
"""

from __future__ import annotations

import argparse
import json
from functools import cache
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from src.cli.config import load_config
from src.cli.store import variant_name
from src.runtime.atomic import atomic_write_text
from src.runtime.errors import OneLineParser, UserError
from src.runtime.results import compact_json

LABELS = ("engine", "unread")


@cache
def templates(ablation: str) -> dict:
    """The labels of `ablation=<name>` as its yaml writes them (interpolations unresolved)."""
    composed = OmegaConf.to_container(load_config([f"ablation={ablation}"]).ablation, resolve=False)
    return {k: composed[k] for k in LABELS}


def labels(config: dict) -> dict:
    """The labels of a record's method, resolved against the record's own config."""
    ablation = {**config["ablation"], **templates(str(config["ablation"]["name"]))}
    resolved = OmegaConf.to_container(OmegaConf.create({**config, "ablation": ablation}), resolve=True)
    return {k: resolved["ablation"][k] for k in LABELS}


def with_labels(ablation: dict, added: dict) -> dict:
    """The ablation group with the labels placed after `gsa`, where the yamls write them."""
    out = {}
    for key, value in ablation.items():
        out[key] = value
        if key == "gsa":
            out.update(added)
    return out | added


def migrate(run_dir: Path) -> bool:
    """Add the labels to one stored run and store its history as columns (`compact_json`); False when it has both."""
    payload = json.loads((run_dir / "results.json").read_text())
    config = payload["config"]
    stored = (run_dir / "run.json").is_file()  # a stored record (history by columns), not a run folder (rows)
    if all(k in config["ablation"] for k in LABELS):
        if not (stored and isinstance(payload.get("history"), list)):
            return False  # columns already, or a run folder (not a stored record: its history stays rows)
        atomic_write_text(run_dir / "results.json", compact_json(payload))  # the same record, in half the bytes
        return True
    try:
        added = labels(config)
    except Exception as exc:  # a deleted ablation yaml, a config without the keys the labels read
        raise UserError(
            f"{run_dir / 'results.json'}: cannot label its method ({type(exc).__name__}: {exc}); expected a record "
            f"whose ablation.name has a yaml in conf/ablation/ and a config holding the keys its labels read"
        ) from None
    config["ablation"] = with_labels(config["ablation"], added)
    text = compact_json(payload) if stored else json.dumps(payload, separators=(",", ":"))
    atomic_write_text(run_dir / "results.json", text)
    if (run_dir / "config_resolved.yaml").is_file():
        atomic_write_text(run_dir / "config_resolved.yaml", yaml.safe_dump(config, sort_keys=False))
    if stored:
        meta = json.loads((run_dir / "run.json").read_text())
        note = "ablation.engine and ablation.unread added by src.migrate (labels of the method, not its computation)"
        meta["migrated"] = [*meta.get("migrated", []), note]
        atomic_write_text(run_dir / "run.json", json.dumps(meta, indent=1) + "\n")
    return True


def relocation(run_dir: Path) -> Path | None:
    """Where a stored run whose variant folder names a moved key by its old name belongs today (`variant_name`; a
    `-<key prefix>` suffix the store added kept); None when its folder is named as today, or by hand (`--variant`)."""
    meta_path = run_dir / "run.json"
    overrides = json.loads(meta_path.read_text()).get("overrides") if meta_path.is_file() else None
    if not overrides:
        return None
    old, new = variant_name(overrides, current=False), variant_name(overrides)
    variant = run_dir.parent.name
    if old == new or not (variant == old or variant.startswith(f"{old}-")):
        return None
    return run_dir.parent.with_name(new + variant[len(old) :]) / run_dir.name


def refuse_taken(moves: dict[Path, Path]) -> None:
    """Refuse moving stored runs (source -> destination) where a destination holds a run already or two runs would
    share one; called before the migration changes anything."""
    taken = [str(dest) for dest in moves.values() if dest.exists()]
    if taken or len(set(moves.values())) < len(moves):
        raise UserError(
            f"cannot move stored runs to folders named as today: {', '.join(taken) or 'two runs to one folder'} "
            "holds a run already; expected free folders (nothing was changed)"
        )


def relocate(moves: dict[Path, Path]) -> None:
    """Move each stored run (source -> destination, checked by `refuse_taken`), a note in its run.json."""
    for run_dir, dest in moves.items():
        dest.parent.mkdir(parents=True, exist_ok=True)
        run_dir.rename(dest)
        if not any(run_dir.parent.iterdir()):
            run_dir.parent.rmdir()
        meta = json.loads((dest / "run.json").read_text())
        note = f"moved from {run_dir.parent.name}/{run_dir.name} by src.migrate (moved keys under today's names)"
        meta["migrated"] = [*meta.get("migrated", []), note]
        atomic_write_text(dest / "run.json", json.dumps(meta, indent=1) + "\n")
        print(f"moved  {run_dir} -> {dest}")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m src.migrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", type=Path, default=[Path("results/runs")])
    ns: argparse.Namespace = parser.parse_args(argv)
    missing = [str(f) for f in ns.folders if not f.is_dir()]
    if missing:
        parser.error(f"{' '.join(missing)}: no such folder; expected folders of stored runs (results/runs)")
    runs = sorted({p.parent for f in ns.folders for p in f.rglob("results.json")})
    moves = {r: dest for r in runs if (dest := relocation(r)) is not None}
    refuse_taken(moves)
    changed = sum(migrate(r) for r in runs)
    relocate(moves)
    print(f"migrated {changed} of {len(runs)} stored run(s); moved {len(moves)} to folders named as today")
    return changed + len(moves)
