"""Stored runs as the tools read them: one results.json checked and loaded, every finished run under folders, a
resolved config's value by dotted key, and a run cut to its first rounds (best validation round chosen again)."""

from __future__ import annotations

import statistics
import warnings
from pathlib import Path
from typing import Any

from src.config.identity import moved
from src.runtime.errors import UserError
from src.runtime.results import at_best, read_results, selection_of

PROJECT = Path(__file__).resolve().parents[2]
STORED = (PROJECT / "results" / "runs").resolve()  # the campaign's runs: the only source of the project's pages


def is_stored(folder: Path) -> bool:
    """Whether `folder` is under results/runs (the campaign's stored runs)."""
    return Path(folder).resolve().is_relative_to(STORED)


def only_stored(folders: list[Path]) -> bool:
    """Whether every folder is under results/runs."""
    return all(is_stored(f) for f in folders)


def is_page_curves(target: Path) -> bool:
    """Whether `target` is results/curves, the results page's curves, which `src.report --out results` writes."""
    return Path(target).resolve() == (PROJECT / "results" / "curves").resolve()


def is_page(target: Path) -> bool:
    """Whether writing `target` writes one of the project's pages: anything under results/ (the runs included) or
    docs/, or a Markdown file at the repository's top or in experiments/ (README.md)."""
    path = Path(target).resolve()
    if any(path.is_relative_to((PROJECT / d).resolve()) for d in ("results", "docs")):
        return True
    return path.suffix == ".md" and path.parent in (PROJECT, (PROJECT / "experiments").resolve())


def refuse_foreign_pages(flag: str, targets: list[Path], folders: list[Path], instead: str) -> None:
    """results/ and the repository's Markdown pages are generated from results/runs only: refuse writing `targets`
    (the files or folders a command would write) there from other runs (a sweep in multirun/, a test's folder), whose
    numbers would then stand as the project's; `instead` says what to do."""
    if only_stored(folders):
        return
    pages = [t for t in targets if is_page(t)]
    if pages:
        foreign = next(str(f) for f in folders if not is_stored(f))
        raise UserError(
            f"{flag} would write {pages[0]}, one of the project's pages, generated from results/runs only, and "
            f"{foreign} is not under it; expected {instead}"
        )


def config_value(config: dict, dotted: str) -> str:
    """`a.b.c` of a resolved config as text ('-' when absent)."""
    value = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return "-"
        value = value[part]
    return str(value)


def encoding_label(comm: dict[str, Any]) -> str:
    """A short name of a run's encoding (its `comm` keys): csr8, coo32, csr8+delta, top16 csr8."""
    label = f"{comm['format']}{comm['bits']}"
    if comm.get("topk"):
        label = f"top{comm['topk']} {label}"
    return label + ("+delta" if comm.get("delta") else "")


def planned_rounds(config: dict) -> int | None:
    """The rounds a resolved config planned (`fl.rounds`), None when it names none."""
    fl = config.get("fl")
    value = fl.get("rounds") if isinstance(fl, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def truncate(payload: dict, rounds: int) -> dict:
    """The run as if it had stopped after `rounds` rounds: best validation round (by the run's selection
    metric, `selection_of`) and its metrics chosen again within them (test data still selects nothing);
    ValueError when none of those rounds is scored."""
    history = [h for h in payload["history"] if h["round"] <= rounds]
    select = selection_of(payload)
    cut = at_best(history, select)
    if cut["best_round"] is None:
        raise ValueError(f"{Path(payload['path']) / 'results.json'}: no round among the first {rounds} has {select}")
    return {**payload, "history": history, **cut}


# the fields of results.json (src/runtime/results.py) that the report and the plots need in every finished run
REQUIRED = {
    "config": dict,
    "dataset": str,
    "protocol": str,
    "ablation": str,
    "seed": int,
    "history": list,
    "test_at_best": dict,
}


def read_run(path: Path) -> dict[str, Any] | None:
    """One results.json with its folder as `path`; None when the run is not finished.

    A broken file (not JSON, truncated, a required field missing or of the wrong type, a history
    row without its round) raises ValueError naming the file and what is wrong.
    """
    try:
        payload = read_results(path)
    except OSError as err:
        raise ValueError(f"{path}: not a readable JSON file ({err})") from err
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(payload).__name__}")
    if not payload.get("finished"):
        return None
    for field, kind in REQUIRED.items():
        if not isinstance(payload.get(field), kind):
            found = "missing" if field not in payload else f"a {type(payload[field]).__name__}"
            raise ValueError(f"{path}: field {field!r} must be a {kind.__name__}, found {found}")
    for i, row in enumerate(payload["history"]):
        if not isinstance(row, dict) or not isinstance(row.get("round"), int):
            raise ValueError(f"{path}: history entry {i} has no integer 'round'")
    if not payload["test_at_best"]:  # no round was scored (a Flower run that lost a node every round)
        raise ValueError(f"{path}: no round was scored, so the run has no test figures to report")
    payload["path"] = str(path.parent)
    payload["config"] = moved(payload["config"])  # read under today's key names (a record keeps the names it ran with)
    return payload


def load_runs(folders: list[Path]) -> list[dict[str, Any]]:
    """Every finished results.json under `folders` (sorted by path), each with its folder as `path`.

    A broken results.json is named in a warning and skipped, so one bad run does not stop a report.
    """
    runs = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("results.json")):
            try:
                payload = read_run(path)
            except ValueError as err:
                warnings.warn(f"skipped {err}", stacklevel=2)
                continue
            if payload is not None:
                runs.append(payload)
    return runs


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and standard deviation over seeds, in percent (std 0 for one seed)."""
    if not values:
        return None, None
    pct = [100 * v for v in values]
    return statistics.mean(pct), (statistics.stdev(pct) if len(pct) > 1 else 0.0)


def claim_figure(mean: float | None, seeds: int) -> str:
    """A figure of the README's claims: the mean over seeds (percent), their number in brackets when not the 3 every
    table cell aims at; "missing" when nothing is stored."""
    if mean is None or not seeds:
        return "missing"
    return f"{mean:.2f}" + ("" if seeds == 3 else f" ({seeds} seed{'s' * (seeds > 1)})")


def cell(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"
