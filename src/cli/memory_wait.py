"""Whether the machine's memory can take one more run now, across every campaign that shares a work folder.

Memory, not cores, bounds how many ML-1M and Lastfm-2k runs a 24 GiB machine takes at once (7-11 GiB each,
docs/reproducing.md). A campaign that starts a run leaves a reservation beside the run's lock,
`<work>/<key>.<pid>.mem` = {"pid", "start": the run's process and its start time, "host": this machine,
"peak_gib": its expected peak}, named after the process that made it (the campaign; a launcher's job itself), and
removes it once it sees the run end. A run may start when its expected peak fits
in MemAvailable less what every running run with a reservation (this campaign's and the other lanes') will still grow
by before its peak. Under one lock of the work folder (`turn`) a campaign checks the memory and reserves it for the
run it picks (a placeholder in its own name until the run's process starts), so two lanes that start runs in the
same second cannot both count the same free memory. A reservation whose process is gone (its campaign killed, or a
pid reused since) is removed by the next check.

First come, first served across lanes: a campaign that waits for a run's memory (after giving its turn to smaller
runs at most `campaign.MAX_PASSES` times) records it in `<work>/<key>.<pid>.wait` (the same fields, `need_gib` and
`since`, its first wait), and every other campaign keeps that memory free for it: a run of theirs starts only if it
fits beside what the runs waiting longer need. So another lane's stream of small runs cannot keep a large run waiting
for ever; the run that has waited longest starts as soon as its memory is free.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from src.runtime.atomic import atomic_write_text
from src.runtime.device import proc_kib


@dataclass(frozen=True)
class Free:
    """The machine's memory now, GiB: `available` (MemAvailable), `total`, `growth`, what the running runs with a
    reservation will still take before they reach their expected peaks, and `queued`, what the runs other campaigns
    have waited for longer than the asking one need."""

    available: float
    total: float
    growth: float
    queued: float = 0.0

    @property
    def free(self) -> float:
        """What a run may take now."""
        return self.available - self.growth - self.queued


def memory_gib() -> tuple[float, float] | None:
    """(available, total) memory of this machine in GiB (/proc/meminfo: MemAvailable, MemTotal); None where unknown."""
    available, total = (proc_kib("/proc/meminfo", f) for f in ("MemAvailable", "MemTotal"))
    return None if available is None or total is None else (available / 2**20, total / 2**20)


def recorded_peak_gib(results: dict) -> float | None:
    """The peak resident memory (GiB) a stored run's results.json recorded (`resources.peak_rss_mib`); None where
    it recorded none: what a rerun of it, or a run of its kind, needs free."""
    mib = (results.get("resources") or {}).get("peak_rss_mib")
    return None if mib is None else mib / 1024


def rss_gib(pid: int) -> float:
    """Resident memory of process `pid` now, in GiB (0 when it is gone or unknown)."""
    return (proc_kib(f"/proc/{pid}/status", "VmRSS") or 0) / 2**20


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot, /proc/<pid>/stat field 22), telling it from a later process
    given the same pid; None when it is gone or unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])  # field 22 of the line; fields[0] is field 3, the state
    except (OSError, ValueError, IndexError):
        return None


def reservation_path(work: Path, key: str) -> Path:
    """This campaign's reservation for the run `key` (another campaign's for the same run is its own file)."""
    return work / f"{key}.{os.getpid()}.mem"


def reserve(work: Path, key: str, pid: int, peak_gib: float | None) -> None:
    """Record that process `pid` runs `key` (or, until its process starts, this campaign holds its place) and is
    expected to peak at `peak_gib`; nothing when that is unknown."""
    if peak_gib is None:
        return
    record = {"pid": pid, "start": process_start(pid), "host": socket.gethostname(), "peak_gib": peak_gib}
    atomic_write_text(reservation_path(work, key), json.dumps(record))


def unreserve(work: Path, key: str) -> None:
    """Remove this campaign's reservation for `key` (its run ended, or never started)."""
    reservation_path(work, key).unlink(missing_ok=True)


def live_records(work: Path, suffix: str, size: str) -> Iterator[dict]:
    """The records `<work>/*.<suffix>` made on this machine whose process still lives, each with its `size` field
    read as a float. One whose process is gone (the same pid with another start time is another process) is removed;
    an unreadable one, or one of another machine sharing the folder (its memory is not this one's), is skipped.
    Called under `turn`."""
    for path in sorted(work.glob(f"*.{suffix}")) if work.is_dir() else ():
        try:
            record = json.loads(path.read_text())
            record["pid"], record[size] = int(record["pid"]), float(record[size])
            host, start = record["host"], record["start"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if host != socket.gethostname():
            continue
        if start is None or process_start(record["pid"]) != start:
            path.unlink(missing_ok=True)
            continue
        yield record


def reservations(work: Path) -> Iterator[tuple[int, float]]:
    """(pid, expected peak GiB) of every live reservation in `work` (`live_records`)."""
    for record in live_records(work, "mem", "peak_gib"):
        yield record["pid"], record["peak_gib"]


def queue_path(work: Path, key: str) -> Path:
    """This process's record that it waits to start the run `key`."""
    return work / f"{key}.{os.getpid()}.wait"


def queue(work: Path, key: str, need_gib: float | None) -> None:
    """Record that this process waits for `need_gib` to start the run `key`; a record already there keeps its
    `since` (its place in the queue). Called under `turn`."""
    path = queue_path(work, key)
    if need_gib is None or path.exists():
        return
    pid = os.getpid()
    record = {"pid": pid, "start": process_start(pid), "host": socket.gethostname(), "need_gib": need_gib}
    atomic_write_text(path, json.dumps({**record, "since": time.time()}))


def dequeue(work: Path, key: str) -> None:
    """Remove this process's wait for `key` (its run started, or it no longer waits)."""
    queue_path(work, key).unlink(missing_ok=True)


def queued_before(work: Path, attainable: float) -> float:
    """GiB the runs other processes have waited for longer than this one (all of theirs when it does not wait) need:
    memory a run of this process leaves free for them. A wait for more than is `attainable` (what is available
    plus what the reserved running runs hold and will give back) is not honoured: nothing the lanes do could let it
    start, and holding memory back for it would stop every lane. Called under `turn`."""
    waits = list(live_records(work, "wait", "need_gib"))
    mine = [float(w["since"]) for w in waits if w["pid"] == os.getpid()]
    first = min(mine) if mine else float("inf")
    return sum(
        w["need_gib"]
        for w in waits
        if w["pid"] != os.getpid() and float(w.get("since", 0.0)) < first and w["need_gib"] <= attainable
    )


def free_now(work: Path) -> Free | None:
    """The machine's memory less what the reserved running runs will still grow by and what the runs other campaigns
    have waited for longer need; None where it is unknown (not Linux), and then nothing is held back."""
    machine = memory_gib()
    if machine is None:
        return None
    running = [(rss_gib(pid), peak) for pid, peak in reservations(work)]
    growth = sum(max(0.0, peak - rss) for rss, peak in running)
    attainable = machine[0] + sum(rss for rss, _ in running)
    return Free(machine[0], machine[1], growth, queued_before(work, attainable))


def short(need_gib: float | None, free: Free | None) -> str:
    """Why a run needing `need_gib` at its peak may not start now ('' when it may). A run whose need or the
    machine's memory is unknown, or that no amount freed could hold, starts."""
    if need_gib is None or free is None or need_gib > free.total or free.free >= need_gib:
        return ""
    later = " once the running runs reach their peaks" if free.growth else ""
    kept = f", {free.queued:.1f} GiB of it kept for runs other campaigns have waited for longer" if free.queued else ""
    return f"about {need_gib:.1f} GiB needed, {free.available - free.growth:.1f} GiB free{later}{kept}"


@contextmanager
def turn(work: Path) -> Iterator[None]:
    """Hold the work folder's memory lock (`<work>/memory.lock`): one campaign at a time checks memory and
    reserves what it starts."""
    work.mkdir(parents=True, exist_ok=True)
    fd = os.open(work / "memory.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def wait_and_reserve(work: Path, key: str, need_gib: float | None, label: str, runs_here: bool = False) -> None:
    """Wait until a run needing `need_gib` at its peak fits (one `wait <label> (...)` line until then), then reserve
    that memory under `key` in this process's name before another check can count it free. `runs_here`: the run
    is this process (a launcher's job), whose memory held already (a previous job's) counts towards its peak."""
    waited = False
    try:
        while True:
            with turn(work):
                held_now = rss_gib(os.getpid()) if runs_here and need_gib is not None else 0.0
                why = short(None if need_gib is None else max(0.0, need_gib - held_now), free_now(work))
                if not why:
                    reserve(work, key, os.getpid(), need_gib)
                    return
                queue(work, key, None if need_gib is None else need_gib - held_now)  # kept free for it from now on
            if not waited:
                print(f"wait   {label} ({why})", flush=True)
                waited = True
            time.sleep(1.0)
    finally:
        dequeue(work, key)


def start_when_free(
    work: Path, key: str, need_gib: float | None, label: str, start: Callable[[], subprocess.Popen]
) -> subprocess.Popen:
    """`start()` a run's process once its expected peak fits and reserve its memory under `key`; the caller
    `unreserve`s when the process ends. For a command that runs one process at a time (`recheck`); the campaign
    picks among its pending runs the first that fits instead."""
    wait_and_reserve(work, key, need_gib, label)  # in this process's name until its own starts
    try:
        proc = start()
    except BaseException:
        unreserve(work, key)
        raise
    reserve(work, key, proc.pid, need_gib)
    return proc


# A job a Hydra launcher runs for the campaign sweeper (hydra_plugins/alignfedrec_campaign) carries its run's expected
# peak in this variable (`hydra.job.env_set`); the job waits for that memory in its own process (`held`).
PEAK_ENV = "ALIGNFEDREC_PEAK_GIB"


@contextmanager
def held(run_dir: Path, label: str) -> Iterator[None]:
    """Within a launcher's job: wait until the peak named by `PEAK_ENV` fits beside the runs of the work folder
    (`run_dir`'s parent, the run's key its name), hold the reservation while the job runs, and remove it after.
    Nothing to wait for where the variable is unset or empty (a plain `src.run` or multirun, a run of no stored
    kind), nor in a SLURM job (`SLURM_JOB_ID`: the scheduler gave it its memory; the node's is not the lanes')."""
    need = os.environ.get(PEAK_ENV, "")
    if not need or os.environ.get("SLURM_JOB_ID"):
        yield
        return
    work, key = run_dir.parent, run_dir.name
    wait_and_reserve(work, key, float(need), label, runs_here=True)
    try:
        yield
    finally:
        unreserve(work, key)
