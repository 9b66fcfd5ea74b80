"""The Flower ClientApp: a SuperNode holds some clients and runs their rounds with the simulator's code.

Node `partition-id` of `num-partitions` holds clients partition-id, partition-id + num, ... (one
client per node in a real deployment). Per `train` message it restores its clients' private
state (item tables, score functions) from Flower's `context.state` (or, after a restart, from
`flower.state_dir`), trains the chosen ones with `train_clients`, encodes each client's
thresholded similarity matrix (`src/comm/codec.py`) and evaluates all its clients with
`evaluate_clients`; the item tables never leave the node.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from omegaconf import DictConfig, OmegaConf

from src.alignment.broadcast import Broadcast
from src.alignment.release import gather
from src.clients.model import ModelSpec, init_params
from src.comm.codec import Encoding, decode_upper, encode_entries, quantise
from src.comm.privacy import NoiseStreams
from src.comm.secure_sum import SecureLayout
from src.data.dataset import FedData, load
from src.data.protocols import NegativeSampler
from src.evaluation.evaluator import Evaluator
from src.flower.messages import Task, pack_reply, unpack_task
from src.flower.secagg import is_secagg_stage, keep_vector, secagg_stage
from src.flower.settings import config_of, flower_checks
from src.methods.base import build_method
from src.rounds.local import ClientPool, LocalTraining, RoundWork, evaluate_clients, train_clients, training_sampler
from src.rounds.memory import resolve_chunk_size
from src.runtime.atomic import atomic_path
from src.runtime.device import setup_device


@dataclass
class NodeData:
    """What a node process reads once: the split, the training sampler and the evaluator."""

    data: FedData
    sampler: NegativeSampler
    evaluator: Evaluator


_DATA: dict[str, NodeData] = {}


def node_data_key(cfg: DictConfig) -> str:
    """Everything the cached `NodeData` depends on, as JSON: the resolved `dataset` (a synthetic one's
    sizes too), `protocol` and `data` subtrees, `seed`, `eval.ks` (the evaluator), and the environment
    variables that choose the data root and the split cache when `data.root` / `data.cache_dir` are null."""

    def tree(key: str):
        return OmegaConf.to_container(OmegaConf.select(cfg, key), resolve=True)

    parts = {
        "dataset": tree("dataset"),
        "protocol": tree("protocol"),
        "data": tree("data"),
        "seed": int(cfg.seed),
        "eval.ks": tree("eval.ks"),
        "env": {k: os.environ.get(k) for k in ("ALIGNFEDREC_DATA", "ALIGNFEDREC_CACHE")},
    }
    return json.dumps(parts, sort_keys=True, default=str)


def node_data(cfg: DictConfig) -> NodeData:
    """The split of this config, cached per process (the simulation runtime reuses its workers),
    under `node_data_key` so that configs whose splits differ never share an entry."""
    key = node_data_key(cfg)
    if key not in _DATA:
        data = load(cfg)
        _DATA[key] = NodeData(
            data,
            training_sampler(str(cfg.protocol.train_negative_pool), data),
            Evaluator(data, tuple(cfg.eval.ks), bool(cfg.protocol.full_ranking)),
        )
    return _DATA[key]


def partition(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node config (the simulation runtime sets both)."""
    conf = context.node_config
    if "partition-id" not in conf or "num-partitions" not in conf:
        raise ValueError(
            "node config needs partition-id and num-partitions, e.g. flower-supernode "
            "--node-config 'partition-id=0 num-partitions=2'"
        )
    part, num = int(conf["partition-id"]), int(conf["num-partitions"])
    if not 0 <= part < num:
        raise ValueError(f"node config partition-id={part} must lie in [0, num-partitions={num})")
    return part, num


def state_file(cfg: DictConfig, context: Context, part: int, num: int) -> Path | None:
    """Where this node keeps its clients' state between rounds: node config `state-dir`, else
    `flower.state_dir`, else None (memory only)."""
    folder = context.node_config.get("state-dir", cfg.flower.state_dir)
    if folder is None:
        return None
    return Path(str(folder)) / f"run{context.run_id}-part{part}of{num}.pt"


def restore_pool(cfg: DictConfig, context: Context, data: FedData, part: int, num: int) -> ClientPool:
    """This node's clients: from context.state, else from its state file, else freshly initialised
    exactly as the simulator initialises them (same generator, rows of this partition)."""
    users = torch.arange(part, data.n_users, num)
    if "pool" in context.state:
        rec = context.state["pool"]
        return ClientPool(
            torch.from_numpy(rec["users"].numpy().copy()),
            {k: torch.from_numpy(v.numpy().copy()) for k, v in rec.items() if k != "users"},
        )
    path = state_file(cfg, context, part, num)
    if path is not None and path.is_file():
        saved = torch.load(path, weights_only=True)
        return ClientPool(saved["users"], saved["state"])
    init = init_params(
        ModelSpec.from_cfg(cfg.model), data.n_users, data.n_items, torch.Generator().manual_seed(int(cfg.seed)), users
    )
    return ClientPool(users, init)


def save_pool(cfg: DictConfig, context: Context, pool: ClientPool, part: int, num: int) -> None:
    """Keep the pool in context.state and, when configured, in the state file (written atomically)."""
    arrays = {"users": Array(pool.users.numpy())}
    arrays.update({k: Array(v.numpy()) for k, v in pool.state.items()})
    context.state["pool"] = ArrayRecord(array_dict=arrays)
    path = state_file(cfg, context, part, num)
    if path is not None:
        with atomic_path(path) as tmp:
            torch.save({"users": pool.users, "state": pool.state}, tmp)


def client_round(cfg: DictConfig, nd: NodeData, pool: ClientPool, task: Task) -> tuple[RecordDict, np.ndarray | None]:
    """Train this node's chosen clients, encode their uploads, evaluate all its clients. With `flower.secagg` the
    uploads are not sent: they come back (decoded, as the server would decode them) summed into the node's
    secure-sum vector, for SecAgg+ (src/flower/secagg.py)."""
    data, device = nd.data, setup_device(cfg)  # deterministic CUDA kernels and matmul precision, as the simulator
    method, m = build_method(cfg, device), data.n_items
    keys = method.shared_keys(pool.state)
    broadcast = method.empty_broadcast()
    if method.uploads_similarity and task.global_sim is not None:
        global_sim = torch.from_numpy(decode_upper(task.global_sim, m, np.float32))
        broadcast = Broadcast(task.labels, global_sim, broadcast.sigma)
    encoding = Encoding.from_cfg(cfg.comm)
    noise = NoiseStreams(int(cfg.seed), task.round)  # each client's stream, as in the simulator
    users, shared, payloads = [], {k: [] for k in keys}, []
    secure = bool(cfg.flower.secagg)  # uploads summed into the node's secure-sum vector, never sent
    uploads: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    chosen = torch.isin(pool.users, task.chosen).nonzero().squeeze(1)
    server = {k: v for k, v in task.shared.items() if k in keys}
    # fl.chunk_size=auto: the cohort of this node's clients that fits its device, sized as the simulator sizes it
    chunk = resolve_chunk_size(cfg, m, len(pool.users), device)
    work = RoundWork()
    dense = method.dense_loss(broadcast)
    for trained in train_clients(
        LocalTraining.from_cfg(cfg), pool, chosen, data, nd.sampler, server, dense, task.round, device, chunk
    ):
        work.add(trained)
        ids = pool.users[trained.rows]
        reports = ~torch.isin(ids, task.absent)  # a simulated failure trains and sends nothing (`fl.dropout`)
        release = method.release(trained.params, ids, reports, noise, entries=True)
        users.append(release.users)
        for k in keys:
            shared[k].append(release.shared[k].detach().cpu())
        if release.blocks is None:
            continue
        for pos, vals in gather(release.blocks, len(release.users), m):
            rows, cols = (pos // m).numpy(), (pos % m).numpy()
            if secure:  # the values the server's decoder would deliver, in the clients' dtype (`add_decoded`)
                decoded = quantise(vals.double(), broadcast.sigma, 1.0, encoding.bits).float().double().numpy()
                uploads.append((rows, cols, decoded))
                continue
            payloads.append(
                encode_entries(
                    m, rows, cols, vals.double().numpy(), encoding.format, encoding.bits, broadcast.sigma, 1.0
                )
            )
    ranks = evaluate_clients(nd.evaluator, pool, device, chunk, method.client_scorer(broadcast, data, device))
    sent = torch.cat(users) if users else torch.zeros(0, dtype=torch.long)
    stacked = {k: torch.cat(v) if v else torch.zeros(0, *pool.state[k].shape[1:]) for k, v in shared.items()}
    vector = SecureLayout(m, method.holder_counts()).pack(uploads) if secure else None
    return pack_reply(sent, stacked, payloads, pool.users, ranks, work.loss_sums, work.steps), vector


def make_client_app(cfg: DictConfig | None = None) -> ClientApp:
    """A ClientApp for `cfg`, or (None) for the Hydra config named by the Flower run config."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if is_secagg_stage(msg.content):  # a stage of SecAgg+ over the vector this node kept (src/flower/secagg.py)
            return secagg_stage(msg, context)
        conf = cfg if cfg is not None else config_of(context.run_config)
        flower_checks(conf)
        nd = node_data(conf)
        part, num = partition(context)
        pool = restore_pool(conf, context, nd.data, part, num)
        task = unpack_task(msg.content)
        content, vector = client_round(conf, nd, pool, task)
        if vector is not None:
            keep_vector(context, vector, float(conf.flower.secagg_clip), (int(conf.seed), task.round, part))
        save_pool(conf, context, pool, part, num)
        return Message(content=content, reply_to=msg)

    return app


app = make_client_app()
