"""Trustworthy run folders: a resume under another config is refused, SIGTERM fails loudly and stays
resumable, one run per folder, checkpoints carry a digest, refused configs leave nothing behind."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from src.cli import train as train_module
from src.cli.store import store
from src.cli.train import ResumeError, train
from src.config.identity import resume_mismatch
from src.runtime import rundir
from src.runtime.checkpoint import CheckpointError, read_record, sha256_file
from tests.conftest import requires_real_data

REPO = Path(__file__).resolve().parents[1]
SYNTH = ["dataset=synthetic", "ablation=backbone", "optim=sgd", "fl.checkpoint_every=1"]
SMALL_FILMTRUST = ["dataset=filmtrust", "data.max_users=30", "ablation=backbone", "optim=sgd"]


def cli(args: list[str], tmp_path: Path, **kw) -> subprocess.CompletedProcess:
    """`python -m src.run <args>` in a fresh process with the test's isolated caches."""
    env = {**os.environ, "ALIGNFEDREC_CACHE": str(tmp_path / "cache")}
    env.pop("ALIGNFEDREC_DATA", None)
    return subprocess.run(
        [sys.executable, "-m", "src.run", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, **kw
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (but the lock and Hydra's log) with its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (rundir.LOCK_NAME, "run.log")
    }


def test_resume_mismatch_lists_result_keys_only():
    saved = {"seed": 0, "protocol": {"name": "clean"}, "fl": {"rounds": 10, "lr_list": [1, 2]}, "logger": {"a": 1}}
    now = {"seed": 7, "protocol": {"name": "paper"}, "fl": {"rounds": 20, "lr_list": [1, 3]}, "logger": {"a": 2}}
    assert resume_mismatch(saved, now) == [
        "fl.lr_list: [1, 2] -> [1, 3]",
        "protocol.name: 'clean' -> 'paper'",
        "seed: 0 -> 7",
    ]
    assert resume_mismatch(saved, {**saved, "fl": {"rounds": 99, "lr_list": [1, 2]}}) == []


def test_resume_with_another_config_is_refused_before_writing(compose_cfg, tmp_path):
    run_dir = tmp_path / "run"
    first = train(compose_cfg(SYNTH + ["fl.rounds=2"]), run_dir, progress=False)
    before = snapshot(run_dir)
    with pytest.raises(ResumeError, match=r"differing keys.*protocol\.name: 'clean' -> 'paper'.*seed: 0 -> 7"):
        train(compose_cfg(SYNTH + ["fl.rounds=3", "protocol=paper", "seed=7", "resume=true"]), run_dir, progress=False)
    assert snapshot(run_dir) == before
    # the same config goes on, and the timings cover both processes
    resumed = train(compose_cfg(SYNTH + ["fl.rounds=3", "resume=true"]), run_dir, progress=False)
    assert [r["round"] for r in resumed["history"]] == [1, 2, 3]
    assert resumed["history"][:2] == first["history"]
    assert resumed["timings"]["processes"] == 2
    assert resumed["timings"]["total_s"] > resumed["timings"]["this_process_s"]
    assert resumed["timings"]["total_s"] >= first["timings"]["total_s"]


def test_resume_refuses_a_corrupted_checkpoint(compose_cfg, tmp_path):
    run_dir = tmp_path / "run"
    train(compose_cfg(SYNTH + ["fl.rounds=2"]), run_dir, progress=False)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert read_record(ckpt)["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    with open(ckpt, "r+b") as fh:
        fh.truncate(ckpt.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=rf"{ckpt} is corrupted or truncated.*restart"):
        train(compose_cfg(SYNTH + ["fl.rounds=3", "resume=true"]), run_dir, progress=False)
    record = read_record(ckpt)  # the record "mended" to match the truncated file: still refused, in one line
    (run_dir / "checkpoints" / "last.json").write_text(json.dumps({**record, "sha256": sha256_file(ckpt)}))
    with pytest.raises(CheckpointError, match=rf"{ckpt} matches its record but is not a readable torch checkpoint"):
        train(compose_cfg(SYNTH + ["fl.rounds=3", "resume=true"]), run_dir, progress=False)
    (run_dir / "checkpoints" / "last.json").unlink()
    with pytest.raises(CheckpointError, match="has no record last.json"):
        train(compose_cfg(SYNTH + ["fl.rounds=3", "resume=true"]), run_dir, progress=False)


def test_a_save_cut_between_its_two_renames_resumes_from_the_save_before(compose_cfg, tmp_path, caplog):
    """A process killed after the record of round 2 moved into place but before its checkpoint did: the folder holds
    round 2's record beside round 1's checkpoint. The record keeps the save it replaced, so the run resumes after
    round 1 and ends as an uninterrupted run does."""
    run_dir = tmp_path / "run"  # SYNTH checkpoints every round
    train(compose_cfg([*SYNTH, "fl.rounds=1"]), run_dir, progress=False)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    round1 = ckpt.read_bytes()
    train(compose_cfg([*SYNTH, "fl.rounds=2", "resume=true"]), run_dir, progress=False)
    assert read_record(ckpt)["round"] == 2 and read_record(ckpt)["previous"]["round"] == 1
    ckpt.write_bytes(round1)  # the cut: round 2's record, round 1's checkpoint
    with caplog.at_level(logging.WARNING):
        resumed = train(compose_cfg([*SYNTH, "fl.rounds=3", "resume=true"]), run_dir, progress=False)
    assert "is round 1's (the save of round 2 was cut): resuming after it" in caplog.text
    straight = train(compose_cfg([*SYNTH, "fl.rounds=3"]), tmp_path / "straight", progress=False)
    assert [r["round"] for r in resumed["history"]] == [1, 2, 3]
    assert resumed["test_at_best"] == pytest.approx(straight["test_at_best"])
    assert "previous" not in read_record(ckpt)["previous"]  # one save kept, not a chain


def test_one_run_per_folder(compose_cfg, tmp_path):
    run_dir = tmp_path / "run"
    fd = rundir.claim(run_dir, resuming=False)  # another run holds the folder
    try:
        with pytest.raises(rundir.RunFolderError, match="in use by another run"):
            train(compose_cfg(SYNTH + ["fl.rounds=1"]), run_dir, progress=False)
    finally:
        rundir.release(fd)
    train(compose_cfg(SYNTH + ["fl.rounds=1"]), run_dir, progress=False)
    before = snapshot(run_dir)
    with pytest.raises(rundir.RunFolderError, match=r"already holds a finished run.*resume=true"):
        train(compose_cfg(SYNTH + ["fl.rounds=1", "seed=3"]), run_dir, progress=False)
    assert snapshot(run_dir) == before
    # resuming another run's checkpoint into this folder would overwrite the run it holds; into a new folder it goes
    other = tmp_path / "other"
    train(compose_cfg(SYNTH + ["fl.rounds=1"]), other, progress=False)
    with pytest.raises(rundir.RunFolderError, match=r"already holds a finished run"):
        train(compose_cfg(SYNTH + ["fl.rounds=2", f"resume='{other}'"]), run_dir, progress=False)
    assert snapshot(run_dir) == before
    moved = train(compose_cfg(SYNTH + ["fl.rounds=2", f"resume='{other}'"]), tmp_path / "new", progress=False)
    assert len(moved["history"]) == 2


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_follow_the_umask(compose_cfg, tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        train(compose_cfg(SYNTH + ["fl.rounds=1"]), tmp_path / "run", progress=False)
    finally:
        os.umask(old)
    for name in ("results.json", "config_resolved.yaml", "csv/metrics.csv", "checkpoints/last.ckpt"):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == mode, name


def test_rejected_config_leaves_no_folder(tmp_path):
    run_dir = tmp_path / "run"
    out = cli(["dataset=synthetic", "fl.rounds=0", f"hydra.run.dir={run_dir}"], tmp_path)
    assert out.returncode != 0
    assert "fl.rounds" in out.stderr
    assert not run_dir.exists()


@requires_real_data
def test_cli_resume_with_other_overrides_keeps_the_folder(tmp_path):
    """The issue's case: a FilmTrust run, then `protocol=paper seed=7 resume=true` into its folder."""
    run_dir = tmp_path / "X"
    base = SMALL_FILMTRUST + ["fl.rounds=2", "fl.checkpoint_every=1", f"hydra.run.dir={run_dir}"]
    assert cli(base, tmp_path).returncode == 0
    assert (run_dir / ".hydra" / "overrides.yaml").is_file()
    before = snapshot(run_dir)
    out = cli(base + ["protocol=paper", "seed=7", "resume=true"], tmp_path)
    assert out.returncode != 0
    assert "protocol.name: 'clean' -> 'paper'" in out.stderr and "seed: 0 -> 7" in out.stderr
    assert snapshot(run_dir) == before  # (the same command without resume: test_one_run_per_folder)


def wait_for_rounds(proc: subprocess.Popen, csv_path: Path, rounds: int, log: Path) -> None:
    deadline = time.monotonic() + 200
    while not (csv_path.is_file() and len(csv_path.read_text().splitlines()) > rounds):
        assert proc.poll() is None, f"run ended (rc {proc.returncode}) too early: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "the rounds never finished"
        time.sleep(0.05)


@requires_real_data
@pytest.mark.parametrize(
    "multirun", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["run", "multirun"]
)  # a multirun's job folders: test_multirun_folders_name_their_swept_values in the fast suite
def test_sigterm_fails_and_stays_resumable(tmp_path, multirun):
    run_dir = tmp_path / "X"
    args = SMALL_FILMTRUST + ["fl.rounds=400", "fl.checkpoint_every=50"]
    if multirun:
        args = ["-m", *args, "seed=0,1", f"hydra.sweep.dir={run_dir}", "hydra.sweep.subdir=job${seed}"]
        job_dir = run_dir / "job0"
    else:
        args = [*args, f"hydra.run.dir={run_dir}"]
        job_dir = run_dir
    env = {**os.environ, "ALIGNFEDREC_CACHE": str(tmp_path / "cache")}
    env.pop("ALIGNFEDREC_DATA", None)
    log = tmp_path / "log.txt"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "src.run", *args], cwd=REPO, env=env, stdout=fh, stderr=fh)
        try:
            wait_for_rounds(proc, job_dir / "csv" / "metrics.csv", 2, log)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=120)
        finally:
            proc.kill()
    text = log.read_text()
    assert rc == 143, text[-3000:]
    assert not (job_dir / "results.json").exists()
    assert not (run_dir / "job1").exists()
    ckpt = job_dir / "checkpoints" / "last.ckpt"
    record = read_record(ckpt)
    assert record["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest() and record["round"] >= 2
    command = next(line for line in text.splitlines() if line.startswith("python -m src.run"))
    assert f"hydra.run.dir={job_dir}" in command and command.endswith("resume=true")
    if not multirun:  # the printed command resumes the run (fewer rounds: the end of the run is its own choice)
        resumed = cli(command.split()[3:] + [f"fl.rounds={record['round'] + 1}"], tmp_path)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        payload = json.loads((job_dir / "results.json").read_text())
        assert len(payload["history"]) == record["round"] + 1 and payload["timings"]["processes"] == 2


def test_keys_added_later_match_their_neutral_default():
    """A checkpoint or stored run from before `eval.select` existed is the same run as one with its default."""
    from src.cli.campaign import identity

    old = {"seed": 0, "eval": {"ks": [10]}, "data": {"max_users": None}}
    new = {"seed": 0, "eval": {"ks": [10], "select": "val/hit@10"}, "data": {"max_users": None, "verify": True}}
    assert resume_mismatch(old, new) == []
    assert identity(old) == identity(new)
    other = {**new, "eval": {"ks": [10], "select": "val/ndcg@10"}}
    assert resume_mismatch(old, other) == ["eval.select: '<absent>' -> 'val/ndcg@10'"]
    assert identity(old) != identity(other)


def test_speed_keys_never_tell_runs_apart():
    """`model.fast_block` changes how fast, not what (bit-identical: tests/test_losses.py): a resume may change it,
    the campaign stores runs with and without it as one, the report puts them in one row; a result key may not."""
    from src.analysis import report
    from src.cli import campaign

    old = {"seed": 0, "model": {"dim": 8, "alignment": "fast"}}  # made before the key existed
    new = {"seed": 0, "model": {"dim": 8, "alignment": "fast", "fast_block": 1048576}}
    other = {"seed": 0, "model": {"dim": 16, "alignment": "fast", "fast_block": 1048576}}
    assert resume_mismatch(old, new) == []
    assert resume_mismatch(new, other) == ["model.dim: 8 -> 16"]
    assert campaign.identity(old) == campaign.identity(new) != campaign.identity(other)
    key = ("ml-100k", "full", "clean")
    runs = [{"config": c} for c in (old, {**new, "seed": 1}, other)]
    groups = report.split_differing(key, runs)
    assert sorted(len(v) for v in groups.values()) == [1, 2]  # old and new in one row, model.dim apart


def test_resume_loads_our_checkpoint_whole_on_every_lightning_the_project_allows():
    """Lightning 2.6 takes `fit(weights_only=)` and must be told False for our checkpoint; older ones (allowed by
    pyproject) take no such keyword and would fail on it."""
    from src.runtime.checkpoint import full_load

    class Older:
        def fit(self, model, ckpt_path=None): ...

    class Newer:
        def fit(self, model, ckpt_path=None, weights_only=None): ...

    assert full_load(Older(), "last.ckpt") == {} and full_load(Newer(), None) == {}
    assert full_load(Newer(), "last.ckpt") == {"weights_only": False}


def test_a_refused_run_never_touches_a_folder_another_process_holds(tmp_path):
    """Issue 36's race, with two real processes: while one holds a folder (still loading its data), runs refused
    there leave its lock file (the same inode) and its log in place, so no third run can take the folder beside it."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.log").write_text("the holder's log\n")
    hold = "import sys, time; from pathlib import Path; from src.runtime import rundir; "
    hold += "rundir.claim(Path(sys.argv[1]), False); print('locked', flush=True); time.sleep(300)"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        inode = (run_dir / rundir.LOCK_NAME).stat().st_ino
        for attempt in range(2):  # the second would have found no lock file, and run beside the holder
            out = cli([*SYNTH, "fl.rounds=1", f"hydra.run.dir={run_dir}"], tmp_path)
            assert out.returncode == 2, out.stderr[-2000:]
            assert "is in use by another run" in out.stderr, (attempt, out.stderr[-2000:])
            assert (run_dir / rundir.LOCK_NAME).stat().st_ino == inode
            assert (run_dir / "run.log").read_text().startswith("the holder's log\n")
        rundir.remove_if_empty_of_runs(run_dir)  # the clean-up itself, in this process
        assert (run_dir / rundir.LOCK_NAME).stat().st_ino == inode
    finally:
        holder.kill()
        holder.wait()
    rundir.remove_if_empty_of_runs(run_dir)  # nobody holds it now: an empty folder goes
    assert not run_dir.exists()


def test_resume_with_fewer_rounds_is_refused(compose_cfg, tmp_path):
    run_dir = tmp_path / "run"
    train(compose_cfg(SYNTH + ["fl.rounds=3"]), run_dir, progress=False)
    before = snapshot(run_dir)
    with pytest.raises(ResumeError, match=r"has run 3 rounds and fl\.rounds=2 is fewer; expected fl\.rounds >= 3"):
        train(compose_cfg(SYNTH + ["fl.rounds=2", "resume=true"]), run_dir, progress=False)
    assert snapshot(run_dir) == before


def test_a_patience_that_would_have_stopped_the_run_earlier_is_refused(compose_cfg, tmp_path):
    """The curve 0.1 0.3 0.2 0.25 0.4 (best at round 2): patience 2 stops at round 4, so a 5-round checkpoint cannot
    be resumed under it; patience 3 would not have stopped before round 5, and no patience never stops."""
    from src.cli.train import check_resume_length

    cfg = compose_cfg(SYNTH + ["fl.rounds=9"])
    record = {"round": 5, "config": {"eval": {"patience": None}}, "curve": [0.1, 0.3, 0.2, 0.25, 0.4]}
    cfg.eval.patience = 2
    with pytest.raises(ResumeError, match=r"eval\.patience=2 would have stopped this run at round 4"):
        check_resume_length(cfg, tmp_path / "last.ckpt", record)
    for patience in (3, None):
        cfg.eval.patience = patience
        check_resume_length(cfg, tmp_path / "last.ckpt", record)
    cfg.eval.patience = 2
    with pytest.raises(ResumeError, match="keeps no curve"):
        check_resume_length(cfg, tmp_path / "last.ckpt", {k: v for k, v in record.items() if k != "curve"})


def test_the_checkpoint_keeps_the_curve_a_patience_change_is_checked_against(compose_cfg, tmp_path):
    run_dir = tmp_path / "run"
    payload = train(compose_cfg(SYNTH + ["fl.rounds=3"]), run_dir, progress=False)
    record = read_record(run_dir / "checkpoints" / "last.ckpt")
    assert record["curve"] == [row["val/hit@10"] for row in payload["history"]]


def test_a_resume_records_the_speed_keys_it_changed_per_round_span(compose_cfg, tmp_path):
    run_dir = tmp_path / "run"
    train(compose_cfg(SYNTH + ["fl.rounds=2"]), run_dir, progress=False)
    resumed = train(compose_cfg(SYNTH + ["fl.rounds=3", "compute=fused", "resume=true"]), run_dir, progress=False)
    assert resumed["resumes"] == [
        {"after_round": 2, "changed": {"compute.kernel": ["native", "fused"], "fl.rounds": [2, 3]}}
    ]
    again = train(compose_cfg(SYNTH + ["fl.rounds=4", "compute=fused", "resume=true"]), run_dir, progress=False)
    assert again["resumes"] == [*resumed["resumes"], {"after_round": 3, "changed": {"fl.rounds": [3, 4]}}]
    assert json.loads((run_dir / "results.json").read_text())["resumes"] == again["resumes"]


def test_a_resume_may_change_the_device_and_the_cohort_size_and_ends_as_an_uninterrupted_run(compose_cfg, tmp_path):
    """Where and in what cohorts the rounds compute is not the run's identity, so a resume may change it (a run cut
    under `device=cpu` or a GPU's `fl.chunk_size=auto` had been refused for good): the resume says so in
    `resumes`, and the run ends where an uninterrupted run in the new cohorts ends, within float rounding."""
    run_dir = tmp_path / "run"
    train(compose_cfg(SYNTH + ["fl.rounds=2", "fl.chunk_size=7", "device=cpu"]), run_dir, progress=False)
    resumed = train(compose_cfg(SYNTH + ["fl.rounds=4", "fl.chunk_size=16", "resume=true"]), run_dir, progress=False)
    assert resumed["resumes"] == [
        {"after_round": 2, "changed": {"device": ["cpu", "auto"], "fl.chunk_size": [7, 16], "fl.rounds": [2, 4]}}
    ]
    whole = train(compose_cfg(SYNTH + ["fl.rounds=4", "fl.chunk_size=16"]), tmp_path / "whole", progress=False)
    for got, want in zip(resumed["history"], whole["history"], strict=True):
        for key in ("val/hit@10", "test/hit@10", "test/ndcg@10", "loss/bce"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (got["round"], key)


def test_a_run_records_the_commit_each_of_its_processes_ran_and_is_stored_with_them(compose_cfg, tmp_path, monkeypatch):
    """The commit is read by the run as each process starts, not by whoever stores it later (the code may have moved
    on meanwhile); a resume at another commit adds its own from the round it went on with."""
    run_dir = tmp_path / "run"
    monkeypatch.setattr(train_module, "git_commit", lambda: "aaa")
    train(compose_cfg(SYNTH + ["fl.rounds=2"]), run_dir, progress=False)
    assert read_record(run_dir / "checkpoints" / "last.ckpt")["code"] == [{"commit": "aaa", "from_round": 1}]
    monkeypatch.setattr(train_module, "git_commit", lambda: "bbb+dirty")
    resumed = train(compose_cfg(SYNTH + ["fl.rounds=3", "resume=true"]), run_dir, progress=False)
    assert resumed["code"] == [{"commit": "aaa", "from_round": 1}, {"commit": "bbb+dirty", "from_round": 3}]
    meta = json.loads((store(run_dir, "x", [], tmp_path / "runs", commit="ignored") / "run.json").read_text())
    assert meta["commit"] == "aaa + bbb+dirty" and meta["code"] == resumed["code"]
    # a checkpoint from before runs recorded their commit: the rounds it holds are labelled as unrecorded
    record = read_record(run_dir / "checkpoints" / "last.ckpt")
    del record["code"]
    (run_dir / "checkpoints" / "last.json").write_text(json.dumps(record))
    again = train(compose_cfg(SYNTH + ["fl.rounds=4", "resume=true"]), run_dir, progress=False)
    assert again["code"] == [{"commit": "unrecorded", "from_round": 1}, {"commit": "bbb+dirty", "from_round": 4}]


@requires_real_data
def test_a_failed_resume_leaves_the_folder_labelled_as_it_ran(tmp_path):
    """A resume cut before it finishes (SIGTERM) leaves .hydra/, config_resolved.yaml and results.json as the run
    that made them; a resume that finishes relabels all three."""
    run_dir = tmp_path / "X"
    base = SMALL_FILMTRUST + ["fl.checkpoint_every=1", f"hydra.run.dir={run_dir}"]
    assert cli([*base, "fl.rounds=2"], tmp_path).returncode == 0
    labels = {p: (run_dir / p).read_bytes() for p in (".hydra/overrides.yaml", "config_resolved.yaml", "results.json")}
    env = {**os.environ, "ALIGNFEDREC_CACHE": str(tmp_path / "cache")}
    env.pop("ALIGNFEDREC_DATA", None)
    log = tmp_path / "log.txt"
    with open(log, "w") as fh:
        args = [*base, "fl.rounds=400", "resume=true"]
        proc = subprocess.Popen([sys.executable, "-m", "src.run", *args], cwd=REPO, env=env, stdout=fh, stderr=fh)
        try:
            wait_for_rounds(proc, run_dir / "csv" / "metrics.csv", 3, log)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 143
        finally:
            proc.kill()
    assert {p: (run_dir / p).read_bytes() for p in labels} == labels
    rounds = read_record(run_dir / "checkpoints" / "last.ckpt")["round"] + 1
    assert rounds >= 4
    done = cli([*base, f"fl.rounds={rounds}", "resume=true"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert yaml.safe_load((run_dir / "config_resolved.yaml").read_text())["fl"]["rounds"] == rounds
    assert f"fl.rounds={rounds}" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert len(json.loads((run_dir / "results.json").read_text())["history"]) == rounds


def test_a_full_disk_while_checkpointing_ends_the_run_with_one_line(compose_cfg, tmp_path, monkeypatch):
    import errno

    from src.runtime import checkpoint

    run_dir = tmp_path / "run"
    train(compose_cfg(SYNTH + ["fl.rounds=1"]), run_dir, progress=False)
    before = (run_dir / "checkpoints" / "last.ckpt").read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "atomic_path", full)
    with pytest.raises(
        CheckpointError, match=r"could not write checkpoint .* after round 2 \(No space left on device\)"
    ):
        train(compose_cfg(SYNTH + ["fl.rounds=2", "resume=true"]), run_dir, progress=False)
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == before


def test_a_full_disk_while_writing_the_record_leaves_the_previous_pair(compose_cfg, tmp_path, monkeypatch):
    """The record is written before the new checkpoint moves into place: a failure there keeps the previous checkpoint
    and record, which still resume (not a new checkpoint beside an old record's digest)."""
    import errno

    from src.runtime import checkpoint

    run_dir = tmp_path / "run"
    train(compose_cfg(SYNTH + ["fl.rounds=1"]), run_dir, progress=False)
    pair = [(run_dir / "checkpoints" / name).read_bytes() for name in ("last.ckpt", "last.json")]

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(checkpoint, "atomic_write_text", full)
        with pytest.raises(CheckpointError, match=r"could not write checkpoint .* after round 2"):
            train(compose_cfg(SYNTH + ["fl.rounds=2", "resume=true"]), run_dir, progress=False)
    assert [(run_dir / "checkpoints" / name).read_bytes() for name in ("last.ckpt", "last.json")] == pair
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt", "last.json"]
    resumed = train(compose_cfg(SYNTH + ["fl.rounds=2", "resume=true"]), run_dir, progress=False)
    assert len(resumed["history"]) == 2


def test_a_sigterm_after_the_save_decision_still_checkpoints_the_round(compose_cfg, tmp_path, monkeypatch):
    """SIGTERM landing once the checkpoint callback has passed (Lightning raises it at the round's end) still leaves
    a checkpoint of that round with its record, and the resumed run ends where an uninterrupted one does."""
    from src.runtime.checkpoint import AtomicCheckpoint

    overrides = ["dataset=synthetic", "ablation=backbone", "optim=sgd", "fl.checkpoint_every=50", "fl.rounds=4"]
    whole = train(compose_cfg(overrides), tmp_path / "whole", progress=False)
    decide = AtomicCheckpoint.on_train_epoch_end

    def late_sigterm(self, trainer, module) -> None:
        decide(self, trainer, module)
        if len(module.history) == 2:  # the signal lands right after the round's save decision
            trainer._signal_connector.received_sigterm = True

    monkeypatch.setattr(AtomicCheckpoint, "on_train_epoch_end", late_sigterm)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        train(compose_cfg(overrides), run_dir, progress=False)
    assert stopped.value.code == 143
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    record = read_record(ckpt)
    assert record["round"] == 2 and record["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    monkeypatch.undo()
    resumed = train(compose_cfg(overrides + ["resume=true"]), run_dir, progress=False)
    assert [row["round"] for row in resumed["history"]] == [1, 2, 3, 4]
    assert [row["val/hit@10"] for row in resumed["history"]] == [row["val/hit@10"] for row in whole["history"]]


def test_multirun_folders_name_their_swept_values(tmp_path: Path) -> None:
    """Each job's folder names the values it ran with beyond dataset/ablation/protocol/seed, as one folder (a `/` or a
    space in a value does not nest or split it), in Hydra's order of keys."""
    sweep = tmp_path / "sweep"
    out = cli(["-m", *SYNTH, "fl.rounds=1,2", "data.root=/a b/c", "logger=csv", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == [
        f"{n}_synthetic_backbone_clean_seed0_data.root=-a--b-c,fl.checkpoint_every=1,fl.rounds={n + 1},optim=sgd"
        for n in range(2)
    ]
    for n, job in enumerate(jobs):
        assert json.loads((sweep / job / "results.json").read_text())["config"]["fl"]["rounds"] == n + 1


def test_sweep_tag_is_one_bounded_folder_name() -> None:
    assert rundir.sweep_tag("") == ""
    assert rundir.sweep_tag("ablation.alpha=0.005") == "_ablation.alpha=0.005"
    long = ",".join(f"ablation.key{i}=/some/path/{i}" for i in range(10))  # 26 characters each
    tag = rundir.sweep_tag(long)
    # the two whole overrides that fit in 64 - 9 characters, never a third cut short, then the hash of them all
    assert tag.startswith("_ablation.key0=-some-path-0,ablation.key1=-some-path-1,~") and len(tag) == 1 + 54 + 9
    assert tag != rundir.sweep_tag(long.replace("key9", "key8"))  # cut tags of different sweeps stay apart
    assert len(rundir.sweep_tag("ablation.name=" + "x" * 80)) == 1 + 9  # one override too long: its hash alone


def test_multirun_folders_and_stored_variants_name_runs_by_one_rule() -> None:
    """A `/` (folders would nest), a space and a non-ASCII letter become `-` alike in a multirun folder's tag and a
    stored run's variant folder; the characters an override is written with stay."""
    from src.cli.store import variant_name

    override = "ablation.name=a/b é:c,d+e~"
    assert rundir.path_segment(override) == "ablation.name=a-b---c,d+e-"
    assert variant_name(["dataset=ml-100k", override]) == "ablation.name=a-b---c,d+e-"
    assert rundir.sweep_tag(override) == "_" + variant_name([override])
