"""The experiment engine end to end: results.json, determinism, kill and resume, dropout, client
sampling, W&B offline and resume errors. Real FilmTrust where the data matters, synthetic elsewhere."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from src.cli.train import train
from src.runtime.loggers import make_loggers, run_name
from src.runtime.results import DEFAULT_SELECT
from tests.conftest import requires_real_data
from tests.wandb_records import assert_holds_the_run, finished_contents

REPO = Path(__file__).resolve().parents[1]
# the engine tests run the PFedRec backbone with the lineage SGD (cheap rounds); AlignFedRec below
FILMTRUST = ["dataset=filmtrust", "ablation=backbone", "optim=sgd", "fl.rounds=3", "fl.checkpoint_every=0"]
PER_ROUND = [
    "round",
    "val/hit@10",
    "test/hit@10",
    "val/ndcg@10",
    "test/ndcg@10",
    "loss/bce",
    "time/sample",
    "time/train",
    "time/aggregate",
    "time/eval",
    "time/round",
    "clients",
    "reported",
]


def metrics(history: list[dict]) -> list[dict]:
    """Each round's values without the wall-clock timings."""
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in history]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def assert_close(a: list[dict], b: list[dict], tol: float) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert abs(ra[k] - rb[k]) <= tol, (ra["round"], k, ra[k], rb[k])


@pytest.fixture(scope="module")
def filmtrust_run(compose_cfg, tmp_path_factory):
    """One 3-round FilmTrust run (seed 0): its config, run folder and results.json payload."""
    cfg = compose_cfg(FILMTRUST)
    run_dir = tmp_path_factory.mktemp("filmtrust-s0")
    return cfg, run_dir, train(cfg, run_dir, progress=False)


@requires_real_data
def test_results_contract(filmtrust_run):
    cfg, run_dir, payload = filmtrust_run
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(payload))
    for key in (
        "config",
        "dataset",
        "protocol",
        "ablation",
        "seed",
        "summary",
        "history",
        "best_round",
        "best_val",
        "test_at_best",
        "timings",
        "finished",
    ):
        assert key in on_disk, key
    assert on_disk["config"] == OmegaConf.to_container(cfg, resolve=True)
    assert (on_disk["dataset"], on_disk["protocol"], on_disk["seed"], on_disk["finished"]) == (
        "filmtrust",
        "clean",
        0,
        True,
    )

    history = on_disk["history"]
    assert [r["round"] for r in history] == [1, 2, 3]
    for row in history:
        assert set(PER_ROUND) <= row.keys(), set(PER_ROUND) - row.keys()
        assert all(math.isfinite(v) for v in row.values())
        assert 0 <= row["test/ndcg@10"] <= row["test/hit@10"] <= 1

    # best round chosen on validation hit@10 (earliest on ties), recomputed here
    best = max(range(len(history)), key=lambda i: (history[i][DEFAULT_SELECT], -i))
    assert on_disk["best_round"] == history[best]["round"]
    assert on_disk["test_at_best"] == {k: v for k, v in history[best].items() if k.startswith("test")}
    assert on_disk["best_val"] == {k: v for k, v in history[best].items() if k.startswith("val")}
    assert {"test/hit@10", "test/ndcg@10"} <= on_disk["test_at_best"].keys()
    assert set(on_disk["timings"]) >= {"setup_s", "total_s", "mean_round_s"}
    assert all(v > 0 for v in on_disk["timings"].values())

    # what ran it and its peak memory: the kernel's own high-water mark of this process bounds the recorded
    # peak (the run happened in this process, earlier), and the run's FilmTrust tables alone need some MiB
    res = on_disk["resources"]
    assert res["peak_rss_mib"] > 50 and res["cpu_count"] == os.cpu_count() and res["torch_threads"] >= 1
    if Path("/proc/self/status").is_file():
        status = Path("/proc/self/status").read_text().splitlines()
        assert res["peak_rss_mib"] <= next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
    on_gpu = res["type"] == "cuda"
    assert res["type"] in ("cpu", "cuda") and res["name"] and (res["peak_gpu_mib"] is not None) == on_gpu

    resolved = yaml.safe_load((run_dir / "config_resolved.yaml").read_text())
    assert resolved == on_disk["config"]

    rows = read_csv(run_dir / "csv" / "metrics.csv")
    assert [int(r["round"]) for r in rows] == [1, 2, 3]
    for row, hist in zip(rows, history):
        assert {k: float(v) for k, v in row.items()} == {k: float(v) for k, v in hist.items()}


@requires_real_data
def test_same_seed_same_metrics(filmtrust_run, compose_cfg, tmp_path):
    _, _, first = filmtrust_run
    again = train(compose_cfg(FILMTRUST), tmp_path / "again", progress=False)
    assert metrics(again["history"]) == metrics(first["history"])
    other = train(compose_cfg(FILMTRUST + ["seed=1", "fl.rounds=2"]), tmp_path / "seed1", progress=False)
    for a, b in zip(metrics(other["history"]), metrics(first["history"])):
        assert a["round"] == b["round"]
        assert a != b
        assert (a["val/hit@10"], a["test/hit@10"], a["loss/bce"]) != (b["val/hit@10"], b["test/hit@10"], b["loss/bce"])


@pytest.mark.slow  # a real SIGKILL; in the fast suite: a SIGTERM'd process resumed, and in-process resumes
@requires_real_data
def test_kill_and_resume_matches_uninterrupted(compose_cfg, cache_dir, tmp_path):
    overrides = ["dataset=filmtrust", "data.max_users=300", "ablation=backbone", "optim=sgd", "fl.rounds=6"]
    overrides.append(f"data.cache_dir='{cache_dir}'")
    run_dir = tmp_path / "a"
    env = {**os.environ, "ALIGNFEDREC_CACHE": str(tmp_path / "cache")}
    env.pop("ALIGNFEDREC_DATA", None)
    cmd = [sys.executable, "-m", "src.run", *overrides, "fl.checkpoint_every=2", f"hydra.run.dir='{run_dir}'"]
    csv_path, last = run_dir / "csv" / "metrics.csv", run_dir / "checkpoints" / "last.ckpt"

    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 150
    try:
        while True:
            assert proc.poll() is None, (
                f"run ended (rc {proc.returncode}) before it could be killed: "
                f"{(tmp_path / 'killed.log').read_text()[-3000:]}"
            )
            assert time.monotonic() < deadline, "round 3 never finished"
            done = len(read_csv(csv_path)) if csv_path.is_file() else 0
            if done >= 3 and last.is_file():
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "results.json").exists()
    before = read_csv(csv_path)
    assert 3 <= len(before) < 6
    # as if the kill had also hit a checkpoint write: the stale temporary file must not survive
    (run_dir / "checkpoints" / ".last.ckpt.tmp").write_bytes(b"half a checkpoint")

    resumed = subprocess.run(cmd + ["resume=true"], cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    history = json.loads((run_dir / "results.json").read_text())["history"]
    assert [r["round"] for r in history] == [1, 2, 3, 4, 5, 6]
    # rounds 1-2 come from the checkpoint (their timings too), not from a fresh start
    assert history[0]["time/round"] == float(before[0]["time/round"])
    assert not [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    rows = read_csv(csv_path)
    assert [int(r["round"]) for r in rows] == [1, 2, 3, 4, 5, 6]

    # uninterrupted, in another folder; without checkpoints, which must not change the numbers either
    reference = train(compose_cfg(overrides + ["fl.checkpoint_every=0"]), tmp_path / "b", progress=False)
    assert_close(metrics(history), metrics(reference["history"]), 1e-6)


def test_alignfedrec_resume_matches_uninterrupted(compose_cfg, tmp_path):
    """Labels, S_g, the delta ledger and the client choice come back from the checkpoint (noise is keyed by round)."""
    base = ["dataset=synthetic", "ablation=full", "encoding=csr8_delta", "privacy.epsilon=200", "fl.checkpoint_every=1"]
    base.append("fl.client_fraction=0.5")  # half the clients a round: the choice draws from the restored generator
    straight = train(compose_cfg(base + ["fl.rounds=4"]), tmp_path / "a", progress=False)
    train(compose_cfg(base + ["fl.rounds=2"]), tmp_path / "b", progress=False)
    resumed = train(compose_cfg(base + ["fl.rounds=4", "resume=true"]), tmp_path / "b", progress=False)
    assert all(row["clients"] == 30 for row in resumed["history"])  # half of the synthetic split's 60
    keys = ["val/hit@10", "test/hit@10", "loss/ica", "loss/gsa", "comm/upload_bytes_total", "community/count"]
    for a, b in zip(straight["history"], resumed["history"], strict=True):
        for k in keys:
            assert (k in a) == (k in b) and (k in a or (a["round"] == 1 and k.startswith("loss/"))), (a["round"], k)
            if k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), (a["round"], k)
    # delta encoding pays from round 2 on: later uploads are smaller than the first
    assert straight["history"][3]["comm/upload_bytes_mean"] < straight["history"][0]["comm/upload_bytes_mean"]


def test_dropout_some_clients_fail(compose_cfg, tmp_path):
    payload = train(
        compose_cfg(["dataset=synthetic", "fl.rounds=3", "fl.dropout=0.5", "fl.checkpoint_every=0"]),
        tmp_path,
        progress=False,
    )
    history = payload["history"]
    assert len(history) == 3
    assert all(r["reported"] <= r["clients"] for r in history)
    assert any(r["reported"] < r["clients"] for r in history)
    assert all(math.isfinite(v) for r in history for v in r.values())


def test_client_fraction(compose_cfg, tmp_path):
    payload = train(
        compose_cfg(["dataset=synthetic", "fl.rounds=2", "fl.client_fraction=0.5", "fl.checkpoint_every=0"]),
        tmp_path,
        progress=False,
    )
    n_users = payload["summary"]["users"]
    assert n_users > 1
    assert [r["clients"] for r in payload["history"]] == [round(0.5 * n_users)] * 2


def test_wandb_offline_runs_stay_separate(compose_cfg, tmp_path, wandb_offline):
    wandb = wandb_offline
    run_files = []
    for seed in (0, 1):
        cfg = compose_cfg(["dataset=synthetic", "fl.rounds=2", "fl.checkpoint_every=0", "logger=wandb", f"seed={seed}"])
        name = run_name(cfg)
        assert name == f"synthetic-full-clean-s{seed}"
        loggers = make_loggers(cfg, tmp_path / "probe")
        assert [type(lg).__name__ for lg in loggers] == ["RoundCSVLogger", "ResumableWandbLogger"]
        init = loggers[1]._wandb_init  # lazy: nothing started yet
        assert (init["name"], init["group"], init["mode"]) == (name, "adhoc", "offline")

        run_dir = tmp_path / f"s{seed}"
        payload = train(cfg, run_dir, progress=False)
        assert len(payload["history"]) == 2
        assert wandb.run is None, "the W&B run was not finished"
        found = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")) + sorted(
            (tmp_path / "wandb-dir").glob("**/offline-run-*/run-*.wandb")
        )
        assert len(found) == 1, found
        finished_contents(found[0])  # wandb-core writes the run's records a moment after finish() returns
        assert name.encode() in found[0].read_bytes()
        run_files.append(found[0])
    assert run_files[0].name != run_files[1].name  # two run ids
    # what the W&B run holds, read from its file: every round's metrics as the history has them (the step is the
    # round), the resolved config, and the best round's test metrics as its summary
    payload = json.loads((tmp_path / "s1" / "results.json").read_text())
    assert [row["round"] for row in payload["history"]] == [1, 2] and payload["config"]["seed"] == 1
    assert_holds_the_run(run_files[1], payload)
    assert b"synthetic-full-clean-s0" not in run_files[1].read_bytes()
    assert b"synthetic-full-clean-s1" not in run_files[0].read_bytes()


def test_resume_without_checkpoint_names_the_path(compose_cfg, tmp_path):
    cfg = compose_cfg(["dataset=synthetic", "fl.rounds=2", "resume=true"])
    expected = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(expected))):
        train(cfg, tmp_path, progress=False)
    other = tmp_path / "elsewhere"
    cfg = compose_cfg(["dataset=synthetic", "fl.rounds=2", f"resume='{other}'"])
    with pytest.raises(FileNotFoundError, match=re.escape(str(other / "checkpoints" / "last.ckpt"))):
        train(cfg, tmp_path / "run", progress=False)


def test_methods_share_what_they_should(compose_cfg, monkeypatch):
    """backbone: every client starts a round from the server's mean item table (the mean of what the clients uploaded
    last round); local: each client from its own table, nothing shared; fedavg: the score function too. The tables
    each chunk starts training from are read where local training receives them."""
    import torch

    from src.data.dataset import build
    from src.rounds import local
    from src.rounds.simulator import FederatedModule

    started: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []  # (rows, the parameters they start from)
    layout, cohort = local.batch_layout, local.train_cohort

    def spy_layout(samples, rows, *args):
        started.append((rows.clone(), {}))
        return layout(samples, rows, *args)

    def spy_cohort(params, *args):
        started[-1][1].update({k: v.clone() for k, v in params.items()})
        return cohort(params, *args)

    monkeypatch.setattr(local, "batch_layout", spy_layout)
    monkeypatch.setattr(local, "train_cohort", spy_cohort)
    tables = {}
    for ablation in ("backbone", "local", "fedavg"):
        cfg = compose_cfg(["dataset=synthetic", f"ablation={ablation}", "fl.rounds=2", "fl.chunk_size=16"])
        data = build(cfg.dataset, cfg.protocol, cfg.seed, cfg.data.root, cfg.data.cache_dir)
        module = FederatedModule(cfg, data)
        module.run_round()
        uploaded_mean = module.state["items"].double().mean(dim=0)
        if ablation == "local":
            assert module.server == {}
        else:
            assert torch.allclose(module.server["items"].double(), uploaded_mean, atol=1e-6)
        if ablation == "fedavg":
            assert torch.allclose(module.server["w0"].double(), module.state["w0"].double().mean(dim=0), atol=1e-6)
        else:
            assert "w0" not in module.server
        after_one = {k: v.clone() for k, v in module.state.items()}
        server = {k: v.clone() for k, v in module.server.items()}
        started.clear()
        module.run_round()
        assert sorted(torch.cat([rows for rows, _ in started]).tolist()) == list(range(data.n_users))
        for rows, params in started:
            own = after_one["items"][rows]  # what each client ended round 1 with
            if ablation == "local":
                assert torch.equal(params["items"], own)
            else:
                assert torch.equal(params["items"], server["items"].expand_as(own).to(own.dtype))
                assert not torch.equal(params["items"], own)
            if ablation == "fedavg":
                assert torch.equal(params["w0"], server["w0"].expand_as(params["w0"]).to(params["w0"].dtype))
            else:
                assert torch.equal(params["w0"], after_one["w0"][rows])
        tables[ablation + "_2"] = module.state["items"].clone()
    assert not torch.allclose(tables["backbone_2"], tables["local_2"])


@pytest.mark.parametrize("shared", [True, False])
def test_init_of_some_clients_equals_their_rows_of_the_full_init(compose_cfg, shared):
    import torch

    from src.clients.model import ModelSpec, init_params

    cfg = compose_cfg(
        [f"model.shared_init={str(shared).lower()}", "model.user_embedding=true", "model.score_hidden=[4]"]
    )
    rows = torch.tensor([5, 1, 8])
    full = init_params(ModelSpec.from_cfg(cfg.model), 10, 7, torch.Generator().manual_seed(3))
    part = init_params(ModelSpec.from_cfg(cfg.model), 10, 7, torch.Generator().manual_seed(3), rows)
    for k in full:
        assert torch.equal(part[k], full[k][rows]), k


@pytest.mark.parametrize("optim", ["adam", "sgd"])
@pytest.mark.parametrize("gsa", ["rows", "pairs"])
@pytest.mark.parametrize("ablation", ["full", "no_ica", "no_gsa"])
def test_every_alignment_ablation_trains_past_the_first_broadcast(compose_cfg, tmp_path, ablation, gsa, optim):
    """Round 1 has no broadcast yet; rounds 2-3 train with the alignment terms on (fast mode)."""
    payload = train(
        compose_cfg(
            [
                "dataset=synthetic",
                f"ablation={ablation}",
                f"optim={optim}",
                "fl.rounds=3",
                "fl.checkpoint_every=0",
                "model.alignment=fast",
                f"model.fast_gsa={gsa}",
                "ablation.sigma=0.01",
            ]
        ),
        tmp_path,
        progress=False,
    )
    last = payload["history"][-1]
    assert payload["finished"] and math.isfinite(last["val/hit@10"])
    assert ("loss/ica" in last) == (ablation != "no_ica") and ("loss/gsa" in last) == (ablation != "no_gsa")


@pytest.mark.parametrize("ablation", ["central", "popularity"])
def test_central_holds_no_client_tables_and_resumes(compose_cfg, tmp_path, ablation):
    """A centralised method trains its own model: the module keeps no per-client tables (nor its checkpoint),
    and a resumed run gives the uninterrupted one's numbers."""
    from src.data.dataset import load
    from src.rounds.simulator import FederatedModule

    base = ["dataset=synthetic", f"ablation={ablation}", "fl.checkpoint_every=1"]
    module = FederatedModule(compose_cfg(base), load(compose_cfg(base)))
    assert sum(v.numel() for v in module.state.values()) == 0
    straight = train(compose_cfg(base + ["fl.rounds=3"]), tmp_path / "a", progress=False)
    train(compose_cfg(base + ["fl.rounds=2"]), tmp_path / "b", progress=False)
    resumed = train(compose_cfg(base + ["fl.rounds=3", "resume=true"]), tmp_path / "b", progress=False)
    assert metrics(resumed["history"]) == metrics(straight["history"])
