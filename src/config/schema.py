"""The config's structured schema: one dataclass per config group, each key with its type, its range and, for a key
added after runs were stored, the value every earlier run had.

Hydra composes `conf/` as usual; `src/cli/config.py` then builds each group's dataclass from the composed values
(`Group(**values)`), whose `__post_init__` checks every key against its `Rule` and the group's own cross-key rules.
Values are checked as given, before any conversion: 2.9 is not an integer and `yes` is not a boolean. A method's own
keys (`ablation.*`) are a subclass of `Ablation` in its module (`KEYS` in src/methods/<name>.py), so a new method
brings its keys with it. Every dataclass is in Hydra's ConfigStore as `schema/<group>`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from src.comm.accountant import ACCOUNTANTS
from src.data.protocols import TRAIN_NEGATIVE_POOLS
from src.runtime.checks import ConfigError, is_int, is_number
from src.runtime.device import MATMUL_PRECISIONS
from src.runtime.results import DEFAULT_SELECT, SELECT_PATTERN

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
METHODS_DIR = Path(__file__).resolve().parents[1] / "methods"


@dataclass(frozen=True)
class Rule:
    """What a key's value must be: `ok(value)` on the value as given, and the words of the error when it is not."""

    ok: Callable[[Any], bool]
    expected: str


def integer(minimum: int, nullable: bool = False, note: str = "") -> Rule:
    """An int >= minimum (a float or a bool is refused, never truncated), or null when `nullable`."""
    return Rule(
        lambda v: (nullable and v is None) or (is_int(v) and v >= minimum),
        f"{'null or ' if nullable else ''}an integer >= {minimum}{note}",
    )


def number(ok: Callable[[float], bool], bounds: str, nullable: bool = False) -> Rule:
    """A finite int or float with ok(value) (`bounds` says which, e.g. '> 0'), or null when `nullable`."""
    return Rule(
        lambda v: (nullable and v is None) or (is_number(v) and ok(v)),
        f"{'null or ' if nullable else ''}a finite number {bounds}",
    )


def one_of(*options: Any) -> Rule:
    """One of `options`, compared with its type (8.0 is not the choice 8)."""
    return Rule(lambda v: any(type(v) is type(o) and v == o for o in options), "one of " + ", ".join(map(str, options)))


BOOLEAN = Rule(lambda v: isinstance(v, bool), "true or false")
TEXT = Rule(lambda v: isinstance(v, str), "a name")
POSITIVE = number(lambda x: x > 0, "> 0")
NON_NEGATIVE = number(lambda x: x >= 0, ">= 0")
COSINE = number(lambda x: 0 < x < 1, "in (0, 1), a cosine threshold")
FRACTION = number(lambda x: 0 < x <= 1, "in (0, 1]")
FILE = Rule(lambda v: v is None or isinstance(v, str), "null or a path")
OUTPUT = Rule(lambda v: isinstance(v, str) and v != "", "a file path")


def not_a_folder(path: str, value: str | None) -> None:
    """An output file must not name an existing directory."""
    if value is not None and Path(value).is_dir():
        refuse(path, value, "a file path, not an existing directory")


NOT_ADDED = object()


def key(rule: Rule | None, default: Any = MISSING, added: Any = NOT_ADDED) -> Any:
    """A key of a group: its rule and its default. `added` marks a key added after runs were stored: `default` is
    then what a config without it meant (the stored runs' value), so a record lacking it and one holding that value
    are one computation (src/config/identity.py)."""
    if added is not NOT_ADDED:
        default = added
    meta = {"rule": rule, "added": added is not NOT_ADDED}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def rule_of(group: type, name: str) -> Rule:
    """The rule declared for key `name` of the dataclass `group`."""
    return {f.name: f for f in fields(group)}[name].metadata["rule"]


def shown(value: Any) -> Any:
    """A value as plain Python (lists and dicts of a DictConfig), for messages."""
    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def as_typed(value: Any) -> str:
    """`value` as one would type it on the command line or in a yaml (`null`, `true`, `[1, 2]`); a string is quoted
    only where it would otherwise read as another type or not as one value (`'5'`, `'a b'`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(as_typed(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {as_typed(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        plain = re.fullmatch(r"[A-Za-z_/][\w./:+-]*", value) and value.lower() not in (
            "null",
            "true",
            "false",
            "nan",
            "inf",
        )
        return value if plain else repr(value)
    return repr(value)


def refuse(path: str, value: Any, expected: str) -> None:
    raise ConfigError(f"{path}={as_typed(shown(value))} is invalid; expected {expected}")


@dataclass(kw_only=True)
class Group:
    """A config group: `__post_init__` checks every key's rule in declaration order, then `check()`."""

    PATH: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            rule = f.metadata.get("rule")
            value = getattr(self, f.name)
            if rule is not None and not rule.ok(value):
                refuse(self.where(f.name), value, rule.expected)
        self.check()

    def check(self) -> None:
        """Rules across the group's keys (none by default)."""

    @classmethod
    def where(cls, name: str) -> str:
        return f"{cls.PATH}.{name}" if cls.PATH else name


@dataclass(kw_only=True)
class Top(Group):
    """The top-level keys."""

    seed: int = key(integer(0))
    device: str = key(
        Rule(lambda v: isinstance(v, str) and DEVICE_PATTERN.fullmatch(v) is not None, "auto, cpu, cuda or cuda:N")
    )
    experiment_name: str = key(TEXT)
    resume: Any = key(None)


@dataclass(kw_only=True)
class Fl(Group):
    PATH = "fl"
    rounds: int = key(integer(1))
    local_epochs: int = key(integer(1))
    client_fraction: float = key(FRACTION)
    batch_size: int = key(integer(1))
    dropout: float = key(number(lambda x: 0 <= x < 1, "in [0, 1)"))
    chunk_size: Any = key(
        Rule(lambda v: v is None or v == "auto" or (is_int(v) and v >= 1), "null, auto or an integer >= 1")
    )
    memory_fraction: float = key(FRACTION)
    max_auto_chunk: int = key(integer(1), added=1024)
    checkpoint_every: int = key(integer(0, note=" (0 = never)"))


def sizes(v: Any) -> bool:
    return isinstance(v, (list, ListConfig)) and all(is_int(h) and h >= 1 for h in v)


@dataclass(kw_only=True)
class Model(Group):
    """The client model and how the alignment terms are computed (conf/model/); the terms' hyperparameters are the
    method's keys (`AlignFedRecKeys` in src/methods/alignfedrec.py)."""

    PATH = "model"
    name: str = key(TEXT)
    dim: int = key(integer(1))
    user_embedding: bool = key(BOOLEAN)
    score_hidden: list = key(Rule(sizes, "a list of integer sizes >= 1"))
    init_std: float = key(POSITIVE)
    loss: str = key(one_of("sigmoid_bce", "logits_bce"))
    shared_init: bool = key(BOOLEAN)
    alignment: str = key(one_of("exact", "fast"))
    fast_anchors: int = key(integer(1))
    fast_gsa: str = key(one_of("rows", "pairs"))
    align_chunk: int = key(integer(1))
    align_block: int = key(integer(1))
    fast_block: Any = key(integer(1, nullable=True), added=None)


def betas(v: Any) -> bool:
    return isinstance(v, (list, ListConfig)) and len(v) == 2 and all(is_number(b) and 0 <= b < 1 for b in v)


@dataclass(kw_only=True)
class Optim(Group):
    """The clients' optimiser (conf/optim/): Adam's betas and eps are required with optim.name=adam."""

    PATH = "optim"
    name: str = key(one_of("sgd", "adam"))
    lr: float = key(POSITIVE)
    item_lr_eta: Any = key(number(lambda x: x > 0, "> 0", nullable=True), default=None)
    alternate: bool = key(BOOLEAN, default=False)
    betas: Any = key(Rule(lambda v: v is None or betas(v), "two finite numbers in [0, 1)"), default=None)
    eps: Any = key(number(lambda x: x > 0, "> 0", nullable=True), default=None)
    fused: bool = key(BOOLEAN, added=False)
    touched_rows: bool = key(BOOLEAN, added=False)

    def check(self) -> None:
        if self.name == "adam":
            if not betas(self.betas):
                refuse("optim.betas", self.betas, "two finite numbers in [0, 1)")
            if self.eps is None:
                refuse("optim.eps", None, "a finite number > 0")


def method_modules() -> tuple[str, ...]:
    """The method modules of src/methods/ (each has `build(cfg, device)`): the values `ablation.method` takes."""
    return tuple(sorted(p.stem for p in METHODS_DIR.glob("*.py") if "\ndef build(" in p.read_text()))


def unread_groups(v: Any) -> bool:
    return isinstance(v, (list, ListConfig)) and all(isinstance(u, str) and u.endswith(".") for u in v)


@dataclass(kw_only=True)
class Ablation(Group):
    """The keys every method has (conf/ablation/<name>.yaml). A method with keys of its own subclasses this in its
    module (`KEYS`), e.g. `ablation.k` of fed_itemknn."""

    PATH = "ablation"
    name: str = key(TEXT)
    method: str = key(Rule(lambda v: v in method_modules(), "a module of src/methods/ with build(cfg, device)"))
    item_table: str = key(one_of("mean", "personal"))
    score_fn: str = key(one_of("mean", "personal"))
    central: bool = key(BOOLEAN)
    ica: bool = key(BOOLEAN)
    gsa: bool = key(BOOLEAN)
    # labels set by the method's yaml only (src/cli/config.py refuses an override): the tables' engine, and the
    # config groups it never reads (runs that differ only in them are one computation)
    engine: str = key(TEXT)
    unread: list = key(
        Rule(unread_groups, "a list of config groups the method never reads, each ending in '.', e.g. [optim.]")
    )


@dataclass(kw_only=True)
class Dataset(Group):
    """A dataset (conf/dataset/): the synthetic one (unit tests only) also needs its generator's keys."""

    PATH = "dataset"
    name: str = key(TEXT)
    min_user_rows: int = key(integer(0))
    alpha: float = key(NON_NEGATIVE)
    tau: float = key(POSITIVE)
    n_users: Any = key(integer(1, nullable=True), default=None)
    n_items: Any = key(integer(1, nullable=True), default=None)
    n_communities: Any = key(integer(1, nullable=True), default=None)
    per_user: Any = key(integer(1, nullable=True), default=None)
    affinity: Any = key(number(lambda x: 0 <= x <= 1, "in [0, 1]", nullable=True), default=None)
    generator_seed: Any = key(integer(0, nullable=True), default=None)

    def check(self) -> None:
        if self.name == "synthetic":
            for name in ("n_users", "n_items", "n_communities", "per_user", "affinity", "generator_seed"):
                if getattr(self, name) is None:
                    refuse(f"dataset.{name}", None, "a value for dataset=synthetic")


@dataclass(kw_only=True)
class Data(Group):
    PATH = "data"
    root: Any = key(FILE)
    cache_dir: Any = key(FILE)
    max_users: Any = key(integer(1, nullable=True))
    verify: bool = key(BOOLEAN, added=True)


@dataclass(kw_only=True)
class Protocol(Group):
    """The evaluation protocol (conf/protocol/: paper or clean)."""

    PATH = "protocol"
    name: str = key(TEXT)
    eval_negatives: int = key(integer(1))
    train_negatives: int = key(integer(0))
    train_negative_pool: str = key(one_of(*TRAIN_NEGATIVE_POOLS))
    dedupe_pairs: bool = key(BOOLEAN)
    lineage_quirks: bool = key(BOOLEAN)
    full_ranking: bool = key(BOOLEAN)


def cutoffs(v: Any) -> bool:
    return isinstance(v, (list, ListConfig)) and len(v) > 0 and all(is_int(k) and k >= 1 for k in v)


@dataclass(kw_only=True)
class Eval(Group):
    """Cutoffs, the validation metric that selects the best round (it must be one of the cutoffs) and patience."""

    PATH = "eval"
    ks: list = key(Rule(cutoffs, "a non-empty list of integer cutoffs K >= 1"))
    select: str = key(
        Rule(
            lambda v: isinstance(v, str) and SELECT_PATTERN.fullmatch(v) is not None,
            "val/hit@K or val/ndcg@K (a validation metric)",
        ),
        added=DEFAULT_SELECT,
    )
    patience: Any = key(integer(1, nullable=True))

    def check(self) -> None:
        k = int(SELECT_PATTERN.fullmatch(self.select).group(2))
        if self.select == DEFAULT_SELECT and k not in self.ks:
            refuse(
                "eval.ks",
                self.ks,
                f"a list that contains {k} ({DEFAULT_SELECT} selects the best round; "
                f"or choose another with eval.select=val/hit@K)",
            )
        if k not in self.ks:
            refuse("eval.select", self.select, f"a cutoff K that eval.ks={shown(self.ks)} contains")


@dataclass(kw_only=True)
class Compute(Group):
    """How the losses are computed and on what (conf/compute/); a config older than the group means its values."""

    PATH = "compute"
    kernel: str = key(one_of("native", "fused", "reference"))
    deterministic: bool = key(BOOLEAN, added=True)
    matmul_precision: str = key(one_of(*MATMUL_PRECISIONS), added="highest")
    gpu_block_scale: int = key(integer(1), added=64)
    compile: bool = key(BOOLEAN, added=False)
    keep_heap: bool = key(BOOLEAN, added=False)


@dataclass(kw_only=True)
class Server(Group):
    """How the server aggregates uploads (the graph, communities and aggregation rule are the method's keys)."""

    PATH = "server"
    sim_block: int = key(integer(1))


@dataclass(kw_only=True)
class Comm(Group):
    """How uploads and the broadcast are encoded (conf/encoding/) and how item tables are counted."""

    PATH = "comm"
    format: str = key(one_of("csr", "coo"))
    topk: Any = key(integer(1, nullable=True))
    bits: int = key(one_of(32, 16, 8, 4))
    delta: bool = key(BOOLEAN)
    tables: str = key(one_of("dense", "rows"), added="dense")


@dataclass(kw_only=True)
class Privacy(Group):
    """The paper's Laplace option (epsilon or scale) and this project's user-level DP (clip, then z or a target)."""

    PATH = "privacy"
    epsilon: Any = key(number(lambda x: x > 0, "> 0", nullable=True))
    scale: Any = key(number(lambda x: x >= 0, ">= 0", nullable=True))
    sensitivity: float = key(POSITIVE)
    clip: Any = key(number(lambda x: x > 0, "> 0", nullable=True), added=None)
    noise_multiplier: Any = key(number(lambda x: x >= 0, ">= 0", nullable=True), added=None)
    target_epsilon: Any = key(number(lambda x: x > 0, "> 0", nullable=True), added=None)
    delta: Any = key(number(lambda x: 0 < x < 1, "in (0, 1)", nullable=True), added=None)
    accountant: str = key(one_of(*ACCOUNTANTS), added="pld")
    server_noise: str = key(one_of("seeded", "secret"), added="seeded")

    @property
    def laplace(self) -> bool:
        """The paper's entry-level noise is on."""
        return self.epsilon is not None or (self.scale is not None and self.scale > 0)

    def check(self) -> None:
        if self.epsilon is not None and self.scale is not None:
            refuse("privacy.scale", self.scale, "null when privacy.epsilon is set (set one of the two)")
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            refuse("privacy.target_epsilon", self.target_epsilon, "null when privacy.noise_multiplier is set")
        if self.clip is None and (self.noise_multiplier is not None or self.target_epsilon is not None):
            refuse("privacy.clip", None, "a clip norm > 0 when user-level noise is set")
        if self.clip is not None and self.laplace:
            refuse("privacy.clip", self.clip, "null with the Laplace option (privacy.epsilon/scale): one mechanism")


@dataclass(kw_only=True)
class Audit(Group):
    PATH = "audit"
    clients: int = key(integer(1))
    recovery_iters: int = key(integer(1))
    out: Any = key(Rule(lambda v: v is None or OUTPUT.ok(v), "null or a file path"))

    def check(self) -> None:
        not_a_folder("audit.out", self.out)


def overrides(v: Any) -> bool:
    return v is None or (isinstance(v, (list, ListConfig)) and all(isinstance(o, str) and "=" in o for o in v))


@dataclass(kw_only=True)
class Search(Group):
    """Where a search keeps its trials as stored runs (null = nowhere): a stored trial is answered, not rerun."""

    PATH = "search"
    store: Any = key(FILE, added=None)

    def check(self) -> None:
        if self.store is not None and Path(self.store).exists() and not Path(self.store).is_dir():
            refuse("search.store", self.store, "null or a folder (results/runs)")


@dataclass(kw_only=True)
class Bench(Group):
    PATH = "bench"
    reference_clients: int = key(integer(0, note=" (0 = skip)"))
    out: str = key(OUTPUT)
    baseline: Any = key(Rule(overrides, "null or a list of key=value overrides"), default=None)

    def check(self) -> None:
        not_a_folder("bench.out", self.out)


@dataclass(kw_only=True)
class Flower(Group):
    PATH = "flower"
    supernodes: int = key(integer(1))
    round_timeout: int = key(integer(1))
    min_nodes: int = key(integer(1))
    connect_timeout: int = key(integer(1))
    max_upload_bytes: int = key(integer(1))
    state_dir: Any = key(FILE)
    run_dir: Any = key(FILE)
    secagg: bool = key(BOOLEAN, added=False)
    secagg_shares: int = key(integer(3), added=3)
    secagg_threshold: int = key(integer(2), added=2)
    secagg_clip: float = key(POSITIVE, added=8.0)

    def check(self) -> None:
        if self.secagg_threshold >= self.secagg_shares:
            refuse(
                "flower.secagg_threshold",
                self.secagg_threshold,
                f"fewer than flower.secagg_shares={self.secagg_shares} (the shares a key is split into)",
            )


@dataclass(kw_only=True)
class Diag(Group):
    PATH = "diag"
    graph: bool = key(BOOLEAN)


# the groups every config has, in the order they are checked (`ablation` is the method's KEYS: src/cli/config.py);
# logger, trainer and callbacks are Lightning's, instantiated (and checked) by Hydra
GROUPS: tuple[type[Group], ...] = (
    Top,
    Compute,
    Fl,
    Model,
    Optim,
    Dataset,
    Data,
    Protocol,
    Eval,
    Server,
    Comm,
    Privacy,
    Audit,
    Bench,
    Flower,
    Diag,
    Search,
)
INSTANTIATED = ("logger", "trainer", "callbacks", "hydra")

# Keys that no longer exist, with the value every run that held them computed with (src/config/identity.py)
RETIRED = {"model.fast_kernel": "autograd", "compute.native": False}
# Keys that moved into the method's keys (conf/ablation/full.yaml): an override of the old name is run as the new one
# with a notice (src/cli/config.py), and a stored record is read under the new names (src/config/identity.py)
MOVED = {
    **{f"model.{k}": f"ablation.{k}" for k in ("alpha", "beta", "tau", "tau0", "sigma", "centre", "gsa_mask")},
    "model.gsa_reduction": "ablation.gsa_reduction",
    **{
        f"server.{k}": f"ablation.{k}"
        for k in ("community", "resolution", "graph", "graph_sigma", "graph_k", "aggregate", "gsa_on_graph")
    },
}


def override_key(override: str) -> str:
    """`+ablation.alpha=0.01` -> `ablation.alpha`: the key an override sets, without its `+`/`~` prefix."""
    return override.lstrip("+~").split("=", 1)[0]


def current_name(override: str) -> str:
    """`model.alpha=0.01` -> `ablation.alpha=0.01`: an override with a moved key (`MOVED`) under today's name, its
    `+`/`~` prefix and value kept; any other override as it is."""
    body = override.lstrip("+~")
    key, sep, value = body.partition("=")
    return f"{override[: len(override) - len(body)]}{MOVED[key]}{sep}{value}" if key in MOVED else override


def register(store: ConfigStore | None = None) -> None:
    """Each group's dataclass in Hydra's ConfigStore as `schema/<group>` (e.g. to compose a typed config)."""
    store = store or ConfigStore.instance()
    for group in (*GROUPS, Ablation):
        store.store(group="schema", name=group.PATH or "top", node=group)


def added_keys(groups: tuple[type[Group], ...]) -> dict[str, Any]:
    """`group.key` -> the value a stored run without the key had, for every key marked added in `groups`."""
    out = {}
    for group in groups:
        for f in fields(group):
            if f.metadata.get("added"):
                out[group.where(f.name)] = f.default
    return out
