"""The federated loop as a LightningModule: one training step = one round.

A round: choose clients (`fl.client_fraction`), run their local training from the server's shared
parameters and last broadcast as stacked tensors (`src/simulator/rounds.py`), let each trained chunk
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
from src.comm.codec import Encoding, Ledger
from src.data.dataset import FedData
from src.evaluation.evaluator import Evaluator
from src.methods.base import build_method
from src.methods.central import make_central
from src.runtime.device import setup_device
from src.runtime.loggers import RoundCSVLogger
from src.server.diagnostics import GraphDiagnostics
from src.simulator.memory import resolve_chunk_size
from src.simulator.rounds import (
    ClientPool,
    LocalTraining,
    RoundWork,
    choose_clients,
    draw_failures,
    evaluate_clients,
    train_clients,
    training_sampler,
)


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
        self.server: Params = {k: self.state[k][0].clone() for k in self.method.shared_keys(self.state)}
        self.broadcast = Broadcast.empty(float(cfg.model.sigma))
        self.server_sim: torch.Tensor | None = None
        self.gen = torch.Generator().manual_seed(int(cfg.seed) + 1)
        self.sampler = training_sampler(str(cfg.protocol.train_negative_pool), data)
        self.train_ptr = torch.as_tensor(data.train_ptr)
        self.train_items = torch.as_tensor(data.train_items)
        self.evaluator = Evaluator(data, tuple(cfg.eval.ks), bool(cfg.protocol.full_ranking))
        self.history: list[dict] = []
        rule = self.method.graph_rule()
        self.diag = (
            GraphDiagnostics(data, *rule)
            if OmegaConf.select(cfg, "diag.graph", default=False) and rule is not None
            else None
        )
        self.central = make_central(self.method, data, self.compute_device) if self.method.central else None
        self.chunk_size = self.resolve_chunk_size()
        self.encoding = Encoding.from_cfg(cfg.comm)
        self.ledger = Ledger(self.encoding, data.n_items)
        self.noise_gen = torch.Generator().manual_seed(int(cfg.seed) + 3)

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
        """One federated round; returns its metrics, losses and phase timings."""
        cfg, fl, method = self.cfg, self.cfg.fl, self.method
        timings: dict[str, float] = {}
        tic = time.perf_counter()
        clients = choose_clients(self.data.n_users, float(fl.client_fraction), self.gen)
        fails = draw_failures(self.data.n_users, float(fl.dropout), self.gen)
        timings["time/sample"] = time.perf_counter() - tic
        if self.central is not None:
            return self.run_central_round(self.round_samples(), timings)
        # the server's sums of this round; client entries are listed only when delta encoding needs them
        sums = method.round_sums(self.data.n_items, self.compute_device, entries=self.encoding.delta)
        work = RoundWork()
        for chunk in train_clients(
            self.local,
            self.pool,
            clients,
            self.data,
            self.sampler,
            self.server,
            method.dense_loss(self.broadcast),
            self.current_round(),
            self.compute_device,
            self.chunk_size,
        ):
            work.add(chunk)
            tic = time.perf_counter()
            # the chunk's clients that did not fail release their upload; the server sums it
            sums.add(method.release(chunk.params, chunk.rows, ~fails[chunk.rows], self.noise_gen, self.encoding.delta))
            work.upload_s += time.perf_counter() - tic
        timings["time/train"] = work.train_s
        tic = time.perf_counter()
        held = self.broadcast  # what the clients hold until the next round's download
        result = method.server_round(sums, self.server, held, int(cfg.seed), len(clients))
        self.server, self.broadcast = result.shared, result.broadcast
        if result.global_sim is not None:
            self.server_sim = result.global_sim  # S_g as the server aggregated it (the broadcast may hold less)
        # aggregate: the uploads made and summed, chunk by chunk (grows with the clients); server: what the server
        # makes of the sums once a round (S_g, the broadcast; not the communities, timed apart)
        timings["time/aggregate"] = work.upload_s
        timings["time/server"] = time.perf_counter() - tic - result.stats.get("time/community", 0.0)
        sizes = None
        if method.uploads_similarity:
            sizes = self.ledger.similarity_uploads(sums.senders, sums.sender_nnz(), sums.entries or None)
        stats = method.traffic(sums, sizes, len(clients), self.server, self.current_round(), int(cfg.model.dim))
        stats.update(result.stats)
        if self.diag is not None and result.global_sim is not None:  # evaluation-only (src/server/diagnostics.py)
            labels = result.broadcast.labels
            stats.update(self.diag(result.global_sim, None if labels is None else labels.numpy()))
        tic = time.perf_counter()
        metrics = self.evaluate(held)
        timings["time/eval"] = time.perf_counter() - tic
        out = {**metrics, **{f"loss/{k}": v for k, v in work.losses.items()}, **stats, **timings}
        out["clients"] = float(len(clients))
        out["steps"] = work.steps  # client-steps of local training this round
        out["reported"] = float(len(clients) - int(fails[clients].sum()))
        return out

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
        losses = self.central.train_round(samples, self.gen)
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
        row = {"round": self.current_epoch + 1, **self.run_round()}
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
        """Client states, server state, RNG state and history go into the checkpoint."""
        checkpoint["federated"] = {
            "state": self.state,
            "server": self.server,
            "gen": self.gen.get_state(),
            "history": self.history,
            "central": self.central.state_dict() if self.central else None,
            "align": (self.broadcast.labels, self.broadcast.global_sim) if self.method.uploads_similarity else None,
            "ledger": self.ledger.state_dict(),
            "noise_gen": self.noise_gen.get_state(),
            "diag_first_edge_keys": None if self.diag is None else self.diag.first_edges,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore what `on_save_checkpoint` stored."""
        fed = checkpoint["federated"]
        self.state, self.server, self.history = fed["state"], fed["server"], fed["history"]
        self.gen.set_state(fed["gen"])
        if self.central is not None:
            self.central.load_state_dict(fed["central"])
        if self.method.uploads_similarity:
            self.broadcast = Broadcast(*fed["align"], float(self.cfg.model.sigma))
        self.ledger.load_state_dict(fed.get("ledger", {}))
        if "noise_gen" in fed:
            self.noise_gen.set_state(fed["noise_gen"])
        if self.diag is not None:
            self.diag.restore(fed)
