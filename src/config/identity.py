"""Which configs are one computation: the run identity of the campaign and the report, and what a resume may change.

A stored config is first read under today's key names (`moved`: the keys `schema.MOVED` lists at their new place),
then flattened to `group.key` leaves; keys that say only where a run writes or how fast it computes are left
out, and so is every key added after runs were stored while it holds the value those runs had (the schema marks
them: `key(..., added=...)` in src/config/schema.py and in the methods' `KEYS`), or a retired key its old value
(`schema.RETIRED`). A record stored before a key existed and one made today with its neutral value are one run.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
from dataclasses import fields
from functools import cache
from typing import Any

from src.config import schema

# the method module of each ablation in records stored before `ablation.method` existed (frozen: those records are)
METHOD_BEFORE_THE_KEY = {
    "full": "alignfedrec",
    "no_ica": "alignfedrec",
    "no_gsa": "alignfedrec",
    "backbone": "sharing",
    "fedavg": "sharing",
    "local": "sharing",
    "central": "central",
    "popularity": "central",
    "itemknn": "central",
}


@cache
def declared(method: str) -> frozenset[str]:
    """The `ablation.*` keys method module `method` declares (its `KEYS`)."""
    module = importlib.import_module(f"src.methods.{method}")
    return frozenset(f.name for f in fields(getattr(module, "KEYS", schema.Ablation)))


def moved(config: dict) -> dict:
    """A stored config (nested, resolved) under today's key names: each key of `schema.MOVED` at its new place when
    the run's method declares it, and dropped when it does not (the method never read it: e.g. a PFedRec record's
    model.sigma). A config already under today's names is returned equal."""
    ablation = config.get("ablation", {})
    method = ablation.get("method") or METHOD_BEFORE_THE_KEY.get(ablation.get("name"))
    if not any(old.split(".")[1] in config.get(old.split(".")[0], {}) for old in schema.MOVED):
        return config
    out = copy.deepcopy(config)
    for old, new in schema.MOVED.items():
        group, name = old.split(".")
        if name not in out.get(group, {}):
            continue
        value = out[group].pop(name)
        target, key = new.split(".")
        if method is None or key in declared(method):
            out.setdefault(target, {})[key] = value
    return out


@cache
def neutral_values() -> dict[str, Any]:
    """`group.key` -> the value of the runs stored before the key existed (or after it was retired)."""
    methods = [importlib.import_module(f"src.methods.{name}") for name in schema.method_modules()]
    keys = {getattr(m, "KEYS", schema.Ablation) for m in methods}
    return {**schema.added_keys((*schema.GROUPS, *sorted(keys, key=lambda k: k.__name__))), **schema.RETIRED}


# Keys that say where a run reads, writes and logs, or which tool looks at it: never what it computes.
WHERE_KEYS = (
    "resume",
    "diag.",
    "experiment_name",
    "logger.",
    "trainer.",
    "callbacks.",
    "data.root",
    "data.cache_dir",
    "bench.",
    "audit.",
    "flower.",
    "hydra.",
    "search.",
)
# Keys under those prefixes that do change the numbers: SecAgg+ clips each upload and rounds it onto its integer grid
COMPUTED_WHERE_KEYS = ("flower.secagg", "flower.secagg_clip")


def only_where(key: str, prefixes: tuple[str, ...]) -> bool:
    """Whether `key` is one of `prefixes` (a name ending in '.' is a group) and not a key that changes the numbers."""
    return key not in COMPUTED_WHERE_KEYS and any(key == p or (p.endswith(".") and key.startswith(p)) for p in prefixes)


# Keys that change only how fast a run computes: `model.fast_block` leaves results bit-identical; the fused and
# compiled kernels compute the same math with another float rounding, as another device does (each has a test
# saying so, with its tolerance).
SPEED_KEYS = (
    "model.fast_block",
    "model.fast_kernel",
    "compute.compile",
    "compute.native",
    "compute.kernel",
    "optim.fused",
    "optim.touched_rows",
    "compute.keep_heap",
)
# Keys that say on which device and in what cohorts the rounds compute: another float rounding, as another kernel
# gives (a chunk trains its clients as they would train alone). A checkpoint keeps its tensors on the host (Lightning
# loads them to the CPU), so a run cut on a GPU can go on on the CPU and one started with `device=cpu` under
# `device=auto` (which is CUDA on a GPU machine); neither direction has yet been run on a GPU.
DEVICE_KEYS = ("device", "fl.chunk_size", "fl.memory_fraction", "fl.max_auto_chunk")
# Keys that change no result but a resume may not change: the graph diagnostics count edges against round 1's
# graph, which a run started without them never kept
KEPT_ON_RESUME = ("diag.graph",)
# Keys a resume may change: the above, and how long to go on.
RESUMABLE_KEYS = (*WHERE_KEYS, *SPEED_KEYS, *DEVICE_KEYS, "fl.rounds", "fl.checkpoint_every", "eval.patience")


# Keys fixed by others, so runs made before they existed match: each ablation name has one method module, and the
# method's yaml names its engine and the keys it never reads (labels of the computation, not part of it).
DERIVED_KEYS = ("ablation.method", "ablation.engine", "ablation.unread")


def normalised(config: dict) -> dict[str, Any]:
    """A resolved config flattened, without the derived keys, the added or retired keys that hold the value of the
    runs made without them (`neutral_values`) and the keys the run's method never reads (the groups its yaml lists
    under `ablation.unread`)."""
    neutral = neutral_values()
    flat = flatten(moved(config))
    unread = flat.get("ablation.unread")
    if unread is None:  # a record from before the label (src.migrate adds it): a central method never read optim.
        unread = ("optim.",) if flat.get("ablation.central") is True else ()
    return {
        k: same_number(v)
        for k, v in flat.items()
        if k not in DERIVED_KEYS and not (k in neutral and neutral[k] == v) and not k.startswith(tuple(unread))
    }


def same_number(value: Any) -> Any:
    """A whole float as the int it equals (`ablation.beta=1` and `1.0` are one computation: a grid written either way
    finds the runs stored the other way); every other value as it is."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {"a.b.c": leaf}; lists stay leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}."))
    if not tree and prefix:
        out[prefix[:-1]] = {}
    return {k.rstrip("."): v for k, v in out.items()}


def differing(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """`key: a -> b` for every key of two flattened configs whose values differ (`<absent>` where one lacks it)."""
    missing = "<absent>"
    return [
        f"{key}: {a.get(key, missing)!r} -> {b.get(key, missing)!r}"
        for key in sorted(a.keys() | b.keys())
        if a.get(key, missing) != b.get(key, missing)
    ]


def resume_mismatch(saved: dict, current: dict) -> list[str]:
    """`key: saved -> current` for every key that differs, except those in `RESUMABLE_KEYS` (but `KEPT_ON_RESUME`)."""

    def kept(config: dict) -> dict[str, Any]:
        return {k: v for k, v in normalised(config).items() if not only_where(k, RESUMABLE_KEYS) or k in KEPT_ON_RESUME}

    return differing(kept(saved), kept(current))


def resume_changes(saved: dict, current: dict) -> dict[str, list]:
    """{key: [before, now]} for the keys a resume may change that change what or how the rounds compute (speed
    and device keys, length, checkpoints, patience; not where the run writes): results.json records them per
    resume."""
    a, b = normalised(saved), normalised(current)
    keys = (*SPEED_KEYS, *DEVICE_KEYS, "fl.rounds", "fl.checkpoint_every", "eval.patience")
    return {k: [a.get(k), b.get(k)] for k in sorted(a.keys() | b.keys()) if k in keys and a.get(k) != b.get(k)}


# Keys that cannot change a run's results: where it reads and writes, how fast it computes, how its clients are
# chunked (a chunk trains its clients as they would train alone) and on which device.
NOT_IDENTITY = (*WHERE_KEYS, *SPEED_KEYS, *DEVICE_KEYS, "fl.checkpoint_every")


def identity_values(config: dict[str, Any]) -> dict[str, Any]:
    """The resolved config, normalised, without the keys that cannot change the results: what `identity` hashes."""
    return {k: v for k, v in normalised(config).items() if not only_where(k, NOT_IDENTITY)}


def identity(config: dict[str, Any]) -> str:
    """sha256 of the resolved config without the keys that cannot change the results: one key per computation
    (the campaign's run identity; the report counts one run per key)."""
    flat = identity_values(config)
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:20]
