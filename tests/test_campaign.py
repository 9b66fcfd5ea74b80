"""The campaign: overlays expand into runs, finished runs are stored compactly and skipped by their
resolved config, a budget cuts long runs with SIGTERM into resumable checkpoints."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from omegaconf import OmegaConf

from src.analysis.report import collect, rows
from src.cli import campaign, memory_wait
from src.cli.config import ConfigError
from src.cli.jobs import compose_config
from src.runtime.errors import UserError
from src.runtime.results import read_results

SMOKE = "experiment=campaign_smoke"


def test_identity_ignores_where_and_how_a_run_is_written():
    base = {
        "seed": 0,
        "fl": {"rounds": 3, "checkpoint_every": 1},
        "logger": {"wandb": False},
        "device": "auto",
        "experiment_name": "a",
    }
    same = {
        **base,
        "fl": {"rounds": 3, "checkpoint_every": 5},
        "logger": {"wandb": True},
        "device": "cuda",
        "experiment_name": "b",
    }
    assert campaign.identity(base) == campaign.identity(same)
    assert campaign.identity(base) != campaign.identity({**base, "seed": 1})
    assert campaign.identity(base) != campaign.identity({**base, "fl": {"rounds": 4, "checkpoint_every": 1}})


def test_identity_drops_only_what_the_method_never_reads():
    """The centralised MF trains with its own Adam: `optim=sgd` and `optim=adam` are one run of it, and two of
    PFedRec (which does read `optim`)."""

    def key(*overrides: str) -> str:
        cfg = compose_config(["dataset=synthetic", *overrides])
        return campaign.identity(OmegaConf.to_container(cfg, resolve=True))

    assert key("ablation=central", "optim=sgd") == key("ablation=central", "optim=adam")
    assert key("ablation=central", "ablation.lr=0.01") != key("ablation=central")
    assert key("ablation=backbone", "optim=sgd") != key("ablation=backbone", "optim=adam")


def test_secure_aggregation_is_part_of_a_runs_identity():
    """SecAgg+ clips each upload and rounds it onto its grid: `flower.secagg` and its clip change the numbers, so they
    tell runs apart (and a resume may not change them), while the other flower keys (where nodes connect) do not."""
    from src.config.identity import resume_mismatch

    def config(*overrides: str) -> dict:
        cfg = compose_config(["dataset=synthetic", "ablation=fed_itemknn", *overrides])
        return OmegaConf.to_container(cfg, resolve=True)

    plain, secure = config(), config("flower.secagg=true")
    assert campaign.identity(secure) != campaign.identity(plain)
    assert campaign.identity(config("flower.secagg=true", "flower.secagg_clip=2")) != campaign.identity(secure)
    assert campaign.identity(config("flower.round_timeout=5")) == campaign.identity(plain)
    assert resume_mismatch(plain, secure) == ["flower.secagg: '<absent>' -> True"]


def test_summary_counts_states_and_the_hours_left(tmp_path):
    config = {"dataset": {"name": "ml-1m"}, "ablation": {"name": "full"}, "protocol": {"name": "clean"}, "seed": 0}
    runs = [
        campaign.Run("t", [], {**config, "seed": seed}, f"k{seed}", "default", est_s=est, status=status)
        for seed, (est, status) in enumerate(
            [(0.0, "stored"), (1800.0, "pending"), (5400.0, "cut"), (3600.0, "failed")]
        )
    ]
    text = campaign.summary(runs, tmp_path)
    assert text.splitlines()[:2] == [
        "stored 1 partial 0 pending 1 cut 1 failed 1 of 4 runs",
        "  left: about 2.0 h of one-thread jobs (partial and cut runs counted whole)",
    ]
    assert "  pending  t/ml-1m/full/clean/default/seed1, est 30.0 min" in text


def test_expand_narrows_and_widens_the_grid():
    runs = campaign.expand("campaign_smoke", [])
    assert len(runs) == 4 and len({r.key for r in runs}) == 4
    assert {r.variant for r in runs} == {"default"}
    narrowed = campaign.expand("campaign_smoke", ["seed=1", "fl.rounds=2,3"])
    assert len(narrowed) == 4
    assert {r.config["seed"] for r in narrowed} == {1}
    assert {r.variant for r in narrowed} == {"fl.rounds=2", "fl.rounds=3"}
    assert {r.key for r in narrowed} & {r.key for r in runs}  # fl.rounds=3 seed 1 is the same run


def test_value_axes_applied_to_one_composition_equal_hydra_composing_each_run():
    """`expand` composes once per group choice and sets seeds and other values on copies: each run's resolved
    config must be the one Hydra composes from that run's own overrides."""
    cli = ["ablation=backbone,no_ica", "seed=0,2", "fl.rounds=2", "model.init_std=0.25", "optim=sgd"]
    runs = campaign.expand("campaign_smoke", cli)
    assert len(runs) == 4
    for run in runs:
        alone = OmegaConf.to_container(compose_config(run.overrides), resolve=True)
        assert run.config == alone, run.overrides
    assert {(r.config["seed"], r.config["fl"]["rounds"], r.config["model"]["init_std"]) for r in runs} == {
        (0, 2, 0.25),
        (2, 2, 0.25),
    }


def test_an_unknown_value_axis_is_named():
    with pytest.raises(ConfigError, match="fl.roundz"):
        campaign.expand("campaign_smoke", ["fl.roundz=2"])


def test_runs_are_stored_compactly_and_skipped_next_time(tmp_path, capsys):
    root, work = tmp_path / "runs", tmp_path / "work"
    args = [SMOKE, "seed=0", "--runs", str(root), "--work", str(work), "--jobs", "2"]
    assert campaign.main(args) == 0
    stored = sorted(root.rglob("run.json"))
    assert [p.parent.relative_to(root).as_posix() for p in stored] == [
        "campaign_smoke/synthetic/backbone/clean/default/seed0",
        "campaign_smoke/synthetic/local/clean/default/seed0",
    ]
    for meta_path in stored:
        meta = json.loads(meta_path.read_text())
        payload = json.loads((meta_path.parent / "results.json").read_text())
        assert meta["key"] == campaign.identity(payload["config"]) and meta["rounds"] == 3
        # the commit the run's process read as it started (the same checkout here), recorded in the run itself
        assert meta["commit"] == campaign.git_commit() and payload["code"] == [
            {"commit": meta["commit"], "from_round": 1}
        ]
        assert sum(p.stat().st_size for p in meta_path.parent.iterdir()) < 200_000
        # the history stored by columns, read back as the rows whose best round the run itself selected
        assert json.loads((meta_path.parent / "results.json").read_text())["history"]["round"] == [1, 2, 3]
        history = read_results(meta_path.parent / "results.json")["history"]
        best = next(r for r in history if r["round"] == payload["best_round"])
        assert {k: best[k] for k in payload["test_at_best"]} == payload["test_at_best"]
        assert not list(meta_path.parent.glob("**/*.ckpt"))
    assert not any(work.iterdir()) or all(p.suffix in (".log", ".lock") for p in work.iterdir())
    # runs ran compiled by default (a speed key), and a plan without compiling finds them stored all the same
    for meta_path in root.rglob("run.json"):
        assert "compile: true" in (meta_path.parent / "config_resolved.yaml").read_text()
    capsys.readouterr()
    assert campaign.main([*args, "--no-compile"]) == 0
    out = capsys.readouterr().out
    assert "start" not in out and out.startswith("stored 2 partial 0 pending 0")
    # the report reads the stored runs like any run folder
    table = rows(collect([root]))
    assert {(r["method"], r["seeds"]) for r in table} == {("backbone", 1), ("local", 1)}
    # seed 1, pending, needs the memory its stored seed 0 peaked at (results.json, MiB)
    backbone = json.loads(next(root.rglob("backbone/clean/default/seed0/results.json")).read_text())
    (pending,) = [r for r in campaign.plan(["campaign_smoke"], ["seed=1"], root) if "/backbone/" in r.label]
    assert pending.mem_gib == pytest.approx(backbone["resources"]["peak_rss_mib"] / 1024)


def test_budget_cut_leaves_a_resumable_partial_run(tmp_path, capsys, monkeypatch):
    root, work = tmp_path / "runs", tmp_path / "work"
    args = [
        SMOKE,
        "seed=0",
        "ablation=backbone",
        "fl.rounds=150",
        "--runs",
        str(root),
        "--work",
        str(work),
        "--jobs",
        "1",
    ]

    started = time.monotonic()

    def clock() -> float:
        """The budget's clock: it stands still until the run's first checkpoint lands (or 10 real minutes
        pass, so a stalled run cannot hang the test), then jumps past 18 s. The cut then never depends on how
        fast this machine trains (150 rounds take about 7 s on a fast one, the cut a fraction of a second)."""
        stalled = time.monotonic() - started > 600
        return 100.0 if stalled or list(work.glob("*/checkpoints/last.json")) else 0.0

    monkeypatch.setattr(
        campaign,
        "time",
        SimpleNamespace(monotonic=clock, sleep=lambda s: time.sleep(0.05), strftime=time.strftime, gmtime=time.gmtime),
    )
    assert campaign.main([*args, "--budget-min", "0.3"]) == 0
    monkeypatch.undo()
    out = capsys.readouterr().out
    assert "partial 1" in out
    assert "partial  campaign_smoke/synthetic/backbone/clean/fl.rounds=150/seed0" in out
    assert not root.exists() or not list(root.rglob("run.json"))
    (key_dir,) = [p for p in work.iterdir() if p.is_dir()]
    done = json.loads((key_dir / "checkpoints" / "last.json").read_text())["round"]
    assert 0 < done < 150
    assert "partial 1" in (campaign.main([*args, "--dry-run"]) == 0 and capsys.readouterr().out)
    assert campaign.main(args) == 0
    assert "(resume," in capsys.readouterr().out
    (meta,) = root.rglob("run.json")
    payload = read_results(meta.parent / "results.json")
    assert len(payload["history"]) == 150 and payload["timings"]["processes"] == 2


def hold_lock(path: Path) -> int:
    """Lock a file as another campaign would (flock on a descriptor of our own)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_a_run_another_campaign_holds_or_stored_is_left_to_it(tmp_path, capsys):
    root, work = tmp_path / "runs", tmp_path / "work"
    args = [SMOKE, "seed=0", "--runs", str(root), "--work", str(work), "--jobs", "2"]
    (backbone,) = campaign.expand("campaign_smoke", ["seed=0", "ablation=backbone"])
    label = "campaign_smoke/synthetic/backbone/clean/default/seed0"
    fd = hold_lock(work / f"{backbone.key}.lock")
    try:
        assert campaign.main(args) == 0
        out = capsys.readouterr().out
        assert f"skip   {label} (another campaign runs it)" in out and f"start  {label}" not in out
        assert [p.parent.relative_to(root).parts[2] for p in root.rglob("run.json")] == ["local"]
        assert campaign.main([*args, "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("stored 1 partial 0 pending 0 cut 0 failed 0 of 2 runs (1 running in another campaign)")
        assert f"  elsewhere {label}" in out
        (planned,) = [r for r in campaign.plan(["campaign_smoke"], ["seed=0"], root) if r.status == "pending"]
    finally:
        os.close(fd)
    assert campaign.main(args) == 0  # the other campaign, now that it runs the run
    out = capsys.readouterr().out
    assert f"start  {label}" in out and out.count("start") == 1
    assert sorted(p.parent.relative_to(root).parts[2] for p in root.rglob("run.json")) == ["backbone", "local"]
    (run,) = campaign.execute([planned], None, 1, work, None, 1, root)  # planned before it was stored
    out = capsys.readouterr().out
    assert "start" not in out and f"skip   {label} (stored since this campaign planned)" in out
    assert run.status == "stored" and (run.stored / "run.json").is_file()
    assert not campaign.claimed_elsewhere(work, run)  # the skip let go of its claim


def test_the_run_process_keeps_its_claim_after_the_campaign_lets_go(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (run,) = campaign.expand("campaign_smoke", ["seed=0", "ablation=backbone"])
    run.extra["lock"] = campaign.claim(work, run)
    proc = campaign.launch(run, work, None, 1)
    campaign.release(run)  # the campaign is gone (killed, say): the run's process still holds the lock
    try:
        assert campaign.claimed_elsewhere(work, run)
    finally:
        assert proc.wait(timeout=300) == 0
    assert not campaign.claimed_elsewhere(work, run)


def test_store_refuses_an_unfinished_run(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"finished": False, "config": {}}))
    with pytest.raises(UserError, match="did not finish"):
        campaign.store(tmp_path, "x", [], tmp_path / "runs")


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"engine": "flower", "best_round": 1}, "a Flower run is not stored beside the simulator's runs"),
        ({"best_round": None}, "no round was scored"),
        ({"best_round": 1, "config": {"data": {"max_users": 30}}}, r"data.max_users=30 .*expected data.max_users=null"),
        ({"best_round": 1, "config": {"data": {"verify": False}}}, r"data.verify=false .*expected data.verify=true"),
    ],
)
def test_store_refuses_a_flower_run_a_run_with_no_scored_round_and_a_cut_or_unverified_dataset(
    tmp_path, fields, reason
):
    (tmp_path / "results.json").write_text(json.dumps({"finished": True, "config": {}, **fields}))
    with pytest.raises(UserError, match=reason):
        campaign.store(tmp_path, "x", [], tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def full_config(dataset: str, optim: str) -> dict:
    """The keys a cost estimate reads of an AlignFedRec full run (fast alignment, device auto)."""
    return {
        "dataset": {"name": dataset},
        "ablation": {"ica": True, "gsa": True, "name": "full"},
        "model": {"alignment": "fast"},
        "device": "auto",
        "optim": {"name": optim},
    }


def test_cost_estimate_takes_the_newest_stored_runs_of_the_kind():
    """Stored runs of the run's kind cost it, the three stored last only (older ones ran other code): those that ran
    with the job's torch threads (none recorded: one), else all of them, each scaled by the threads it ran with (a
    run that had both cores costs a one-thread job twice its seconds). The method's own runs at another thread count
    come before an aligned sibling's at the job's."""
    kind = ("ml-100k", True, "fast", "full", "auto", "adam")
    stored = [
        {"kind": kind, "mean_round_s": 1.0, "stored_at": "2026-11-29T10:00:00Z"},
        {"kind": kind, "mean_round_s": 4.0, "stored_at": "2026-12-01T10:00:00Z"},
        {"kind": kind, "mean_round_s": 2.5, "threads": 2, "stored_at": "2026-12-01T11:00:00Z"},
        {"kind": kind, "mean_round_s": 3.0, "threads": 1, "stored_at": "2026-11-30T10:00:00Z"},
        {"kind": ("ml-100k", False, "-", "backbone", "auto", "adam"), "mean_round_s": 0.5, "stored_at": "2026-12-02"},
        {"kind": (*kind[:4], "cuda", "adam"), "mean_round_s": 0.1, "stored_at": "2026-12-02T00:00:00Z"},
        {"kind": (*kind[:5], "sgd"), "mean_round_s": 9.0, "stored_at": "2026-12-03T00:00:00Z"},  # the other engine
    ]
    config = full_config("ml-100k", "adam")
    assert campaign.seconds_per_round(config, stored) == pytest.approx((1.0 + 4.0 + 3.0) / 3)
    assert campaign.seconds_per_round(config, stored, threads=2) == pytest.approx(2.5)
    assert campaign.seconds_per_round(config, stored, threads=4) == pytest.approx((0.75 + 1.0 + 1.25) / 3)
    sibling = {"kind": (*kind[:3], "no_ica", *kind[4:]), "mean_round_s": 7.0, "threads": 1, "stored_at": "2026-12-09"}
    two_threads = [r for r in stored if r.get("threads") == 2]
    assert campaign.seconds_per_round(config, [*two_threads, sibling]) == pytest.approx(5.0)  # its own, scaled
    assert campaign.seconds_per_round(config, [sibling]) == pytest.approx(7.0)
    sgd = {**config, "optim": {"name": "sgd"}}
    assert campaign.seconds_per_round(sgd, stored) == pytest.approx(9.0)


def test_peak_memory_is_the_largest_of_the_newest_stored_runs_of_the_kind_and_shown_with_the_cost():
    """A pending run shows the most memory any of the three runs of its kind stored last held (a lane's need before
    it starts), borrowed from an aligned sibling like its time, and nothing where no stored run recorded it."""
    kind = ("ml-1m", True, "fast", "knn_ica", "auto", "adam")
    stored = [
        {"kind": kind, "mean_round_s": 40.0, "peak_gib": 20, "stored_at": "2026-12-01"},  # older: out
        {"kind": kind, "mean_round_s": 40.0, "peak_gib": 8, "stored_at": "2026-12-05"},
        {"kind": kind, "mean_round_s": 40.0, "peak_gib": 11.5, "stored_at": "2026-12-06"},
        {"kind": kind, "mean_round_s": 40.0, "stored_at": "2026-12-07"},  # recorded none: not counted
        {"kind": kind, "mean_round_s": 40.0, "peak_gib": 9, "stored_at": "2026-12-04"},
        {"kind": (*kind[:3], "full", "auto", "adam"), "mean_round_s": 70.0, "peak_gib": 7, "stored_at": "1"},
    ]
    config = full_config("ml-1m", "adam")
    config["ablation"]["name"] = "knn_ica"
    assert campaign.peak_memory_gib(config, stored) == pytest.approx(11.5)
    no_gsa = {**config, "ablation": {**config["ablation"], "name": "no_gsa"}}
    assert campaign.peak_memory_gib(no_gsa, stored) == pytest.approx(11.5)  # the newest three aligned siblings
    assert campaign.peak_memory_gib(no_gsa, stored[-1:]) == pytest.approx(7.0)
    assert campaign.peak_memory_gib(config, [r for r in stored if "peak_gib" not in r]) is None
    run = campaign.Run("t", [], {**config, "seed": 0}, "k", "default", est_s=1800, mem_gib=11.5)
    assert campaign.cost_text(run) == "est 30.0 min, about 11.5 GiB"
    assert campaign.cost_text(campaign.Run("t", [], config, "k", "default", est_s=60)) == "est 1.0 min"


def test_a_campaign_starts_a_run_whose_memory_is_short_once_a_running_run_ends(tmp_path, monkeypatch, capsys):
    """Two jobs, memory for one of the two runs at a time: the second waits (one `wait` line) and starts after the
    first ends, though a second job slot was free all along."""
    events: list[str] = []
    live: dict[str, int] = {}

    class Proc:
        def __init__(self, key: str) -> None:
            self.key, self.pid, self.polls, self.returncode = key, 0, 0, 0

        def poll(self):
            self.polls += 1
            if self.polls < 3:
                return None
            live.pop(self.key, None)
            return 0

    def launch(run, *args, **kwargs):
        events.append(f"start {run.key} beside {sorted(live)}")
        live[run.key] = 1
        return Proc(run.key)

    asked = []

    def memory_gib() -> tuple[float, float]:
        asked.append(1)
        assert len(asked) < 1000, "the campaign never started the waiting run"
        return 12.0 - 10.0 * len(live), 24.0

    monkeypatch.setattr(memory_wait, "memory_gib", memory_gib)
    monkeypatch.setattr(memory_wait, "rss_gib", lambda pid: 10.0)
    monkeypatch.setattr(campaign, "launch", launch)
    monkeypatch.setattr(campaign, "take", lambda *a: True)
    monkeypatch.setattr(campaign, "release", lambda run: None)
    monkeypatch.setattr(campaign, "finish", lambda run, rc, *a: setattr(run, "status", "stored"))
    monkeypatch.setattr(campaign.time, "sleep", lambda s: None)
    runs = [
        campaign.Run(
            "t",
            [],
            {"dataset": {"name": "d"}, "ablation": {"name": a}, "protocol": {"name": "p"}, "seed": 0},
            a,
            "default",
            est_s=60.0 * (i + 1),
            mem_gib=10.0,
        )
        for i, a in enumerate(("a", "b"))
    ]
    campaign.execute(runs, None, 2, tmp_path, None, 1, tmp_path / "runs")
    assert events == ["start a beside []", "start b beside []"]
    out = capsys.readouterr().out
    assert out.count("wait   t/d/b/p/default/seed0 (about 10.0 GiB needed, 2.0 GiB free)") == 1
    assert all(r.status == "stored" for r in runs)


ROUND_PARTS = ("train", "aggregate", "eval", "community", "server")


def test_cost_estimate_of_an_aligned_ablation_takes_a_stored_sibling_before_bench_reports(tmp_path):
    """With no stored run of its own ablation, an aligned run is costed from stored runs of another aligned ablation
    alike in all else (not from the unaligned backbone, another engine or another dataset), before any bench report;
    an unaligned run never borrows from a sibling."""
    (tmp_path / "b.json").write_text(
        json.dumps({"dataset": "ml-1m", "ablation": "full", "seconds_per_round": dict.fromkeys(ROUND_PARTS, 1.0)})
    )
    stored = [
        {"kind": ("ml-1m", True, "fast", "no_ica", "auto", "sgd"), "mean_round_s": 100.0, "stored_at": "2026-12-01"},
        {"kind": ("ml-1m", True, "fast", "no_gsa", "auto", "sgd"), "mean_round_s": 120.0, "stored_at": "2026-12-02"},
        {"kind": ("ml-1m", True, "fast", "no_gsa", "auto", "adam"), "mean_round_s": 50.0, "stored_at": "2026-12-03"},
        {"kind": ("ml-1m", False, "-", "backbone", "auto", "sgd"), "mean_round_s": 5.0, "stored_at": "2026-12-04"},
        {"kind": ("ml-100k", True, "fast", "full", "auto", "sgd"), "mean_round_s": 9.0, "stored_at": "2026-12-05"},
    ]
    full = full_config("ml-1m", "sgd")
    assert campaign.seconds_per_round(full, stored, tmp_path) == pytest.approx((100.0 + 120.0) / 2)
    assert campaign.seconds_per_round(full, stored[2:], tmp_path) == pytest.approx(2.0 * 5.0)  # bench: 5 s on 2 threads
    fedavg = {**full, "ablation": {"name": "fedavg"}}
    assert campaign.seconds_per_round(fedavg, stored[:3], tmp_path) == pytest.approx(6040 * 3706 / (943 * 1682))


def test_cost_estimate_takes_the_fastest_matching_bench_report(tmp_path):
    """Without stored runs of its kind a run is costed from bench reports of its dataset and kind (the fastest:
    older reports measured slower code), scaled to all clients and by the torch threads each report ran with over
    the job's (a report without them: two threads)."""

    def report(name: str, dataset: str, ablation: str, train: float, share: float, threads: int | None = None) -> None:
        secs = {"train": train, "aggregate": 1.0, "eval": 0.5, "community": 0.1, "sample": 0.0, "round": 9.9}
        body = {"dataset": dataset, "ablation": ablation, "overrides": [], "config": {"client_fraction": share}}
        if threads is not None:
            body["device"] = {"name": "cpu", "torch_threads": threads}
        (tmp_path / name).write_text(json.dumps({**body, "seconds_per_round": secs}))

    report("ml-1m_old.json", "ml-1m", "full", 20.0, 0.05)
    report("speed_ml-1m_new.json", "ml-1m", "full", 3.0, 0.1)
    report("speed_ml-100k.json", "ml-100k", "full", 0.1, 1.0)
    report("speed_ml-1m_backbone.json", "ml-1m", "backbone", 0.2, 1.0)
    (tmp_path / "kernels.json").write_text(json.dumps({"dataset": "ml-1m", "rows": []}))
    config = {"dataset": {"name": "ml-1m"}, "ablation": {"ica": True, "gsa": True}, "model": {"alignment": "fast"}}
    assert campaign.seconds_per_round(config, [], tmp_path) == pytest.approx(2.0 * ((3.0 + 1.0) / 0.1 + 0.6))
    plain = {**config, "ablation": {"ica": False, "gsa": False}}
    assert campaign.seconds_per_round(plain, [], tmp_path) == pytest.approx(2.0 * (0.2 + 1.0 + 0.6))
    # fed_itemknn uploads similarities without aligning: costed as an aligned run until a bench of its own exists
    knn = {**config, "ablation": {"ica": False, "gsa": False, "name": "fed_itemknn", "method": "fed_itemknn"}}
    assert campaign.seconds_per_round(knn, [], tmp_path) == pytest.approx(2.0 * ((3.0 + 1.0) / 0.1 + 0.6))
    report("native_ml-1m_fed_itemknn.json", "ml-1m", "fed_itemknn", 0.5, 0.1)
    assert campaign.seconds_per_round(knn, [], tmp_path) == pytest.approx(2.0 * ((0.5 + 1.0) / 0.1 + 0.6))
    # the same figures measured with one torch thread are one one-thread job's time as they stand (not doubled), so
    # that report now costs the plain run; a two-thread job takes half of it
    report("touched_ml-1m_backbone.json", "ml-1m", "backbone", 0.2, 1.0, threads=1)
    assert campaign.seconds_per_round(plain, [], tmp_path) == pytest.approx(0.2 + 1.0 + 0.6)
    assert campaign.seconds_per_round(plain, [], tmp_path, threads=2) == pytest.approx((0.2 + 1.0 + 0.6) / 2)
    # a report of the same method in another alignment mode is no measurement of it: the exact run keeps the scaled
    # fallback (no exact report of ML-1M here), not the fast report of `full`
    exact = {**config, "ablation": {"ica": True, "gsa": True, "name": "full", "method": "alignfedrec"}}
    exact["model"] = {"alignment": "exact"}
    scaled = 15.0 * (6040 * 3706) / (943 * 1682) * 3706 / 1682
    assert campaign.seconds_per_round(exact, [], tmp_path) == pytest.approx(scaled)


# the ablations that train an alignment term (ICA or GSA), written out
ALIGNING = {"full", "no_ica", "no_gsa", "knn_ica", "knn_full"}


@pytest.mark.parametrize("ablation", sorted(p.stem for p in (campaign.CONF_DIR / "ablation").glob("*.yaml")))
def test_cost_kind_and_bench_matching_agree_on_whether_an_ablation_aligns(ablation, compose_cfg):
    """The estimate reads an ablation's yaml (bench reports) and a composed config (stored runs): both must say
    whether it aligns as the method does, else a run's cost is taken from the wrong kind of measurement."""
    config = OmegaConf.to_container(compose_cfg(["dataset=synthetic", f"ablation={ablation}"]), resolve=True)
    assert campaign.aligns(ablation) == (ablation in ALIGNING) == campaign.run_kind(config)[1]


def test_a_resume_may_not_switch_the_graph_diagnostics():
    """diag.graph changes no result (outside identity) but counts edges against round 1's graph, which a run started
    without it never kept: a resume keeps it as run, while keys that only say where a run logs may change."""
    from src.config.identity import resume_mismatch

    def config(*overrides: str) -> dict:
        return OmegaConf.to_container(compose_config(["dataset=synthetic", *overrides]), resolve=True)

    plain = config()
    assert campaign.identity(config("diag.graph=true")) == campaign.identity(plain)
    assert resume_mismatch(plain, config("diag.graph=true")) == ["diag.graph: False -> True"]
    assert resume_mismatch(plain, config("experiment_name=other")) == []


def test_stored_runs_are_read_again_only_where_a_record_changed(tmp_path, monkeypatch):
    """The stored runs a campaign checks before each run it starts: a record rewritten (another computation) or
    removed since the last look is seen; one unchanged is not parsed again."""
    from src.cli import store
    from src.runtime.atomic import atomic_write_text

    def record(folder: Path, seed: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        config = OmegaConf.to_container(compose_config(["dataset=synthetic", f"seed={seed}"]), resolve=True)
        atomic_write_text(folder / "results.json", json.dumps({"config": config}))  # as the store writes
        (folder / "run.json").write_text("{}")

    a, b = tmp_path / "a" / "seed0", tmp_path / "b" / "seed0"
    record(a, 0)
    record(b, 1)
    first = store.stored_runs(tmp_path)
    assert sorted(first.values()) == [a, b]
    parsed: list[int] = []
    real_identity = store.identity
    monkeypatch.setattr(store, "identity", lambda config: parsed.append(1) or real_identity(config))
    assert store.stored_runs(tmp_path) == first and parsed == []  # unchanged: not parsed again
    record(b, 2)  # rewritten: another computation in the same folder
    (a / "run.json").unlink()  # no longer a stored run
    (again,) = store.stored_runs(tmp_path).items()
    assert again[1] == b and again[0] not in first and parsed == [1]
    (b / "results.json").write_text("not json")  # unreadable: skipped with a warning, not the old key
    assert store.stored_runs(tmp_path) == {}


def test_a_run_stored_by_hand_keeps_the_overrides_that_name_its_computation(tmp_path):
    """`campaign store <run folder>` records what the run was started with (its Hydra record) without where it ran,
    how fast or on which device (a key or its whole group), as the campaign records its own, so its variant folder
    and `recheck` see the same run."""
    from src.cli.store import run_overrides

    assert run_overrides(tmp_path) == []  # no Hydra record: nothing to read
    (tmp_path / ".hydra").mkdir()
    given = [
        "experiment=table1",
        "dataset=ml-1m",
        "ablation=knn_ica",
        "+ablation.alpha=0.05",
        "compute.compile=true",
        "device=cpu",
        "fl.chunk_size=auto",
        "data.cache_dir=/tmp/x",
        "resume=true",
        "logger=wandb",
        "~trainer.foo",
        "optim=sgd",
        "flower.secagg=true",
        "flower.supernodes=4",
        "seed=2",
    ]
    (tmp_path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(given))
    kept = ["experiment=table1", "dataset=ml-1m", "ablation=knn_ica", "+ablation.alpha=0.05", "optim=sgd"]
    kept += ["flower.secagg=true", "seed=2"]  # SecAgg+ clips and rounds the uploads: it changes the numbers
    assert run_overrides(tmp_path) == kept
    assert campaign.variant_name(kept) == "+ablation.alpha=0.05_flower.secagg=true_optim=sgd"
    (tmp_path / ".hydra" / "overrides.yaml").write_text("dataset: ml-1m\n")
    with pytest.raises(UserError, match="holds a dict; expected Hydra's list of overrides"):
        run_overrides(tmp_path)


def test_a_run_stored_by_hand_lands_where_the_campaign_would_put_it_and_rechecks(tmp_path, capsys):
    """A hand run's record, stored with `campaign store`: the campaign's folder for its overrides, overrides that
    compose again to the stored config (what `recheck` needs); stored twice, or under another experiment, it is
    refused rather than filed a second time or mislabelled."""
    from src.cli import recheck

    overrides = [SMOKE, "ablation=local", "seed=0", "fl.rounds=2"]
    config = OmegaConf.to_container(compose_config(overrides), resolve=True)
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    extras = ["device=cpu", "fl.chunk_size=auto", "resume=true", "logger=wandb", "data.cache_dir=/tmp/x"]
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, *extras]))
    history = [{"round": r, "val/hit@10": 0.1 * r, "test/hit@10": 0.1} for r in (1, 2)]
    payload = {"finished": True, "config": config, "best_round": 2, "history": history, "test_at_best": {}}
    (run / "results.json").write_text(json.dumps(payload))
    root = tmp_path / "runs"
    with pytest.raises(UserError, match="started with experiment=campaign_smoke; expected --experiment campaign_smoke"):
        campaign.main(["store", str(run), "--experiment", "table1", "--runs", str(root)])
    assert not root.exists()
    assert campaign.main(["store", str(run), "--experiment", "campaign_smoke", "--runs", str(root)]) == 0
    (dest,) = [p.parent for p in root.rglob("run.json")]
    assert dest.relative_to(root).as_posix() == "campaign_smoke/synthetic/local/clean/fl.rounds=2/seed0"
    (planned,) = campaign.expand("campaign_smoke", ["ablation=local", "seed=0", "fl.rounds=2", "device=cpu"])
    assert planned.variant == "fl.rounds=2" and planned.key == json.loads((dest / "run.json").read_text())["key"]
    again, stored = recheck.stored_record(dest)
    recheck.same_run(again, stored["config"], dest)  # composes again to the stored config: no error
    capsys.readouterr()
    twin = tmp_path / "twin"  # the same computation in another folder, stored in the same call
    (twin / ".hydra").mkdir(parents=True)
    (twin / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, "fl.rounds=2"]))
    (twin / "results.json").write_text(json.dumps(payload))
    shutil.rmtree(root)
    assert campaign.main(["store", str(run), str(twin), "--experiment", "campaign_smoke", "--runs", str(root)]) == 0
    assert f"not stored {twin}: the same computation is stored in {dest}" in capsys.readouterr().out
    assert campaign.main(["store", str(run), "--experiment", "campaign_smoke", "--runs", str(root)]) == 0
    assert f"the same computation is stored in {dest}" in capsys.readouterr().out
    assert len(list(root.rglob("run.json"))) == 1
