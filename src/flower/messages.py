"""What the ServerApp and the ClientApps send each other, as Flower records, and its validation.

Server -> node (`train` message): the round, the clients chosen this round (and which of them fail to
report, when failures are simulated), the server's shared
parameters (FedAvg baselines) and the broadcast of AlignFedRec (community labels and S_g as an
encoded sparse matrix, `src/comm/codec.py`). Node -> server: for each of its chosen clients that
trained, its shared parameters and its encoded similarity upload; the evaluation ranks of every
client it holds; the training losses. `unpack_reply` checks everything before the server uses
it and raises `RejectedReply` with the reason.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from src.comm.codec import PayloadError, decode_entries


class RejectedReply(ValueError):
    """A node's reply the server will not use; the message says why."""


@dataclass
class Task:
    """One round's instructions to every node."""

    round: int
    chosen: torch.Tensor
    shared: dict[str, torch.Tensor]
    labels: torch.Tensor | None
    global_sim: bytes | None
    absent: torch.Tensor  # chosen clients that train but do not report (simulated failures, `fl.dropout`)


@dataclass
class Reply:
    """One node's validated answer: per-client uploads, ranks of all its clients, losses."""

    users: torch.Tensor
    shared: dict[str, torch.Tensor]
    sims: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    sim_bytes: list[int]
    eval_users: torch.Tensor
    ranks: dict[str, torch.Tensor]
    loss_sums: dict[str, float]
    steps: float


def _arr(x: torch.Tensor | np.ndarray) -> Array:
    return Array(np.ascontiguousarray(x.numpy() if isinstance(x, torch.Tensor) else x))


def pack_task(task: Task) -> RecordDict:
    """The `train` message content."""
    arrays = {"chosen": _arr(task.chosen.long()), "absent": _arr(task.absent.long())}
    arrays.update({f"shared/{k}": _arr(v) for k, v in task.shared.items()})
    if task.labels is not None:
        arrays["labels"] = _arr(task.labels.long())
    if task.global_sim is not None:
        arrays["global_sim"] = _arr(np.frombuffer(task.global_sim, dtype=np.uint8))
    return RecordDict({"task": ArrayRecord(array_dict=arrays), "round": ConfigRecord({"round": int(task.round)})})


def unpack_task(content: RecordDict) -> Task:
    """Inverse of `pack_task` (the server is trusted by the node)."""
    arrays = content["task"]
    shared = {
        k.split("/", 1)[1]: torch.from_numpy(v.numpy().copy()) for k, v in arrays.items() if k.startswith("shared/")
    }
    labels = torch.from_numpy(arrays["labels"].numpy().copy()) if "labels" in arrays else None
    sim = arrays["global_sim"].numpy().tobytes() if "global_sim" in arrays else None
    chosen, absent = (torch.from_numpy(arrays[k].numpy().copy()) for k in ("chosen", "absent"))
    return Task(int(content["round"]["round"]), chosen, shared, labels, sim, absent)


def pack_reply(
    users: torch.Tensor,
    shared: dict[str, torch.Tensor],
    payloads: list[bytes],
    eval_users: torch.Tensor,
    ranks: dict[str, torch.Tensor],
    loss_sums: dict[str, float],
    steps: float,
) -> RecordDict:
    """A node's answer; `payloads[i]` is the encoded similarity upload of `users[i]` (empty list: none);
    `loss_sums` are the loss terms summed over the node's `steps` client-steps."""
    up = {"users": _arr(users.long())}
    up.update({f"shared/{k}": _arr(v) for k, v in shared.items()})
    up.update({f"sim/{i}": _arr(np.frombuffer(p, dtype=np.uint8)) for i, p in enumerate(payloads)})
    ev = {"users": _arr(eval_users.long()), **{f"rank/{k}": _arr(v.long()) for k, v in ranks.items()}}
    metrics = {f"loss/{k}": float(v) for k, v in loss_sums.items()}
    metrics["steps"] = float(steps)
    return RecordDict(
        {"upload": ArrayRecord(array_dict=up), "eval": ArrayRecord(array_dict=ev), "train": MetricRecord(metrics)}
    )


def rejecting_malformed(unpack: Callable[..., Reply]) -> Callable[..., Reply]:
    """`unpack` whose every failure is a `RejectedReply`: a malformed record (a list where a number goes, a byte order
    numpy cannot hand to torch) is a rejection, never an exception that ends the run."""

    @functools.wraps(unpack)
    def checked(*args: Any, **kwargs: Any) -> Reply:
        try:
            return unpack(*args, **kwargs)
        except RejectedReply:
            raise
        except (TypeError, ValueError, AttributeError, IndexError, OverflowError) as err:
            raise RejectedReply(f"malformed reply ({type(err).__name__}: {err})") from None

    return checked


@rejecting_malformed
def unpack_reply(
    content: RecordDict,
    chosen: set[int],
    n_users: int,
    n_items: int,
    shared_shapes: dict[str, tuple[int, ...]],
    similarity: bool,
    rank_limits: dict[str, int],
    max_bytes: int,
) -> Reply:
    """Decode and check a node's answer; raise `RejectedReply` naming the first problem found (whatever a node sends,
    the server gets a Reply or a RejectedReply)."""
    try:
        up, ev, train = content["upload"], content["eval"], content["train"]
    except KeyError as err:
        raise RejectedReply(f"missing record {err}") from None
    if not isinstance(up, ArrayRecord) or not isinstance(ev, ArrayRecord) or not isinstance(train, MetricRecord):
        raise RejectedReply("records 'upload'/'eval' must be ArrayRecords and 'train' a MetricRecord")
    users = _ids(up, "upload", n_users)
    if not set(users.tolist()) <= chosen:
        raise RejectedReply(f"upload from clients not chosen this round: {sorted(set(users.tolist()) - chosen)[:5]}")
    shared = {}
    for k, shape in shared_shapes.items():
        if f"shared/{k}" not in up:
            raise RejectedReply(f"upload lacks shared parameter {k!r}")
        v = torch.from_numpy(up[f"shared/{k}"].numpy().copy())
        # finite as the float32 the server computes with (a float64 1e300 is finite, and inf once cast)
        if tuple(v.shape) != (len(users), *shape) or not v.is_floating_point() or not bool(v.float().isfinite().all()):
            raise RejectedReply(
                f"shared parameter {k!r} has shape {tuple(v.shape)} {v.dtype}; expected finite float32 "
                f"values of shape {(len(users), *shape)}"
            )
        shared[k] = v.float()
    sims, sizes = [], []
    if similarity:
        for i in range(len(users)):
            if f"sim/{i}" not in up:
                raise RejectedReply(f"upload lacks the similarity payload of client {int(users[i])}")
            payload = up[f"sim/{i}"].numpy().tobytes()
            try:
                _, rows, cols, vals = decode_entries(payload, m_expected=n_items, max_bytes=max_bytes)
            except PayloadError as err:
                raise RejectedReply(f"similarity payload of client {int(users[i])}: {err}") from None
            sims.append((torch.from_numpy(rows), torch.from_numpy(cols), torch.from_numpy(vals)))
            sizes.append(len(payload))
    eval_users = _ids(ev, "eval", n_users)
    # a node uploads for clients it holds, and evaluates every client it holds: no upload for another node's client
    # (the server checks that no two accepted replies evaluate one client, so no client is summed twice)
    if stray := set(users.tolist()) - set(eval_users.tolist()):
        raise RejectedReply(f"upload from clients the node does not evaluate: {sorted(stray)[:5]}")
    ranks = {}
    for split, limit in rank_limits.items():
        if f"rank/{split}" not in ev:
            raise RejectedReply(f"eval lacks ranks of split {split!r}")
        r = torch.from_numpy(ev[f"rank/{split}"].numpy().copy())
        if r.shape != eval_users.shape or r.dtype != torch.int64 or (len(r) and (r.min() < 1 or r.max() > limit)):
            raise RejectedReply(f"ranks of {split!r} must be {len(eval_users)} integers in [1, {limit}]")
        ranks[split] = r
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in train.values()):
        raise RejectedReply("the training metrics must be numbers (the loss sums and the step count)")
    losses = {k.split("/", 1)[1]: float(v) for k, v in train.items() if k.startswith("loss/")}
    steps = float(train.get("steps", 0.0))
    if not (all(np.isfinite(list(losses.values()))) and np.isfinite(steps) and steps >= 0):
        raise RejectedReply("a training loss or the step count is not a finite number")
    return Reply(users, shared, sims, sizes, eval_users, ranks, losses, steps)


def _ids(record: ArrayRecord, name: str, n_users: int) -> torch.Tensor:
    """Client ids of a record: distinct int64 in [0, n_users)."""
    if "users" not in record:
        raise RejectedReply(f"record {name!r} lacks 'users'")
    users = torch.from_numpy(record["users"].numpy().copy())
    if users.dim() != 1 or users.dtype != torch.int64 or (len(users) and (users.min() < 0 or users.max() >= n_users)):
        raise RejectedReply(f"{name}: client ids must be a vector of int64 in [0, {n_users})")
    if len(torch.unique(users)) != len(users):
        raise RejectedReply(f"{name}: a client id appears twice")
    return users
