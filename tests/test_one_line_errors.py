"""One-line errors: every command reports a bad config, override, path or flag as `error: ...; expected ...`,
exits 2, prints no traceback (unless HYDRA_FULL_ERROR=1) and starts nothing.

Each case runs the command's `__main__` in the test process (`runpy`, as `python -m` runs it); the cases in
`IN_A_PROCESS` and the tests below them run it as a fresh `python -m` process, so that what the shell sees (the exit
status, stderr, no traceback) is checked end to end for a Hydra command and an argparse command.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import MissingConfigException

from src.cli.jobs import command_jobs, grid_jobs
from src.data.dataset import load
from src.rounds.local import training_sampler
from src.runtime.checks import ConfigError
from src.runtime.errors import describe, flatten
from tests.conftest import requires_real_data

REPO = Path(__file__).resolve().parents[1]


def command(module: str, args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` in a fresh process, with the test's isolated caches."""
    environ = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    environ.update(ALIGNFEDREC_CACHE=str(tmp_path / "cache"), **env)
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=environ, capture_output=True, text=True, timeout=300
    )


def in_process(module: str, args: list[str], tmp_path: Path, monkeypatch, capsys) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` run in this process (its `__main__` block through runpy), with the test's caches;
    an exception other than SystemExit propagates and fails the test, as a traceback would."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setenv("ALIGNFEDREC_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", [module, *args])
    for name in (module, f"{module}.__main__"):  # run as a fresh `python -m` runs it, not over an imported copy
        monkeypatch.delitem(sys.modules, name, raising=False)
    capsys.readouterr()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    out = capsys.readouterr()
    return subprocess.CompletedProcess([module, *args], code, out.out, out.err)


CASES = [
    ("src.run", ["dataset=filmtrust", "fl.rounds=abc"], "fl.rounds=abc is invalid; expected an integer >= 1"),
    ("src.run", ["dataset=nope"], "no config 'dataset/nope' in conf/; expected one of dataset: filmtrust"),
    (
        "src.run",
        ["-m", "hydra/sweeper=campaign", "dataset=synthetic"],
        "hydra/sweeper=campaign runs experiment overlays; expected experiment=<overlay>",
    ),
    (
        "src.campaign",
        ["experiment=campaign_smoke", "flower.secagg=true", "--dry-run"],
        "flower.secagg=true: ablation=backbone sends no similarity upload; expected a similarity-sharing method",
    ),
    ("src.run", ["fl.roundz=3"], "no key fl.roundz in the config; expected a key of conf/"),
    ("src.run", ["ablation.alpha=["], "cannot parse override 'ablation.alpha=['; expected key=value"),
    (
        "src.run",
        ["+fl.roundz=3"],
        "override +fl.roundz=3 adds a key the config does not have; expected a key of conf/ "
        "(did you mean fl.rounds=3?)",
    ),
    ("src.run", ["ablation.sigma=-0.5"], "ablation.sigma=-0.5 is invalid; expected a finite number in (0, 1)"),
    (
        "src.run",
        ["ablation.graph_sigma=1.0"],
        "ablation.graph_sigma=1.0 is invalid; expected null or a finite number in (0, 1)",
    ),
    (
        "src.run",
        ["flower.secagg=true"],
        "flower.secagg=true: secure aggregation hides each upload from a server in another process, and the "
        "simulator has none; expected flower.secagg=false",
    ),
    ("src.run", ["dataset=synthetic", "resume=true"], "resume=True: no checkpoint at "),
    (
        "src.run",
        ["dataset=synthetic", "protocol.eval_negatives=100000"],
        "protocol.eval_negatives=100000 is too large for synthetic: user index ",
    ),
    (
        "src.run",
        ["dataset=synthetic", "dataset.min_user_rows=100000"],
        "dataset.min_user_rows=100000 leaves no user of synthetic (the most rows a user has: ",
    ),
    ("src.campaign", ["experiment=table1", "--jobs", "-1"], "--jobs -1 is invalid; expected an integer >= 1"),
    ("src.campaign", ["experiment=table1", "--budget-min", "-5"], "--budget-min -5.0 is invalid; expected a number"),
    ("src.campaign", ["store", "/nonexistent"], "store needs --experiment; expected the usage of"),
    ("src.report", ["results/runs", "--rounds", "0"], "--rounds 0 is invalid; expected an integer >= 1"),
    ("src.campaign", ["experiment=table1", "--jobs", "0"], "--jobs 0 is invalid; expected an integer >= 1"),
    ("src.campaign", ["experiment=nope", "--dry-run"], "no config 'experiment/nope' in conf/; expected one of"),
    (
        "src.campaign",
        ["experiment=campaign_smoke", "data.max_users=5", "--dry-run"],
        "data.max_users=5 cuts the dataset, which no stored run may; expected data.max_users=null",
    ),
    ("src.report", ["results/runs", "--out", "README.md"], "--out README.md is a file; expected a folder"),
    ("src.data", ["dataset=nope"], "no config 'dataset/nope'"),
    ("src.audit", ["fl.rounds=0"], "fl.rounds=0 is invalid; expected an integer >= 1"),
    ("src.bench", ["fl.rounds=0"], "fl.rounds=0 is invalid; expected an integer >= 1"),
    (
        "src.bench",
        ["dataset=synthetic", "fl.rounds=1", 'bench.baseline=["fl.rounds=abc"]'],
        "bench.baseline=['fl.rounds=abc']: fl.rounds=abc is invalid; expected an integer >= 1",
    ),
    # the Flower app keeps no checkpoint: a resume is refused, not started again from round 1 under resume=true
    (
        "src.flower.simulate",
        ["dataset=synthetic", "resume=true", f"flower.run_dir={Path('/nonexistent') / 'run'}"],
        "resume=True: the Flower app keeps no checkpoint",
    ),
    # the loopback deployment checks its overrides before it starts a SuperLink (a bad one was an hour's timeout)
    ("src.flower.loopback", ["fl.rounds=abc"], "fl.rounds=abc is invalid; expected an integer >= 1"),
    ("src.flower.loopback", ["--nodes", "0"], "--nodes=0 is invalid; expected an integer >= 1"),
    (
        "src.flower.loopback",
        ["--certs", "/nonexistent", "dataset=synthetic"],
        "/nonexistent/ca.crt is missing; expected the output of `make certs`",
    ),
]


# what a fresh process prints for these is checked end to end (a Hydra command, an argparse command)
IN_A_PROCESS = {"src.run:dataset=filmtrust fl.rounds=abc", "src.campaign:experiment=table1 --jobs 0"}
IDS = [f"{m}:{' '.join(a)}" for m, a, _ in CASES]


@pytest.mark.parametrize(("module", "args", "message", "case"), [(*c, i) for c, i in zip(CASES, IDS)], ids=IDS)
def test_a_bad_input_is_one_line_and_exit_2(module, args, message, case, tmp_path, monkeypatch, capsys):
    # every place the command would write is under tmp_path: its run folder, its report, the caches
    where = {"src.run": f"hydra.run.dir={tmp_path / 'run'}", "src.bench": f"bench.out={tmp_path / 'bench.json'}"}
    where["src.audit"] = f"audit.out={tmp_path / 'audit.json'}"
    where["src.flower.loopback"] = f"--workdir={tmp_path / 'loopback'}"
    args = [*args, where[module]] if module in where else args
    run = command if case in IN_A_PROCESS else lambda *a: in_process(*a, monkeypatch, capsys)
    out = run(module, args, tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr[-2000:]
    assert lines == [lines[-1]] and lines[0].startswith("error: ") and message in lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr + out.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "it started something"


def test_full_error_shows_the_traceback(tmp_path):
    out = command("src.run", ["fl.rounds=abc", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, HYDRA_FULL_ERROR="1")
    assert out.returncode != 0 and "Traceback" in out.stderr and "ConfigError" in out.stderr


def test_every_job_of_a_multirun_is_checked_before_the_first_starts(tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    out = in_process(
        "src.run",
        ["-m", "dataset=synthetic", "fl.rounds=1", "ablation.sigma=0.5,1.5", f"hydra.sweep.dir={sweep}"],
        tmp_path,
        monkeypatch,
        capsys,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().startswith("error: job 1 of 2 (") and "ablation.sigma=1.5 is invalid" in out.stderr
    assert not sweep.exists()  # job 0 never started


def test_the_jobs_of_a_command_line():
    assert command_jobs(["a=1", "b=2"]) == [["a=1", "b=2"]]
    assert command_jobs(["--cfg", "job"]) is None  # Hydra's own flags: left to Hydra
    jobs = command_jobs(["-m", "seed=0,1", "fl.rounds=2"])
    assert jobs == [["seed=0", "fl.rounds=2"], ["seed=1", "fl.rounds=2"]]
    # an overlay's grid with a command-line axis replacing one of its axes, in place
    assert grid_jobs({"x": "1,2", "y": "a"}, ["x=3"]) == [["x=3", "y=a"]]
    sweep = command_jobs(["-m", "experiment=sweep_sigma", "seed=0"])
    assert sorted(j[0] for j in sweep) == sorted(f"ablation.sigma={s}" for s in ("0.3", "0.5", "0.7"))


def test_messages_are_flattened_to_one_line():
    assert flatten("first.\n\n  second\n") == "first; second"
    err = MissingConfigException("In 'config': Could not find 'dataset/x'", "dataset/x", ["b", "a"])
    assert describe(err) == "no config 'dataset/x' in conf/; expected one of dataset: a, b"


def test_an_output_folder_under_a_file_is_refused_before_hydra_makes_it(tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("")
    args = ["dataset=synthetic", "fl.rounds=1", f"hydra.run.dir={tmp_path / 'afile' / 'x'}"]
    out = in_process("src.run", args, tmp_path, monkeypatch, capsys)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"error: hydra.run.dir={tmp_path / 'afile' / 'x'}: {tmp_path / 'afile'} is a file; expected a folder (or a "
        "path under one)"
    ]


@requires_real_data
def test_flower_simulation_with_more_nodes_than_clients_is_refused_first(tmp_path, monkeypatch, capsys):
    pytest.importorskip("flwr")
    run = tmp_path / "run"
    args = ["dataset=filmtrust", "data.max_users=5", "flower.supernodes=8", "fl.rounds=1", f"hydra.run.dir={run}"]
    out = in_process("src.flower.simulate", args, tmp_path, monkeypatch, capsys)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == (
        "error: flower.supernodes=8 but the split has 5 clients; expected at most 5 (node p holds clients p, p + n, "
        "...: a node without clients cannot train)"
    )
    assert "Traceback" not in out.stderr and not run.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_a_campaign_on_a_missing_gpu_is_refused_before_any_run(tmp_path, monkeypatch, capsys):
    from src.cli import campaign

    def never(*args, **kwargs):
        raise AssertionError("the campaign planned or ran before refusing the device")

    monkeypatch.setattr(campaign, "plan", never)
    monkeypatch.setattr(campaign, "execute", never)
    work = tmp_path / "work"
    args = ["experiment=table1", "--device", "cuda", "--work", str(work)]
    out = in_process("src.campaign", args, tmp_path, monkeypatch, capsys)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: device=cuda is invalid; expected a device this machine has: CUDA is not available here (use "
        "device=auto or device=cpu)"
    ]
    assert out.stdout == "" and not work.exists()


def test_an_unwritable_output_folder_is_refused(tmp_path, monkeypatch):
    """(root writes anywhere, so the folder's permission bits cannot show it here: os.access stands in)"""
    from src.runtime import checks

    monkeypatch.setattr(checks.os, "access", lambda path, mode: False)
    with pytest.raises(
        checks.ConfigError, match=rf"hydra.run.dir={tmp_path}/x: {tmp_path} is not writable; expected a folder"
    ):
        checks.check_output_dir("hydra.run.dir", str(tmp_path / "x"))
    with pytest.raises(checks.ConfigError, match=rf"bench.out={tmp_path}/b.json: {tmp_path} is not writable"):
        checks.check_output_file("bench.out", str(tmp_path / "b.json"))


@pytest.mark.parametrize(
    ("module", "args", "message"),
    [
        ("src.bench", ["bench.out={file}/x.json"], "bench.out={file}/x.json: {file} is a file; expected a path under"),
        ("src.audit", ["audit.out={file}/a.json"], "audit.out={file}/a.json: {file} is a file; expected a path under"),
        ("src.plots", ["curves", "results/runs", "--out", "{file}/p"], "--out={file}/p: {file} is a file; expected a"),
    ],
    ids=["bench under a file", "audit under a file", "plots under a file"],
)
def test_an_output_path_a_command_cannot_write_is_refused_before_it_works(
    module, args, message, tmp_path, monkeypatch, capsys
):
    """The report's path is checked first: the bench or audit would otherwise run to the end and then fail to write."""
    from src.analysis import audit
    from src.perf import bench

    def never(*a, **k):
        raise AssertionError("the command worked before refusing its output path")

    monkeypatch.setattr(bench, "bench", never)
    monkeypatch.setattr(audit, "audit", never)
    (tmp_path / "afile").write_text("")
    fill = {"file": tmp_path / "afile"}
    args = ["dataset=synthetic", *args] if module != "src.plots" else args
    out = in_process(module, [a.format(**fill) for a in args], tmp_path, monkeypatch, capsys)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [out.stderr.strip().splitlines()[-1]]
    assert out.stderr.strip().startswith("error: " + message.format(**fill)), out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_data_root_without_the_dataset_is_refused_before_any_job_starts(tmp_path, monkeypatch, capsys):
    sweep, empty = tmp_path / "sweep", tmp_path / "nodata"
    args = ["-m", "dataset=filmtrust,ml-100k", f"data.root={empty}", "fl.rounds=1", f"hydra.sweep.dir={sweep}"]
    out = in_process("src.run", args, tmp_path, monkeypatch, capsys)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        f"error: job 0 of 2 (dataset=filmtrust data.root={empty} fl.rounds=1 hydra.sweep.dir={sweep}): "
        f"data.root='{empty}': "
        f"{empty / 'filmtrust'} lacks the files of dataset 'filmtrust'; expected one of [['ratings.txt']]"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "it started something"


def test_a_data_variable_that_is_no_folder_is_refused_first(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ALIGNFEDREC_DATA", str(tmp_path / "absent"))
    out = in_process("src.run", ["fl.rounds=1", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, monkeypatch, capsys)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    [line] = out.stderr.strip().splitlines()
    assert line.startswith(f"error: $ALIGNFEDREC_DATA='{tmp_path / 'absent'}': ") and "; expected a data root" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_dataset_found_nowhere_and_not_downloadable_is_one_line(tmp_path, monkeypatch, capsys):
    """A fresh clone without ../shared/data and without network: the download's failure says how to supply the data,
    and the run leaves no folder and no file behind."""
    import urllib.error
    import urllib.request

    from src.data import paths
    from src.data.download import SHARED_DATA

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network here")

    monkeypatch.setattr(paths, "SHARED_DATA", tmp_path / "no-shared-data")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    run = tmp_path / "run"
    args = ["dataset=ml-100k", "fl.rounds=1", f"hydra.run.dir={run}"]
    out = in_process("src.run", args, tmp_path, monkeypatch, capsys)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error: could not download https://files.grouplens.org/datasets/movielens/ml-100k.zip: ")
    assert f"; expected the dataset under ../shared/data ({SHARED_DATA})" in line and "data.root" in line
    assert not run.exists() and [p for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("pool", ["non_train", "non_train_non_candidates"])
def test_the_largest_eval_negatives_the_error_names_runs(compose_cfg, tmp_path, pool):
    """The refusal of a too-large protocol.eval_negatives names a maximum that builds the split and its training
    sampler (a pool without the candidates keeps one item per user outside them), and one more is refused."""
    base = ["dataset=synthetic", f"protocol.train_negative_pool={pool}", f"data.cache_dir={tmp_path}"]
    with pytest.raises(ConfigError) as err:
        load(compose_cfg([*base, "protocol.eval_negatives=100000"]))
    most = int(str(err.value).rsplit("expected at most ", 1)[1])
    data = load(compose_cfg([*base, f"protocol.eval_negatives={most}"]))
    training_sampler(pool, data)  # every user has a training negative left to draw
    with pytest.raises(ConfigError, match=f"expected at most {most}$"):
        load(compose_cfg([*base, f"protocol.eval_negatives={most + 1}"]))


def test_a_cached_split_is_checked_for_the_pool_that_keeps_a_negative_out(compose_cfg, tmp_path):
    """The split's cache key leaves the training-negative pool out (the pool draws nothing of the split): a split
    cached under `non_train` at the largest eval_negatives that pool allows is refused, in the same line as a fresh
    draw, under `non_train_non_candidates`, which keeps one more item per user out of the candidates."""
    base = ["dataset=synthetic", f"data.cache_dir={tmp_path}"]
    with pytest.raises(ConfigError) as err:
        load(compose_cfg([*base, "protocol.train_negative_pool=non_train", "protocol.eval_negatives=100000"]))
    most = int(str(err.value).rsplit("expected at most ", 1)[1])
    available = int(str(err.value).split(" has ", 1)[1].split(" ", 1)[0])
    assert available == 2 * most  # the user with the fewest never-interacted items has none to spare at `most`
    load(compose_cfg([*base, "protocol.train_negative_pool=non_train", f"protocol.eval_negatives={most}"]))
    assert len(list(tmp_path.glob("synthetic-*.npz"))) == 1  # the cached split
    with pytest.raises(ConfigError, match=f"protocol.eval_negatives={most} is too large for synthetic.*keeps one out"):
        load(
            compose_cfg(
                [*base, "protocol.train_negative_pool=non_train_non_candidates", f"protocol.eval_negatives={most}"]
            )
        )


def test_a_reading_tools_warning_is_one_line(tmp_path):
    """A broken results.json is skipped with one `warning: ...` line naming it, not a warning and its source line."""
    from tests.test_report import fake_run

    fake_run(tmp_path / "good")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{not json")
    out = subprocess.run(
        [sys.executable, "-m", "src.report", str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: skipped ") and "bad/results.json" in lines[0], lines
