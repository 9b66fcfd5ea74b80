"""The Flower app against the simulator, and its fault handling, on 20 real FilmTrust users.

The engine here is an in-process grid that hands each message to the real ClientApp (Flower's
own `ClientApp.__call__`), so the server and client code under test are exactly those a
SuperLink would run; `test_flower_deploy.py` runs them over real SuperNodes.
"""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")
from flwr.app import Array, Message, MetricRecord  # noqa: E402

from src.cli.config import ConfigError  # noqa: E402
from src.cli.train import train  # noqa: E402
from src.comm.codec import PayloadError, decode_entries, encode_entries  # noqa: E402
from src.flower.inprocess import InProcessGrid, flower_task, node_context  # noqa: E402
from src.flower.messages import RejectedReply, pack_reply, unpack_reply  # noqa: E402
from src.flower.server_app import serve  # noqa: E402
from tests.conftest import SHARED_DATA, requires_real_data  # noqa: E402
from tests.wandb_records import assert_holds_the_run  # noqa: E402

pytestmark = requires_real_data
SMALL = [
    f"data.root='{SHARED_DATA}'",
    "dataset=filmtrust",
    "data.max_users=20",
    "protocol=paper",
    "fl.rounds=3",
    "logger=csv",
]


@pytest.fixture(autouse=True)
def task_identity():
    with flower_task():
        yield


def compare(flower: list[dict], simulator: list[dict], tol: float = 1e-4) -> float:
    """Largest difference over every metric both histories log (timings aside)."""
    assert len(flower) == len(simulator)
    worst = 0.0
    for a, b in zip(flower, simulator):
        common = [k for k in b if k in a and not k.startswith("time/")]
        assert any(k.startswith("test/") for k in common) and any(k.startswith("val/") for k in common)
        for k in common:
            assert a[k] == pytest.approx(b[k], abs=tol), (a["round"], k)
            worst = max(worst, abs(a[k] - b[k]))
    return worst


@pytest.mark.parametrize("ablation", ["full", "fedavg", "fed_itemknn"])
def test_flower_run_matches_the_simulator(compose_cfg, tmp_path, ablation):
    cfg = compose_cfg([*SMALL, f"ablation={ablation}"])
    flower = serve(InProcessGrid(cfg, 3), cfg, tmp_path / "flower")
    simulator = train(cfg, tmp_path / "sim", progress=False)
    compare(flower["history"], simulator["history"])
    last = flower["history"][-1]
    assert last["flower/nodes"] == 3 and last["flower/rejected"] == 0 and last["flower/failed"] == 0
    if ablation == "full":
        assert flower["history"][-1]["community/count"] > 0
        assert flower["communication"]["upload_bytes_total"] > 0
    saved = json.loads((tmp_path / "flower" / "results.json").read_text())
    assert saved["finished"] and saved["engine"] == "flower"
    assert (tmp_path / "flower" / "csv" / "metrics.csv").is_file()


def test_flower_logs_to_the_simulators_loggers_wandb_included(compose_cfg, tmp_path, wandb_offline):
    """`logger=wandb` works in Flower as in the simulator: the same Lightning loggers, fed each round (the step is
    the round), the resolved config, the best round's test metrics as the W&B summary; metrics.csv is the csv
    logger's."""
    cfg = compose_cfg([*SMALL, "fl.rounds=2", "logger=wandb"])
    payload = serve(InProcessGrid(cfg, 2), cfg, tmp_path / "flower")
    assert wandb_offline.run is None, "the W&B run was not finished"
    found = sorted((tmp_path / "flower").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(found) == 1, found
    assert [row["round"] for row in payload["history"]] == [1, 2]
    assert_holds_the_run(found[0], payload)
    with open(tmp_path / "flower" / "csv" / "metrics.csv", newline="") as fh:
        assert [int(r["round"]) for r in csv.DictReader(fh)] == [1, 2]


def test_a_folder_holding_a_run_is_refused_before_anything_is_written(compose_cfg, tmp_path):
    cfg = compose_cfg(SMALL)
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds a run already"):
        serve(InProcessGrid(cfg, 2), cfg, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def corrupt_similarity(reply: Message, how: str) -> Message:
    """The reply with its first similarity payload truncated or blown up."""
    up = reply.content["upload"]
    payload = up["sim/0"].numpy().tobytes()
    bad = payload[:-3] if how == "truncated" else payload + bytes(1_000_000)
    up["sim/0"] = Array(np.frombuffer(bad, dtype=np.uint8))
    return reply


def test_dead_and_malformed_nodes_do_not_stop_the_run(compose_cfg, tmp_path, caplog):
    cfg = compose_cfg([*SMALL, "flower.max_upload_bytes=200000"])

    def fault(round_, node, reply):
        if node == 101 and round_ == 2:
            return None  # killed mid-round: no reply
        if node == 102 and round_ == 2:
            return corrupt_similarity(reply, "truncated")
        if node == 102 and round_ == 3:
            return corrupt_similarity(reply, "oversized")
        return reply

    with caplog.at_level(logging.WARNING):
        result = serve(InProcessGrid(cfg, 3, fault), cfg, tmp_path)
    rounds = result["history"]
    assert [r["flower/replies"] for r in rounds] == [3, 2, 3]
    assert [r["flower/rejected"] for r in rounds] == [0, 1, 1]
    # round 2 aggregates node 100's clients only (7 of 20), round 3 nodes 100 and 101
    assert [r["flower/evaluated"] for r in rounds] == [20, 7, 14]
    msgs = [r.getMessage() for r in caplog.records]
    # each rejection for its own reason: the truncated payload in round 2, the oversized one in round 3
    assert any(m.startswith("round 2: reply of node 102 rejected") and "payload has" in m for m in msgs), msgs
    assert any(
        m.startswith("round 3: reply of node 102 rejected") and "exceeds the limit of 200000 bytes" in m for m in msgs
    ), msgs
    # rounds 2 and 3 evaluated 7 and 14 of the 20 users: their metrics are kept apart and cannot be the best round
    assert np.isfinite(rounds[0]["val/hit@10"]) and result["best_round"] == 1
    for r in rounds[1:]:
        assert "val/hit@10" not in r and "test/hit@10" not in r and np.isfinite(r["subset/val/hit@10"])
    assert any(m.startswith("round 2: 1/3 nodes accepted, unscored (7 of 20 users evaluated)") for m in msgs), msgs


def test_a_restarted_node_rejoins_with_its_state(compose_cfg, tmp_path):
    """Node 101 loses its memory (a new process) after round 1; its state file brings its clients back."""
    cfg = compose_cfg([*SMALL, f"flower.state_dir='{tmp_path / 'state'}'"])
    grid = InProcessGrid(cfg, 3)

    def fault(round_, node, reply):
        if node == 101 and round_ == 1:
            grid.contexts[101] = node_context(101, 1, 3)
        return reply

    grid.fault = fault
    flower = serve(grid, cfg, tmp_path / "flower")
    simulator = train(cfg, tmp_path / "sim", progress=False)
    compare(flower["history"], simulator["history"])
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [f"run1-part{p}of3.pt" for p in range(3)]


def test_reply_validation_names_the_problem():
    users = torch.tensor([1, 4])
    m = 6
    good = encode_entries(m, np.array([0, 1]), np.array([2, 5]), np.array([0.7, 0.9]), "csr", 32)
    shared = {"w0": torch.zeros(2, 3, 1)}
    ranks = {"val": torch.tensor([1, 5, 2]), "test": torch.tensor([3, 1, 9])}
    args = dict(
        chosen={1, 4},
        n_users=10,
        n_items=m,
        shared_shapes={"w0": (3, 1)},
        similarity=True,
        rank_limits={"val": 10, "test": 10},
        max_bytes=10_000,
    )

    def content(**change):
        parts = dict(
            users=users,
            shared=shared,
            payloads=[good, good],
            eval_users=torch.tensor([1, 4, 7]),
            ranks=ranks,
            loss_sums={"bce": 1.0},
            steps=4.0,
        )
        parts.update(change)
        return pack_reply(**parts)

    ok = unpack_reply(content(), **args)
    assert ok.users.tolist() == [1, 4] and ok.sim_bytes == [len(good)] * 2
    cases = {
        "not chosen": content(users=torch.tensor([1, 3])),
        "lacks shared parameter": content(shared={}),
        "expected finite float32 values": content(shared={"w0": torch.full((2, 3, 1), float("nan"))}),
        "lacks the similarity payload": content(payloads=[good]),
        "shorter than": content(payloads=[good, good[:5]]),
        "announces m=": content(
            payloads=[good, encode_entries(7, np.array([0]), np.array([1]), np.array([0.8]), "csr", 32)]
        ),
        "integers in [1, 10]": content(ranks={"val": torch.tensor([1, 50, 2]), "test": ranks["test"]}),
        "appears twice": content(eval_users=torch.tensor([1, 1, 7])),
        # client 4 is another node's: its upload would be summed twice (this node's and its own node's)
        "upload from clients the node does not evaluate: [4]": content(eval_users=torch.tensor([1, 7])),
        # a float64 that overflows float32, the precision the server sums in
        "expected finite float32": content(shared={"w0": torch.full((2, 3, 1), 1e300, dtype=torch.float64)}),
    }
    for reason, bad in cases.items():
        with pytest.raises(RejectedReply, match=reason.replace("[", r"\[").replace("]", r"\]")):
            unpack_reply(bad, **args)
    with pytest.raises(RejectedReply, match="exceeds the limit"):
        unpack_reply(content(), **{**args, "max_bytes": 20})
    # records flwr accepts that the server cannot read: rejected, never an exception that ends the run
    listed = content()
    listed["train"] = MetricRecord({"steps": [1.0], "loss/bce": 1.0})
    swapped = content()
    swapped["eval"]["users"] = Array(np.array([1, 4, 7], dtype=">i8"))
    for bad in (listed, swapped):
        with pytest.raises(RejectedReply):
            unpack_reply(bad, **args)


@pytest.mark.parametrize("fmt", ["csr", "coo"])
def test_payload_decoder_rejects_what_no_encoder_produces(fmt):
    m = 5
    good = encode_entries(m, np.array([0, 2]), np.array([3, 4]), np.array([0.6, 0.8]), fmt, 32)
    _, rows, cols, vals = decode_entries(good, m_expected=m)
    assert rows.tolist() == [0, 2] and cols.tolist() == [3, 4] and np.allclose(vals, [0.6, 0.8])
    if fmt == "csr":  # row 3 holding column 1
        lower = encode_entries(m, np.array([3]), np.array([1]), np.array([0.6]), fmt, 32)
    else:  # position 10 of the 10 upper-triangle pairs of 5 items
        lower = bytes([64 + 32]) + np.array([m, 1], np.uint32).tobytes() + bytes([10]) + np.float32(0.6).tobytes()
    bad_value = encode_entries(m, np.array([0]), np.array([1]), np.array([7.0]), fmt, 32)
    flag = bytes([200]) + good[1:]
    for payload, reason in [
        (lower, "strict upper triangle|outside the 10"),
        (bad_value, "outside \\[-1, 1\\]"),
        (flag, "unknown format byte"),
        (good + b"x", "bytes"),
    ]:
        with pytest.raises(PayloadError, match=reason):
            decode_entries(payload, m_expected=m)


@pytest.mark.slow
def test_simulation_runtime_matches_the_simulator(compose_cfg, tmp_path):
    """Flower's simulation runtime (Ray, 3 virtual SuperNodes): about a minute, most of it starting Ray."""
    from src.flower.simulate import simulate

    cfg = compose_cfg(SMALL + ["flower.supernodes=3"])
    flower = simulate(cfg, tmp_path / "flower")
    simulator = train(cfg, tmp_path / "sim", progress=False)
    compare(flower["history"], simulator["history"])


def test_node_data_cache_is_keyed_by_everything_the_split_depends_on(compose_cfg, tmp_path):
    from src.flower.client_app import node_data_key

    base = ["dataset=synthetic"]
    key = node_data_key(compose_cfg(base))
    assert node_data_key(compose_cfg(base)) == key
    for change in (
        ["dataset.n_users=50"],
        ["dataset.n_items=200"],
        ["dataset.affinity=0.5"],
        ["dataset.generator_seed=3"],
        ["protocol=paper"],
        ["protocol.eval_negatives=49"],
        ["protocol.train_negative_pool=non_train_non_candidates"],
        ["seed=1"],
        ["data.max_users=10"],
        [f"data.cache_dir='{tmp_path}'"],
        [f"data.root='{tmp_path}'"],
        ["data.verify=false"],
        ["eval.ks=[10]"],
    ):
        assert node_data_key(compose_cfg(base + change)) != key, change
    # what does not change the split shares the entry
    assert node_data_key(compose_cfg(base + ["fl.rounds=7", "ablation.alpha=0.1"])) == key


def test_nodes_size_auto_cohorts_like_the_simulator(compose_cfg, tmp_path, monkeypatch):
    """fl.chunk_size=auto on a node: cohorts sized from its device's free memory (here: room for 2
    clients), not one cohort of all its clients; the run still matches the simulator."""
    from src.flower import client_app
    from src.rounds.memory import bytes_per_client

    cfg = compose_cfg([*SMALL, "fl.chunk_size=auto"])
    from src.data.dataset import load

    per = bytes_per_client(
        load(cfg).n_items,
        int(cfg.model.dim),
        str(cfg.model.alignment),
        int(cfg.model.fast_anchors),
        int(cfg.fl.batch_size),
    )
    monkeypatch.setattr("src.rounds.memory.free_bytes", lambda device: int(2.5 * per / float(cfg.fl.memory_fraction)))
    used = []
    real = client_app.train_clients

    def spy(*args):
        used.append(args[-1])  # chunk_size
        return real(*args)

    monkeypatch.setattr(client_app, "train_clients", spy)
    flower = serve(InProcessGrid(cfg, 3), cfg, tmp_path / "flower")
    assert used and set(used) == {2}
    simulator = train(cfg, tmp_path / "sim", progress=False)
    compare(flower["history"], simulator["history"])


@pytest.mark.parametrize(
    "extra",
    [
        ["ablation=full", "privacy.epsilon=50"],  # Laplace noise: each client's stream, whichever node trains it
        ["ablation=full", "encoding=csr8_delta"],  # delta encoding, counted by the same ledger
        ["ablation=fed_itemknn", "fl.dropout=0.3"],  # simulated failures: the chosen clients that do not report
        ["ablation=fedavg", "fl.dropout=0.3", "fl.client_fraction=0.5"],
        ["ablation=backbone", "comm.tables=rows", "fl.client_fraction=0.5"],  # tables counted as changed rows
        # user-level DP: clipped uploads, the server's noise on the sum, the one-shot upload, the accountant
        ["ablation=fed_itemknn", "privacy.clip=1", "privacy.noise_multiplier=0.5", "ablation.upload_round=2"],
    ],
    ids=["dp_noise", "comm_delta", "dropout", "fedavg_dropout_fraction", "table_rows", "user_dp_one_shot"],
)
def test_flower_matches_the_simulator_with(compose_cfg, tmp_path, extra):
    """One round loop: what the simulator does with noise, delta accounting and failures, Flower does alike."""
    cfg = compose_cfg([*SMALL, *extra])
    flower = serve(InProcessGrid(cfg, 3), cfg, tmp_path / "flower")
    simulator = train(cfg, tmp_path / "sim", progress=False)
    compare(flower["history"], simulator["history"])
    keys = {k for row in simulator["history"] for k in row}
    assert {"reported", "comm/upload_bytes_total"} <= keys
    if "fl.dropout=0.3" in extra:
        assert any(r["reported"] < r["clients"] for r in flower["history"])
    if "privacy.clip=1" in extra:
        assert [r["privacy/user_releases"] for r in flower["history"]] == [0.0, 1.0, 1.0]
        assert flower["history"][-1]["privacy/user_epsilon"] > 0
    if "encoding=csr8_delta" in extra:  # the delta pays from round 2 on, on both
        first, last = flower["history"][0], flower["history"][-1]
        assert last["comm/upload_bytes_mean"] < first["comm/upload_bytes_mean"]


def test_flower_stops_early_where_the_simulator_does(compose_cfg, tmp_path):
    cfg = compose_cfg([*SMALL, "ablation=fedavg", "fl.rounds=12", "eval.patience=2", "fl.checkpoint_every=0"])
    flower = serve(InProcessGrid(cfg, 2), cfg, tmp_path / "flower")
    simulator = train(cfg, tmp_path / "sim", progress=False)
    assert len(simulator["history"]) < 12  # it did stop early
    compare(flower["history"], simulator["history"])
    assert flower["finished"] and flower["best_round"] == simulator["best_round"]


def test_a_clients_noise_does_not_depend_on_its_chunk(compose_cfg, tmp_path):
    """Each client draws its Laplace noise from its own (seed, round, client) stream: cohorts of 3 clients give
    the run one cohort of all gives, the noise changes the run, and a stream depends on the seed and the round."""
    base = [*SMALL, "ablation=full", "privacy.epsilon=20", "fl.rounds=2"]
    whole = train(compose_cfg([*base, "fl.chunk_size=null"]), tmp_path / "a", progress=False)["history"]
    threes = train(compose_cfg([*base, "fl.chunk_size=3"]), tmp_path / "b", progress=False)["history"]
    compare(whole, threes, tol=1e-6)
    # the noise is there: without it the run differs
    plain = train(compose_cfg([*SMALL, "ablation=full", "fl.rounds=2"]), tmp_path / "c", progress=False)
    assert plain["history"][0]["comm/upload_bytes_total"] != whole[0]["comm/upload_bytes_total"]
    # a client's stream: the same whichever cohort draws it, another under another seed or round
    from src.comm.privacy import NoiseStreams

    def draws(seed: int, round_: int, users: list[int], which: int) -> torch.Tensor:
        return torch.rand(8, generator=NoiseStreams(seed, round_).for_clients(torch.tensor(users))[which])

    assert torch.equal(draws(0, 2, [5], 0), draws(0, 2, [2, 5], 1))
    assert not torch.equal(draws(0, 2, [5], 0), draws(1, 2, [5], 0))
    assert not torch.equal(draws(0, 2, [5], 0), draws(0, 3, [5], 0))


def test_the_flower_app_refuses_a_pooled_method_with_its_reason():
    import pytest

    from src.cli.config import load_config
    from src.flower.settings import flower_checks

    with pytest.raises(ConfigError, match=r"ablation=itemknn: it pools all data on one machine"):
        flower_checks(load_config(["ablation=itemknn"]))
    flower_checks(load_config(["ablation=fed_itemknn"]))


def test_a_deployed_serverapp_shows_its_rounds_on_stderr(monkeypatch, capsys):
    """Where no handler would show an INFO line (a `flwr-serverapp` process), the round lines and rejections go to
    stderr, which `flwr log` shows, once; where logging shows them (Hydra), nothing is added."""
    import logging

    from src.flower.server_app import progress_to_stderr

    logger = logging.getLogger("tests.flower.progress")
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [logging.NullHandler()])
    level = root.level
    try:
        root.setLevel(logging.INFO)  # (setLevel, not an attribute: it clears the loggers' level caches)
        progress_to_stderr(logger)  # set up to show INFO (Hydra): left alone
        assert not logger.handlers
        root.setLevel(logging.WARNING)  # handlers, but INFO dropped: the round lines would be lost
        progress_to_stderr(logger)
        progress_to_stderr(logger)
        logger.info("round %d: %d/%d nodes accepted", 1, 2, 2)
        assert len(logger.handlers) == 1
    finally:
        logger.handlers.clear()
        logger.setLevel(logging.NOTSET)
        root.setLevel(level)
    err = capsys.readouterr().err
    assert err.count("round 1: 2/2 nodes accepted") == 1, err
