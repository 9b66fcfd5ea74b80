"""`python -m src.campaign experiment=table1 [experiment=table2 ...] [overrides] --budget-min 150 --jobs 2`

A resumable campaign that keeps its runs in the repository. It expands each experiment overlay's
grid (`hydra.sweeper.params`, narrowed or widened by `key=a,b` on the command line), skips every
run already stored under `results/runs/` (identified by its resolved config, not by the commit),
orders the rest by estimated cost, and runs what fits in the budget, `--jobs` at a time with one
torch thread each. A finished run is stored compactly:

    results/runs/<experiment>/<dataset>/<ablation>/<protocol>/<variant>/seed<k>/
        results.json   the run's results with its whole history (compact JSON)
        config_resolved.yaml
        run.json       identity key, overrides, commit it ran at, device, seconds

Work folders (checkpoints) live outside the repository (`--work`, default
`$ALIGNFEDREC_CACHE/campaign`): a run cut by the budget is stopped with SIGTERM (it finishes its
round and checkpoints) and resumes from there the next time, while its checkpoint is still there.
Campaigns may share a work folder: each run is claimed by a lock (`<key>.lock`, held by the campaign and
the run's own process), so two campaigns never run the same run, and a run another campaign stored
since this one planned is not run again.
`python -m src.campaign store <run folder> ...` stores runs made by hand (`python -m src.run`);
`python -m src.campaign recheck <stored run folder> ...` reruns a stored run's first rounds with today's code and
compares them with its history (src/cli/recheck.py).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from src.cli import memory_wait, recheck
from src.cli.config import CONF_DIR, simulator_checks, validate_device
from src.cli.jobs import check_job, compose_config, compose_runs, grid_jobs, run_command
from src.cli.store import (
    REPO,
    RUNS,
    computation_overrides,
    git_commit,
    record_key,
    refuse_other_experiment,
    refuse_unreportable,
    run_overrides,
    store,
    stored_runs,
    variant_name,
)
from src.config.identity import identity
from src.methods.base import method_class
from src.runtime.cache import default_cache_dir
from src.runtime.errors import OneLineParser
from src.runtime.round_estimate import estimated_round_seconds

BENCH = REPO / "results" / "bench"
# how many smaller runs a campaign starts before a run whose memory does not fit, before it waits for that run
MAX_PASSES = 2


@dataclass(eq=False)
class Run:
    """One run of the campaign: where it belongs, how to start it, what it is, what it costs."""

    experiment: str
    overrides: list[str]
    config: dict[str, Any]
    key: str
    variant: str
    est_s: float = 0.0
    mem_gib: float | None = None  # peak resident memory of stored runs of its kind (None: none stored)
    status: str = "pending"
    stored: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        c = self.config
        return (
            f"{self.experiment}/{c['dataset']['name']}/{c['ablation']['name']}/{c['protocol']['name']}/"
            f"{self.variant}/seed{c['seed']}"
        )


def expand(experiment: str, cli: list[str]) -> list[Run]:
    """The runs of one overlay: its sweeper grid with the command line's values replacing or adding axes."""
    params = (
        OmegaConf.select(compose_config([f"experiment={experiment}"], hydra_node=True), "hydra.sweeper.params") or {}
    )
    every = [[f"experiment={experiment}", *job] for job in grid_jobs(dict(params), cli)]
    runs = []
    for overrides, cfg in zip(every, compose_runs(every)):
        check_job(cfg, simulator_checks)  # what `src.run` refuses before any job starts
        config = OmegaConf.to_container(cfg, resolve=True)
        refuse_unreportable(config, " ".join(overrides))
        runs.append(
            Run(experiment, overrides, config, identity(config), variant_name(computation_overrides(overrides)))
        )
    return runs


def trains_aligned(ablation: dict[str, Any]) -> bool:
    """Whether an ablation group's values (resolved or as written in its yaml) train with ICA or GSA."""
    return bool(ablation.get("ica") or ablation.get("gsa"))


@cache
def aligns(ablation: str) -> bool:
    """Whether `ablation=<ablation>` trains with an alignment term (ICA or GSA), as composed (a yaml may take its
    keys from another: no_ica includes full)."""
    if not (CONF_DIR / "ablation" / f"{ablation}.yaml").is_file():
        return False
    return trains_aligned(OmegaConf.to_container(compose_config([f"ablation={ablation}"]).ablation, resolve=False))


def run_kind(config: dict[str, Any]) -> tuple:
    """What a run's round time depends on: dataset, whether and how it aligns, the method, the device, the
    optimiser (the lineage SGD engine's local steps cost other than Adam's)."""
    ab = config["ablation"]
    aligned = trains_aligned(ab)
    mode = config["model"]["alignment"] if aligned else "-"
    return (
        config["dataset"]["name"],
        aligned,
        mode,
        ab.get("name"),
        str(config.get("device", "auto")),
        str(config.get("optim", {}).get("name", "-")),
    )


@cache
def uploads_similarity(method: str | None) -> bool:
    """Whether the clients of `ablation.method` upload item-item similarities (the method class's trait: AlignFedRec,
    fed_itemknn): its round costs the server's sums of m x m uploads whether or not it trains an alignment term."""
    if method is None:
        return False
    return bool(method_class(OmegaConf.create({"ablation": {"method": method}})).uploads_similarity)


def newest_of_kind(
    kind: tuple,
    stored: list[dict[str, Any]],
    value: Callable[[dict], float | None],
    prefer: Callable[[dict], bool] = lambda r: True,
) -> list[float]:
    """`value` of each of the three runs of `kind` stored last that recorded one (older runs ran other code), those
    `prefer` picks first; for an aligned kind with none, of another aligned ablation alike in all else (the
    alignment's sums are most of such a round, whichever term is off). What the time and memory estimates read of
    the stored runs."""

    def newest(alike: Callable[[tuple], bool], preferred: bool) -> list[float]:
        rows = sorted(
            (r.get("stored_at", ""), v)
            for r in stored
            if alike(r["kind"]) and (not preferred or prefer(r)) and (v := value(r))
        )
        return [v for _, v in rows[-3:]]

    tiers = [lambda k: k == kind]
    if kind[1]:
        tiers.append(lambda k: k[:3] == kind[:3] and k[4:] == kind[4:])
    for alike in tiers:
        if found := newest(alike, True) or newest(alike, False):
            return found
    return []


def seconds_per_round(
    config: dict[str, Any], stored: list[dict[str, Any]], bench_dir: Path | None = None, threads: int = 1
) -> float:
    """Estimated seconds per round of a job with `threads` torch threads. The newest stored runs of the same kind
    (`newest_of_kind`: for an aligned run without any, of another aligned ablation alike in all else), those that
    ran with `threads` too first (one that recorded no count counts as one thread); each scaled by its threads over
    `threads` (time does not scale with the count alone: a one-thread ML-1M `knn_ica` job beside another took 1.7
    times a two-thread run's time).
    Else bench reports of the dataset (of the same method when there are some, else of the same kind; a method that
    uploads similarities without aligning is costed as an aligned run, its sums being most of a round; each scaled
    by the torch threads it recorded, two where it recorded none); else scaled from ML-100K. Older runs and bench
    reports measured slower implementations: of stored runs the three stored last count, of bench reports the
    fastest."""
    kind = run_kind(config)
    ds, aligned, mode = kind[:3]
    uploads = uploads_similarity(config["ablation"].get("method"))
    newest = newest_of_kind(
        kind,
        stored,
        lambda r: r["mean_round_s"] and r["mean_round_s"] * (r.get("threads") or 1) / threads,
        prefer=lambda r: (r.get("threads") or 1) == threads,
    )
    if newest:
        return sum(newest) / len(newest)
    benched: list[tuple[bool, float]] = []  # (of the same method, seconds)
    for path in sorted((bench_dir or BENCH).glob("*.json")):
        bench = json.loads(path.read_text())
        if bench.get("dataset") != ds or not isinstance(bench.get("seconds_per_round"), dict):
            continue
        bench_aligned = aligns(str(bench.get("ablation")))
        exact = any(o == "model.alignment=exact" for o in bench.get("overrides", []))
        bench_mode = ("exact" if exact else "fast") if bench_aligned else "-"
        alike = bench_aligned if uploads and not aligned else bench_aligned == aligned and bench_mode in (mode, "-")
        same = bench.get("ablation") == kind[3] and bench_mode in (mode, "-")
        if alike or same:
            bench_threads = (bench.get("device") or {}).get("torch_threads") or 2
            benched.append((same, estimated_round_seconds(bench) * bench_threads / threads))
    if benched:
        own = [secs for same, secs in benched if same]
        return min(own or [secs for _, secs in benched])
    users, items = {
        "ml-100k": (943, 1682),
        "filmtrust": (1227, 2071),
        "ml-1m": (6040, 3706),
        "lastfm-2k": (1600, 12454),
    }.get(ds, (943, 1682))
    heavy = aligned or uploads
    scale = users * items / (943 * 1682) * (items / 1682 if heavy else 1.0)
    return (15.0 if heavy else 1.0) * scale


def peak_memory_gib(config: dict[str, Any], stored: list[dict[str, Any]]) -> float | None:
    """The largest peak resident memory (GiB) of the three runs of the same kind stored last (`run_kind`; for an
    aligned run without any, of another aligned ablation alike in all else, as `seconds_per_round` borrows); None
    when none recorded it. What a lane needs free before it starts the run: memory, not cores, bounds how many
    ML-1M and Lastfm-2k runs a machine takes at once (docs/reproducing.md)."""
    peaks = newest_of_kind(run_kind(config), stored, lambda r: r.get("peak_gib"))
    return max(peaks) if peaks else None


def cost_text(run: Run) -> str:
    """`est 117.7 min, about 8.7 GiB`: a run's estimated time as a one-thread job and, where stored runs of its kind
    recorded it, its peak memory."""
    memory = "" if run.mem_gib is None else f", about {run.mem_gib:.1f} GiB"
    return f"est {run.est_s / 60:.1f} min{memory}"


def plan(experiments: list[str], cli: list[str], root: Path = RUNS, threads: int = 1) -> list[Run]:
    """Every run of the experiments, each marked stored or pending, pending ones costed as jobs of `threads` torch
    threads; duplicates dropped."""
    done = stored_runs(root)
    stats = []
    for folder in done.values():
        try:
            payload = json.loads((folder / "results.json").read_text())
            stored_at = str(json.loads((folder / "run.json").read_text()).get("stored_at", ""))
        except (OSError, ValueError):
            continue
        stats.append(
            {
                "kind": run_kind(payload["config"]),
                "mean_round_s": payload.get("timings", {}).get("mean_round_s"),
                "threads": payload.get("resources", {}).get("torch_threads"),
                "peak_gib": memory_wait.recorded_peak_gib(payload),
                "stored_at": stored_at,
            }
        )
    runs, seen = [], set()
    for experiment in experiments:
        for run in expand(experiment, cli):
            if run.key in seen:
                continue
            seen.add(run.key)
            if run.key in done:
                run.status, run.stored = "stored", done[run.key]
            else:
                run.est_s = seconds_per_round(run.config, stats, threads=threads) * int(run.config["fl"]["rounds"])
                run.mem_gib = peak_memory_gib(run.config, stats)
            runs.append(run)
    return runs


def work_dir(work: Path, run: Run) -> Path:
    return work / run.key


def checkpointed(folder: Path) -> bool:
    """A work folder whose last checkpoint and its record are both there (the run can resume)."""
    return (folder / "checkpoints" / "last.ckpt").is_file() and (folder / "checkpoints" / "last.json").is_file()


def claim(work: Path, run: Run, tries: int = 3) -> int | None:
    """Lock `<work>/<key>.lock` (flock) and return its descriptor, or None when another process holds it. The lock
    lasts while any process holding the descriptor lives: the campaign, and the run it passes it to. A refusal is
    retried (`tries`, 0.2 s apart): another campaign's `claimed_elsewhere` holds the lock for an instant."""
    fd = os.open(work / f"{run.key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if attempt + 1 < tries:
                time.sleep(0.2)
    os.close(fd)
    return None


def claimed_elsewhere(work: Path, run: Run) -> bool:
    """Whether another campaign (or a run it left behind) holds the run's lock now."""
    if not (work / f"{run.key}.lock").is_file():
        return False
    fd = claim(work, run, tries=1)
    if fd is not None:
        os.close(fd)
    return fd is None


def take(work: Path, run: Run, root: Path) -> bool:
    """Claim a pending run for this campaign (its lock in `run.extra`); False, with a line saying why, when another
    campaign runs it or has stored it since this one planned."""
    if (lock := claim(work, run)) is None:
        run.status = "elsewhere"
        print(f"skip   {run.label} (another campaign runs it)", flush=True)
        return False
    run.extra["lock"] = lock
    if (folder := stored_runs(root).get(run.key)) is not None:
        release(run)
        run.status, run.stored = "stored", folder
        print(f"skip   {run.label} (stored since this campaign planned)", flush=True)
        return False
    return True


def release(run: Run) -> None:
    """Close this campaign's descriptor of the run's lock (the lock ends when the run's process has ended too)."""
    fd = run.extra.pop("lock", None)
    if fd is not None:
        os.close(fd)


def resumes(work: Path, run: Run) -> bool:
    """Whether `run` resumes from its work folder's checkpoint; a folder that never reached one is removed (the run
    begins again there)."""
    folder = work_dir(work, run)
    resume = checkpointed(folder)
    if folder.exists() and not resume:
        shutil.rmtree(folder)
    return resume


def launch(run: Run, work: Path, device: str | None, threads: int, compiled: bool = False) -> subprocess.Popen:
    """Start `python -m src.run` for `run` in its work folder, resuming its checkpoint when there is one
    (`compiled`: with `compute.compile=true`, a speed key: the run's identity is unchanged). The run's process
    inherits the run's lock (`claim`), so a run outliving its campaign stays claimed."""
    folder = work_dir(work, run)
    resume = resumes(work, run)
    on_device = [f"device={device}", *(["fl.chunk_size=auto"] if device.startswith("cuda") else [])] if device else []
    speed = ["compute.compile=true"] if compiled else []  # a run on a GPU keeps eager kernels (methods/alignfedrec.py)
    args = [*run.overrides, *on_device, *speed, f"hydra.run.dir={folder}", *(["resume=true"] if resume else [])]
    argv, env = run_command(args, threads)
    folder.parent.mkdir(parents=True, exist_ok=True)
    log = open(work / f"{run.key}.log", "a")
    print(f"start  {run.label} ({'resume' if resume else 'new'}, {cost_text(run)})", flush=True)
    lock = run.extra.get("lock")
    return subprocess.Popen(
        argv,
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        pass_fds=() if lock is None else (lock,),
    )


def execute(
    runs: list[Run],
    budget_s: float | None,
    jobs: int,
    work: Path,
    device: str | None,
    threads: int,
    root: Path = RUNS,
    commit_each: bool = False,
    compiled: bool = False,
) -> list[Run]:
    """Run the pending runs, cheapest first, `jobs` at a time, within the budget; store each as it ends. A run whose
    expected peak memory does not fit now gives its turn to the next that does (src/cli/memory_wait.py), at most
    `MAX_PASSES` times; then the campaign starts nothing before it, and the other campaigns of the work folder keep
    its memory free for it."""
    pending = sorted((r for r in runs if r.status == "pending"), key=lambda r: r.est_s)
    running: dict[Run, subprocess.Popen] = {}
    waited: set[str] = set()
    passed: dict[str, int] = {}  # how many runs went before a run that did not fit in memory
    start = time.monotonic()
    try:
        while pending or running:
            left = None if budget_s is None else budget_s - (time.monotonic() - start)
            if left is not None and left <= 0:
                for proc in running.values():
                    proc.send_signal(15)  # SIGTERM: the run finishes its round, checkpoints, exits
                for run, proc in running.items():
                    proc.wait()
                    memory_wait.unreserve(work, run.key)
                    release(run)
                    run.status = "partial" if checkpointed(work_dir(work, run)) else "cut"
                break
            while pending and len(running) < jobs:
                # the runs that fit in the budget; when none does, the cheapest (a cut run resumes next time)
                fits = [r for r in pending if left is None or r.est_s <= left] or pending[:1]
                with memory_wait.turn(work):  # one campaign at a time checks memory and reserves it for its pick
                    free = memory_wait.free_now(work)
                    nxt = next((r for r in fits if not memory_wait.short(r.mem_gib, free)), None)
                    if nxt is not None and nxt is not fits[0]:  # a smaller run goes before the one that does not fit,
                        if passed.get(fits[0].key, 0) >= MAX_PASSES:  # at most MAX_PASSES times: then it waits for it
                            nxt = None
                        else:
                            passed[fits[0].key] = passed.get(fits[0].key, 0) + 1
                            memory_wait.dequeue(work, fits[0].key)  # passed over: not yet a claim on the others' memory
                    if nxt is not None:
                        memory_wait.reserve(work, nxt.key, os.getpid(), nxt.mem_gib)  # its place, until it starts
                        memory_wait.dequeue(work, nxt.key)
                    else:  # the other campaigns keep its memory free for it from now on (first come, first served)
                        memory_wait.queue(work, fits[0].key, fits[0].mem_gib)
                if nxt is None:  # none fits in memory now: wait for a run to end (this campaign's or another's)
                    if fits[0].key not in waited:
                        print(f"wait   {fits[0].label} ({memory_wait.short(fits[0].mem_gib, free)})", flush=True)
                        waited.add(fits[0].key)
                    break
                pending.remove(nxt)
                if not take(work, nxt, root):
                    memory_wait.unreserve(work, nxt.key)
                    continue
                try:
                    running[nxt] = launch(nxt, work, device, threads, compiled)
                except BaseException:
                    memory_wait.unreserve(work, nxt.key)
                    release(nxt)
                    raise
                memory_wait.reserve(work, nxt.key, running[nxt].pid, nxt.mem_gib)
            for run, proc in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[run]
                memory_wait.unreserve(work, run.key)
                try:
                    finish(run, proc.returncode, work, root, commit_each)
                finally:
                    release(run)  # only once stored and its work folder gone: no other campaign resumes it meanwhile
            time.sleep(1.0)
    finally:  # no wait outlives the campaign's loop, however it ends (a killed campaign's goes stale)
        for run in runs:
            memory_wait.dequeue(work, run.key)
    return runs


def finish(run: Run, returncode: int, work: Path, root: Path, commit_each: bool) -> None:
    """Store a run whose process ended well (and drop its work folder), or mark it failed."""
    folder = work_dir(work, run)
    if returncode == 0 and (folder / "results.json").is_file():
        run.stored = store(folder, run.experiment, computation_overrides(run.overrides), root)
        run.status = "stored"
        print(
            f"stored {run.label} -> {run.stored.relative_to(REPO) if run.stored.is_relative_to(REPO) else run.stored}",
            flush=True,
        )
        if commit_each:
            commit_run(run)
        shutil.rmtree(folder, ignore_errors=True)
    else:
        run.status = "failed"
        print(f"FAILED {run.label} (exit {returncode}); log: {work / (run.key + '.log')}", flush=True)


def commit_run(run: Run) -> None:
    """`git commit` the stored run's folder alone (nothing else staged goes with it)."""
    rel = str(run.stored.relative_to(REPO))
    subprocess.run(["git", "add", "--", rel], cwd=REPO, check=True)
    subprocess.run(["git", "commit", "-q", "-m", f"results: {run.label}", "--", rel], cwd=REPO, check=True)


def summary(runs: list[Run], work: Path) -> str:
    """One line per run state (and how many run in another campaign now), the estimated hours left, then the runs
    in flight elsewhere, partial, cut, failed and pending by name."""
    for run in runs:
        if run.status == "pending" and claimed_elsewhere(work, run):
            run.status = "elsewhere"
        elif run.status == "pending" and checkpointed(work_dir(work, run)):
            run.status = "partial"
    counts = {s: sum(r.status == s for r in runs) for s in ("stored", "partial", "pending", "cut", "failed")}
    elsewhere = sum(r.status == "elsewhere" for r in runs)
    lines = [" ".join(f"{k} {v}" for k, v in counts.items()) + f" of {len(runs)} runs"]
    if elsewhere:
        lines[0] += f" ({elsewhere} running in another campaign)"
    left = sum(r.est_s for r in runs if r.status in ("pending", "partial", "cut"))
    if left:
        lines.append(f"  left: about {left / 3600:.1f} h of one-thread jobs (partial and cut runs counted whole)")
    for state in ("elsewhere", "partial", "cut", "failed", "pending"):
        for run in sorted(runs, key=lambda r: r.est_s):
            if run.status == state:
                cost = f", {cost_text(run)}" if state == "pending" else ""
                lines.append(f"  {state:8s} {run.label}{cost}")
    return "\n".join(lines)


def through_launcher(
    experiments: list[str], overrides: list[str], work: Path, runs: Path, threads: int, compiled: bool
) -> int:
    """Hand the campaign to a Hydra launcher (`hydra/launcher=...` among the overrides): the same planning and
    storing as a Hydra sweeper (`hydra/sweeper=campaign`, hydra_plugins/alignfedrec_campaign), in a `src.run`
    multirun; returns its exit status."""
    sweeper = [
        "hydra/sweeper=campaign",
        f"experiment={','.join(experiments)}",
        f"hydra.sweeper.work={work}",
        f"hydra.sweeper.runs={runs}",
        f"hydra.sweeper.threads={threads}",
        f"hydra.sweeper.compile={str(compiled).lower()}",
    ]
    cmd = [sys.executable, "-m", "src.run", "-m", *sweeper, *overrides]
    print("through a Hydra launcher:", shlex.join(cmd[1:]), flush=True)
    return subprocess.run(cmd, cwd=REPO).returncode


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        prog="python -m src.campaign", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "args",
        nargs="*",
        help="experiment=<overlay> (repeatable) and key=value[,value] overrides; or `store <run folder>...`; or "
        "`recheck <stored run folder>...`",
    )
    parser.add_argument("--budget-min", type=float, default=None, help="stop (SIGTERM, checkpoint) after this long")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run with compute.compile=true (CPU runs repay its seconds of compiling; docs/performance.md)",
    )
    parser.add_argument("--device", default=None, help="device= of every run; cuda also sizes cohorts from free memory")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="work folders (checkpoints) and memory reservations, outside the repository; recheck counts the runs "
        "of this folder before it starts its rerun",
    )
    parser.add_argument("--runs", type=Path, default=RUNS, help="where finished runs are stored")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    parser.add_argument("--git-commit", action="store_true", help="git commit each stored run as it lands")
    parser.add_argument("--experiment", help="store: the experiment the runs belong to")
    parser.add_argument("--variant", help="store: the variant folder name (default: from the overrides)")
    parser.add_argument(
        "--commit",
        help="store: the commit of runs written before runs recorded their own (default: this checkout's)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="recheck: the first rounds rerun and compared")
    parser.add_argument(
        "--atol", type=float, default=0.0025, help="recheck: the largest metric difference (a fraction of users)"
    )
    parser.add_argument("--rtol", type=float, default=1e-4, help="recheck: the largest relative loss difference")
    ns = parser.parse_args(argv)
    for flag, value in (("--jobs", ns.jobs), ("--threads", ns.threads)):
        if value < 1:
            parser.error(f"{flag} {value} is invalid; expected an integer >= 1")
    if ns.budget_min is not None and not ns.budget_min > 0:
        parser.error(f"--budget-min {ns.budget_min} is invalid; expected a number of minutes > 0")
    if ns.device is not None:
        validate_device(ns.device)
    work = ns.work or default_cache_dir() / "campaign"
    if ns.args[:1] == ["recheck"]:
        if ns.rounds < 1:
            parser.error(f"--rounds {ns.rounds} is invalid; expected an integer >= 1")
        if not ns.args[1:]:
            parser.error("recheck needs stored run folders (results/runs/.../seed<k>)")
        failed = 0
        for folder in map(Path, ns.args[1:]):
            try:  # one folder that cannot be rechecked never stops the others
                result = recheck.recheck(folder, ns.rounds, ns.atol, ns.rtol, ns.threads, work, ns.device)
            except recheck.RecheckError as err:
                print(f"{'not rechecked':16} {err}", flush=True)
                failed += 1
                continue
            print(recheck.summary(result), flush=True)
            failed += bool(result.beyond)
        return int(failed > 0)
    if ns.args[:1] == ["store"]:
        if not ns.experiment:
            parser.error("store needs --experiment")
        done = stored_runs(ns.runs)
        for folder in map(Path, ns.args[1:]):
            overrides = run_overrides(folder)
            refuse_other_experiment(folder, overrides, ns.experiment)
            try:
                key = record_key(folder / "results.json")
            except (OSError, ValueError, KeyError):
                key = None  # no readable record: store says what is missing
            if (held := done.get(key)) is not None:
                print(f"not stored {folder}: the same computation is stored in {held}")
                continue
            dest = store(folder, ns.experiment, overrides, ns.runs, ns.variant, ns.commit or git_commit())
            done[key] = dest  # store raised where there was no readable record
            print(f"stored {folder} -> {dest}")
        return 0
    experiments = [a.split("=", 1)[1] for a in ns.args if a.startswith("experiment=")]
    overrides = [a for a in ns.args if not a.startswith("experiment=")]
    if not experiments:
        parser.error("name at least one experiment=<overlay> (conf/experiment/)")
    bad = [a for a in overrides if "=" not in a]
    if bad:
        parser.error(f"expected key=value overrides, got {bad}")
    # a launcher and its settings say where runs execute, never what a run is: not part of the plan
    launcher = [a for a in overrides if a.startswith(("hydra/launcher=", "hydra.launcher."))]
    overrides = [a for a in overrides if a not in launcher]
    if launcher and not ns.dry_run:
        if ns.budget_min is not None or ns.git_commit or ns.device is not None:
            parser.error(
                "--budget-min, --git-commit and --device are the process loop's; expected them without "
                "hydra/launcher=, or the launcher's own settings (e.g. hydra.launcher.timeout_min)"
            )
        return through_launcher(experiments, overrides + launcher, work, ns.runs, ns.threads, ns.compile)
    runs = plan(experiments, overrides, ns.runs, ns.threads)
    if not ns.dry_run:
        work.mkdir(parents=True, exist_ok=True)
        execute(
            runs,
            None if ns.budget_min is None else 60 * ns.budget_min,
            ns.jobs,
            work,
            ns.device,
            ns.threads,
            ns.runs,
            ns.git_commit,
            ns.compile,
        )
    print(summary(runs, work))
    return int(any(r.status == "failed" for r in runs))
