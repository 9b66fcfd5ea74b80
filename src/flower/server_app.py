"""The Flower ServerApp: the simulator's `RoundStrategy` over Flower messages.

Each round: the strategy's `configure_fit` (the simulator's client choice and failures), a `train` message
to every connected node, up to `flower.round_timeout` for the replies, invalid ones rejected with a logged
reason, the method's sums of what arrived (`RoundSums.add_decoded`), then the strategy's `aggregate_fit`,
exactly as the simulator runs it, and the new broadcast sent with the next round. Metrics
come from the ranks the nodes computed for all their clients. The run folder receives
config_resolved.yaml, csv/metrics.csv and results.json (rewritten atomically every round).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path

import torch
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from src.cli.store import git_commit
from src.clients.model import ModelSpec, init_params
from src.comm.codec import encode_upper
from src.comm.secure_sum import SecureLayout
from src.data.dataset import load
from src.evaluation.evaluator import Evaluator, split_metrics
from src.flower.messages import RejectedReply, Reply, Task, pack_task, unpack_reply
from src.flower.secagg import SecAggSettings, secure_sum
from src.flower.settings import config_of, flower_checks
from src.methods.base import RoundSums, build_method
from src.rounds.strategy import RoundStrategy
from src.runtime.checks import ConfigError
from src.runtime.device import setup_device
from src.runtime.loggers import finish_loggers, make_loggers
from src.runtime.results import (
    atomic_write_text,
    build_results,
    rounds_without_improvement,
    select_key,
    write_results,
)

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


@dataclass
class Replies:
    """A round's replies: the valid ones and their senders (no client reported twice), and how many arrived,
    failed (the node crashed or went offline) or were rejected."""

    accepted: list[Reply] = field(default_factory=list)
    senders: list[int] = field(default_factory=list)
    received: int = 0
    failed: int = 0
    rejected: int = 0


def collect_replies(
    replies: Iterable[Message], round_: int, expected: set[int], check: Callable[[RecordDict, set[int]], Reply]
) -> Replies:
    """Sort round `round_`'s replies: `check` decodes a reply's content for the clients still expected (those
    `expected` that no accepted reply reported) or raises `RejectedReply`; each failure is logged with its reason."""
    got, seen = Replies(), set()
    for rep in replies:
        got.received += 1
        node = rep.metadata.src_node_id
        if rep.has_error():  # the node crashed or went offline (the SuperLink answers for it)
            got.failed += 1
            log.warning("round %d: node %d failed: %s", round_, node, rep.error.reason)
            continue
        try:
            reply = check(rep.content, expected - seen)
            if seen & set(reply.eval_users.tolist()):
                raise RejectedReply("holds clients another node already reported this round")
        except RejectedReply as err:
            got.rejected += 1
            log.warning("round %d: reply of node %d rejected: %s", round_, node, err)
            continue
        seen |= set(reply.eval_users.tolist())
        got.accepted.append(reply)
        got.senders.append(node)
    return got


def serve(grid: Grid, cfg: DictConfig, run_dir: Path) -> dict:
    """Run all rounds over the connected nodes through the simulator's `RoundStrategy`; write and return
    results.json's payload."""
    flower_checks(cfg)
    if (run_dir / "results.json").exists():  # its loggers (the W&B run id) and records would be the other run's
        raise ConfigError(
            f"flower.run_dir={run_dir} holds a run already (results.json); expected a new folder (Flower runs do not "
            "resume)"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    t0 = time.perf_counter()
    device = setup_device(cfg)  # first, as the simulator: deterministic kernels and matmul precision
    data = load(cfg)
    m = data.n_items
    method = build_method(cfg, device)
    init = init_params(
        ModelSpec.from_cfg(cfg.model),
        data.n_users,
        data.n_items,
        torch.Generator().manual_seed(int(cfg.seed)),
        torch.tensor([0]),
    )
    shared = {k: init[k][0] for k in method.shared_keys(init)}  # the simulator's server starts from client 0's draw
    strategy = RoundStrategy(cfg, method, data, shared, device)
    secure = SecAggSettings.from_cfg(cfg.flower) if cfg.flower.secagg else None
    if secure is not None and shared:
        raise ConfigError(
            f"flower.secagg=true: ablation={cfg.ablation.name} also shares {sorted(shared)}, which would go in the "
            "clear; expected a method that shares only similarity uploads"
        )
    layout = SecureLayout(m, method.holder_counts())
    negatives = int(data.val_negatives.shape[1])
    limits = {"val": negatives + 1, "test": negatives + 1}
    if cfg.protocol.full_ranking:
        limits.update({"val_full": m, "test_full": m})
    check = partial(
        unpack_reply,
        n_users=data.n_users,
        n_items=m,
        similarity=method.uploads_similarity and secure is None,
        rank_limits=limits,
        max_bytes=int(cfg.flower.max_upload_bytes),
    )
    encoded: bytes | None = None  # the broadcast S_g as encoded
    history: list[dict] = []
    select = select_key(cfg)
    chance = Evaluator(data, tuple(cfg.eval.ks), bool(cfg.protocol.full_ranking)).chance()
    facts = RunFacts(data.summary(), chance, time.perf_counter() - t0, t0, git_commit())
    with round_loggers(cfg, run_dir) as loggers:
        for r in range(1, int(cfg.fl.rounds) + 1):
            tic = time.perf_counter()
            plan = strategy.configure_fit(r)
            nodes = wait_for_nodes(grid, cfg, first=r == 1)
            task = Task(r, plan.clients, plan.shared, plan.broadcast.labels, encoded, plan.absent)
            timeout = float(cfg.flower.round_timeout)
            # the TTL drops a task a dead node never pulled, so a restarted node does not train a stale round
            messages = [
                Message(content=pack_task(task), dst_node_id=n, message_type="train", group_id=str(r), ttl=timeout)
                for n in nodes
            ]
            shapes = {k: tuple(v.shape) for k, v in plan.shared.items()}
            got = collect_replies(
                grid.send_and_receive(messages, timeout=timeout),
                r,
                set(plan.clients.tolist()) - set(plan.absent.tolist()),
                partial(check, shared_shapes=shapes),
            )
            accepted = got.accepted
            sums, row = strategy.round_sums(), node_rows(cfg, accepted, data.n_users)
            if secure is None:
                for rep in accepted:
                    sums.add_decoded(rep.users, {k: v.to(device) for k, v in rep.shared.items()}, rep.sims)
            elif method.uploads_in(r) and accepted:
                row.update(add_secure_sum(grid, sums, dict(zip(got.senders, accepted, strict=True)), r, layout, secure))
            stats, result = strategy.aggregate_fit(plan, sums)
            row.update(stats)
            if result.broadcast is not plan.broadcast and result.broadcast.global_sim is not None:  # a new broadcast
                encoded = encode_upper(
                    result.broadcast.global_sim.numpy(),
                    strategy.encoding.format,
                    strategy.encoding.bits,
                    lo=0.0,
                    hi=1.0,
                )
            row.update(
                {
                    "round": r,
                    "flower/nodes": float(len(nodes)),
                    "flower/replies": float(got.received),
                    "flower/failed": float(got.failed),
                    "flower/rejected": float(got.rejected),
                    "time/round": time.perf_counter() - tic,
                }
            )
            history.append(row)
            if select in row:
                log.info("round %d: %d/%d nodes accepted, %s %.4f", r, len(accepted), len(nodes), select, row[select])
            else:  # a mean over the clients that replied is not the run's metric
                evaluated = int(row["flower/evaluated"])
                log.warning(
                    "round %d: %d/%d nodes accepted, unscored (%d of %d users evaluated)",
                    r,
                    len(accepted),
                    len(nodes),
                    evaluated,
                    data.n_users,
                )
            payload = record_round(run_dir, cfg, facts, history, loggers)
            if payload["finished"]:
                break
        finish_loggers(loggers, payload)
    return payload


@dataclass(frozen=True)
class RunFacts:
    """What results.json says of a Flower run beside its rounds: the split's summary, a random scorer's test metrics
    on it (`Evaluator.chance`), the server's setup seconds and start, the commit the ServerApp runs (one process:
    Flower runs do not resume)."""

    summary: dict
    chance: dict[str, float]
    setup_s: float
    started: float
    commit: str


@contextmanager
def round_loggers(cfg: DictConfig, run_dir: Path) -> Iterator[list[Logger]]:
    """The simulator's Lightning loggers (`logger=`: csv/metrics.csv, W&B), given the config, fed round by round by
    `record_round`; closed as failed when the run ends in an exception (the caller finishes them with the summary)."""
    loggers = make_loggers(cfg, run_dir)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        yield loggers
    except BaseException:
        finish_loggers(loggers, None)
        raise


def record_round(run_dir: Path, cfg: DictConfig, facts: RunFacts, history: list[dict], loggers: list[Logger]) -> dict:
    """Log the last round to the loggers (csv/metrics.csv rewritten atomically, W&B), write results.json (atomically)
    and return its payload, finished at the last round or where the simulator's early-stopping rule stops
    (src/runtime/callbacks.py)."""
    row = history[-1]
    for logger in loggers:
        logger.log_metrics({k: v for k, v in row.items() if k != "round"}, step=int(row["round"]))
        logger.save()
    select, patience = select_key(cfg), cfg.eval.patience
    stop = patience is not None and rounds_without_improvement(history, select) >= int(patience)
    timings = {
        "setup_s": facts.setup_s,
        "total_s": time.perf_counter() - facts.started,
        "mean_round_s": sum(h["time/round"] for h in history) / len(history),
    }
    finished = stop or int(history[-1]["round"]) == int(cfg.fl.rounds)
    payload = build_results(cfg, facts.summary, history, timings, finished=finished, chance=facts.chance)
    payload["engine"] = "flower"
    payload["code"] = [{"commit": facts.commit, "from_round": 1}]
    write_results(run_dir, payload)
    return payload


def add_secure_sum(
    grid: Grid, sums: RoundSums, replies: dict[int, Reply], round_: int, layout: SecureLayout, settings: SecAggSettings
) -> dict[str, float]:
    """SecAgg+ over the nodes that replied with uploads (`replies` by node id); the sum of the vectors it unmasks
    goes into `sums`, with the clients of the nodes whose vectors it holds. Fewer than two such nodes are not summed
    (the sum of one node's vector is that vector). Returns the round's SecAgg+ figures."""
    tic = time.perf_counter()
    senders = sorted(n for n, rep in replies.items() if len(rep.users))
    if len(senders) < 2:
        log.warning(
            "round %d: %d node(s) with uploads; SecAgg+ needs two (one node's sum is its upload)", round_, len(senders)
        )
        return {"flower/secagg_nodes": 0.0, "flower/secagg_bytes": 0.0, "flower/secagg_messages": 0.0}
    result = secure_sum(grid, senders, round_, layout, settings)
    if result.total is None:
        log.warning("round %d: SecAgg+ halted (too few nodes left for its threshold); no upload is summed", round_)
    else:
        upper, support, count = layout.unpack(result.total, sums.sims.upper.device)
        users = torch.cat([replies[n].users for n in result.summed]) if result.summed else torch.zeros(0, dtype=int)
        if count == len(users):
            sums.add_secure(users, upper, support, count)
        else:  # the count is the nodes' word: a node that inflates it would shrink the mean of every pair
            listed = len(users)
            log.warning(
                "round %d: SecAgg+ sum counts %d uploads, the summed nodes listed %d; no upload is summed",
                round_,
                count,
                listed,
            )
    return {
        "flower/secagg_nodes": float(len(result.summed)),
        "flower/secagg_bytes": float(result.masked_bytes),
        "flower/secagg_messages": float(result.messages),
        "time/secagg": time.perf_counter() - tic,
    }


# where a round's metrics go when some users went unevaluated (a node failed, was rejected or missed the timeout)
SUBSET = "subset/"


def node_rows(cfg: DictConfig, replies: list[Reply], n_users: int) -> dict:
    """The round's metrics from the ranks the nodes computed for their clients, the mean training losses,
    and what the nodes sent (the bytes on the wire, beside the ledger's `comm/` counts).

    Metrics over fewer than all `n_users` users (a node lost this round) are kept as `subset/<split>/...`: a mean
    over the clients of the nodes that replied is not the run's metric, so the round is unscored and never the best
    round (`best_round`), as in the simulator, which evaluates every user every round."""
    ranks, losses, steps = {}, {}, 0.0
    for rep in replies:
        for split, rk in rep.ranks.items():
            ranks.setdefault(split, []).append(rk)
        for k, v in rep.loss_sums.items():
            losses[k] = losses.get(k, 0.0) + v
        steps += rep.steps
    row: dict = split_metrics({k: torch.cat(v) for k, v in ranks.items()}, tuple(int(k) for k in cfg.eval.ks))
    evaluated = sum(len(r.eval_users) for r in replies)
    if evaluated < n_users:
        row = {SUBSET + k: v for k, v in row.items()}
    row.update({f"loss/{k}": v / max(steps, 1.0) for k, v in losses.items()})
    row["steps"] = steps
    row["flower/evaluated"] = float(evaluated)
    row["flower/upload_bytes"] = float(sum(sum(r.sim_bytes) for r in replies))
    return row


def shows_info(logger: logging.Logger) -> bool:
    """Whether some handler on `logger`'s way to the root prints an INFO record."""
    node: logging.Logger | None = logger
    while node is not None:
        if any(h.level <= logging.INFO for h in node.handlers):
            return True
        node = node.parent if node.propagate else None
    return False


def progress_to_stderr(logger: logging.Logger) -> None:
    """In a deployed `flwr-serverapp` process nothing sets up logging, so the per-round line (`round N: k/n nodes
    accepted, ...`, INFO) and the rejections would go nowhere: there, send them to stderr, which `flwr log` shows.
    Where logging is already set up (Hydra's `src.flower.simulate`, pytest), leave it alone."""
    if logger.isEnabledFor(logging.INFO) and shows_info(logger):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def make_server_app(cfg: DictConfig | None = None, run_dir: Path | None = None) -> ServerApp:
    """A ServerApp for `cfg`, or (None) for the Hydra config named by the Flower run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        progress_to_stderr(logging.getLogger("src.flower"))  # the ServerApp's and SecAgg+'s lines
        conf = cfg if cfg is not None else config_of(context.run_config)
        serve(grid, conf, run_dir if run_dir is not None else run_dir_of(conf))

    return app


app = make_server_app()
