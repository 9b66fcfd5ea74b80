"""The method objects: every `ablation=` builds the method it names, with what it shares and sends;
a client's released entries match the thresholded cosine written plainly; bad method names are refused."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from alignment_helpers import np_cosine, np_normalise, np_upload
from omegaconf import OmegaConf

from src.alignment.release import ReleaseSpec, release_entries
from src.cli import config, jobs
from src.cli.config import CONF_DIR, ConfigError, refuse_misnamed
from src.cli.jobs import compose_runs
from src.clients.model import ModelSpec, init_params
from src.methods.base import RoundSums, build_method, method_class

CPU = torch.device("cpu")
# ablation -> (method module, parameters the server averages, uploads similarity, central)
EXPECTED = {
    "backbone": ("sharing", ["items"], False, False),
    "fedavg": ("sharing", ["items", "w0", "b0"], False, False),
    "local": ("sharing", [], False, False),
    "full": ("alignfedrec", [], True, False),
    "no_ica": ("alignfedrec", [], True, False),
    "no_gsa": ("alignfedrec", [], True, False),
    "central": ("central", [], False, True),
    "popularity": ("central", [], False, True),
    "itemknn": ("central", [], False, True),
    "knn_ica": ("alignfedrec", [], True, False),
    "knn_full": ("alignfedrec", [], True, False),
    "fed_itemknn": ("fed_itemknn", [], True, False),
    "private_itemknn": ("fed_itemknn", [], True, False),
}

# similarity-sharing ablation -> (trains ICA, trains GSA)
ALIGNMENT_TERMS = {
    "full": (True, True),
    "no_ica": (False, True),
    "no_gsa": (True, False),
    "knn_ica": (True, False),
    "knn_full": (True, True),
    "fed_itemknn": (False, False),
    "private_itemknn": (False, False),
}


def test_every_ablation_file_is_listed_here():
    assert {p.stem for p in (CONF_DIR / "ablation").glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("ablation", sorted(EXPECTED))
def test_each_ablation_builds_its_method(compose_cfg, ablation):
    module, shared, similarity, central = EXPECTED[ablation]
    cfg = compose_cfg([f"ablation={ablation}", "model.score_hidden=[]"])
    assert cfg.ablation.method == module
    method = build_method(cfg, CPU)
    assert type(method).__module__ == f"src.methods.{module}" and method.name == ablation
    params = init_params(ModelSpec.from_cfg(cfg.model), 3, 10, torch.Generator().manual_seed(0))
    assert method.shared_keys(params) == shared
    assert (method.uploads_similarity, method.central) == (similarity, central)
    # the class the config checks read before any method is built (privacy.clip)
    assert method_class(cfg) is type(method)
    if ablation == "private_itemknn":  # one upload, clipped, the rank-10 release (conf/ablation/private_itemknn.yaml)
        assert (method.upload_round, method.rank, method.spec.clip) == (40, 10, 1.0)
        assert [r for r in range(1, 42) if method.uploads_in(r)] == [40]
    if similarity:  # the alignment terms each method trains with, written out (the paper's Table 2 and this project's)
        assert (method.loss.use_ica, method.loss.use_gsa) == ALIGNMENT_TERMS[ablation]


def test_an_unknown_method_is_refused_before_any_work(compose_cfg):
    with pytest.raises(ConfigError) as err:
        compose_cfg(["ablation=full", "ablation.method=nope"])
    assert "ablation.method" in str(err.value) and "alignfedrec" in str(err.value)


@pytest.mark.parametrize("path", sorted((CONF_DIR / "ablation").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_ablation_file_names_the_method_after_itself(path):
    """Runs are stored and labelled under `ablation.name`: each conf/ablation/<x>.yaml composes name x (a yaml copied
    from another method with its name left unchanged would file its runs as that method's)."""
    cfg = compose_runs([[f"ablation={path.stem}"]])[0]
    assert cfg.ablation.name == path.stem, f"{path}: name: {cfg.ablation.name}; expected name: {path.stem}"


def test_a_yaml_named_after_another_method_is_refused_in_one_line(monkeypatch):
    copied = OmegaConf.create({"ablation": {"name": "local", "method": "sharing"}})
    refuse_misnamed(["ablation=local"], copied)
    refuse_misnamed(["ablation='local'"], copied)  # quoted as Hydra reads it
    refuse_misnamed(["~ablation"], copied)  # a deleted choice names no file
    # as conf/ablation/local_l2.yaml would compose
    monkeypatch.setattr(jobs, "compose_config", lambda overrides: copied)
    with pytest.raises(ConfigError, match=r"^ablation=local_l2: conf/ablation/local_l2\.yaml sets name: local;"):
        compose_runs([["ablation=local_l2", "seed=1"]])
    with pytest.raises(
        ConfigError,
        match=r"^ablation=local_l2: conf/ablation/local_l2\.yaml sets name: local; expected name: local_l2 ",
    ):
        refuse_misnamed(["dataset=synthetic", "ablation=local_l2"], copied)


def test_a_method_module_without_method_is_refused_in_one_line(compose_cfg, monkeypatch):
    """The config checks read the class a method builds (`METHOD`) before anything is built: a module without it is
    named, not an AttributeError from deep inside."""
    module = types.ModuleType("src.methods.sharing")
    module.build = lambda cfg, device: None
    monkeypatch.setattr(config, "method_module", lambda cfg: module)
    with pytest.raises(
        ConfigError, match=r"^ablation\.method=sharing: src/methods/sharing\.py has no METHOD; expected"
    ):
        compose_cfg(["ablation=local"])


def test_a_key_no_method_declares_points_at_the_methods_keys(compose_cfg):
    with pytest.raises(ConfigError, match=r"declares its own keys in KEYS of src/methods/sharing\.py\)$"):
        compose_cfg(["ablation=local", "+ablation.l2=1"])


@pytest.mark.parametrize("rows,block", [(4, 40), (128, 1 << 22)])
def test_release_entries_are_the_thresholded_cosine_of_each_client(rows, block):
    """Each client's listed entries are exactly the nonzero strict-upper entries of its thresholded cosine."""
    c, m, d, sigma = 4, 13, 3, 0.3
    tabs = torch.randn(c, m, d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = release_entries(tabs, ReleaseSpec(sigma, True, block, rows))
    assert len(got) == c
    for table, (pos, vals) in zip(tabs.numpy(), got):
        up = np.triu(np_upload(np_cosine(table, True), sigma), 1)
        j, k = np.nonzero(up)
        np.testing.assert_array_equal(pos.numpy(), j * m + k)  # sorted row-major, as encoded
        np.testing.assert_allclose(vals.numpy(), up[j, k], rtol=0, atol=1e-12)


def test_server_graph_variants_change_only_the_server_side(compose_cfg):
    """The variants (this project's) leave local training alone: round 1 (no broadcast yet) trains the same;
    the community graph then follows `ablation.graph_sigma` / `ablation.graph=knn`, and support_mean S_g has no
    value below sigma (every held entry is >= sigma)."""
    from src.data.dataset import load
    from src.rounds.simulator import FederatedModule

    base = ["dataset=synthetic", "ablation=full", "model.dim=8", "ablation.sigma=0.3"]
    rows = {}
    for name, extra in {
        "paper": [],
        "high": ["ablation.graph_sigma=0.95"],
        "knn": ["ablation.graph_sigma=0.95", "ablation.graph=knn", "ablation.graph_k=3"],
        "support": ["ablation.aggregate=support_mean"],
    }.items():
        cfg = compose_cfg([*base, *extra])
        module = FederatedModule(cfg, load(cfg))
        rows[name] = module.run_round()
        if name == "support":
            g = module.broadcast.global_sim
            assert float(g[g > 0].min()) >= 0.3 - 1e-6
    assert len({rows[n]["loss/bce"] for n in rows}) == 1
    assert rows["high"]["community/edges"] < rows["paper"]["community/edges"]
    assert 0 < rows["knn"]["community/edges"] <= 3 * load(compose_cfg(base)).n_items
    assert rows["support"]["community/edges"] >= rows["paper"]["community/edges"]


@pytest.mark.parametrize("ablation", ["knn_ica", "knn_full"])
def test_knn_variants_against_a_numpy_server(compose_cfg, ablation):
    """`ablation=knn_ica|knn_full` (this project's): one random initialisation per client; after a round, S_g is
    the mean over all clients of their thresholded cosines (numpy), the graph is each item's k largest S_g entries
    > 0 (brute force), and every community of more than one item is connected in that graph."""
    from src.data.dataset import load
    from src.rounds.simulator import FederatedModule

    k = 3
    cfg = compose_cfg(["dataset=synthetic", f"ablation={ablation}", "model.dim=8", f"ablation.graph_k={k}"])
    assert (cfg.ablation.graph, cfg.model.shared_init) == ("knn", False)
    assert bool(cfg.ablation.gsa_on_graph) == (ablation == "knn_full")
    module = FederatedModule(cfg, load(cfg))
    first = module.state["items"].numpy()
    assert not np.allclose(first[0], first[1])  # per-client initialisation
    stats = module.run_round()
    sigma, tables = float(cfg.ablation.sigma), module.state["items"].double().numpy()
    mean = np.zeros((tables.shape[1],) * 2)
    for table in tables:
        e = np_normalise(table, bool(cfg.ablation.centre))
        sim = e @ e.T
        np.fill_diagonal(sim, 0.0)
        mean += np.where(sim >= sigma, sim, 0.0) / len(tables)
    got = module.broadcast.global_sim.double().numpy()
    np.testing.assert_allclose(got, mean, atol=1e-5)
    m = len(mean)
    edges = set()
    for j in range(m):
        row = [(got[j, x], x) for x in range(m) if x != j and got[j, x] > 0]
        edges |= {(min(j, x), max(j, x)) for _, x in sorted(row, reverse=True)[:k]}
    assert stats["community/edges"] == len(edges) > 0
    labels = module.broadcast.labels.numpy()
    neighbours = {j: set() for j in range(m)}
    for a, b in edges:
        neighbours[a].add(b)
        neighbours[b].add(a)
    for community in set(labels.tolist()):
        members = set(np.flatnonzero(labels == community).tolist())
        seen, todo = set(), [min(members)]
        while todo:
            j = todo.pop()
            if j not in seen:
                seen.add(j)
                todo += [x for x in neighbours[j] if x in members]
        assert seen == members


@pytest.mark.parametrize(("overrides", "releases"), [([], 7), (["ablation.upload_round=3"], 1)])
def test_laplace_epsilon_counts_the_rounds_with_uploads(compose_cfg, overrides, releases):
    """Basic composition over releases: a one-shot fed_itemknn (`ablation.upload_round=3`) has spent one round's ε
    at round 7, not seven; uploading every round, seven."""
    cfg = compose_cfg(["ablation=fed_itemknn", "privacy.epsilon=0.5", "fl.rounds=7", *overrides])
    method = build_method(cfg, CPU)
    sums = RoundSums(6, CPU, similarity=True)
    spent = method.traffic(sums, None, 3, {}, round_=7, dim=4)
    assert spent["privacy/epsilon_total_entry"] == pytest.approx(0.5 * releases)
    assert spent["privacy/epsilon_total_matrix"] == pytest.approx(0.5 * releases * 15)


def test_the_worked_method_of_the_docs_runs_as_written(tmp_path, monkeypatch, cache_dir):
    """docs/methods.md's `local_l2`, its module and its yaml taken from the page as written, put beside the real ones
    (a copy of src/methods/ and Hydra's search path): it trains with its loss logged, and a bad value of its key is
    refused in one line."""
    import importlib.util
    import re
    import sys

    from src.cli.config import load_config
    from src.cli.train import train
    from src.config import identity, schema

    identity.neutral_values()  # cached from the real methods before the copy stands in
    text = (CONF_DIR.parent / "docs" / "methods.md").read_text()
    code = re.search(r'```python\n("""`local_l2`.*?)```', text, re.S).group(1)
    yaml = re.search(r"```yaml\n(name: local_l2\n.*?)```", text, re.S).group(1)
    methods, conf = tmp_path / "methods", tmp_path / "conf" / "ablation"
    methods.mkdir()
    conf.mkdir(parents=True)
    for path in schema.METHODS_DIR.glob("*.py"):
        (methods / path.name).write_text(path.read_text())
    (methods / "local_l2.py").write_text(code)
    (conf / "local_l2.yaml").write_text(yaml)
    spec = importlib.util.spec_from_file_location("src.methods.local_l2", methods / "local_l2.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "src.methods.local_l2", module)
    spec.loader.exec_module(module)
    monkeypatch.setattr(schema, "METHODS_DIR", methods)
    extra = [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", f"data.cache_dir='{cache_dir}'"]
    cfg = load_config(["dataset=synthetic", "ablation=local_l2", "fl.rounds=2", "fl.checkpoint_every=0", *extra])
    payload = train(cfg, tmp_path / "run", progress=False)
    assert [row["round"] for row in payload["history"]] == [1, 2]
    assert all(row["loss/l2"] > 0 for row in payload["history"])
    with pytest.raises(ConfigError, match=r"^ablation\.l2=-1 is invalid; expected a finite number >= 0$"):
        load_config(["dataset=synthetic", "ablation=local_l2", "ablation.l2=-1", *extra])
