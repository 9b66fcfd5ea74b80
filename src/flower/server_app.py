"""The Flower ServerApp: the simulator's server round over Flower messages.

Each round: choose clients (`choose_clients`, the simulator's generator), send every connected
node a `train` message, wait up to `flower.round_timeout` for the replies, reject invalid ones
with a logged reason, then let the run's method (`src/methods/`) sum what arrived (`RoundSums.add_decoded`)
and take its server step exactly as the simulator does, and broadcast the result with the next round. Metrics
come from the ranks the nodes computed for all their clients. The run folder receives
config_resolved.yaml, csv/metrics.csv and results.json (rewritten atomically every round).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig, OmegaConf

from src.alignment.broadcast import Broadcast
from src.clients.model import ModelSpec, init_params
from src.comm.codec import Encoding, encode_upper
from src.data.dataset import load
from src.evaluation.evaluator import split_metrics
from src.flower.messages import RejectedReply, Task, pack_task, unpack_reply
from src.flower.settings import config_of, flower_checks
from src.methods.base import Method, ServerRound, build_method
from src.runtime.device import resolve_device
from src.runtime.loggers import history_csv
from src.runtime.results import atomic_write_text, build_results, select_key, write_results
from src.simulator.rounds import advance_failure_stream, choose_clients

log = logging.getLogger(__name__)


def run_dir_of(cfg: DictConfig) -> Path:
    """`flower.run_dir`, or outputs/flower/<dataset>/<ablation>/<protocol>/seed<seed>_<time>."""
    if cfg.flower.run_dir is not None:
        return Path(str(cfg.flower.run_dir))
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return Path("outputs/flower") / cfg.dataset.name / cfg.ablation.name / cfg.protocol.name / f"seed{cfg.seed}_{stamp}"


def wait_for_nodes(grid: Grid, cfg: DictConfig, first: bool) -> list[int]:
    """The connected nodes, after waiting up to `flower.connect_timeout` s for `flower.min_nodes` of them.

    Before the first round too few nodes is an error; later the round goes on with those present
    (a node that died may rejoin in a later round).
    """
    deadline = time.monotonic() + float(cfg.flower.connect_timeout)
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= int(cfg.flower.min_nodes) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if not nodes or (first and len(nodes) < int(cfg.flower.min_nodes)):
        raise TimeoutError(
            f"{len(nodes)} SuperNodes connected within flower.connect_timeout="
            f"{cfg.flower.connect_timeout} s; flower.min_nodes={cfg.flower.min_nodes} are needed"
        )
    if len(nodes) < int(cfg.flower.min_nodes):
        log.warning(
            "only %d of flower.min_nodes=%d SuperNodes connected; the round goes on", len(nodes), cfg.flower.min_nodes
        )
    return nodes


def serve(grid: Grid, cfg: DictConfig, run_dir: Path) -> dict:
    """Run all rounds over the connected nodes; write and return results.json's payload."""
    flower_checks(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    t0 = time.perf_counter()
    data = load(cfg)
    m, device = data.n_items, resolve_device(cfg.device)
    method = build_method(cfg, device)
    init = init_params(
        ModelSpec.from_cfg(cfg.model),
        data.n_users,
        data.n_items,
        torch.Generator().manual_seed(int(cfg.seed)),
        torch.tensor([0]),
    )
    server = {k: init[k][0] for k in method.shared_keys(init)}  # the simulator's server starts from client 0's draw
    broadcast = Broadcast.empty(float(cfg.model.sigma))
    gen = torch.Generator().manual_seed(int(cfg.seed) + 1)
    encoding = Encoding.from_cfg(cfg.comm)
    negatives = int(data.val_negatives.shape[1])
    limits = {"val": negatives + 1, "test": negatives + 1}
    if cfg.protocol.full_ranking:
        limits.update({"val_full": m, "test_full": m})
    encoded: bytes | None = None  # the broadcast S_g as encoded
    history: list[dict] = []
    select = select_key(cfg)
    t_setup = time.perf_counter() - t0
    for r in range(1, int(cfg.fl.rounds) + 1):
        tic = time.perf_counter()
        clients = choose_clients(data.n_users, float(cfg.fl.client_fraction), gen)
        advance_failure_stream(data.n_users, gen)  # the simulator draws its failures here
        nodes = wait_for_nodes(grid, cfg, first=r == 1)
        task = Task(r, clients, server, broadcast.labels, encoded)
        timeout = float(cfg.flower.round_timeout)
        # the TTL drops a task a dead node never pulled, so a restarted node does not train a stale round
        messages = [
            Message(content=pack_task(task), dst_node_id=n, message_type="train", group_id=str(r), ttl=timeout)
            for n in nodes
        ]
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        chosen, seen = set(clients.tolist()), set()
        accepted, rejected, failed = [], 0, 0
        for rep in replies:
            node = rep.metadata.src_node_id
            if rep.has_error():  # the node crashed or went offline (the SuperLink answers for it)
                failed += 1
                log.warning("round %d: node %d failed: %s", r, node, rep.error.reason)
                continue
            try:
                reply = unpack_reply(
                    rep.content,
                    chosen - seen,
                    data.n_users,
                    m,
                    {k: tuple(v.shape) for k, v in server.items()},
                    method.uploads_similarity,
                    limits,
                    int(cfg.flower.max_upload_bytes),
                )
                if seen & set(reply.eval_users.tolist()):
                    raise RejectedReply("holds clients another node already reported this round")
            except RejectedReply as err:
                rejected += 1
                log.warning("round %d: reply of node %d rejected: %s", r, node, err)
                continue
            seen |= set(reply.eval_users.tolist())
            accepted.append(reply)
        row, result = aggregate(cfg, method, accepted, server, broadcast, m, device, r, len(clients))
        server = result.shared
        if result.global_sim is not None:  # a new broadcast (else the clients keep the last one)
            broadcast = result.broadcast
            encoded = encode_upper(broadcast.global_sim.numpy(), encoding.format, encoding.bits, lo=0.0, hi=1.0)
        row.update(
            {
                "round": r,
                "clients": float(len(clients)),
                "flower/nodes": float(len(nodes)),
                "flower/replies": float(len(replies)),
                "flower/failed": float(failed),
                "flower/rejected": float(rejected),
                "time/round": time.perf_counter() - tic,
            }
        )
        history.append(row)
        log.info(
            "round %d: %d/%d nodes accepted, %s %.4f",
            r,
            len(accepted),
            len(nodes),
            select,
            row.get(select, float("nan")),
        )
        atomic_write_text(run_dir / "csv" / "metrics.csv", history_csv(history))
        finished = r == int(cfg.fl.rounds)
        timings = {
            "setup_s": t_setup,
            "total_s": time.perf_counter() - t0,
            "mean_round_s": sum(h["time/round"] for h in history) / len(history),
        }
        payload = build_results(cfg, data.summary(), history, timings, finished=finished)
        payload["engine"] = "flower"
        write_results(run_dir, payload)
    return payload


def aggregate(
    cfg: DictConfig,
    method: Method,
    replies: list,
    server: dict,
    broadcast: Broadcast,
    m: int,
    device: torch.device,
    round_: int,
    clients: int,
) -> tuple[dict, ServerRound]:
    """The server round on the accepted replies of a round that chose `clients` clients: the method's
    sums of the decoded uploads and its server step; returns the round's row and the server's new state."""
    sums = method.round_sums(m, device)
    sizes, ranks, losses, steps = [], {}, {}, 0.0
    for rep in replies:
        sums.add_decoded(rep.users, {k: v.to(device) for k, v in rep.shared.items()}, rep.sims)
        sizes.extend(float(size) for size in rep.sim_bytes)
        for split, rk in rep.ranks.items():
            ranks.setdefault(split, []).append(rk)
        for k, v in rep.loss_sums.items():
            losses[k] = losses.get(k, 0.0) + v
        steps += rep.steps
    result = method.server_round(sums, server, broadcast, int(cfg.seed), clients)
    row: dict = split_metrics({k: torch.cat(v) for k, v in ranks.items()}, tuple(int(k) for k in cfg.eval.ks))
    row.update({f"loss/{k}": v / max(steps, 1.0) for k, v in losses.items()})
    row.update(
        {
            "steps": steps,
            "reported": float(len(sums.senders)),
            "flower/evaluated": float(sum(len(r.eval_users) for r in replies)),
        }
    )
    sent = torch.tensor(sizes, dtype=torch.float64) if method.uploads_similarity else None
    row.update(method.traffic(sums, sent, clients, result.shared, round_, int(cfg.model.dim)))
    row.update(result.stats)
    return row, result


def make_server_app(cfg: DictConfig | None = None, run_dir: Path | None = None) -> ServerApp:
    """A ServerApp for `cfg`, or (None) for the Hydra config named by the Flower run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        conf = cfg if cfg is not None else config_of(context.run_config)
        serve(grid, conf, run_dir if run_dir is not None else run_dir_of(conf))

    return app


app = make_server_app()
