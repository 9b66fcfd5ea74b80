"""`src.campaign recheck`: a stored run's first rounds rerun with today's code, compared with its stored history."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from src.cli import recheck
from src.cli.campaign import main as campaign_main
from src.runtime.results import read_results
from tests.conftest import requires_real_data

REPO = Path(__file__).resolve().parents[1]
# AlignFedRec with the lineage engine (the C kernels), ML-100K, paper protocol: a stored Table 2 run
STORED = REPO / "results" / "runs" / "table2" / "ml-100k" / "full" / "paper" / "optim=sgd" / "seed0"


def test_compare_gives_each_largest_difference_and_what_is_beyond_tolerance():
    stored = [
        {"round": 1, "val/hit@10": 0.5, "test/hit@10": 0.25, "loss/bce": 0.7, "time/round": 3.0},
        {"round": 2, "val/hit@10": 0.6, "test/hit@10": 0.5, "loss/bce": 0.6, "time/round": 3.0},
    ]
    again = [
        {"round": 1, "val/hit@10": 0.5, "test/hit@10": 0.251, "loss/bce": 0.7, "time/round": 9.0},
        {"round": 2, "val/hit@10": 0.61, "test/hit@10": 0.5, "loss/bce": 0.6 * (1 + 2e-4), "time/round": 1.0},
    ]
    largest, beyond = recheck.compare(stored, again, atol=0.005, rtol=1e-4)
    assert largest.keys() == {"val/hit@10", "test/hit@10", "loss/bce"}  # times are not results
    assert largest["val/hit@10"] == pytest.approx(0.01) and largest["test/hit@10"] == pytest.approx(0.001)
    assert largest["loss/bce"] == pytest.approx(1.2e-4)
    assert beyond == ["loss/bce", "val/hit@10"]
    assert recheck.compare(stored, stored, 0.0, 0.0) == ({"val/hit@10": 0, "test/hit@10": 0, "loss/bce": 0}, [])


def test_a_round_or_key_the_rerun_lacks_and_a_value_not_finite_are_beyond_tolerance() -> None:
    stored = [{"round": 1, "val/hit@10": 0.5, "loss/bce": 0.7}, {"round": 2, "val/hit@10": 0.6, "loss/bce": 0.6}]
    missing = ({"val/hit@10": math.inf, "loss/bce": math.inf}, ["loss/bce", "val/hit@10"])
    assert recheck.compare(stored, [], 1.0, 1.0) == missing
    again = [{"round": 2, "val/hit@10": 0.6, "loss/bce": 0.6}, {"round": 1, "val/hit@10": 0.5}]  # rows by round
    assert recheck.compare(stored, again, 0.0, 0.0) == ({"val/hit@10": 0.0, "loss/bce": math.inf}, ["loss/bce"])
    again = [{"round": 1, "val/hit@10": 0.5, "loss/bce": math.nan}, {"round": 2, "val/hit@10": 0.6, "loss/bce": 0.6}]
    largest, beyond = recheck.compare(stored, again, 0.0, 0.0)
    assert beyond == ["loss/bce"] and largest["loss/bce"] == math.inf
    verdict = recheck.Recheck(Path("x"), 2, largest, beyond).verdict
    assert verdict == "differs" and recheck.Recheck(Path("x"), 2, {"a": 0.0}, []).verdict == "identical"


def test_a_run_whose_computation_reads_its_rounds_reruns_all_of_them() -> None:
    history = [{"round": r} for r in (1, 2, 3)]
    assert recheck.rounds_to_rerun({"privacy": {"target_epsilon": None}}, history, 2) == 2
    assert recheck.rounds_to_rerun({}, history, 9) == 3  # never more than it stored
    assert recheck.rounds_to_rerun({"privacy": {"target_epsilon": 4.0}}, history, 2) is None
    assert recheck.rounds_to_rerun({"ablation": {"upload_round": 40}}, history, 2) is None


def test_overrides_that_no_longer_compose_are_named_not_raised(tmp_path: Path) -> None:
    altered = tmp_path / "seed0"
    shutil.copytree(STORED, altered)
    meta = json.loads((altered / "run.json").read_text())
    for extra, why in (("model.fast_kernel=true", "was replaced"), ("experiment=gone", "no longer compose")):
        meta["overrides"] = [*json.loads((STORED / "run.json").read_text())["overrides"], extra]
        (altered / "run.json").write_text(json.dumps(meta))
        with pytest.raises(recheck.RecheckError, match=why):
            recheck.recheck(altered, 1, atol=0.0025, rtol=1e-4, threads=1, work=tmp_path / "work")


@requires_real_data
def test_a_stored_run_reproduces_and_an_altered_record_is_found(tmp_path, capsys):
    same = recheck.recheck(STORED, 1, atol=0.0025, rtol=1e-4, threads=1, work=tmp_path / "work")
    assert same.rounds == 1 and not same.beyond and same.verdict in ("identical", "within tolerance")
    assert {"val/hit@10", "test/hit@10", "loss/bce"} <= same.largest.keys()
    altered = tmp_path / "seed0"
    shutil.copytree(STORED, altered)
    payload = read_results(altered / "results.json")  # a stored record holds its history as columns
    payload["history"][0]["test/hit@10"] += 0.01
    (altered / "results.json").write_text(json.dumps(payload))
    assert campaign_main(["recheck", str(altered), "--rounds", "1"]) == 1
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("differs") and line.endswith("; beyond tolerance: test/hit@10")
    assert "largest difference: metric test/hit@10 " in line


def test_a_record_its_overrides_no_longer_make_is_refused(tmp_path):
    altered = tmp_path / "seed0"
    shutil.copytree(STORED, altered)
    payload = json.loads((altered / "results.json").read_text())
    payload["config"]["optim"]["lr"] *= 2
    (altered / "results.json").write_text(json.dumps(payload))
    with pytest.raises(recheck.RecheckError, match=r"its overrides make another run today \(optim.lr: "):
        recheck.recheck(altered, 1, atol=0.0025, rtol=1e-4, threads=1, work=tmp_path / "work")
    with pytest.raises(recheck.RecheckError, match=r"holds no stored run .*expected a folder of results/runs/"):
        recheck.recheck(tmp_path, 1, atol=0.0025, rtol=1e-4, threads=1, work=tmp_path / "work")


def test_the_command_names_each_folder_it_cannot_recheck_and_goes_on(tmp_path, capsys):
    assert campaign_main(["recheck", str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["not", "rechecked"]] * 2
    assert str(tmp_path / "a") in lines[0] and str(tmp_path / "b") in lines[1]


def test_recheck_arguments_are_checked(capsys):
    with pytest.raises(SystemExit):
        campaign_main(["recheck", str(STORED), "--rounds", "0"])
    assert "--rounds 0 is invalid; expected an integer >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        campaign_main(["recheck"])
    assert "recheck needs stored run folders" in capsys.readouterr().err


def test_a_group_left_at_its_default_then_is_named_as_stored(tmp_path):
    """A run stored when `protocol=paper` was the default named no protocol; today's default is clean."""
    altered = tmp_path / "seed0"
    shutil.copytree(STORED, altered)
    meta = json.loads((altered / "run.json").read_text())
    meta["overrides"] = [o for o in meta["overrides"] if not o.startswith(("protocol=", "optim="))]
    (altered / "run.json").write_text(json.dumps(meta))
    overrides, payload = recheck.stored_record(altered)
    assert overrides[-2:] == ["protocol=paper", "optim=sgd"] and overrides[0] == "experiment=table2"
    recheck.same_run(overrides, payload["config"], altered)  # today's config of them is the stored run
    with pytest.raises(recheck.RecheckError, match=r"protocol.name: 'paper' -> 'clean'"):
        recheck.same_run(overrides[:-2] + ["optim=sgd"], payload["config"], altered)
