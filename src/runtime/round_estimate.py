"""What a bench report says of a whole round (`python -m src.bench` benches a share of the clients).

Read by the campaign's time estimates (src/cli/campaign.py) and the speed table of docs/performance.md
(src/analysis/bench_tables.py).
"""

from __future__ import annotations


def estimated_round_seconds(bench: dict) -> float:
    """Seconds of a whole round estimated from a bench of a share of the clients: train and aggregate (the uploads
    made and summed) grow with the clients chosen; the server's once-a-round work, communities and evaluation do
    not (also the speed table of docs/performance.md, src/analysis/bench_tables.py)."""
    secs = bench["seconds_per_round"]
    share = float(bench.get("config", {}).get("client_fraction", 1.0)) or 1.0
    fixed = secs["eval"] + secs["community"] + secs.get("server", 0.0)
    return (secs["train"] + secs["aggregate"]) / share + fixed
