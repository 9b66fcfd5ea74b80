"""A Flower grid whose SuperNodes are ClientApps in this process: the deployment's server and client code, without
processes or sockets, for tests and side-by-side measurements (`src.perf.secagg_cost`).

Each message reaches its node as a copy, as over a wire; a node whose ClientApp raises answers with an error reply,
as a SuperNode does. `fault(round, node, reply)` may drop a reply (return None) or alter it, as a dead or
misbehaving SuperNode would.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity
from omegaconf import DictConfig

from src.flower.client_app import make_client_app

Fault = Callable[[int, int, Message], Message | None]


class InProcessGrid:
    """`n_nodes` nodes with ids 100, 101, ...; node 100 + p holds clients p, p + n_nodes, ..."""

    def __init__(self, cfg: DictConfig, n_nodes: int, fault: Fault | None = None):
        self.app = make_client_app(cfg)
        self.contexts = {100 + p: node_context(100 + p, p, n_nodes) for p in range(n_nodes)}
        self.fault = fault
        self.run = SimpleNamespace(run_id=1)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: list[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            try:
                reply = self.app(copy.deepcopy(msg), self.contexts[node])
            except Exception as err:  # what flwr's ClientApp runtime sends for it (supernode/runtime/run_clientapp.py)
                reason = f"{type(err).__name__}: {err}"
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
            if self.fault is not None:
                reply = self.fault(int(msg.metadata.group_id), node, reply)
            if reply is not None:
                replies.append(reply)
        return replies


def node_context(node_id: int, part: int, n_nodes: int) -> Context:
    """A fresh node's context (empty state), as a SuperNode started with partition-id / num-partitions."""
    return Context(
        run_id=1,
        node_id=node_id,
        state=RecordDict(),
        run_config={},
        node_config={"partition-id": part, "num-partitions": n_nodes},
    )


@contextmanager
def flower_task() -> Iterator[None]:
    """Flower builds messages only inside a task; give this process one (what a SuperLink assigns)."""
    before = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = before
