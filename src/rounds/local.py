"""The clients' side of a round as plain functions: local training of the chosen clients, and evaluation.

The Lightning simulator (`simulator.py`) and the Flower ClientApp (`src/flower/`) call these same
functions; only the transport differs (in-process tensors there, encoded Flower messages here):
`train_clients` (sample, train as stacked cohorts, yield each trained chunk so that the caller hands it
to the method's `release`) and `evaluate_clients`. What is sent and how the server sums it is the
method's (`src/methods/`); which clients train, and the server's step, are the `RoundStrategy`'s.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from omegaconf import DictConfig

from src.clients.cohort import (
    DenseLoss,
    OptimSpec,
    batch_layout,
    chunks_by_steps,
    local_steps,
    sample_round,
    train_cohort,
)
from src.clients.model import Params, forward, score_all_items
from src.data.dataset import FedData
from src.data.protocols import NegativeSampler, excluded_for_training
from src.evaluation.evaluator import Evaluator, ScoreFn


@dataclass
class ClientPool:
    """The clients one process holds: row i of every `state` tensor belongs to client `users[i]`."""

    users: torch.Tensor
    state: Params

    def rows_of(self, users: torch.Tensor) -> torch.Tensor:
        """Rows of the given client ids (each must be in the pool)."""
        order = torch.argsort(self.users)
        pos = torch.searchsorted(self.users[order], users)
        rows = order[pos.clamp(max=len(order) - 1)]
        if len(users) and not bool((self.users[rows] == users).all()):
            raise KeyError(f"clients {users[self.users[rows] != users].tolist()[:5]} are not held here")
        return rows

    def params(self, rows: torch.Tensor, device: torch.device) -> Params:
        """Copy the parameters of `rows` onto `device` (`index_select`: twice as fast as `v[rows]` on a CPU)."""
        return {k: v.index_select(0, rows.to(v.device)).to(device) for k, v in self.state.items()}


@dataclass
class TrainedChunk:
    """One chunk after local training: its rows in the pool, its parameters on the compute device."""

    rows: torch.Tensor
    params: Params
    loss_sums: dict[str, float]  # each loss term summed over the chunk's client-steps
    steps: float  # client-steps trained
    train_s: float


@dataclass
class RoundWork:
    """What local training of one round produced, besides the updated parameters."""

    loss_sums: dict[str, float] = field(default_factory=dict)
    steps: float = 0.0
    train_s: float = 0.0
    upload_s: float = 0.0

    def add(self, chunk: TrainedChunk) -> None:
        """Count a trained chunk in."""
        for k, v in chunk.loss_sums.items():
            self.loss_sums[k] = self.loss_sums.get(k, 0.0) + v
        self.steps += chunk.steps
        self.train_s += chunk.train_s

    @property
    def losses(self) -> dict[str, float]:
        """Mean of each loss term over all client-steps of the round."""
        return {k: v / max(self.steps, 1.0) for k, v in self.loss_sums.items()}


def training_sampler(pool: str, data: FedData) -> NegativeSampler:
    """The protocol's training-negative sampler over all clients' pools (`protocol.train_negative_pool`)."""
    candidates = np.concatenate([data.val_negatives, data.test_negatives], 1)
    return NegativeSampler(excluded_for_training(pool, data.train_matrix(), data.interacted_matrix(), candidates))


@dataclass(frozen=True)
class LocalTraining:
    """How the clients of a round train, typed once from the config: local epochs, batch size, training
    negatives per positive, the run's seed (client streams), the optimiser and the BCE form."""

    epochs: int
    batch_size: int
    negatives: int
    seed: int
    optim: OptimSpec
    loss: str = "sigmoid_bce"

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> LocalTraining:
        return cls(
            int(cfg.fl.local_epochs),
            int(cfg.fl.batch_size),
            int(cfg.protocol.train_negatives),
            int(cfg.seed),
            OptimSpec.from_cfg(cfg.optim),
            str(cfg.model.loss),
        )


def train_clients(
    spec: LocalTraining,
    pool: ClientPool,
    chosen: torch.Tensor,
    data: FedData,
    sampler: NegativeSampler,
    shared: Params,
    dense: DenseLoss | None,
    round_: int,
    device: torch.device,
    chunk_size: int | None,
) -> Iterator[TrainedChunk]:
    """Local training of the pool's rows `chosen` in round `round_`, chunk by chunk, in place.

    Each chunk starts from the server's `shared` parameters, trains as one stacked cohort and is
    yielded (to be released) before the next chunk is formed.
    """
    samples = sample_round(
        torch.as_tensor(data.train_ptr),
        torch.as_tensor(data.train_items),
        sampler,
        spec.negatives,
        spec.seed,
        round_,
        users=pool.users,
    )
    steps = local_steps(samples, chosen, spec.epochs, spec.batch_size)
    for rows in chunks_by_steps(chosen, steps, chunk_size):
        tic = time.perf_counter()
        params = pool.params(rows, device)
        for k, v in shared.items():
            params[k].copy_(v.to(device).expand_as(params[k]))
        layout = batch_layout(samples, rows, spec.epochs, spec.batch_size, spec.seed, round_)
        part = train_cohort(params, samples, layout, spec.optim, data.n_items, spec.loss, dense)
        n_steps = float(layout.steps.sum())
        for k, v in params.items():
            pool.state[k][rows] = v.to(pool.state[k].device)
        # per-chunk means over client-steps -> sums
        yield TrainedChunk(rows, params, {k: v * n_steps for k, v in part.items()}, n_steps, time.perf_counter() - tic)


def evaluate_clients(
    evaluator: Evaluator,
    pool: ClientPool,
    device: torch.device,
    chunk_size: int | None,
    scorer: ScoreFn | None = None,
) -> dict[str, torch.Tensor]:
    """Ranks of every client of the pool on its validation and test items: scored by its own current
    parameters, or by `scorer(users, item_ids)` when the method gives one (`Method.client_scorer`)."""
    size = int(chunk_size or len(pool.users)) or 1

    def model_score(users: torch.Tensor, item_ids: torch.Tensor | None) -> torch.Tensor:
        params = pool.params(pool.rows_of(users), device)
        with torch.no_grad():
            if item_ids is None:
                return score_all_items(params)
            return forward(params, item_ids.to(device))

    chunks = [pool.users[i : i + size] for i in range(0, len(pool.users), size)]
    return evaluator.ranks(model_score if scorer is None else scorer, chunks)
