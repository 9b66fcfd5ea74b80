"""Whether a run's memory fits now, across the campaigns that share a work folder (src/cli/memory_wait.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from src.cli import campaign, memory_wait, recheck


def fake_machine(monkeypatch, available: float, rss: dict[int, float], total: float = 24.0) -> None:
    """This machine has `available` of `total` GiB free; process pid holds rss[pid] GiB and started at tick 1 (a pid
    absent from `rss` is gone; this test's own process lives, holding nothing)."""
    monkeypatch.setattr(memory_wait, "memory_gib", lambda: (available, total))
    monkeypatch.setattr(memory_wait, "rss_gib", lambda pid: rss.get(pid, 0.0))
    monkeypatch.setattr(memory_wait, "process_start", lambda pid: 1 if pid in rss or pid == os.getpid() else None)


def test_a_run_waits_for_what_the_reserved_running_runs_will_still_take(tmp_path, monkeypatch):
    """On 24 GiB with 8 free: an 11.3 GiB run waits, a 6.9 GiB run starts unless a running run expected at 10 GiB
    and now at 6 will take 4 more; runs at or past their peak, gone, of another machine or with an unreadable
    reservation add nothing (a gone one's file is removed); a run whose need is unknown, or more than the machine
    holds, starts."""
    fake_machine(monkeypatch, 8.0, {101: 6.0, 102: 12.0})
    assert memory_wait.short(11.3, memory_wait.free_now(tmp_path)) == "about 11.3 GiB needed, 8.0 GiB free"
    assert memory_wait.short(6.9, memory_wait.free_now(tmp_path)) == ""
    memory_wait.reserve(tmp_path, "at-peak", 102, 10.0)
    memory_wait.reserve(tmp_path, "gone", 103, 10.0)
    (tmp_path / "torn.1.mem").write_text('{"pid": 10')
    elsewhere = {"pid": 101, "start": 1, "host": "another-node", "peak_gib": 10.0}
    (tmp_path / "elsewhere.1.mem").write_text(json.dumps(elsewhere))
    assert memory_wait.free_now(tmp_path) == memory_wait.Free(8.0, 24.0, 0.0)
    assert not memory_wait.reservation_path(tmp_path, "gone").exists()
    assert memory_wait.reservation_path(tmp_path, "at-peak").exists() and (tmp_path / "elsewhere.1.mem").exists()
    memory_wait.reserve(tmp_path, "growing", 101, 10.0)
    free = memory_wait.free_now(tmp_path)
    assert free == memory_wait.Free(8.0, 24.0, 4.0)
    assert memory_wait.short(6.9, free) == "about 6.9 GiB needed, 4.0 GiB free once the running runs reach their peaks"
    assert memory_wait.short(None, free) == "" and memory_wait.short(30.0, free) == ""
    memory_wait.unreserve(tmp_path, "growing")
    assert memory_wait.short(6.9, memory_wait.free_now(tmp_path)) == ""
    memory_wait.reserve(tmp_path, "unknown", 101, None)  # a run of no stored kind reserves nothing
    assert not memory_wait.reservation_path(tmp_path, "unknown").exists()
    monkeypatch.setattr(memory_wait, "memory_gib", lambda: None)  # not Linux: nothing known, nothing held back
    assert memory_wait.short(11.3, memory_wait.free_now(tmp_path)) == ""


def test_the_machines_memory_and_processes_are_read_from_proc(tmp_path):
    """MemAvailable, a process's resident memory and start time from /proc; a reservation of this process counts its
    growth to the reserved peak, and one naming this pid with another start time (a reused pid) is removed."""
    machine = memory_wait.memory_gib()
    if machine is None:
        pytest.skip("no /proc/meminfo")
    available, total = machine
    assert 0 < available <= total
    assert 0 < memory_wait.rss_gib(os.getpid()) < total and memory_wait.rss_gib(2**22 + 7) == 0.0
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert memory_wait.process_start(child.pid) >= memory_wait.process_start(os.getpid()) > 0
    finally:
        child.kill()
        child.wait()
    assert memory_wait.process_start(child.pid) is None
    memory_wait.reserve(tmp_path, "me", os.getpid(), total)  # this process, far from its reserved peak
    assert memory_wait.free_now(tmp_path).growth == pytest.approx(total - memory_wait.rss_gib(os.getpid()), abs=0.05)
    assert json.loads(memory_wait.reservation_path(tmp_path, "me").read_text()) == {
        "pid": os.getpid(),
        "start": memory_wait.process_start(os.getpid()),
        "host": socket.gethostname(),
        "peak_gib": total,
    }
    reused = {"pid": os.getpid(), "start": memory_wait.process_start(os.getpid()) - 1, "host": socket.gethostname()}
    (tmp_path / "reused.1.mem").write_text(json.dumps({**reused, "peak_gib": total}))
    assert memory_wait.free_now(tmp_path).growth == pytest.approx(total - memory_wait.rss_gib(os.getpid()), abs=0.05)
    assert not (tmp_path / "reused.1.mem").exists()


def test_the_work_folder_lock_lets_one_campaign_check_at_a_time(tmp_path):
    """While one campaign holds its turn, another process cannot take it."""
    probe = (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "try: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')\n"
        "except BlockingIOError: print('held')"
    )

    def other() -> str:
        lock = tmp_path / "memory.lock"
        return subprocess.run([sys.executable, "-c", probe, str(lock)], capture_output=True, text=True).stdout.strip()

    with memory_wait.turn(tmp_path):
        assert other() == "held"
    assert other() == "free"


def smoke_run(name: str, est_min: float, mem: float) -> campaign.Run:
    config = {"dataset": {"name": "d"}, "ablation": {"name": name}, "protocol": {"name": "p"}, "seed": 0}
    return campaign.Run("t", [], config, name, "default", est_s=60.0 * est_min, mem_gib=mem)


def fake_launches(monkeypatch, rss: dict[int, float], ends_after: int = 3) -> list[str]:
    """`campaign.launch` starts a fake process (pid 201, 202, ...) that holds its run's memory at once and ends after
    `ends_after` polls; returns the list of what started, beside what, in order."""
    events: list[str] = []

    class Proc:
        def __init__(self, pid: int, size: float) -> None:
            self.pid, self.polls, self.returncode = pid, 0, 0
            rss[pid] = size

        def poll(self):
            self.polls += 1
            if self.polls < ends_after:
                return None
            rss.pop(self.pid, None)
            return 0

    def launch(run, *args, **kwargs):
        events.append(f"start {run.key} beside {sorted(k for k, v in rss.items() if v)}")
        return Proc(200 + len(events), run.mem_gib)

    monkeypatch.setattr(campaign, "launch", launch)
    monkeypatch.setattr(campaign, "take", lambda *a: True)
    monkeypatch.setattr(campaign, "release", lambda run: None)
    monkeypatch.setattr(campaign, "finish", lambda run, rc, *a: setattr(run, "status", "stored"))
    monkeypatch.setattr(campaign.time, "sleep", lambda s: None)
    return events


def test_a_run_that_does_not_fit_gives_its_turn_to_one_that_does(tmp_path, monkeypatch, capsys):
    """6 GiB free, a cheaper 10 GiB run and a dearer 4 GiB one: the 4 GiB run starts first, the 10 GiB run waits
    (one line) and starts once memory is free. Each pick is reserved before the turn ends (another lane's check
    counts it at once), and no reservation outlives its run."""
    rss: dict[int, float] = {}
    events = fake_launches(monkeypatch, rss)
    fake_machine(monkeypatch, 6.0, rss)
    polls: list[int] = []

    def memory_gib() -> tuple[float, float]:
        polls.append(1)
        assert len(polls) < 1000, "the campaign never started the waiting run"
        return (16.0 if events and not rss else 6.0), 24.0  # another program's 10 GiB freed as the 4 GiB run ends

    monkeypatch.setattr(memory_wait, "memory_gib", memory_gib)
    held_at_exit: list[list[str]] = []
    real_turn = memory_wait.turn

    @contextmanager
    def watched_turn(work):
        with real_turn(work):
            yield
            held_at_exit.append(sorted(p.name.split(".")[0] for p in work.glob("*.mem")))

    monkeypatch.setattr(memory_wait, "turn", watched_turn)
    runs = [smoke_run("big", 10.0, 10.0), smoke_run("small", 20.0, 4.0)]
    campaign.execute(runs, None, 2, tmp_path, None, 1, tmp_path / "runs")
    assert events == ["start small beside []", "start big beside []"]
    assert capsys.readouterr().out.count("wait   t/d/big/p/default/seed0 (about 10.0 GiB needed, 6.0 GiB free)") == 1
    assert held_at_exit[0] == ["small"] and ["big"] in held_at_exit  # reserved within the turn that picked it
    assert all(r.status == "stored" for r in runs) and not list(tmp_path.glob("*.mem"))


def test_a_lane_counts_what_another_lanes_new_run_will_still_take(tmp_path, monkeypatch, capsys):
    """Two lanes on one work folder. The other lane has just started a run expected to peak at 10 GiB (0.5 GiB
    resident so far): MemAvailable (16 GiB) still counts the 9.5 GiB it will take, so this lane's 8 GiB run waits
    until that run ends, instead of both growing into 18 GiB."""
    rss: dict[int, float] = {999: 0.5}
    events = fake_launches(monkeypatch, rss)
    fake_machine(monkeypatch, 16.0, rss)
    (tmp_path / "other.4242.mem").write_text(
        json.dumps({"pid": 999, "start": 1, "host": socket.gethostname(), "peak_gib": 10.0})
    )
    polls: list[int] = []

    def memory_gib() -> tuple[float, float]:
        polls.append(1)
        if len(polls) == 5:
            rss.pop(999)  # the other lane's run ends
        assert len(polls) < 1000
        return 16.0, 24.0

    monkeypatch.setattr(memory_wait, "memory_gib", memory_gib)
    (run,) = campaign.execute([smoke_run("mine", 10.0, 8.0)], None, 1, tmp_path, None, 1, tmp_path / "runs")
    assert events == ["start mine beside []"] and len(polls) >= 5
    out = capsys.readouterr().out
    assert "wait   t/d/mine/p/default/seed0 (about 8.0 GiB needed, 6.5 GiB free once the running runs reach" in out
    assert run.status == "stored" and not list(tmp_path.glob("*.mem"))  # the other lane's, stale, removed too


def test_a_recheck_starts_its_rerun_once_its_memory_is_free(tmp_path, monkeypatch, capsys):
    rss: dict[int, float] = {999: 1.0, 7: 0.1}
    fake_machine(monkeypatch, 12.0, rss)
    memory_wait.reserve(tmp_path, "lane", 999, 10.0)
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            rss.pop(999)

    monkeypatch.setattr(memory_wait.time, "sleep", sleep)
    proc = memory_wait.start_when_free(
        tmp_path, "recheck-1", 8.0, "python -m src.run x", lambda: SimpleNamespace(pid=7)
    )
    assert proc.pid == 7 and len(sleeps) == 3
    assert (
        capsys.readouterr().out
        == "wait   python -m src.run x (about 8.0 GiB needed, 3.0 GiB free once the running runs reach their peaks)\n"
    )
    assert json.loads(memory_wait.reservation_path(tmp_path, "recheck-1").read_text())["pid"] == 7


def test_a_failed_rerun_leaves_no_reservation(tmp_path, monkeypatch):
    """recheck's rerun ends with its reservation removed, whether its process fails or cannot start."""
    monkeypatch.setattr(recheck, "run_command", lambda args, threads: ([sys.executable, "-c", "exit(3)"], None))
    work = tmp_path / "work"
    with pytest.raises(recheck.RecheckError, match="failed"):
        recheck.rerun(["seed=0"], 1, tmp_path / "out", 1, work, "recheck-x", 0.001)
    assert not list(work.glob("*.mem"))
    monkeypatch.setattr(recheck, "run_command", lambda args, threads: ([str(tmp_path / "no-such-program")], None))
    with pytest.raises(FileNotFoundError):
        recheck.rerun(["seed=0"], 1, tmp_path / "out", 1, work, "recheck-x", 0.001)
    assert not list(work.glob("*.mem"))


def test_a_launchers_job_waits_for_the_peak_its_sweeper_named_and_holds_it_while_it_runs(tmp_path, monkeypatch, capsys):
    """`memory_wait.held` in a job's process: the peak from the environment (`hydra.job.env_set`), the work folder
    and key from the job's folder `<work>/<key>`; nothing without the variable; the reservation gone after the job,
    whether it ended well or not."""
    rss: dict[int, float] = {999: 2.0}
    fake_machine(monkeypatch, 10.0, rss)
    work = tmp_path / "work"
    work.mkdir()
    (work / "lane.4242.mem").write_text(
        json.dumps({"pid": 999, "start": 1, "host": socket.gethostname(), "peak_gib": 8.0})
    )
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        rss.pop(999)  # the other lane's run ends

    monkeypatch.setattr(memory_wait.time, "sleep", sleep)
    monkeypatch.delenv(memory_wait.PEAK_ENV, raising=False)
    with memory_wait.held(work / "k1", "job"):
        assert not list(work.glob("k1.*"))  # a plain src.run: nothing to wait for
    monkeypatch.setenv(memory_wait.PEAK_ENV, "7.5")
    with memory_wait.held(work / "k1", "table1 k1"):
        (reservation,) = work.glob("k1.*.mem")
        assert json.loads(reservation.read_text())["peak_gib"] == 7.5 and len(sleeps) == 1
    assert capsys.readouterr().out.startswith("wait   table1 k1 (about 7.5 GiB needed, 4.0 GiB free once")
    with pytest.raises(RuntimeError), memory_wait.held(work / "k2", "table1 k2"):
        assert list(work.glob("k2.*.mem"))
        raise RuntimeError("the job failed")
    assert not list(work.glob("*.mem"))


def test_a_job_counts_what_its_own_process_holds_and_a_slurm_job_does_not_wait(tmp_path, monkeypatch):
    """A launcher's worker that ran a job before holds 5 GiB already: a 7.5 GiB peak needs 2.5 more, which the 4 GiB
    free hold. Under SLURM the scheduler gave the job its memory: no wait, no reservation."""
    work = tmp_path / "work"
    fake_machine(monkeypatch, 4.0, {os.getpid(): 5.0})
    monkeypatch.setattr(memory_wait.time, "sleep", lambda s: pytest.fail("the job waited"))
    monkeypatch.setenv(memory_wait.PEAK_ENV, "7.5")
    with memory_wait.held(work / "k", "job"):
        assert list(work.glob("k.*.mem"))
    fake_machine(monkeypatch, 0.5, {})
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    with memory_wait.held(work / "k", "job"):
        assert not list(work.glob("*.mem"))


def test_the_campaign_sweeper_names_each_jobs_peak_in_the_environment_hydra_gives_the_job(tmp_path, monkeypatch):
    """The sweeper's job override, composed and applied as Hydra runs a job (`env_override` of hydra.job.env_set),
    is the peak `held` waits for; an unknown peak is an empty value, no wait."""
    from hydra.core.utils import env_override

    from hydra_plugins.alignfedrec_campaign.campaign_sweeper import CampaignSweeper
    from src.cli.jobs import compose_config

    sweeper = CampaignSweeper(runs=str(tmp_path / "runs"), work=str(tmp_path / "work"))
    known, unknown = smoke_run("a", 1.0, 8.6), smoke_run("b", 1.0, None)
    fake_machine(monkeypatch, 20.0, {})
    monkeypatch.delenv(memory_wait.PEAK_ENV, raising=False)
    for run, reserved in ((known, [8.6]), (unknown, [])):
        run.extra["resume"] = False
        overrides = [o for o in sweeper.job(run) if o.startswith("++hydra.job.env_set.")]
        env_set = compose_config(["dataset=synthetic", *overrides], hydra_node=True).hydra.job.env_set
        with env_override(env_set), memory_wait.held(tmp_path / "work" / run.key, run.label):
            peaks = [json.loads(p.read_text())["peak_gib"] for p in (tmp_path / "work").glob("*.mem")]
        assert peaks == reserved


def test_a_run_that_does_not_fit_is_passed_over_at_most_twice(tmp_path, monkeypatch, capsys):
    """6 GiB free, the cheapest run needs 10 and three dearer ones 2 each, one job at a time: two small runs go
    before the big one, then the campaign waits for it (one line) rather than start the third."""
    rss: dict[int, float] = {}
    events = fake_launches(monkeypatch, rss)
    fake_machine(monkeypatch, 6.0, rss)
    polls: list[int] = []
    idle: list[int] = []  # checks made with both small runs ended

    def memory_gib() -> tuple[float, float]:
        polls.append(1)
        assert len(polls) < 1000, "the campaign never started the waiting run"
        if len(events) >= 2 and not rss:
            idle.append(1)
        return (16.0 if len(idle) > 3 else 6.0), 24.0  # another program's 10 GiB freed a while after

    monkeypatch.setattr(memory_wait, "memory_gib", memory_gib)
    runs = [smoke_run("big", 10.0, 10.0), *(smoke_run(f"small{i}", 20.0 + i, 2.0) for i in (1, 2, 3))]
    campaign.execute(runs, None, 1, tmp_path, None, 1, tmp_path / "runs")
    assert [e.split()[1] for e in events] == ["small1", "small2", "big", "small3"]
    assert campaign.MAX_PASSES == 2
    out = capsys.readouterr().out
    assert out.count("wait   t/d/big/p/default/seed0 (about 10.0 GiB needed, 6.0 GiB free)") == 1


def wait_record(work, key: str, pid: int, need: float, since: float) -> None:
    """Another campaign's (process `pid`) record that it waits for `need` GiB to start `key` since `since`."""
    record = {"pid": pid, "start": 1, "host": socket.gethostname(), "need_gib": need, "since": since}
    (work / f"{key}.{pid}.wait").write_text(json.dumps(record))


def test_only_the_runs_waiting_longer_in_other_campaigns_are_kept_free(tmp_path, monkeypatch):
    """Process 998 has waited since t=50 for 3 GiB, 999 since t=200 for 5 GiB, 997 (gone) since t=10 for 9: a
    campaign that does not wait keeps 8 GiB for them; one waiting since t=100 keeps only the 3 of the run before it;
    the gone one's record is removed."""
    fake_machine(monkeypatch, 20.0, {998: 1.0, 999: 1.0})
    wait_record(tmp_path, "a", 998, 3.0, 50.0)
    wait_record(tmp_path, "b", 999, 5.0, 200.0)
    wait_record(tmp_path, "c", 997, 9.0, 10.0)
    assert memory_wait.free_now(tmp_path) == memory_wait.Free(20.0, 24.0, 0.0, 8.0)
    assert not (tmp_path / "c.997.wait").exists()
    monkeypatch.setattr(memory_wait.time, "time", lambda: 100.0)
    memory_wait.queue(tmp_path, "mine", 6.0)
    monkeypatch.setattr(memory_wait.time, "time", lambda: 300.0)
    memory_wait.queue(tmp_path, "mine", 6.0)  # waiting still: its place in the queue is kept
    assert memory_wait.free_now(tmp_path).queued == 3.0
    memory_wait.dequeue(tmp_path, "mine")
    assert memory_wait.free_now(tmp_path).queued == 8.0
    # a wait no lane could ever satisfy (more than is available plus what reserved runs hold) holds nothing back
    wait_record(tmp_path, "huge", 998, 22.0, 60.0)
    assert memory_wait.free_now(tmp_path).queued == 8.0
    memory_wait.reserve(tmp_path, "running", 999, 6.0)  # a running run of 1 GiB now: 21 GiB attainable, still short
    assert memory_wait.free_now(tmp_path).queued == 8.0
    (tmp_path / f"running.{os.getpid()}.mem").unlink()
    fake_machine(monkeypatch, 23.0, {998: 1.0, 999: 1.0})
    assert memory_wait.free_now(tmp_path).queued == 30.0


def test_a_small_run_waits_for_a_large_run_another_lane_has_waited_for_longer(tmp_path, monkeypatch, capsys):
    """Another lane has waited a minute for 10 GiB; 12 are free. This lane's 4 GiB run would fit, but would leave
    the other's too little: it waits (one line naming what is kept), its own wait recorded after the other's, and
    starts once the other lane's run has started and reserved its memory. No record outlives the campaign."""
    rss: dict[int, float] = {999: 0.2}
    events = fake_launches(monkeypatch, rss)
    fake_machine(monkeypatch, 12.0, rss)
    wait_record(tmp_path, "big", 999, 10.0, time.time() - 60)
    polls: list[int] = []
    mine_waits: list[bool] = []

    def memory_gib() -> tuple[float, float]:
        polls.append(1)
        mine_waits.append(any(tmp_path.glob(f"*.{os.getpid()}.wait")))
        if len(polls) == 5:  # the other lane starts its run: its wait becomes a reservation, its process grows
            (tmp_path / "big.999.wait").unlink()
            record = {"pid": 999, "start": 1, "host": socket.gethostname(), "peak_gib": 10.0}
            (tmp_path / "big.4242.mem").write_text(json.dumps(record))  # made by the other lane's campaign
            rss[999] = 10.0
        assert len(polls) < 1000, "the campaign never started its run"
        return (12.0 if len(polls) < 5 else 2.0 if len(polls) < 9 else 14.0), 24.0

    monkeypatch.setattr(memory_wait, "memory_gib", memory_gib)
    (run,) = campaign.execute([smoke_run("small", 10.0, 4.0)], None, 1, tmp_path, None, 1, tmp_path / "runs")
    assert events == ["start small beside [999]"] and len(polls) >= 9
    out = capsys.readouterr().out
    assert out.count("wait   t/d/small/p/default/seed0 (about 4.0 GiB needed, 12.0 GiB free, 10.0 GiB of it kept") == 1
    assert any(mine_waits[1:5])  # its own wait was recorded (behind the other's) while it waited
    assert run.status == "stored" and not list(tmp_path.glob(f"*.{os.getpid()}.*"))
