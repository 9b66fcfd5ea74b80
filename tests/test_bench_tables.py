"""The docs tables generated from bench reports (`src/analysis/bench_tables.py`)."""

from __future__ import annotations

import json

import pytest

from src.analysis.report import generated
from src.runtime.errors import UserError


def bench_report(share: float, train: float, aggregate: float, rss: float, baseline: dict | None = None) -> dict:
    secs = {"train": train, "aggregate": aggregate, "server": 0.5, "community": 0.25, "eval": 0.25}
    secs["round"] = sum(secs.values())
    report = {
        "dataset": "ml-1m",
        "protocol": "paper",
        "ablation": "full",
        "n_users": 6040,
        "n_items": 3706,
        "config": {"client_fraction": share},
        "overrides": ["dataset=ml-1m", f"fl.client_fraction={share}", "bench.out=x.json"],
        "seconds_per_round": secs,
        "client_steps_per_second": 1234.4,
        "peak_rss_mib": rss,
        "roofline": {
            "fma_peak_gflop_s": 200.0,
            "train": {"achieved_gflop_s": 50.0, "peak_gflop_s": 100.0, "fma_fraction": 0.25},
            "aggregate": {"achieved_gflop_s": 120.0, "peak_gflop_s": 90.0, "fma_fraction": 0.6},
        },
    }
    if baseline is not None:
        report["baseline"] = baseline
    return report


@pytest.fixture
def runs_root(tmp_path):
    (tmp_path / "bench").mkdir()
    before = bench_report(0.1, 8.0, 4.0, 2048.0)
    after = bench_report(0.1, 2.0, 1.0, 3072.0, baseline=before)
    (tmp_path / "bench" / "after.json").write_text(json.dumps(after))
    (tmp_path / "bench" / "plain.json").write_text(json.dumps(bench_report(1.0, 1.0, 1.0, 512.0)))
    return tmp_path / "runs"


def test_speed_row_estimates_the_whole_round_from_the_share_benched(runs_root):
    row = generated("speed:after", runs_root).splitlines()[2].split(" | ")
    # after: round 2 + 1 + 0.5 + 0.25 + 0.25 = 4 s measured; whole round (2 + 1) / 0.1 + 1 = 31 s
    # before: round 8 + 4 + 1 = 13 s measured; whole round (8 + 4) / 0.1 + 1 = 121 s
    assert row[0] == "| ML-1M, paper (6,040 x 3,706)" and row[1] == "10%"
    assert row[7:14] == ["**4.00**", "13.00", "3.25x", "**31.0 s**", "121.0 s", "3.90x", "52 min"]
    assert row[14] == "3.0 GiB (2.0) |"


def test_phase_and_roofline_rows(runs_root):
    phases = generated("bench:plain", runs_root).splitlines()[2]
    assert phases == (
        "| `python -m src.bench dataset=ml-1m fl.client_fraction=1.0` | 1.00 | 1.00 | 0.25 | 0.25 | **3.00** "
        "| 1,234 | 0.5 GiB |"
    )
    roof = generated("roofline:plain", runs_root).splitlines()[2]
    assert roof == "| ML-1M, paper | 50 / 100 / 200 (25%) | 120 / 90 / 200 (60%) |"


def test_an_absent_report_or_baseline_is_named(runs_root):
    with pytest.raises(UserError, match=r"bench report .*nothing\.json is absent"):
        generated("bench:nothing", runs_root)
    with pytest.raises(UserError, match="has no baseline"):
        generated("speed:plain", runs_root)
