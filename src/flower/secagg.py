"""Secure aggregation of the similarity uploads on Flower (`flower.secagg=true`): flwr's SecAgg+, unchanged.

A round then has two steps. The `train` message goes out as usual; each node trains, evaluates, and keeps its
clients' uploads summed into one dense vector (`src/comm/secure_sum.py`) instead of sending them. Then flwr's
`SecAggPlusWorkflow` runs its four stages (keys, key shares, masked vectors, unmasking) over the nodes that replied:
each node's masked vector is uniformly random to the server, and only their sum is unmasked, with the vectors of
nodes that drop out after the share-keys stage recovered from the key shares (up to `flower.secagg_threshold`).

The workflow is written for flwr's legacy `Strategy`; `_SecureSum` is the least of one it needs: every node's fit
instruction is empty (the node already holds its vector) and `aggregate_fit` keeps the sum.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common.recorddict_compat import fitres_to_recorddict
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from src.comm.secure_sum import SecureLayout

# where a node keeps its round's vector between the `train` message and the SecAgg+ stages
VECTOR_RECORD = "secagg_vector"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecAggSettings:
    """flwr SecAgg+ parameters: each node's key is split into `shares` shares, `threshold` of them recover it, and
    every entry of a node's vector must lie in [-clip, clip] (quantised to 2**22 levels: a step of clip / 2**21)."""

    shares: int
    threshold: int
    clip: float
    timeout: float

    @classmethod
    def from_cfg(cls, flower: Any) -> SecAggSettings:
        return cls(
            int(flower.secagg_shares),
            int(flower.secagg_threshold),
            float(flower.secagg_clip),
            float(flower.round_timeout),
        )

    def step(self) -> float:
        """One quantisation level of one node's entry."""
        return 2 * self.clip / 2**22


# the key a node's reply to each SecAgg+ stage holds (flwr's secaggplus_mod)
REPLY_KEYS = {
    Stage.SETUP: Key.PUBLIC_KEY_1,
    Stage.SHARE_KEYS: Key.CIPHERTEXT_LIST,
    Stage.COLLECT_MASKED_VECTORS: Key.MASKED_PARAMETERS,
    Stage.UNMASK: Key.SHARE_LIST,
}


def reply_stage(reply: Message) -> str | None:
    """The SecAgg+ stage a node's reply answers, or None (an error, or any other reply)."""
    if reply.has_error():
        return None
    conf = reply.content.config_records.get(RECORD_KEY_CONFIGS)
    return next((stage for stage, key in REPLY_KEYS.items() if conf is not None and key in conf), None)


def is_secagg_stage(content: RecordDict) -> bool:
    """Whether a `train` message is a stage of SecAgg+ (else it is a round's task)."""
    return RECORD_KEY_CONFIGS in content.config_records


def on_grid(vector: np.ndarray, clip: float, generator: np.random.Generator) -> np.ndarray:
    """The vector [n] stochastically rounded to SecAgg+'s grid of 2**22 levels over [-clip, clip] from `generator`:
    flwr's own rounding (from numpy's unseeded global state) then leaves it as it is (exactly so for a power-of-two
    clip), so a run's sums are reproducible from its seed."""
    scale = 2**22 / (2 * clip)
    pre = (np.clip(vector, -clip, clip) + clip) * scale
    low = np.floor(pre)
    return (low + (generator.random(pre.shape) < pre - low)) / scale - clip


def keep_vector(context: Context, vector: np.ndarray, clip: float, seed: tuple[int, ...] = (0,)) -> None:
    """Node side: keep this round's vector for the SecAgg+ stages, on SecAgg+'s grid (`on_grid`, drawn from `seed`:
    run seed, round, node); refuse one that SecAgg+ would clip (without its value: the reason reaches the server)."""
    if vector.size and float(np.abs(vector).max()) > clip:
        log.warning(
            "this node's secure-sum vector peaks at %.6g, beyond flower.secagg_clip=%s", np.abs(vector).max(), clip
        )
        raise ValueError(
            f"this node's secure-sum vector holds an entry beyond flower.secagg_clip={clip}, which SecAgg+ would "
            "clip; expected flower.secagg_clip >= the most clients a node holds"
        )
    grid = on_grid(vector, clip, np.random.default_rng(list(seed)))
    context.state[VECTOR_RECORD] = ArrayRecord(numpy_ndarrays=[grid])


def stored_fit(msg: Message, context: Context) -> Message:
    """Node side, the fit step SecAgg+'s client mod wraps: this round's kept vector, weight 1 (so that the
    workflow's weighted mean is the plain mean over nodes)."""
    vector = context.state[VECTOR_RECORD].to_numpy_ndarrays()[0]
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([vector]), num_examples=1, metrics={})
    return Message(content=fitres_to_recorddict(res, keep_input=False), reply_to=msg)


def secagg_stage(msg: Message, context: Context) -> Message:
    """Node side: one stage of SecAgg+ (flwr's `secaggplus_mod` around `stored_fit`)."""
    return secaggplus_mod(msg, context, stored_fit)


class _SecureSum(Strategy):
    """The legacy Strategy SecAgg+'s workflow drives: empty fit instructions to `nodes`; the unmasked mean kept."""

    def __init__(self, grid: Grid, nodes: list[int]):
        run_id = grid.run.run_id
        self.proxies = [GridClientProxy(n, grid, run_id) for n in nodes]
        self.mean: np.ndarray | None = None
        self.summed: list[int] = []

    def initialize_parameters(self, client_manager: Any) -> Parameters | None:
        return None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        return [(p, FitIns(Parameters(tensors=[], tensor_type=""), {})) for p in self.proxies]

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        self.summed = sorted(cast(GridClientProxy, proxy).node_id for proxy, _ in results)
        if results:
            self.mean = parameters_to_ndarrays(results[0][1].parameters)[0]
        return None, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


@dataclass
class _Metered:
    """A Grid that counts the bytes of the masked vectors the nodes send (all else is passed through)."""

    grid: Grid
    masked_bytes: int = 0
    messages: int = 0
    replies: list = field(default_factory=list)
    keep: bool = False
    keyed: set[int] = field(default_factory=set)  # nodes that sent their public keys (setup)
    shared: set[int] = field(default_factory=set)  # nodes that sent their encrypted key shares (share keys)

    @property
    def run(self) -> Any:
        return self.grid.run

    def send_and_receive(self, messages: Any, timeout: float | None = None) -> list[Message]:
        sent = list(messages)
        replies = list(self.grid.send_and_receive(sent, timeout=timeout))
        self.messages += len(sent) + len(replies)
        for rep in replies:
            stage = reply_stage(rep)
            if stage == Stage.SETUP:
                self.keyed.add(rep.metadata.src_node_id)
            elif stage == Stage.SHARE_KEYS:
                self.shared.add(rep.metadata.src_node_id)
            elif stage == Stage.COLLECT_MASKED_VECTORS:
                masked = rep.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
                self.masked_bytes += sum(len(b) for b in cast(list, masked))
                if self.keep:
                    self.replies.append(rep)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


@dataclass
class SecureRound:
    """What the server learns from one round of SecAgg+: the sum of the vectors of the nodes in `summed`."""

    total: np.ndarray | None
    summed: list[int]
    masked_bytes: int
    messages: int
    masked: list[Message] = field(default_factory=list)  # the masked vectors as received, when asked to keep them


def secure_sum(
    grid: Grid,
    nodes: list[int],
    round_: int,
    layout: SecureLayout,
    settings: SecAggSettings,
    keep_masked: bool = False,
    workflow: Callable[..., SecAggPlusWorkflow] = SecAggPlusWorkflow,
) -> SecureRound:
    """Server side: run SecAgg+ over `nodes` (each holding its vector of `layout`) and return the sum, or None when
    the protocol halted with fewer than two nodes left. flwr's SecAgg+ survives nodes that drop out once they have
    shared their keys; a node lost before (setup, share keys) halts it, so it is run again over the nodes that
    answered both stages (each node's SecAgg+ state restarts from setup)."""
    metered = _Metered(grid, keep=keep_masked)
    while True:
        result = _secure_sum_once(metered, nodes, round_, layout, settings, workflow)
        alive = sorted(metered.keyed & metered.shared & set(nodes))
        if result.total is not None or len(alive) < 2 or len(alive) == len(nodes):
            return result
        log.warning(
            "round %d: SecAgg+ lost nodes %s before they shared keys; again over %s",
            round_,
            sorted(set(nodes) - set(alive)),
            alive,
        )
        nodes, metered.keyed, metered.shared = alive, set(), set()


def _secure_sum_once(
    metered: _Metered,
    nodes: list[int],
    round_: int,
    layout: SecureLayout,
    settings: SecAggSettings,
    workflow: Callable[..., SecAggPlusWorkflow],
) -> SecureRound:
    """One run of the SecAgg+ workflow over `nodes`."""
    grid = metered.grid
    strategy = _SecureSum(metered, nodes)  # type: ignore[arg-type]
    state = RecordDict(
        {
            MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: int(round_)}),
            MAIN_PARAMS_RECORD: ArrayRecord(),
        }
    )
    base = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=state, run_config={})
    flow = workflow(
        num_shares=settings.shares,
        reconstruction_threshold=settings.threshold,
        max_weight=1.0,
        clipping_range=settings.clip,
        timeout=settings.timeout,
    )
    flow(metered, LegacyContext(base, strategy=strategy))  # type: ignore[arg-type]
    total = None
    if strategy.mean is not None:
        total = strategy.mean.astype(np.float64) * len(strategy.summed)  # the workflow returns the mean over nodes
        if total.shape != (layout.size,):
            total = None
    return SecureRound(total, strategy.summed, metered.masked_bytes, metered.messages, metered.replies)
