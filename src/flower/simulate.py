"""`python -m src.flower.simulate [overrides]`: the Flower app on Flower's simulation runtime, one machine.

The same Hydra config as `python -m src.run`; `flower.supernodes` virtual SuperNodes each hold
every n-th client. The ServerApp writes results.json into the Hydra run folder, like a
simulator run, so `src.report` and the notebook read both.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from src.cli.config import ConfigError, validate
from src.cli.jobs import check_command_line
from src.data.dataset import load
from src.flower.client_app import make_client_app
from src.flower.server_app import make_server_app
from src.flower.settings import flower_checks
from src.runtime import rundir
from src.runtime.results import report_best

log = logging.getLogger(__name__)


def simulate(cfg: DictConfig, run_dir: Path) -> dict:
    """Run `cfg` on Flower's simulation runtime (Ray backend, one CPU per virtual node)."""
    from flwr.simulation import run_simulation

    validate(cfg)
    flower_checks(cfg)
    n_users = load(cfg).n_users  # the split (cached); every virtual node must hold a client
    if int(cfg.flower.supernodes) > n_users:
        raise ConfigError(
            f"flower.supernodes={cfg.flower.supernodes} but the split has {n_users} clients; expected at most "
            f"{n_users} (node p holds clients p, p + n, ...: a node without clients cannot train)"
        )
    per_node = -(-n_users // int(cfg.flower.supernodes))
    if cfg.flower.secagg and per_node > float(cfg.flower.secagg_clip):
        raise ConfigError(
            f"flower.secagg_clip={cfg.flower.secagg_clip} but a node holds up to {per_node} clients, whose summed "
            f"uploads SecAgg+ would clip; expected flower.secagg_clip >= {per_node} (or more flower.supernodes)"
        )
    lock = rundir.claim(run_dir, resuming=False)
    try:
        rundir.write_hydra_files(run_dir, cfg)
        run_simulation(
            server_app=make_server_app(cfg, run_dir),
            client_app=make_client_app(cfg),
            num_supernodes=int(cfg.flower.supernodes),
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {
                    "num_cpus": max(1, min(int(cfg.flower.supernodes), os.cpu_count() or 1)),
                    "include_dashboard": False,
                },
            },
        )
    finally:
        rundir.release(lock)
    results = run_dir / "results.json"
    if not results.is_file():
        raise RuntimeError(f"the Flower simulation ended without writing {results}; see the log above")
    return json.loads(results.read_text())


@hydra.main(config_path="../../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the best round's value of the selection metric (`eval.select`)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    payload = rundir.checked_in(run_dir, lambda: simulate(cfg, run_dir))
    return report_best(payload, run_dir, log)


if __name__ == "__main__":
    # every job composes and validates before Hydra starts the first; a moved key runs under its new name
    sys.argv[1:] = check_command_line(sys.argv[1:], flower_checks)
    main()
