"""The Hydra config of a Flower run: composed from the run config's `overrides`, checked for Flower."""

from __future__ import annotations

import shlex

from omegaconf import DictConfig

from src.cli.config import ConfigError, load_config, secagg_checks
from src.methods.base import not_federated

_CACHE: dict[str, DictConfig] = {}


def config_of(run_config: dict) -> DictConfig:
    """Compose conf/ with the overrides of `[tool.flwr.app.config]` / `flwr run --run-config`,
    e.g. overrides = "dataset=filmtrust data.max_users=20 fl.rounds=3"."""
    text = str(run_config.get("overrides", ""))
    if text not in _CACHE:
        _CACHE[text] = load_config(shlex.split(text))
    return _CACHE[text]


def flower_checks(cfg: DictConfig) -> None:
    """What the Flower app does not do (the simulator does), refused with the key to change."""
    refusal = not_federated(cfg)
    if refusal is not None:
        raise ConfigError(f"ablation={cfg.ablation.name}: {refusal}")
    if cfg.resume not in (False, None):
        raise ConfigError(
            f"resume={cfg.resume}: the Flower app keeps no checkpoint (the nodes hold the clients' tables), so a run "
            "starts from round 1; expected resume=false, or the simulator (python -m src.run) to resume"
        )
    secagg_checks(cfg)
