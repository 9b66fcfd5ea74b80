"""Compose the Hydra config and validate it before any data is read."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, ListConfig, OmegaConf

from src.comm.accountant import ACCOUNTANTS
from src.data.protocols import TRAIN_NEGATIVE_POOLS
from src.methods.base import method_module
from src.runtime.checks import ConfigError, is_int, is_number
from src.runtime.checks import boolean as _bool
from src.runtime.checks import check as _check
from src.runtime.checks import choice as _choice
from src.runtime.checks import get as _get
from src.runtime.checks import integer as _int
from src.runtime.checks import non_negative as _non_negative
from src.runtime.checks import number as _num
from src.runtime.checks import positive as _positive
from src.runtime.checks import shown as _shown
from src.runtime.device import MATMUL_PRECISIONS
from src.runtime.results import DEFAULT_SELECT, SELECT_PATTERN

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
COMMUNITY_METHODS = ("igraph", "leidenalg", "leidenalg_rb")
LOSSES = ("sigmoid_bce", "logits_bce")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
KERNELS = ("native", "fused", "reference")
# keys that were replaced: an override of one is refused naming its successor
MOVED_KEYS = {
    "model.fast_kernel": "compute=fused or compute=reference (the config group conf/compute/)",
    "compute.native": "compute=native or compute=fused (the config group conf/compute/)",
}


def _not_a_folder(cfg: DictConfig, key: str, nullable: bool = False) -> None:
    """An output file path: a non-empty string that does not name an existing directory (or null if allowed)."""
    value = _get(cfg, key)
    if nullable and value is None:
        return
    _check(isinstance(value, str) and value != "", key, _shown(value), "a file path")
    _check(not Path(value).is_dir(), key, value, "a file path, not an existing directory")


def validate_device(device: Any) -> None:
    """`device`: auto, cpu, cuda or cuda:N, and a CUDA device must exist on this machine."""
    _check(
        isinstance(device, str) and DEVICE_PATTERN.fullmatch(device) is not None,
        "device",
        _shown(device),
        "auto, cpu, cuda or cuda:N",
    )
    if not device.startswith("cuda"):
        return
    _check(
        torch.cuda.is_available(),
        "device",
        device,
        "a device this machine has: CUDA is not available here (use device=auto or device=cpu)",
    )
    index = int(device.split(":")[1]) if ":" in device else 0
    count = torch.cuda.device_count()
    _check(
        index < count,
        "device",
        device,
        f"a device this machine has: it has {count} CUDA device(s), cuda:0..cuda:{count - 1}",
    )


def _validate_model(cfg: DictConfig) -> None:
    _int(cfg, "model.dim", 1)
    _num(cfg, "model.init_std", _positive, "> 0")
    _choice(cfg, "model.loss", LOSSES)
    for key in ("user_embedding", "shared_init", "centre"):
        _bool(cfg, f"model.{key}")
    _num(cfg, "model.alpha", _non_negative, ">= 0")
    _num(cfg, "model.beta", _non_negative, ">= 0")
    _num(cfg, "model.tau", _positive, "> 0")
    _num(cfg, "model.tau0", _positive, "> 0")
    # sigma thresholds cosines: entries below it are not uploaded, uploads are quantised over [sigma, 1], and the
    # server graph keeps S_g >= sigma; 0 or less would upload (nearly) every pair, 1 none (docs/configuration.md)
    _num(cfg, "model.sigma", lambda x: 0 < x < 1, "in (0, 1), a cosine threshold (the paper's 0.5)")
    _choice(cfg, "model.gsa_mask", ("local", "global", "union"))
    _choice(cfg, "model.alignment", ("exact", "fast"))
    _choice(cfg, "model.fast_gsa", ("rows", "pairs"))
    _choice(cfg, "model.gsa_reduction", ("sum", "mean"))
    for key in ("fast_anchors", "align_chunk", "align_block"):
        _int(cfg, f"model.{key}", 1)
    if "fast_block" in cfg.model:
        _int(cfg, "model.fast_block", 1, nullable=True)
    hidden = _get(cfg, "model.score_hidden")
    _check(
        isinstance(hidden, ListConfig) and all(is_int(h) and h >= 1 for h in hidden),
        "model.score_hidden",
        _shown(hidden),
        "a list of integer sizes >= 1",
    )


def _validate_optim(cfg: DictConfig) -> None:
    name = _choice(cfg, "optim.name", ("sgd", "adam"))
    _num(cfg, "optim.lr", _positive, "> 0")
    if "item_lr_eta" in cfg.optim:
        _num(cfg, "optim.item_lr_eta", _positive, "> 0", nullable=True)
    if "alternate" in cfg.optim:
        _bool(cfg, "optim.alternate")
    if "fused" in cfg.optim:
        _bool(cfg, "optim.fused")
    if "touched_rows" in cfg.optim:
        _bool(cfg, "optim.touched_rows")
    if name == "adam":
        betas = _get(cfg, "optim.betas")
        _check(
            isinstance(betas, ListConfig) and len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas),
            "optim.betas",
            _shown(betas),
            "two finite numbers in [0, 1)",
        )
        _num(cfg, "optim.eps", _positive, "> 0")


def method_modules() -> tuple[str, ...]:
    """The method modules of src/methods/ (each has `build(cfg, device)`): the values `ablation.method` takes."""
    folder = Path(__file__).resolve().parents[1] / "methods"
    return tuple(sorted(p.stem for p in folder.glob("*.py") if "\ndef build(" in p.read_text()))


def _validate_ablation(cfg: DictConfig) -> None:
    _choice(cfg, "ablation.method", method_modules())
    for key in ("item_table", "score_fn"):
        _choice(cfg, f"ablation.{key}", ("mean", "personal"))
    for key in ("central", "ica", "gsa"):
        _bool(cfg, f"ablation.{key}")
    _check(isinstance(_get(cfg, "ablation.engine"), str), "ablation.engine", _get(cfg, "ablation.engine"), "a name")
    unread = _get(cfg, "ablation.unread")
    expected = "a list of config groups the method never reads, each ending in '.', e.g. [optim.]"
    ok = isinstance(unread, ListConfig) and all(isinstance(u, str) and u.endswith(".") for u in unread)
    _check(ok, "ablation.unread", _shown(unread), expected)
    # the method's own keys: checked by its module (`validate(cfg)` in src/methods/<ablation.method>.py)
    check_method = getattr(method_module(cfg), "validate", None)
    if check_method is not None:
        check_method(cfg)


def _validate_fl(cfg: DictConfig) -> None:
    _int(cfg, "fl.rounds", 1)
    _int(cfg, "fl.local_epochs", 1)
    _num(cfg, "fl.client_fraction", lambda x: 0 < x <= 1, "in (0, 1]")
    _int(cfg, "fl.batch_size", 1)
    _num(cfg, "fl.dropout", lambda x: 0 <= x < 1, "in [0, 1)")
    chunk = _get(cfg, "fl.chunk_size")
    _check(
        chunk is None or chunk == "auto" or (is_int(chunk) and chunk >= 1),
        "fl.chunk_size",
        chunk,
        "null, auto or an integer >= 1",
    )
    _num(cfg, "fl.memory_fraction", lambda x: 0 < x <= 1, "in (0, 1]")
    if OmegaConf.select(cfg, "fl.max_auto_chunk", default=None) is not None:  # absent in older configs: 1024
        _int(cfg, "fl.max_auto_chunk", 1)
    _int(cfg, "fl.checkpoint_every", 0, note=" (0 = never)")


def _validate_data(cfg: DictConfig) -> None:
    _int(cfg, "data.max_users", 1, nullable=True)
    _bool(cfg, "data.verify")
    _int(cfg, "dataset.min_user_rows", 0)
    if cfg.dataset.name == "synthetic":
        for key in ("n_users", "n_items", "n_communities", "per_user"):
            _int(cfg, f"dataset.{key}", 1)
        _num(cfg, "dataset.affinity", lambda x: 0 <= x <= 1, "in [0, 1]")
        _int(cfg, "dataset.generator_seed", 0)
    _int(cfg, "protocol.eval_negatives", 1)
    _int(cfg, "protocol.train_negatives", 0)
    _choice(cfg, "protocol.train_negative_pool", tuple(TRAIN_NEGATIVE_POOLS))
    for key in ("dedupe_pairs", "lineage_quirks", "full_ranking"):
        _bool(cfg, f"protocol.{key}")
    ks = _get(cfg, "eval.ks")
    _check(
        isinstance(ks, ListConfig) and len(ks) > 0 and all(is_int(k) and k >= 1 for k in ks),
        "eval.ks",
        _shown(ks),
        "a non-empty list of integer cutoffs K >= 1",
    )
    _validate_select(cfg, ks)
    _int(cfg, "eval.patience", 1, nullable=True)


def _validate_select(cfg: DictConfig, ks: ListConfig) -> None:
    """`eval.select` (default val/hit@10; absent in older configs): val/hit@K or val/ndcg@K, K in eval.ks."""
    select = OmegaConf.select(cfg, "eval.select", default=None) or DEFAULT_SELECT
    match = SELECT_PATTERN.fullmatch(select) if isinstance(select, str) else None
    _check(match is not None, "eval.select", _shown(select), "val/hit@K or val/ndcg@K (a validation metric)")
    k = int(match.group(2))
    if select == DEFAULT_SELECT:
        _check(
            k in ks,
            "eval.ks",
            _shown(ks),
            f"a list that contains {k} ({DEFAULT_SELECT} selects the best round; "
            f"or choose another with eval.select=val/hit@K)",
        )
    _check(k in ks, "eval.select", select, f"a cutoff K that eval.ks={_shown(ks)} contains")


def _validate_compute(cfg: DictConfig) -> None:
    """`compute.*` (src/runtime/device.py); absent in configs older than the block, which then mean its defaults."""
    if OmegaConf.select(cfg, "compute", default=None) is None:
        return
    _bool(cfg, "compute.deterministic")
    _choice(cfg, "compute.matmul_precision", MATMUL_PRECISIONS)
    for key in ("compute.compile", "compute.keep_heap"):
        if OmegaConf.select(cfg, key, default=None) is not None:
            _bool(cfg, key)
    _choice(cfg, "compute.kernel", KERNELS)
    if OmegaConf.select(cfg, "compute.gpu_block_scale", default=None) is not None:
        _int(cfg, "compute.gpu_block_scale", 1)


def _validate_server(cfg: DictConfig) -> None:
    _choice(cfg, "server.community", COMMUNITY_METHODS)
    _num(cfg, "server.resolution", _positive, "> 0")
    _int(cfg, "server.sim_block", 1)
    if "graph" in cfg.server:
        _choice(cfg, "server.graph", ("threshold", "knn"))
        _num(cfg, "server.graph_sigma", lambda x: 0 < x < 1, "in (0, 1), a cosine threshold", nullable=True)
        _int(cfg, "server.graph_k", 1)
        _choice(cfg, "server.aggregate", ("mean", "support_mean"))
    if OmegaConf.select(cfg, "server.gsa_on_graph", default=False) is not False:
        _bool(cfg, "server.gsa_on_graph")  # what it needs of GSA: src/methods/alignfedrec.py:validate


def _validate_comm_privacy(cfg: DictConfig) -> None:
    comm, priv = cfg.comm, cfg.privacy
    _choice(cfg, "comm.format", ("csr", "coo"))
    _int(cfg, "comm.topk", 1, nullable=True)
    _choice(cfg, "comm.bits", (32, 16, 8, 4))
    _bool(cfg, "comm.delta")
    _choice(cfg, "comm.tables", ("dense", "rows"))
    epsilon = _num(cfg, "privacy.epsilon", _positive, "> 0", nullable=True)
    scale = _num(cfg, "privacy.scale", _non_negative, ">= 0", nullable=True)
    _check(
        epsilon is None or scale is None,
        "privacy.scale",
        priv.scale,
        "null when privacy.epsilon is set (set one of the two)",
    )
    _num(cfg, "privacy.sensitivity", _positive, "> 0")
    noisy = epsilon is not None or (scale is not None and scale > 0)
    _check(
        not (noisy and comm.topk is not None),
        "comm.topk",
        comm.topk,
        "null when privacy noise is on (top-k would select on noiseless rows)",
    )
    _validate_user_dp(cfg, noisy)


def _validate_user_dp(cfg: DictConfig, laplace: bool) -> None:
    """User-level DP (src/comm/user_dp.py): a clip norm, then a noise multiplier or a target epsilon, not both."""
    clip = _num(cfg, "privacy.clip", _positive, "> 0", nullable=True)
    z = _num(cfg, "privacy.noise_multiplier", _non_negative, ">= 0", nullable=True)
    target = _num(cfg, "privacy.target_epsilon", _positive, "> 0", nullable=True)
    _num(cfg, "privacy.delta", lambda x: 0 < x < 1, "in (0, 1)", nullable=True)
    _choice(cfg, "privacy.accountant", ACCOUNTANTS)
    _check(z is None or target is None, "privacy.target_epsilon", target, "null when privacy.noise_multiplier is set")
    if clip is None:
        _check(z is None and target is None, "privacy.clip", None, "a clip norm > 0 when user-level noise is set")
        return
    _check(
        getattr(method_module(cfg), "UPLOADS_SIMILARITY", False),
        "privacy.clip",
        clip,
        f"null for ablation={cfg.ablation.name}: it clips similarity uploads, and this method uploads none",
    )
    _check(not laplace, "privacy.clip", clip, "null with the Laplace option (privacy.epsilon/scale): one mechanism")
    _check(
        cfg.fl.client_fraction == 1,
        "fl.client_fraction",
        cfg.fl.client_fraction,
        "1 with privacy.clip (a fixed-size draw lets one user displace another: twice the sensitivity accounted)",
    )
    _choice(cfg, "privacy.server_noise", ("seeded", "secret"))
    bits = cfg.comm.bits
    _check(bits == 32, "privacy.clip", clip, f"comm.bits=32 (quantisation would undo the clip; got {bits})")
    _check(
        cfg.server.aggregate == "mean",
        "privacy.clip",
        clip,
        "server.aggregate=mean (the noisy sum is divided by the public count of chosen clients)",
    )


def _validate_commands(cfg: DictConfig) -> None:
    """The keys of python -m src.audit, src.perf.bench and the Flower app."""
    _int(cfg, "audit.clients", 1)
    _int(cfg, "audit.recovery_iters", 1)
    _not_a_folder(cfg, "audit.out", nullable=True)
    _int(cfg, "bench.reference_clients", 0, note=" (0 = skip)")
    baseline = OmegaConf.select(cfg, "bench.baseline", default=None)
    _check(
        baseline is None
        or (isinstance(baseline, ListConfig) and all(isinstance(o, str) and "=" in o for o in baseline)),
        "bench.baseline",
        _shown(baseline),
        "null or a list of key=value overrides",
    )
    _not_a_folder(cfg, "bench.out")
    for key in ("supernodes", "round_timeout", "min_nodes", "connect_timeout", "max_upload_bytes"):
        _int(cfg, f"flower.{key}", 1)


def validate(cfg: DictConfig) -> None:
    """Type and range checks on every user-facing key; raises ConfigError naming the first bad key.

    Integers must be ints (2.9 is refused, not truncated; a bool is not an int), numbers finite
    ints or floats, choices one of the values the code accepts, and `device` one this machine has.
    """
    _int(cfg, "seed", 0)
    validate_device(_get(cfg, "device"))
    _validate_compute(cfg)
    _validate_fl(cfg)
    _validate_model(cfg)
    _validate_optim(cfg)
    _validate_ablation(cfg)
    _validate_data(cfg)
    _validate_server(cfg)
    _validate_comm_privacy(cfg)
    _validate_commands(cfg)


# a method's labels, set by its yaml only: `unread` decides which keys tell its runs apart, so an override could
# make two different runs one (src/runtime/rundir.py:normalised)
METHOD_LABELS = ("ablation.engine", "ablation.unread")


def refuse_moved(overrides: list[str]) -> None:
    """A ConfigError naming the successor of the first override of a replaced key (`MOVED_KEYS`), or refusing an
    override of a method's labels (`METHOD_LABELS`)."""
    for line in overrides:
        key = line.split("=", 1)[0].lstrip("+~")
        if key in MOVED_KEYS:
            raise ConfigError(f"{key} was replaced (override {line}); expected {MOVED_KEYS[key]}")
        if key in METHOD_LABELS:
            raise ConfigError(
                f"override {line} sets a label of the method; expected it in the method's yaml only "
                f"(conf/ablation/<name>.yaml)"
            )


def load_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose conf/config.yaml with command-line style overrides (used by the CLIs and tests)."""
    refuse_moved(list(overrides or []))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides or []))
    validate(cfg)
    return cfg
