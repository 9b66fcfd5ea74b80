"""The federated loop as a LightningModule: one training step = one round.

A round: choose clients (`fl.client_fraction`), run their local training from the server's shared
parameters and last broadcast as stacked tensors (`src/rounds/local.py`), let each trained chunk
release its upload (a share `fl.dropout` of the chosen clients fails to report) into the server's
sums, let the server turn the sums into its new state and broadcast, then evaluate every client with
its own parameters on validation and test (`src/evaluation/`). What is trained, sent, summed and
broadcast is the method's (`self.method`, `src/methods/`). Lightning drives the rounds,
checkpoints and loggers; all state lives in plain tensors so chunks can move between devices.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from src.alignment.broadcast import Broadcast
from src.clients.cohort import RoundSamples, sample_round
from src.clients.model import ModelSpec, Params, init_params
from src.data.dataset import FedData
from src.evaluation.evaluator import Evaluator
from src.methods.base import build_method
from src.methods.central import make_central
from src.rounds.local import ClientPool, LocalTraining, RoundWork, evaluate_clients, train_clients, training_sampler
from src.rounds.memory import resolve_chunk_size
from src.rounds.strategy import RoundStrategy
from src.runtime.device import setup_device
from src.runtime.loggers import RoundCSVLogger, quiet_fit, quiet_lightning


class FederatedModule(L.LightningModule):
    """All clients' parameters, the server state and the round logic of one federated run."""

    def __init__(self, cfg: DictConfig, data: FedData):
        super().__init__()
        # manual optimisation: every client of the stacked cohort steps its own optimiser state inside a round
        # (src/clients/), so no single loss.backward() and optimizer.step() describes a round
        self.automatic_optimization = False
        self.save_hyperparameters(OmegaConf.to_container(cfg, resolve=True))  # the loggers' config (W&B, CSV)
        self.cfg, self.data = cfg, data
        self.compute_device = setup_device(cfg)  # first: before any CUDA work of the run
        self.method = build_method(cfg, self.compute_device)
        init_gen = torch.Generator().manual_seed(int(cfg.seed))
        self.local = LocalTraining.from_cfg(cfg)
        # a centralised method trains its own model (`self.central`): no client holds tables (on ML-1M they
        # would be 2.9 GB of memory and of every checkpoint)
        holders = 0 if self.method.central else data.n_users
        self.state: Params = init_params(ModelSpec.from_cfg(cfg.model), holders, data.n_items, init_gen)
        # the server's side of every round, as the Flower ServerApp runs it too; it starts from client 0's draw
        shared = {k: self.state[k][0].clone() for k in self.method.shared_keys(self.state)}
        self.strategy = RoundStrategy(cfg, self.method, data, shared, self.compute_device)
        self.sampler = training_sampler(str(cfg.protocol.train_negative_pool), data)
        self.train_ptr = torch.as_tensor(data.train_ptr)
        self.train_items = torch.as_tensor(data.train_items)
        self.evaluator = Evaluator(data, tuple(cfg.eval.ks), bool(cfg.protocol.full_ranking))
        self.history: list[dict] = []
        self.central = make_central(self.method, data, self.compute_device) if self.method.central else None
        self.chunk_size = self.resolve_chunk_size()

    @property
    def server(self) -> Params:
        """The server's shared parameters."""
        return self.strategy.shared

    @property
    def broadcast(self) -> Broadcast:
        """The last broadcast (what the clients hold)."""
        return self.strategy.broadcast

    @property
    def server_sim(self) -> torch.Tensor | None:
        """S_g as the server last aggregated it (the broadcast may hold less)."""
        return self.strategy.global_sim

    def resolve_chunk_size(self) -> int | None:
        """`fl.chunk_size`, or with `auto` the cohort that fits the free memory of the compute device."""
        return resolve_chunk_size(self.cfg, self.data.n_items, self.data.n_users, self.compute_device)

    def train_dataloader(self) -> DataLoader:
        """One dummy batch per epoch: each epoch is one federated round."""
        return DataLoader([0], batch_size=1)

    def configure_optimizers(self) -> None:
        """None for Lightning: the optimisers are per client and per round, inside the stacked cohort."""
        return None

    @property
    def pool(self) -> ClientPool:
        """Every client, row = client id."""
        return ClientPool(torch.arange(self.data.n_users), self.state)

    def run_round(self) -> dict[str, float]:
        """One federated round (`RoundStrategy` on the server side, `train_clients` on the clients'); returns
        its metrics, losses and phase timings."""
        tic = time.perf_counter()
        plan = self.strategy.configure_fit(self.current_round())
        timings = {"time/sample": time.perf_counter() - tic}
        if self.central is not None:
            return self.run_central_round(self.round_samples(), timings)
        sums, work = self.strategy.round_sums(), RoundWork()
        for chunk in train_clients(
            self.local,
            self.pool,
            plan.clients,
            self.data,
            self.sampler,
            plan.shared,
            self.method.dense_loss(plan.broadcast),
            plan.round,
            self.compute_device,
            self.chunk_size,
        ):
            work.add(chunk)
            tic = time.perf_counter()
            # the chunk's clients that did not fail release their upload; the server sums it
            release = self.method.release(
                chunk.params, chunk.rows, plan.uploads(chunk.rows), plan.noise, self.strategy.encoding.delta
            )
            sums.add(release)
            work.upload_s += time.perf_counter() - tic
        # aggregate: the uploads made and summed, chunk by chunk (grows with the clients)
        timings.update({"time/train": work.train_s, "time/aggregate": work.upload_s})
        stats, _ = self.strategy.aggregate_fit(plan, sums)
        tic = time.perf_counter()
        metrics = self.evaluate(plan.broadcast)  # the broadcast the clients trained with, until the next download
        timings["time/eval"] = time.perf_counter() - tic
        return {**metrics, **{f"loss/{k}": v for k, v in work.losses.items()}, **stats, **timings, "steps": work.steps}

    def round_samples(self) -> RoundSamples:
        """Every client's training samples of the round being run (positives and the protocol's negatives)."""
        local = self.local
        return sample_round(
            self.train_ptr, self.train_items, self.sampler, local.negatives, local.seed, self.current_round()
        )

    def current_round(self) -> int:
        """1-based index of the round being run."""
        return len(self.history) + 1

    def run_central_round(self, samples, timings: dict[str, float]) -> dict[str, float]:
        """The centralised baseline: one epoch over the pooled samples, then the same evaluation."""
        tic = time.perf_counter()
        losses = self.central.train_round(samples, self.strategy.gen)  # after the round's draws, as always
        timings["time/train"] = time.perf_counter() - tic
        tic = time.perf_counter()
        metrics = self.evaluator.run(self.central.score, self.eval_chunks())
        timings["time/eval"] = time.perf_counter() - tic
        n = float(self.data.n_users)
        return {**metrics, **{f"loss/{k}": v for k, v in losses.items()}, **timings, "clients": n, "reported": n}

    def eval_chunks(self) -> list[torch.Tensor]:
        """All users in chunks of `fl.chunk_size`."""
        size = int(self.chunk_size or self.data.n_users)
        return [torch.arange(i, min(i + size, self.data.n_users)) for i in range(0, self.data.n_users, size)]

    def evaluate(self, held: Broadcast) -> dict[str, float]:
        """Every client scored with its own current parameters, or as its method scores with the broadcast
        `held` (the one it trained with; `Method.client_scorer`)."""
        scorer = self.method.client_scorer(held, self.data, self.compute_device)
        ranks = evaluate_clients(self.evaluator, self.pool, self.compute_device, self.chunk_size, scorer)
        return self.evaluator.metrics(ranks)

    def training_step(self, batch, batch_idx: int) -> None:
        """Run one round and record it."""
        tic = time.perf_counter()
        row = {"round": self.current_round(), **self.run_round()}
        row["time/round"] = time.perf_counter() - tic
        self.history.append(row)
        # float64 tensors: Lightning keeps their precision (a float would become float32); step = the round
        metrics = {k: torch.tensor(float(v), dtype=torch.float64) for k, v in row.items() if k != "round"}
        self.log_dict({**metrics, "step": float(row["round"])}, on_step=False, on_epoch=True, batch_size=1)

    def on_train_start(self) -> None:
        """A resumed run redoes the rounds after its checkpoint: the CSV holds exactly the checkpoint's rounds."""
        for logger in self.loggers:
            if isinstance(logger, RoundCSVLogger):
                logger.restore(self.history)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Client states, the server's state (`RoundStrategy.state_dict`) and the history go into the checkpoint."""
        checkpoint["federated"] = {
            "state": self.state,
            "history": self.history,
            "central": self.central.state_dict() if self.central else None,
            **self.strategy.state_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore what `on_save_checkpoint` stored."""
        fed = checkpoint["federated"]
        self.state, self.history = fed["state"], fed["history"]
        self.strategy.load_state_dict(fed)
        if self.central is not None:
            self.central.load_state_dict(fed["central"])


def fit_rounds(module: FederatedModule, rounds: int, callbacks: list[L.Callback] | None = None) -> None:
    """`rounds` more rounds of `module` through a bare Lightning Trainer (no logger, no checkpoint): a tool that
    trains before it looks (`src.audit`) runs its rounds as a run does (`training_step`), with hooks as callbacks."""
    if rounds <= 0:
        return
    quiet_lightning()
    trainer = L.Trainer(
        max_epochs=rounds,  # a fresh Trainer counts its epochs from 0; the module counts rounds by its history
        devices=1,
        accelerator="gpu" if module.compute_device.type == "cuda" else "cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks or [],
    )
    with quiet_fit():
        trainer.fit(module)
