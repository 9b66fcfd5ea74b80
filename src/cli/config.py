"""Compose the Hydra config and validate it before any data is read.

Each group is checked by its dataclass in `src/config/schema.py` (types, ranges, rules within the group); the method's
keys by its own (`KEYS` in src/methods/<ablation.method>.py); what spans groups is checked here and by the method
module's `validate(cfg)`.
"""

from __future__ import annotations

import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from omegaconf import DictConfig, OmegaConf

from src.config import schema
from src.config.schema import Ablation, Group, refuse
from src.methods.base import method_class, method_module
from src.runtime.checks import ConfigError
from src.runtime.results import select_key
from src.runtime.rundir import sweep_tag

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# keys that were replaced (retired from the schema: `schema.RETIRED`, their value in the runs stored before): an
# override of one is refused naming its successor
REPLACED_KEYS = {
    "model.fast_kernel": "compute=fused or compute=reference (the config group conf/compute/)",
    "compute.native": "compute=native or compute=fused (the config group conf/compute/)",
}
# a method's labels, set by its yaml only: `unread` decides which keys tell its runs apart, so an override could
# make two different runs one (src/config/identity.py:normalised)
METHOD_LABELS = ("ablation.engine", "ablation.unread")

schema.register()
# a multirun folder's name carries the values it swept (conf/config.yaml: hydra.sweep.subdir)
OmegaConf.register_new_resolver("sweep_tag", sweep_tag, replace=True)


def validate_device(device: Any) -> None:
    """`device`: auto, cpu, cuda or cuda:N, and a CUDA device must exist on this machine."""
    rule = schema.rule_of(schema.Top, "device")
    if not rule.ok(device):
        refuse("device", device, rule.expected)
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        refuse(
            "device", device, "a device this machine has: CUDA is not available here (use device=auto or device=cpu)"
        )
    index = int(device.split(":")[1]) if ":" in device else 0
    count = torch.cuda.device_count()
    if index >= count:
        refuse("device", device, f"a device this machine has: it has {count} CUDA device(s), cuda:0..cuda:{count - 1}")


def method_keys(cfg: DictConfig) -> type[Ablation]:
    """The dataclass of the method's keys: its module's `KEYS`, or the keys every method has."""
    rule = schema.rule_of(Ablation, "method")
    method = OmegaConf.select(cfg, "ablation.method", default=None)
    if not rule.ok(method):
        refuse("ablation.method", method, f"one of {', '.join(schema.method_modules())} ({rule.expected})")
    module = method_module(cfg)
    if not isinstance(getattr(module, "METHOD", None), type):
        raise ConfigError(
            f"ablation.method={method}: src/methods/{method}.py has no METHOD; expected METHOD = <the Method class its "
            f"build() returns> (the config checks read its traits before anything is built)"
        )
    return getattr(module, "KEYS", Ablation)


def typed(cfg: DictConfig, group: type[Group]) -> Group:
    """The group of `cfg` as its dataclass (which checks it); a key the dataclass lacks, or a required key the config
    lacks, is a ConfigError naming it."""
    keys = {f.name: f for f in fields(group)}
    names = set(keys)
    if group.PATH:
        node = OmegaConf.select(cfg, group.PATH, default=None)
        if not isinstance(node, DictConfig):
            raise ConfigError(f"{group.PATH} is missing; expected the group in the composed config (conf/)")
        values = OmegaConf.to_container(node, resolve=True)
        for name in values:
            if name not in names:
                method = OmegaConf.select(cfg, "ablation.method", default="<method>")
                declare = f" (a method declares its own keys in KEYS of src/methods/{method}.py)"
                raise ConfigError(
                    f"{group.where(name)} is not a key of {group.PATH}; expected one of {', '.join(sorted(names))}"
                    + (declare if group.PATH == "ablation" else "")
                )
    else:
        values = {name: OmegaConf.select(cfg, name, default=None) for name in names if name in cfg}
    for name, f in keys.items():
        if name not in values and f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"{group.where(name)} is missing; expected it in the composed config (conf/)")
    return group(**values)


def validate(cfg: DictConfig) -> None:
    """Type and range checks on every user-facing key; raises ConfigError naming the first bad key.

    Integers must be ints (2.9 is refused, not truncated; a bool is not an int), numbers finite ints or floats,
    choices one of the values the code accepts, and `device` one this machine has.
    """
    groups = {group.PATH: typed(cfg, group) for group in schema.GROUPS}
    validate_device(cfg.device)
    _validate_fixed(cfg, typed(cfg, method_keys(cfg)))
    _validate_lightning(cfg)
    comm, privacy = groups["comm"], groups["privacy"]
    if privacy.laplace and comm.topk is not None:
        refuse("comm.topk", comm.topk, "null when privacy noise is on (top-k would select on noiseless rows)")
    if privacy.clip is not None:
        _validate_user_dp(cfg, privacy.clip)
    check_method = getattr(method_module(cfg), "validate", None)  # what the method needs of the other groups
    if check_method is not None:
        check_method(cfg)


def secagg_checks(cfg: DictConfig) -> None:
    """What secure aggregation needs of the method (`flower.secagg=true`), checked alike by the Flower app and the
    simulator, so both refuse such a config with the same reason before the simulator's own."""
    if not cfg.flower.secagg:
        return
    if not method_class(cfg).uploads_similarity:  # SecAgg+ sums the similarity uploads (src/flower/secagg.py)
        raise ConfigError(
            f"flower.secagg=true: ablation={cfg.ablation.name} sends no similarity upload; expected a "
            "similarity-sharing method (SecAgg+ here sums similarity uploads)"
        )
    if cfg.comm.delta:
        raise ConfigError(
            "comm.delta=true with flower.secagg=true: a delta is taken against one client's last upload, which "
            "the server never sees under secure aggregation; expected comm.delta=false"
        )


def simulator_checks(cfg: DictConfig) -> None:
    """What only the Flower app does, refused in the simulator with the reason (the mirror of
    `src.flower.settings.flower_checks`), so that no stored run is labelled with what it did not do."""
    secagg_checks(cfg)
    if cfg.flower.secagg:
        raise ConfigError(
            "flower.secagg=true: secure aggregation hides each upload from a server in another process, and the "
            "simulator has none; expected flower.secagg=false, or the Flower app (python -m src.flower.simulate)"
        )


# the Lightning callbacks a run may have (conf/callbacks/default.yaml); the checkpoint and the progress bar are the
# run's own (src/cli/train.py)
CALLBACKS = ("early_stopping",)
# Trainer keys that stop a run before fl.rounds or skip part of a round (one epoch is one round), with the values
# that change nothing (Lightning's defaults); unset (null) is fine too
TRAINER_CUTS: dict[str, tuple] = {
    "max_steps": (-1,),
    "max_time": (),
    "min_epochs": (),
    "min_steps": (),
    "limit_train_batches": (1, 1.0),
    "limit_val_batches": (1, 1.0),
    "val_check_interval": (1, 1.0),
    "check_val_every_n_epoch": (1,),
    "overfit_batches": (0, 0.0),
    "fast_dev_run": (False,),
    "accumulate_grad_batches": (1,),
    "precision": ("32-true", "32", 32),
}


def _validate_lightning(cfg: DictConfig) -> None:
    """The Lightning groups follow the run's own keys: they are left out of a run's identity (where and how it is
    driven), so a trainer that stops before `fl.rounds`, or early stopping on another metric (a test metric would
    select on test data) or another patience, would be stored as the run its keys describe."""
    rounds = OmegaConf.select(cfg, "trainer.max_epochs", default=None)
    if rounds != cfg.fl.rounds:  # null or removed too: Lightning would then train 1000 epochs
        refuse("trainer.max_epochs", rounds, f"fl.rounds ({cfg.fl.rounds}); set fl.rounds instead")
    extra = sorted(set(OmegaConf.select(cfg, "callbacks", default=None) or {}) - set(CALLBACKS))
    if extra:
        refuse(
            f"callbacks.{extra[0]}",
            "added",
            f"only {', '.join('callbacks.' + c for c in CALLBACKS)} (a run's identity leaves callbacks out, so a "
            "callback that changed training would label the run with what it did not do)",
        )
    for key, harmless in TRAINER_CUTS.items():
        value = OmegaConf.select(cfg, f"trainer.{key}", default=None)
        if value is not None and not any(value == v and type(value) is type(v) for v in harmless):
            expected = "unset" + "".join(f" or {v!r}" for v in harmless)
            refuse(f"trainer.{key}", value, f"{expected} (it would cut or skip rounds of a run stored as all of them)")
    stopping = OmegaConf.select(cfg, "callbacks.early_stopping", default=None)
    if stopping is None:
        if cfg.eval.patience is not None:
            refuse(
                "eval.patience",
                cfg.eval.patience,
                "null without callbacks.early_stopping (removed, the simulator would never stop early; the Flower app "
                "refuses it alike), or the callback",
            )
        return
    select = select_key(cfg)
    if stopping.get("monitor") != select:
        refuse(
            "callbacks.early_stopping.monitor",
            stopping.get("monitor"),
            f"the selection metric eval.select ({select}); set eval.select instead (a validation metric)",
        )
    if stopping.get("patience") != cfg.eval.patience:
        expected = f"eval.patience ({cfg.eval.patience}); set eval.patience instead"
        refuse("callbacks.early_stopping.patience", stopping.get("patience"), expected)


def _validate_fixed(cfg: DictConfig, ablation: Ablation) -> None:
    """`ablation.central`, `item_table` and `score_fn` as the method implements them: another value would be ignored
    and still label the run (its identity, its tables) with what it did not do."""
    method = method_class(cfg)
    fixed = {"central": method.central}
    if method.tables is not None:
        fixed.update(zip(("item_table", "score_fn"), method.tables, strict=True))
    for key, value in fixed.items():
        if getattr(ablation, key) != value:
            shown = str(value).lower() if isinstance(value, bool) else value
            refuse(f"ablation.{key}", getattr(ablation, key), f"{shown} for ablation.method={cfg.ablation.method}")


def _validate_user_dp(cfg: DictConfig, clip: float) -> None:
    """User-level DP (src/comm/user_dp.py) clips similarity uploads, summed over every user, unquantised."""
    if not method_class(cfg).uploads_similarity:
        refuse(
            "privacy.clip",
            clip,
            f"null for ablation={cfg.ablation.name}: it clips similarity uploads, and this method uploads none",
        )
    if cfg.fl.client_fraction != 1:
        refuse(
            "fl.client_fraction",
            cfg.fl.client_fraction,
            "1 with privacy.clip (a fixed-size draw lets one user displace another: twice the sensitivity accounted)",
        )
    if cfg.comm.bits != 32:
        refuse("privacy.clip", clip, f"comm.bits=32 (quantisation would undo the clip; got {cfg.comm.bits})")
    if cfg.ablation.aggregate != "mean":
        refuse(
            "privacy.clip",
            clip,
            "ablation.aggregate=mean (the noisy sum is divided by the public count of chosen clients)",
        )


NOTICED: set[str] = set()


def renamed(overrides: list[str]) -> list[str]:
    """The overrides with each moved key (`schema.MOVED`, e.g. model.beta -> ablation.beta) under its new name; one
    notice line per key on stderr (once per process)."""
    out = []
    for line in overrides:
        key = schema.override_key(line)
        line = schema.current_name(line)
        if key in schema.MOVED and key not in NOTICED:
            NOTICED.add(key)
            print(
                f"notice: {key} is now {schema.MOVED[key]} (the method's keys: conf/ablation/); running {line}",
                file=sys.stderr,
            )
        out.append(line)
    return out


def refuse_replaced(overrides: list[str]) -> None:
    """A ConfigError naming the successor of the first override of a replaced key (`REPLACED_KEYS`), or refusing an
    override of a method's labels (`METHOD_LABELS`)."""
    for line in overrides:
        key = schema.override_key(line)
        if key in REPLACED_KEYS:
            raise ConfigError(f"{key} was replaced (override {line}); expected {REPLACED_KEYS[key]}")
        if key in METHOD_LABELS:
            raise ConfigError(
                f"override {line} sets a label of the method; expected it in the method's yaml only "
                f"(conf/ablation/<name>.yaml)"
            )


def refuse_misnamed(overrides: list[str], cfg: DictConfig) -> None:
    """`ablation=X` must compose a method named X: runs are stored and labelled under `ablation.name`, so a yaml copied
    from another method with its `name:` left unchanged would file its runs as that method's."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    chosen = [p for p in parsed if p.key_or_group == "ablation" and p.type != OverrideType.DEL]
    if not chosen or not isinstance(chosen[-1].value(), str):
        return
    option = chosen[-1].value()
    name = OmegaConf.select(cfg, "ablation.name", default=None)
    if name != option:
        raise ConfigError(
            f"ablation={option}: conf/ablation/{option}.yaml sets name: {name}; expected name: {option} (runs are "
            f"stored and labelled under it)"
        )


def load_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose conf/config.yaml with command-line style overrides and validate it (the CLIs' tools and the tests).
    Composed as the commands compose each job (`src.cli.jobs.compose_runs`): Hydra composes each set of group
    choices once per process, plain values are applied to a copy as Hydra applies them."""
    from src.cli.jobs import compose_runs  # jobs builds on this module

    cfg = compose_runs([list(overrides or [])], added_keys=True)[0]
    validate(cfg)
    return cfg
