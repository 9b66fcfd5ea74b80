"""Secure aggregation (flwr SecAgg+) of the similarity uploads on the Flower app.

Checked against independent computations: the dense layout against a brute-force sum, the secure sum against the
plain sum of the nodes' vectors (within SecAgg+'s quantisation), a whole run against the simulator, nodes dropping
out within and beyond the threshold, and what the server holds of one node (its masked vector) against the
membership audit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")
from flwr.common import bytes_to_ndarray  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage  # noqa: E402

from src.analysis.audit import auc, membership_scores, training_items  # noqa: E402
from src.cli.config import ConfigError, load_config, simulator_checks  # noqa: E402
from src.cli.train import train  # noqa: E402
from src.comm.secure_sum import SecureLayout  # noqa: E402
from src.data.dataset import load  # noqa: E402
from src.flower import server_app  # noqa: E402
from src.flower.inprocess import InProcessGrid, flower_task  # noqa: E402
from src.flower.secagg import (  # noqa: E402
    VECTOR_RECORD,
    SecAggSettings,
    keep_vector,
    on_grid,
    reply_stage,
    secure_sum,
)
from src.flower.server_app import serve  # noqa: E402
from src.flower.settings import flower_checks  # noqa: E402
from src.flower.simulate import simulate  # noqa: E402
from src.rounds.strategy import RoundStrategy  # noqa: E402
from tests.conftest import requires_real_data  # noqa: E402
from tests.test_flower import SMALL, compare  # noqa: E402

SETTINGS = SecAggSettings(shares=3, threshold=2, clip=8.0, timeout=60.0)


@pytest.fixture(autouse=True)
def task_identity():
    with flower_task():
        yield


def random_uploads(rng: np.random.Generator, m: int, n: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`n` sparse uploads of strict-upper-triangle entries, some positions repeated across uploads."""
    out = []
    for _ in range(n):
        k = int(rng.integers(1, m * 2))
        r, c = rng.integers(0, m, k), rng.integers(0, m, k)
        keep = r < c
        pos = np.unique(r[keep] * m + c[keep])
        out.append((pos // m, pos % m, rng.uniform(0.3, 1.0, len(pos))))
    return out


@pytest.mark.parametrize("support", [False, True])
def test_the_layout_holds_what_a_dense_sum_holds(support):
    m, uploads = 9, random_uploads(np.random.default_rng(0), 9, 5)
    dense, held = np.zeros((m, m)), np.zeros((m, m), dtype=int)
    for rows, cols, vals in uploads:  # the brute-force oracle: entry by entry
        for r, c, v in zip(rows, cols, vals, strict=True):
            dense[r, c] += v
            held[r, c] += 1
    layout = SecureLayout(m, support)
    vector = layout.pack(uploads)
    assert vector.shape == (layout.size,) == (m * (m - 1) // 2 * (2 if support else 1) + 1,)
    upper, holders, count = layout.unpack(vector)
    np.testing.assert_allclose(upper.numpy(), dense)
    assert count == 5 and (holders is None) == (not support)
    if support:
        np.testing.assert_array_equal(holders.numpy(), held)
    with pytest.raises(ValueError, match="on or below the diagonal"):
        layout.pack([(np.array([2]), np.array([2]), np.array([1.0]))])


def test_a_node_rounds_its_vector_onto_the_secagg_grid_reproducibly():
    rng = np.random.default_rng(5)
    x = rng.uniform(-3, 3, 200_000)
    a, b = on_grid(x, 8.0, np.random.default_rng([1, 2])), on_grid(x, 8.0, np.random.default_rng([1, 2]))
    np.testing.assert_array_equal(a, b)
    levels = (a + 8.0) * 2**18  # 2**22 levels over [-8, 8]: a step of 2**-18
    np.testing.assert_array_equal(levels, np.round(levels))
    assert np.abs(a - x).max() <= 2**-18 and abs(float((a - x).mean())) < 2**-18 / 100  # within a level, unbiased


@pytest.fixture
def small_cfg():
    return load_config([*SMALL, "ablation=fed_itemknn", "flower.secagg=true"])


def nodes_holding(cfg, vectors: list[np.ndarray], fault=None) -> InProcessGrid:
    """A grid of len(vectors) nodes, node 100 + p holding vectors[p] as its round's vector."""
    grid = InProcessGrid(cfg, len(vectors), fault)
    for ctx, vec in zip(grid.contexts.values(), vectors, strict=True):
        keep_vector(ctx, vec, SETTINGS.clip)
    return grid


def test_the_secure_sum_is_the_plain_sum_within_the_quantisation(small_cfg):
    rng = np.random.default_rng(1)
    layout = SecureLayout(40, True)
    vectors = [layout.pack(random_uploads(rng, 40, 3)) for _ in range(4)]
    result = secure_sum(nodes_holding(small_cfg, vectors), [100, 101, 102, 103], 1, layout, SETTINGS)
    assert result.summed == [100, 101, 102, 103]
    # each node's entry is stochastically rounded to one of 2**22 levels over [-clip, clip]
    np.testing.assert_allclose(result.total, np.sum(vectors, axis=0), atol=4 * SETTINGS.step())
    assert result.masked_bytes == 4 * layout.masked_bytes()
    upper, holders, count = layout.unpack(result.total)
    assert count == 12 and int(holders.sum()) == int(sum(v[layout.pairs : 2 * layout.pairs].sum() for v in vectors))


def test_nodes_that_drop_out_within_the_threshold_are_survived(small_cfg):
    rng = np.random.default_rng(2)
    layout = SecureLayout(30, False)
    vectors = [layout.pack(random_uploads(rng, 30, 2)) for _ in range(5)]
    nodes = [100, 101, 102, 103, 104]

    masked = Stage.COLLECT_MASKED_VECTORS

    def drop(stage, who):
        return lambda round_, node, reply: None if node in who and reply_stage(reply) == stage else reply

    # a node that never sends its masked vector: the sum of the others (its pairwise masks recovered from shares)
    result = secure_sum(nodes_holding(small_cfg, vectors, drop(masked, {101})), nodes, 1, layout, SETTINGS)
    assert result.summed == [100, 102, 103, 104]
    np.testing.assert_allclose(result.total, np.sum(vectors, axis=0) - vectors[1], atol=5 * SETTINGS.step())
    # a node that sent its vector and then dropped out: still summed (its own mask recovered from shares)
    result = secure_sum(nodes_holding(small_cfg, vectors, drop(Stage.UNMASK, {103})), nodes, 1, layout, SETTINGS)
    assert result.summed == nodes
    np.testing.assert_allclose(result.total, np.sum(vectors, axis=0), atol=5 * SETTINGS.step())
    # a node lost before it shared its keys halts flwr's SecAgg+: it is run again over the others
    for stage in (Stage.SETUP, Stage.SHARE_KEYS):
        result = secure_sum(nodes_holding(small_cfg, vectors, drop(stage, {102})), nodes, 1, layout, SETTINGS)
        assert result.summed == [100, 101, 103, 104]
        np.testing.assert_allclose(result.total, np.sum(vectors, axis=0) - vectors[2], atol=5 * SETTINGS.step())
    # beyond the threshold (a node left with fewer live neighbours than shares needed): nothing is unmasked
    halted = secure_sum(
        nodes_holding(small_cfg, vectors, drop(masked, {101, 102, 103})),
        nodes,
        1,
        layout,
        SETTINGS,
    )
    assert halted.total is None


@requires_real_data
def test_a_secure_run_matches_the_simulator(compose_cfg, tmp_path):
    """fed_itemknn (item-kNN on S_g, no threshold cut on it): the whole run is the simulator's."""
    extra = ["ablation=fed_itemknn"]
    cfg = compose_cfg([*SMALL, *extra])
    secure = compose_cfg([*SMALL, *extra, "flower.secagg=true"])
    flower = serve(InProcessGrid(secure, 3), secure, tmp_path / "flower")
    simulator = train(cfg, tmp_path / "sim", progress=False)
    # everything the run learns and reports is the simulator's; the traffic is what SecAgg+ sends (dense, counted
    # below), not the sparse uploads the simulator counts
    traffic = [{k: v for k, v in row.items() if not k.startswith("comm/")} for row in flower["history"]]
    compare(traffic, simulator["history"])
    layout = SecureLayout(load(cfg).n_items, False)
    for row in flower["history"]:
        assert row["flower/secagg_nodes"] == 3 and row["flower/upload_bytes"] == 0  # nothing in the clear
        assert row["flower/secagg_bytes"] == 3 * layout.masked_bytes()
        assert row["comm/upload_nnz_mean"] == 2 * layout.pairs  # every pair, in the codec's whole-matrix count


@requires_real_data
def test_a_secure_run_survives_a_node_that_drops_out_mid_protocol(compose_cfg, tmp_path):
    """Node 101 never sends its masked vector in round 2: the round sums the other two nodes' clients (13 of 20),
    recovered from the key shares, and the run goes on."""
    cfg = compose_cfg([*SMALL, "ablation=fed_itemknn", "flower.secagg=true"])

    def fault(round_, node, reply):
        return None if (round_, node) == (2, 101) and reply_stage(reply) == Stage.COLLECT_MASKED_VECTORS else reply

    history = serve(InProcessGrid(cfg, 3, fault), cfg, tmp_path)["history"]
    assert [r["flower/secagg_nodes"] for r in history] == [3, 2, 3]
    assert [r["reported"] for r in history] == [20, 13, 20]
    assert all(np.isfinite(r["val/hit@10"]) for r in history)


@requires_real_data
def test_a_sum_whose_upload_count_the_nodes_inflated_is_not_summed(compose_cfg, tmp_path, monkeypatch, caplog):
    """The count of uploads comes back through the masked sum, which the nodes make: in round 2 it says 5 more than
    the summed nodes listed (a node that would shrink every pair's mean). The round sums nothing and says why."""
    cfg = compose_cfg([*SMALL, "ablation=fed_itemknn", "flower.secagg=true", "fl.rounds=3"])
    honest = server_app.secure_sum

    def inflated(grid, nodes, round_, layout, settings):
        result = honest(grid, nodes, round_, layout, settings)
        if round_ == 2:
            result.total[-1] += 5
        return result

    monkeypatch.setattr(server_app, "secure_sum", inflated)
    history = serve(InProcessGrid(cfg, 3), cfg, tmp_path)["history"]
    assert [r["reported"] for r in history] == [20, 0, 20]
    assert "round 2: SecAgg+ sum counts 25 uploads, the summed nodes listed 20; no upload is summed" in caplog.text


@requires_real_data
def test_a_round_with_one_uploading_node_sums_nothing(compose_cfg, tmp_path, caplog):
    """One client chosen per round (fl.client_fraction=0.05 of 20): a sum over one node would be its upload, so the
    round sums no upload, and says why."""
    cfg = compose_cfg([*SMALL, "ablation=fed_itemknn", "flower.secagg=true", "fl.client_fraction=0.05", "fl.rounds=2"])
    history = serve(InProcessGrid(cfg, 3), cfg, tmp_path)["history"]
    assert [(r["flower/secagg_nodes"], r["reported"]) for r in history] == [(0, 0), (0, 0)]
    assert "SecAgg+ needs two (one node's sum is its upload)" in caplog.text


@requires_real_data
@pytest.mark.parametrize("extra", [["ablation=full"], ["ablation=knn_ica", "ablation.aggregate=support_mean"]])
def test_the_secure_global_matrix_is_the_plain_one_within_the_quantisation(compose_cfg, tmp_path, monkeypatch, extra):
    """Communities cut S_g at sigma: S_g after round 1, plain Flower against SecAgg+, differs by at most the three
    nodes' quantisation steps (over the uploads' or holders' count), and the round's metrics are the same. Later
    rounds may differ where an entry of S_g lies that close to sigma (a community gains or loses an item)."""
    seen: dict[str, list[torch.Tensor]] = {"plain": [], "secure": []}
    counts: list[torch.Tensor] = []  # what S_g divides each pair's sum by: the uploads, or the pair's holders
    original = RoundStrategy.aggregate_fit

    def recording(self, plan, sums):
        stats, result = original(self, plan, sums)
        seen[key].append(result.global_sim.clone())
        support = sums.sims.support
        counts.append(torch.tensor(float(sums.sims.count)) if support is None else (support + support.T).clamp(min=1))
        return stats, result

    monkeypatch.setattr(RoundStrategy, "aggregate_fit", recording)
    histories = {}
    for key, secure in (("plain", []), ("secure", ["flower.secagg=true"])):
        cfg = compose_cfg([*SMALL, *extra, "fl.rounds=1", *secure])
        histories[key] = serve(InProcessGrid(cfg, 3), cfg, tmp_path / key)["history"]
    gap = (seen["secure"][0] - seen["plain"][0]).abs().double()
    assert float(gap.max()) > 0
    bound = 3 * SETTINGS.step() / counts[0].double() + 1e-7  # (+ S_g's float32 rounding)
    assert bool((gap <= bound).all()), float((gap - bound).max())
    assert histories["secure"][0]["val/hit@10"] == histories["plain"][0]["val/hit@10"]


@requires_real_data
def test_what_the_server_holds_of_one_client_is_at_chance(compose_cfg):
    """One client per node (as deployed), 8 FilmTrust clients, each upload made of pairs of its training items (the
    clearest membership signal an upload can carry): the audit's row statistics recover the training items from the
    upload itself (AUC 1), and nothing from the masked vector a SecAgg+ server receives (AUC near 0.5)."""
    n = 8
    cfg = compose_cfg([*SMALL, f"data.max_users={n}", "ablation=fed_itemknn", "flower.secagg=true"])
    data = load(cfg)
    layout = SecureLayout(data.n_items, False)
    rng = np.random.default_rng(3)
    truths, vectors = [], []
    for u in range(n):
        truth = training_items(data, u)
        items = np.flatnonzero(truth)
        r, c = np.triu_indices(len(items), 1)
        vectors.append(layout.pack([(items[r], items[c], rng.uniform(0.5, 1.0, len(r)))]))
        truths.append(truth)
    nodes = list(range(100, 100 + n))
    result = secure_sum(nodes_holding(cfg, vectors), nodes, 1, layout, SETTINGS, keep_masked=True)
    np.testing.assert_allclose(result.total, np.sum(vectors, axis=0), atol=n * SETTINGS.step())
    assert sorted(r.metadata.src_node_id for r in result.masked) == nodes
    plain, masked, order = [], [], []
    for rep in result.masked:
        p = rep.metadata.src_node_id - 100  # node 100 + p holds client p
        held = bytes_to_ndarray(rep.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS][1])
        plain.append(auc(membership_scores(layout.pair_matrix(vectors[p]), None)["row_sum"], truths[p]))
        scores = membership_scores(layout.pair_matrix(held), None)["row_sum"]
        masked.append(np.argsort(np.argsort(scores)) / len(scores))  # ranked within the client's own items
        order.append(p)
    assert min(plain) == 1.0
    # pooled over the clients (one with few training items gives a noisy AUC on its own)
    pooled = auc(np.concatenate(masked), np.concatenate([truths[p] for p in order]))
    assert abs(pooled - 0.5) < 0.05, pooled


@requires_real_data  # src.flower.simulate reads the split to count the clients per node
def test_secure_aggregation_refuses_what_it_cannot_protect(compose_cfg, tmp_path):
    for checks in (flower_checks, simulator_checks):  # what SecAgg+ needs of the method: the same reason in both
        with pytest.raises(ConfigError, match="sends no similarity upload"):
            checks(compose_cfg([*SMALL, "ablation=fedavg", "flower.secagg=true"]))
        with pytest.raises(ConfigError, match="comm.delta=true with flower.secagg=true"):
            checks(compose_cfg([*SMALL, "ablation=full", "flower.secagg=true", "comm.delta=true"]))
    with pytest.raises(ConfigError, match="the simulator has none; expected flower.secagg=false"):
        simulator_checks(compose_cfg([*SMALL, "ablation=fed_itemknn", "flower.secagg=true"]))
    with pytest.raises(ConfigError, match="flower.secagg_threshold=3 is invalid; expected fewer than"):
        load_config([*SMALL, "flower.secagg_threshold=3"])
    context = InProcessGrid(compose_cfg(SMALL), 1).contexts[100]
    with pytest.raises(ValueError, match="beyond flower.secagg_clip=8.0, which SecAgg[+] would clip") as err:
        keep_vector(context, np.array([0.5, 9.25]), 8.0)
    assert "9.25" not in str(err.value)  # the reason reaches the server: no value of the upload in it
    assert VECTOR_RECORD not in context.state
    with pytest.raises(ConfigError, match="a node holds up to 10 clients, whose summed uploads SecAgg[+] would clip"):
        simulate(compose_cfg([*SMALL, "ablation=fed_itemknn", "flower.secagg=true", "flower.supernodes=2"]), tmp_path)
