"""Compose the Hydra config and validate it before any data is read."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from src.protocols import TRAIN_NEGATIVE_POOLS

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


class ConfigError(ValueError):
    """A config value is out of its valid range; the message names the key."""


def _check(ok: bool, key: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config {key}={value!r} is invalid: expected {expected}")


def validate(cfg: DictConfig) -> None:
    """Range checks on every user-facing key; raises ConfigError naming the first bad key."""
    fl, model, proto = cfg.fl, cfg.model, cfg.protocol
    _check(isinstance(cfg.seed, int) and cfg.seed >= 0, "seed", cfg.seed, "an integer >= 0")
    _check(int(fl.rounds) >= 1, "fl.rounds", fl.rounds, "an integer >= 1")
    _check(int(fl.local_epochs) >= 1, "fl.local_epochs", fl.local_epochs, "an integer >= 1")
    _check(0 < float(fl.client_fraction) <= 1, "fl.client_fraction", fl.client_fraction, "a value in (0, 1]")
    _check(int(fl.batch_size) >= 1, "fl.batch_size", fl.batch_size, "an integer >= 1")
    _check(0 <= float(fl.dropout) < 1, "fl.dropout", fl.dropout, "a value in [0, 1)")
    _check(fl.chunk_size is None or fl.chunk_size == "auto" or (isinstance(fl.chunk_size, int) and fl.chunk_size >= 1),
           "fl.chunk_size", fl.chunk_size, "null, auto or an integer >= 1")
    _check(0 < float(fl.memory_fraction) <= 1, "fl.memory_fraction", fl.memory_fraction, "a value in (0, 1]")
    _check(int(fl.checkpoint_every) >= 0, "fl.checkpoint_every", fl.checkpoint_every, "an integer >= 0 (0 = never)")
    _check(int(model.dim) >= 1, "model.dim", model.dim, "an integer >= 1")
    _check(float(model.alpha) >= 0, "model.alpha", model.alpha, "a value >= 0")
    _check(float(model.beta) >= 0, "model.beta", model.beta, "a value >= 0")
    _check(float(model.tau) > 0, "model.tau", model.tau, "a value > 0")
    _check(float(model.tau0) > 0, "model.tau0", model.tau0, "a value > 0")
    _check(-1 <= float(model.sigma) <= 1, "model.sigma", model.sigma, "a value in [-1, 1]")
    _check(model.gsa_mask in ("local", "global", "union"), "model.gsa_mask", model.gsa_mask, "local, global or union")
    _check(model.alignment in ("exact", "fast"), "model.alignment", model.alignment, "exact or fast")
    _check(model.fast_gsa in ("rows", "pairs"), "model.fast_gsa", model.fast_gsa, "rows or pairs")
    _check(model.gsa_reduction in ("sum", "mean"), "model.gsa_reduction", model.gsa_reduction, "sum or mean")
    _check(all(int(h) >= 1 for h in model.score_hidden), "model.score_hidden", model.score_hidden, "a list of sizes >= 1")
    _check(float(cfg.optim.lr) > 0, "optim.lr", cfg.optim.lr, "a value > 0")
    _check(int(proto.eval_negatives) >= 1, "protocol.eval_negatives", proto.eval_negatives, "an integer >= 1")
    _check(int(proto.train_negatives) >= 0, "protocol.train_negatives", proto.train_negatives, "an integer >= 0")
    _check(proto.train_negative_pool in TRAIN_NEGATIVE_POOLS, "protocol.train_negative_pool",
           proto.train_negative_pool, f"one of {TRAIN_NEGATIVE_POOLS}")
    _check(len(cfg.eval.ks) > 0 and all(int(k) >= 1 for k in cfg.eval.ks), "eval.ks", list(cfg.eval.ks),
           "a non-empty list of cutoffs K >= 1")
    _check(cfg.eval.patience is None or int(cfg.eval.patience) >= 1, "eval.patience", cfg.eval.patience,
           "null or an integer >= 1")
    for key in ("item_table", "score_fn"):
        _check(cfg.ablation[key] in ("mean", "personal"), f"ablation.{key}", cfg.ablation[key], "mean or personal")
    if cfg.dataset.name == "synthetic":
        for key in ("n_users", "n_items", "n_communities", "per_user"):
            _check(int(cfg.dataset[key]) >= 1, f"dataset.{key}", cfg.dataset[key], "an integer >= 1")
    comm, priv = cfg.comm, cfg.privacy
    _check(comm.format in ("csr", "coo"), "comm.format", comm.format, "csr or coo")
    _check(comm.topk is None or int(comm.topk) >= 1, "comm.topk", comm.topk, "null or an integer >= 1")
    _check(comm.bits in (32, 16, 8, 4), "comm.bits", comm.bits, "32, 16, 8 or 4")
    _check(isinstance(comm.delta, bool), "comm.delta", comm.delta, "true or false")
    _check(priv.epsilon is None or float(priv.epsilon) > 0, "privacy.epsilon", priv.epsilon, "null or a value > 0")
    _check(priv.scale is None or float(priv.scale) >= 0, "privacy.scale", priv.scale, "null or a value >= 0")
    _check(priv.epsilon is None or priv.scale is None, "privacy.scale", priv.scale,
           "null when privacy.epsilon is set (set one of the two)")
    _check(float(priv.sensitivity) > 0, "privacy.sensitivity", priv.sensitivity, "a value > 0")
    noisy = priv.epsilon is not None or (priv.scale is not None and float(priv.scale) > 0)
    _check(not (noisy and comm.topk is not None), "comm.topk", comm.topk,
           "null when privacy noise is on (top-k would select on noiseless rows)")
    _check(int(cfg.dataset.min_user_rows) >= 0, "dataset.min_user_rows", cfg.dataset.min_user_rows, "an integer >= 0")


def load_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose conf/config.yaml with command-line style overrides (used by the CLIs and tests)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides or []))
    validate(cfg)
    return cfg
