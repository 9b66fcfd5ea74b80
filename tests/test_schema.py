"""The config schema (src/config/schema.py): every composed key is declared with a type and a rule, checked in the
dataclass's `__post_init__`; a method's own keys are its module's `KEYS`; the keys added after runs were stored keep
the value those runs had, so their identities never move."""

from __future__ import annotations

from dataclasses import fields

import pytest
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from src.cli.config import ConfigError, load_config, typed
from src.cli.jobs import compose_runs
from src.config import schema
from src.config.identity import identity, neutral_values

# Keys stored runs may lack, with the value those runs computed with (the table rundir.ADDED_KEYS held before the
# schema; the server.graph* keys and server.aggregate are ablation.* since they moved to the method's keys): a schema
# edit that changed one would silently change the identity of every record stored without it.
STORED_WITHOUT = {
    "data.verify": True,
    "eval.select": "val/hit@10",
    "compute.deterministic": True,
    "compute.matmul_precision": "highest",
    "fl.max_auto_chunk": 1024,
    "compute.gpu_block_scale": 64,
    "model.fast_block": None,
    "model.fast_kernel": "autograd",
    "compute.compile": False,
    "optim.fused": False,
    "optim.touched_rows": False,
    "compute.keep_heap": False,
    "compute.native": False,
    "ablation.graph": "threshold",
    "ablation.graph_sigma": None,
    "ablation.graph_k": 10,
    "ablation.aggregate": "mean",
    "ablation.gsa_on_graph": False,
    "comm.tables": "dense",
    "ablation.upload_round": None,
    "ablation.rank": None,
    "privacy.clip": None,
    "privacy.noise_multiplier": None,
    "privacy.target_epsilon": None,
    "privacy.delta": None,
    "privacy.accountant": "pld",
    "privacy.server_noise": "seeded",
    "flower.secagg": False,
    "flower.secagg_shares": 3,
    "flower.secagg_threshold": 2,
    "flower.secagg_clip": 8.0,
    "search.store": None,
}


def test_the_keys_stored_runs_lack_keep_their_values():
    assert {k: v for k, v in neutral_values().items() if k in STORED_WITHOUT} == STORED_WITHOUT
    assert set(neutral_values()) == set(STORED_WITHOUT), "a new added key: list it above with its neutral value"


def test_a_record_without_the_added_keys_is_the_same_run(compose_cfg):
    """A record stored before the keys existed (each dropped from today's config, which holds the neutral value)
    and today's config are one computation."""
    config = OmegaConf.to_container(compose_cfg(["ablation=fed_itemknn"]), resolve=True)
    old = {g: dict(v) if isinstance(v, dict) else v for g, v in config.items()}
    dropped = 0
    for dotted in STORED_WITHOUT:
        group, name = dotted.split(".")
        if name in old.get(group, {}) and old[group][name] == STORED_WITHOUT[dotted]:
            del old[group][name]
            dropped += 1
            if not old[group]:  # a group all of whose keys came later (search) is absent from the old record
                del old[group]
    assert dropped >= 10
    assert identity(old) == identity(config)
    old["server"]["graph_k"] = 11  # a non-neutral value is part of the run
    assert identity(old) != identity(config)


def test_every_group_is_a_typed_structured_config_in_the_config_store():
    schema.register()
    stored = ConfigStore.instance().repo["schema"]
    for group in (*schema.GROUPS, schema.Ablation):
        assert f"{group.PATH or 'top'}.yaml" in stored
        typed_cfg = OmegaConf.structured(group)
        assert set(typed_cfg) == {f.name for f in fields(group)}
    # typed: the stored node refuses a value of the wrong type for a typed key
    node = stored["fl.yaml"].node
    with pytest.raises(ValidationError):
        OmegaConf.merge(node, {"rounds": "abc"})
    checked = 0
    for group in (*schema.GROUPS, schema.Ablation):
        node = stored[f"{group.PATH or 'top'}.yaml"].node
        for f in fields(group):
            if f.type in (int, "int"):  # a plain integer key: text must not pass
                with pytest.raises(ValidationError):
                    OmegaConf.merge(node, {f.name: "not a number"})
                checked += 1
                break
    assert checked >= 3


def test_the_dataclass_checks_its_keys_in_post_init():
    """Built directly, without Hydra: the group's rules are the dataclass's own."""
    cfg = load_config([])
    good = {f.name: cfg.fl[f.name] for f in fields(schema.Fl)}
    assert schema.Fl(**good).rounds == 100
    with pytest.raises(ConfigError, match=r"^fl\.rounds=0 is invalid; expected an integer >= 1$"):
        schema.Fl(**{**good, "rounds": 0})
    with pytest.raises(ConfigError, match=r"^fl\.dropout=1 is invalid"):
        schema.Fl(**{**good, "dropout": 1})
    with pytest.raises(ConfigError, match="privacy.scale"):
        schema.Privacy(epsilon=1.0, scale=0.1, sensitivity=2.0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+model.dimm=1"], r"^model\.dimm is not a key of model; expected one of .*dim"),
        (["+ablation.alpah=1"], r"^ablation\.alpah is not a key of ablation; expected one of .*alpha"),
        (["ablation=backbone", "+ablation.k=5"], r"^ablation\.k is not a key of ablation"),
        (["ablation=fed_itemknn", "ablation.k=0"], r"^ablation\.k=0 is invalid; expected an integer >= 1$"),
        (["ablation=fed_itemknn", "ablation.rank=1.5"], r"^ablation\.rank=1\.5 is invalid"),
        (["ablation=fed_itemknn", "ablation.ica=true"], r"^ablation\.ica=true is invalid; expected false for"),
        (["ablation=itemknn", "ablation.scorer=svd"], r"^ablation\.scorer=svd is invalid; expected one of mf"),
        (["ablation=central", "ablation.lr=0"], r"^ablation\.lr=0 is invalid"),
        (["~fl.rounds"], r"^fl\.rounds is missing; expected it in the composed config"),
        (["optim=adam", "~optim.eps"], r"^optim\.eps=null is invalid; expected a finite number > 0$"),
        (["dataset=synthetic", "~dataset.n_users"], r"^dataset\.n_users=null is invalid; expected a value"),
    ],
)
def test_a_bad_key_of_a_group_or_of_a_method_is_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides)


def test_a_method_brings_its_own_keys():
    """fed_itemknn's `k` is in its KEYS (src/methods/fed_itemknn.py), not in the keys every method has."""
    from src.cli.config import method_keys
    from src.methods import fed_itemknn

    cfg = load_config(["ablation=fed_itemknn"])
    assert method_keys(cfg) is fed_itemknn.KEYS
    assert issubclass(fed_itemknn.KEYS, schema.Ablation)
    assert "k" not in {f.name for f in fields(schema.Ablation)}
    assert typed(cfg, method_keys(cfg)).k == 50


def test_a_moved_key_runs_under_its_new_name_with_a_notice(capsys):
    """model.beta and server.graph are the method's keys now (ablation.beta, ablation.graph): an override of the old
    name is the same config as one of the new name, with one notice line; a method without the key refuses it."""
    from src.cli import config as config_module

    config_module.NOTICED.clear()
    old = load_config(["model.beta=2.0", "server.graph=knn"])
    assert "notice: model.beta is now ablation.beta" in capsys.readouterr().err
    new = load_config(["ablation.beta=2.0", "ablation.graph=knn"])
    assert OmegaConf.to_container(old, resolve=True) == OmegaConf.to_container(new, resolve=True)
    assert (new.ablation.beta, new.ablation.graph) == (2.0, "knn") and "beta" not in new.model
    # a method without the key: the renamed override is refused naming the method's own keys
    with pytest.raises(ConfigError, match=r"ablation=backbone has no key ablation\.beta; expected one of its keys"):
        compose_runs([["ablation=backbone", "model.beta=2.0"]])


def test_a_record_stored_under_the_old_names_is_the_run_of_today(compose_cfg):
    """A record made before the move (model.sigma, server.aggregate, ...) reads under today's names and is the same
    computation; a PFedRec record's model.sigma, which PFedRec never read, is dropped."""
    from src.config.identity import moved

    for ablation in ("full", "fed_itemknn", "backbone"):
        today = OmegaConf.to_container(compose_cfg([f"ablation={ablation}"]), resolve=True)
        before = {g: dict(v) if isinstance(v, dict) else v for g, v in today.items()}
        before["ablation"] = {k: v for k, v in today["ablation"].items()}
        before["model"] = dict(today["model"], sigma=0.5, alpha=0.005)
        before["server"] = dict(today["server"], aggregate="mean", community="igraph")
        for name in ("sigma", "alpha", "aggregate", "community"):
            before["ablation"].pop(name, None)
        if ablation != "backbone":
            assert moved(before) == today
        else:
            assert "sigma" not in moved(before)["ablation"] and "sigma" not in moved(before)["model"]
        assert identity(before) == identity(today)


def test_a_key_the_method_lacks_names_the_method_and_a_moved_typo_finds_its_new_home():
    from src.cli.jobs import compose_runs

    with pytest.raises(ConfigError, match=r"ablation=backbone has no key ablation\.sigma; expected one of its keys"):
        compose_runs([["ablation=backbone", "model.sigma=0.3"]])
    with pytest.raises(ConfigError, match=r"did you mean ablation\.alpha=1\?"):
        compose_runs([["+model.alpah=1"]])


def test_a_whole_number_written_either_way_is_one_run(compose_cfg):
    """`ablation.beta=1` (a grid in a yaml) and `ablation.beta=1.0` (a stored run's override) are one computation;
    1.5 and 1 are not."""
    as_int = OmegaConf.to_container(compose_cfg(["ablation.beta=1"]), resolve=True)
    as_float = OmegaConf.to_container(compose_cfg(["ablation.beta=1.0"]), resolve=True)
    other = OmegaConf.to_container(compose_cfg(["ablation.beta=1.5"]), resolve=True)
    assert as_int["ablation"]["beta"] == 1 and type(as_float["ablation"]["beta"]) is float
    assert identity(as_int) == identity(as_float) != identity(other)


def test_a_refused_value_is_shown_as_it_is_typed():
    """Messages show values in the command line's and yaml's syntax (null, true, [a, b]), quoting a string only where
    it would otherwise read as another type or as more than one value."""
    cases = {
        None: "null",
        True: "true",
        "abc": "abc",
        "cuda:0": "cuda:0",
        "5": "'5'",
        "true": "'true'",
        "a b": "'a b'",
        "": "''",
        0.5: "0.5",
        float("nan"): "nan",
        -3: "-3",
    }
    for value, text in cases.items():
        assert schema.as_typed(value) == text, value
    assert schema.as_typed([1, "x", None, [False]]) == "[1, x, null, [false]]"
    assert schema.as_typed({"lr": 0.1, "name": "sgd"}) == "{lr: 0.1, name: sgd}"
