"""The docs tables read from single stored records (`src/analysis/record_tables.py`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from src.analysis import record_tables
from src.analysis.report import block_kinds, generated
from src.cli.train import train
from src.runtime.errors import UserError
from tests.test_report import fake_run


def diag_row(round_: int, hit: float, spearman: float, edges: int, share: float, communities: int) -> dict:
    return {
        "round": round_,
        "val/hit@10": hit,
        "diag/spearman_cooccurrence": spearman,
        "diag/edges": float(edges),
        "diag/edges_from_round1": share,
        "community/count": float(communities),
        "community/edges": float(edges),
        "community/non_singleton": float(communities - 1),
    }


def test_diag_rows_are_the_named_rounds_of_the_run_with_its_best_marked(tmp_path):
    history = [diag_row(k, 0.1 * k, 0.01 * k, 1000 - k, 1.0 / k, 10 + k) for k in range(1, 6)]
    fake_run(tmp_path / "probe", history=history, best_round=4)
    text = generated("diag:probe@1,4", tmp_path)
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[2] == "| 1 | 10.00 | 0.010 | 999 | 100% | 11 | - | - |"
    assert lines[3] == "| 4 (best) | 40.00 | 0.040 | 996 | 25% | 14 | - | - |"
    # two runs side by side, each column its own run's values; the second averages S_g over supporters
    other = [diag_row(k, 0.05 * k, 0.3 * k, 2000 + k, 0.1 * k, 5) for k in range(1, 4)]
    support = {"seed": 0, "ablation": {"aggregate": "support_mean"}}
    fake_run(tmp_path / "support", history=other, best_round=3, ablation="knn_ica", config=support)
    side = generated("diagvs:probe,support@2", tmp_path).splitlines()
    assert side[0] == "| round | `backbone` | `knn_ica`, support mean |"
    assert side[2] == "| 2 | 0.02 / 50% / 20.0 | 0.60 / 20% / 10.0 |"
    graph = generated("graph:probe@3", tmp_path).splitlines()
    assert graph[2] == "| 3 | 997 / 12 |"


def test_a_missing_round_run_or_round_list_is_named(tmp_path):
    fake_run(tmp_path / "probe", history=[diag_row(1, 0.1, 0.0, 5, 1.0, 2)], best_round=1)
    with pytest.raises(UserError, match=r"has no round 7; expected a round from 1 to 1"):
        generated("diag:probe@7", tmp_path)
    with pytest.raises(UserError, match=r"no finished run in .*absent"):
        generated("diag:absent@1", tmp_path)
    with pytest.raises(UserError, match=r"names no rounds"):
        generated("diag:probe", tmp_path)
    with pytest.raises(UserError, match=r"names no rounds"):
        generated("diag:probe@1,x", tmp_path)
    with pytest.raises(UserError, match=r"names 2 runs; expected one"):
        generated("diag:probe,probe@1", tmp_path)
    fake_run(tmp_path / "plain", best_round=1)
    with pytest.raises(UserError, match=r"logged no graph diagnostics; expected a run made with diag.graph=true"):
        generated("diag:plain@1", tmp_path)
    with pytest.raises(UserError, match=r"no audit report in"):
        record_tables.audit10_markdown(tmp_path)


def test_block_kinds_finds_every_block_with_an_argument():
    text = "<!-- comm:ml-100k -->\n<!-- /comm:ml-100k -->\n<!-- diag:a/b@1,2 -->\n<!-- audit10 -->\n<!-- runs:x -->"
    assert block_kinds(text) == ["audit10", "comm:ml-100k", "diag:a/b@1,2", "runs:x"]


def test_comm_table_counts_bytes_per_client_round_and_shows_a_config_once(compose_cfg, tmp_path):
    base = ["dataset=synthetic", "ablation=full", "fl.rounds=2", "fl.checkpoint_every=0", "ablation.sigma=0.3"]
    runs = {
        "comm_sigma/synthetic/a": ["encoding=csr32"],
        "comm_sigma/synthetic/b": ["encoding=csr8"],
        "comm_encoding/synthetic/c": ["encoding=csr32"],  # the same config in the other sweep: one row
    }
    payloads = {k: train(compose_cfg(base + extra), tmp_path / k, progress=False) for k, extra in runs.items()}
    lines = record_tables.comm_markdown(tmp_path, "synthetic").splitlines()
    assert [line.split(" | ")[1] for line in lines[2:]] == ["csr32", "csr8"]
    for line, key in zip(lines[2:], ("comm_sigma/synthetic/a", "comm_sigma/synthetic/b"), strict=True):
        history = payloads[key]["history"]
        embedding = payloads[key]["summary"]["items"] * 32 * 4  # items x dim x fp32: the upload PFedRec would send
        up = sum(r["comm/upload_bytes_mean"] * r["comm/uploaders"] for r in history)
        up /= sum(r["comm/uploaders"] for r in history)
        down = sum(r["comm/download_bytes_total"] for r in history) / sum(r["clients"] for r in history)
        cells = line.split(" | ")
        assert cells[0] == "| 0.3" and cells[2] == f"{up / 1024:,.1f}" and cells[3] == f"{100 * up / embedding:.1f}%"
        assert cells[4] == f"{down / 1024:,.1f}"
        test = payloads[key]["test_at_best"]
        assert cells[5] == f"{100 * test['test/hit@10']:.2f} / {100 * test['test/ndcg@10']:.2f} |"
    with pytest.raises(UserError, match="no stored comm_sigma or comm_encoding run for ml-1m"):
        record_tables.comm_markdown(tmp_path, "ml-1m")


def test_audit10_rows_read_the_audit_reports(tmp_path):
    (tmp_path / "audit").mkdir()
    report = {
        "dataset": "ml-100k",
        "ablation": "full",
        "epsilon_round_entry": 10.0,
        "noise_scale": 0.2,
        "upload_nnz_mean": 1234.4,
        "membership_auc": {"row_sum": 0.5, "row_degree": 0.25, "distance_from_global": 0.75},
        "membership_auc_std": {"row_sum": 0.1, "row_degree": 0.2, "distance_from_global": 0.3},
        "recovery_cosine": 0.671,
        "recovery_cosine_chance": 0.114,
    }
    (tmp_path / "audit" / "a.json").write_text(json.dumps(report))
    line = record_tables.audit10_markdown(tmp_path).splitlines()[2]
    assert line == ("| ml-100k | full | 10 (b = 0.2) | 1,234 | 0.50 ± 0.10 | 0.25 ± 0.20 | 0.75 ± 0.30 | 0.67 (0.11) |")


def test_cooccurrence_out_is_what_the_block_shows(tmp_path, monkeypatch, cache_dir: Path):
    from src.analysis import cooccurrence

    out = tmp_path / "cooccurrence.json"
    rows = cooccurrence.main(
        ["--datasets", "synthetic", "--protocols", "clean", "--thresholds", "0.5,0.1", "--out", str(out)]
    )
    lines = record_tables.cooccurrence_markdown(tmp_path).splitlines()
    head = "| dataset | protocol | view | users | items | max share | pairs >= 0.5 | pairs >= 0.1 |"
    assert lines[0] == head and len(lines) == 2 + len(rows)
    for line, r in zip(lines[2:], rows, strict=True):
        cells = [r["view"], f"{r['users']:,}", f"{r['items']:,}", f"{r['max_share']:.3f}"]
        cells += [f"{int(r['pairs>=0.5']):,}", f"{int(r['pairs>=0.1']):,}"]
        assert line == "| synthetic | clean | " + " | ".join(cells) + " |"
    with pytest.raises(UserError, match="is absent; expected the output of python -m src.cooccurrence"):
        record_tables.cooccurrence_markdown(tmp_path / "elsewhere")


def test_the_noiseless_privacy_point_is_found_under_a_communication_sweep(compose_cfg, tmp_path):
    """The campaign runs one computation once: the privacy sweep's `none` point may be stored as a communication
    sweep's run; the privacy table shows it, and no run that differs in more than the noise."""
    base = ["dataset=synthetic", "ablation=full", "fl.rounds=2", "fl.checkpoint_every=0"]
    train(compose_cfg([*base, "privacy.epsilon=50"]), tmp_path / "privacy_epsilon/synthetic/a", progress=False)
    # the 8-bit run comes first in the folders read: only the identity of the computation picks the plain one
    train(compose_cfg([*base, "encoding=csr8"]), tmp_path / "comm_sigma/synthetic/c", progress=False)
    plain = train(compose_cfg(base), tmp_path / "comm_encoding/synthetic/b", progress=False)
    lines = record_tables.privacy_markdown(tmp_path, "synthetic").splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| 50", "| none"]
    test = plain["test_at_best"]
    assert lines[3].endswith(f"| {100 * test['test/hit@10']:.2f} / {100 * test['test/ndcg@10']:.2f} |")
    history = plain["history"]
    up = sum(r["comm/upload_bytes_total"] for r in history) / sum(r["comm/uploaders"] for r in history)
    assert lines[3].split(" | ")[1] == f"{up / 1024:,.1f}"  # the fp32 upload, not the 8-bit run's


def test_cost_rows_read_each_runs_own_timings(tmp_path):
    timings = {"total_s": 5400.0, "mean_round_s": 54.0, "processes": 2}
    config = {"seed": 0, "ablation": {"engine": "adam+fast"}}
    resources = {"type": "cpu", "torch_threads": 2, "peak_rss_mib": 9216.0}
    fake_run(tmp_path / "t" / "a", timings=timings, config=config, ablation="full", resources=resources)
    fake_run(tmp_path / "t" / "b", timings={"total_s": 600.0, "mean_round_s": 6.0}, config=config)
    lines = generated("cost:t", tmp_path).splitlines()
    assert lines[0].endswith("| torch threads | peak RSS (GiB) |")
    assert lines[2] == "| synthetic | backbone | clean | adam+fast | 0 | 1 | 6.0 | 10 min | 1 | - | - |"
    assert lines[3] == "| synthetic | full | clean | adam+fast | 0 | 1 | 54.0 | 1.5 h | 2 | 2 | 9.0 |"
    with pytest.raises(UserError, match="no stored run under 'nothing'"):
        generated("cost:nothing", tmp_path)


def test_user_dp_rows_are_the_seed_means_per_target_epsilon(tmp_path):
    """`userdp:<dataset>` groups the stored private_epsilon runs by target epsilon (none last) and shows the mean ±
    std over seeds (numbers computed here by hand), the largest epsilon spent and the noise multiplier."""
    hits = {(4.0, 0): 0.50, (4.0, 1): 0.54, (None, 0): 0.60}
    for (eps, seed), hit in hits.items():
        fake_run(
            tmp_path / "private_epsilon" / "synthetic" / f"e{eps}_s{seed}",
            config={"seed": seed, "privacy": {"target_epsilon": eps}},
            seed=seed,
            privacy={"user_epsilon": 3.999 + seed / 1000, "user_noise_multiplier": 0.8} if eps else {},
            test_at_best={"test/hit@10": hit, "test/ndcg@10": hit / 2, "test_full/hit@10": hit / 10},
        )
    lines = generated("userdp:synthetic", tmp_path).splitlines()
    assert len(lines) == 4
    assert lines[2] == "| 4 | 4.000 | 0.800 | 2 | 52.00 ± 2.83 | 26.00 ± 1.41 | 5.20 ± 0.28 | - |"
    assert lines[3] == "| none | - | 0.000 | 1 | 60.00 ± 0.00 | 30.00 ± 0.00 | 6.00 ± 0.00 | - |"
    with pytest.raises(UserError, match="private_epsilon"):
        generated("userdp:ml-1m", tmp_path)


def test_user_dp_audit_rows_read_the_audit_reports(tmp_path):
    folder = tmp_path / "audit" / "user_dp"
    folder.mkdir(parents=True)
    base = {"dataset": "synthetic", "clients": 20, "membership_auc": {"learned": 0.987}}
    (folder / "a.json").write_text(
        json.dumps(
            {**base, "user_epsilon": 8.0, "release_membership_auc": 0.91, "release_membership_auc_gaussian": 0.93}
        )
    )
    (folder / "b.json").write_text(json.dumps(base))
    lines = generated("userdp_audit", tmp_path / "runs").splitlines()
    assert lines[2:] == ["| synthetic | 8 | 20 | 0.99 | 0.91 | 0.93 |", "| synthetic | none | 20 | 0.99 | - | - |"]


def test_the_user_dp_claim_quotes_the_largest_epsilon_within_8(tmp_path):
    from src.analysis.privacy_tables import claim

    assert claim(tmp_path, "55.71") is None  # nothing stored: no sentence
    for eps, hit in ((4.0, 0.40), (8.0, 0.50), (16.0, 0.60), (None, 0.70)):
        fake_run(
            tmp_path / "private_epsilon" / "ml-100k" / f"e{eps}",
            config={"seed": 0, "privacy": {"target_epsilon": eps}},
            test_at_best={"test/hit@10": hit, "test/ndcg@10": hit / 2},
        )
    assert "hit@10 50.00 at epsilon 8 (1 seed), below PFedRec's 55.71" in claim(tmp_path, "55.71")


def test_secagg_cost_counts_the_dense_vector_against_the_measured_uploads(tmp_path):
    """m = 101 items: 5,050 pairs at 8 bytes = 40,400 bytes dense (39.5 KiB) against the runs' own upload figures."""
    summary = {"items": 101, "users": 4}
    history = [{"round": r, "val/hit@10": 0.5, "comm/upload_bytes_total": 4096.0} for r in (1, 2)]
    fake_run(
        tmp_path / "graph_variants" / "ml-100k" / "fed_itemknn" / "clean" / "s0",
        history=history,
        summary=summary,
        communication={"upload_bytes_mean_per_client_round": 2048.0},
    )
    with pytest.raises(UserError, match="fed_itemknn and private_epsilon"):
        generated("secagg_cost", tmp_path)
    fake_run(
        tmp_path / "private_epsilon" / "ml-100k" / "none",
        config={"seed": 0, "privacy": {"target_epsilon": None}},
        summary=summary,
        communication={"upload_bytes_mean_per_client_round": 512.0},
    )
    lines = generated("secagg_cost", tmp_path).splitlines()
    assert lines[2] == "| ml-100k | 101 | 5,050 | 39 | 2.0 | 20x | 2 | 0.5 |"


def test_a_search_block_lists_the_trials_best_validation_first_with_their_values(tmp_path):
    def trial(name: str, alpha: float, lr: float, engine: str, val: float, best_round: int) -> None:
        config = {"seed": 0, "ablation": {"alpha": alpha, "beta": 5.0, "tau": 0.1, "sigma": 0.5}}
        config["optim"] = {"name": engine, "lr": lr}
        fake_run(
            tmp_path / "search_x" / name,
            config=config,
            ablation="full",
            protocol="paper",
            best_round=best_round,
            best_val={"val/hit@10": val},
            timings={"mean_round_s": 6.25},
        )

    trial("a", 0.001, 0.1, "sgd", 0.5, 40)
    trial("b", 0.0123456, 0.01, "adam", 0.625, 7)
    lines = generated("search:search_x", tmp_path).splitlines()
    assert lines[0] == "2 trials stored (synthetic, full, paper protocol, seed 0), best val/hit@10 first."
    assert lines[2].count("|") == lines[3].count("|") == lines[4].count("|") == 11
    assert lines[4] == "| 1 | adam | 0.01 | 0.0123 | 5 | 0.1 | 0.5 | 7 | 62.50 | 6.2 |"
    assert lines[5] == "| 2 | sgd | 0.1 | 0.001 | 5 | 0.1 | 0.5 | 40 | 50.00 | 6.2 |"
    # the best trial's values, to full precision, in the campaign commands of its seeds
    engine = "optim=adam optim.lr=0.01"
    assert lines[-3:] == [
        f"python -m src.campaign experiment=search_best ablation.alpha=0.0123456 ablation.beta=5.0 ablation.tau=0.1 "
        f"ablation.sigma=0.5 {engine}",
        f"python -m src.campaign experiment=search_best ablation=backbone {engine}",
        "```",
    ]
    with pytest.raises(UserError, match=r"no stored trial under .*absent"):
        generated("search:absent", tmp_path)


def test_the_search_claim_reads_every_method_at_the_best_trials_setting_only(tmp_path):
    def run(folder: str, ablation: str, protocol: str, seed: int, alpha: float, lr: float, engine: str, **kw) -> None:
        config = {"seed": seed, "ablation": {"alpha": alpha, "beta": 5.0, "tau": 0.1, "sigma": 0.5}}
        config |= {"optim": {"name": engine, "lr": lr}, "fl": {"rounds": kw.pop("rounds", 100)}}
        fake_run(tmp_path / folder, config=config, ablation=ablation, protocol=protocol, seed=seed, **kw)

    def result(hit: float) -> dict:
        return {"test_at_best": {"test/hit@10": hit, "test/ndcg@10": 0.0}}

    def canary(dataset: str, engine: str) -> str:
        return f"<local {dataset} {engine}>"

    published = {"full": {"synthetic": [86.85, 73.71]}}
    assert record_tables.search_claim(tmp_path, published, canary) is None  # no search stored yet
    run("search_published/a", "full", "paper", 0, 0.001, 0.1, "sgd", best_val={"val/hit@10": 0.5}, **result(0.99))
    run("search_published/b", "full", "paper", 0, 0.02, 0.01, "adam", best_val={"val/hit@10": 0.625}, **result(0.7))
    for seed, hit in ((1, 0.9), (2, 0.8)):
        run(f"search_best/full/paper/s{seed}", "full", "paper", seed, 0.02, 0.01, "adam", **result(hit))
    run("search_best/full/clean/s0", "full", "clean", 0, 0.02, 0.01, "adam", **result(0.15))
    run("search_best/no_ica/paper/s0", "no_ica", "paper", 0, 0.02, 0.01, "adam", **result(0.7))
    run("search_best/no_ica/paper/other", "no_ica", "paper", 1, 0.5, 0.01, "adam", **result(0.1))  # other alpha
    run("search_best/no_ica/paper/short", "no_ica", "paper", 2, 0.02, 0.01, "adam", rounds=10, **result(0.2))
    run("search_best/backbone/paper/s0", "backbone", "paper", 0, 0.5, 0.01, "adam", **result(0.3))  # alpha unread
    run("search_best/backbone/paper/other", "backbone", "paper", 1, 0.02, 0.1, "adam", **result(0.9))  # other lr
    text = record_tables.search_claim(tmp_path, published, canary)
    # full, paper: the trial (0.7) and seeds 1-2 (0.9, 0.8); the other trial and the other settings' runs are left out
    assert text.startswith("- **No searched setting reaches AlignFedRec's published row** under the paper protocol")
    assert "2 trials" in text and "end at adam with learning rate 0.01" in text
    assert (
        "`full` scores 80.00 (85.00 on the 2 seeds the search never saw) against the published 86.85 (the `local` "
        "canary, which never federates: " in text
    )
    assert "<local synthetic adam>" in text
    assert "full > no_ica > no_gsa > backbone is not yet measured there" in text  # no_gsa has no run
    assert "(no_ica 70.00 (1 seed), no_gsa missing, backbone 30.00 (1 seed))" in text
    assert "the same `full` scores 15.00 (1 seed)" in text
    # the ordering and the head follow the numbers: no_gsa between no_ica and the backbone, full above its row
    run("search_best/no_gsa/paper/s0", "no_gsa", "paper", 0, 0.02, 0.01, "adam", **result(0.5))
    assert "backbone appears there" in record_tables.search_claim(tmp_path, published, canary)
    text = record_tables.search_claim(tmp_path, {"full": {"synthetic": [75.0, 70.0]}}, canary)
    assert text.startswith("- **A search passes AlignFedRec's published row**")
    run("search_best/no_gsa/paper/s1", "no_gsa", "paper", 1, 0.02, 0.01, "adam", **result(0.95))
    assert "backbone does not appear there" in record_tables.search_claim(tmp_path, published, canary)
