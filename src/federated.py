"""The federated loop as a LightningModule: one training step = one round.

A round: choose clients (`fl.client_fraction`), download the server's shared parameters, run
their local training as stacked tensors (`cohort.py`), upload (a share `fl.dropout` of the chosen
clients fails to report), aggregate on the server (`server.py`), then evaluate every client with
its own parameters on validation and test (`evaluation.py`). Lightning drives the rounds,
checkpoints and loggers; all state lives in plain tensors so chunks can move between devices.
"""
from __future__ import annotations

import time

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from src.central import CentralTrainer
from src.community import adjusted_rand_index, detect
from src.cohort import batch_layout, chunks_by_steps, local_steps, sample_round, train_cohort
from src.data.dataset import FedData
from src.evaluation import Evaluator
from src.losses import AlignmentLoss
from src.model import Params, forward, init_params, score_all_items
from src.protocols import NegativeSampler, excluded_for_training
from src.server import MeanAggregator
from src.similarity import SimilarityAggregator


def resolve_device(name: str) -> torch.device:
    """`auto` = cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def shared_keys(ablation: DictConfig, params: Params) -> list[str]:
    """Parameter names the server averages under this method."""
    keys = ["items"] if ablation.item_table == "mean" else []
    if ablation.score_fn == "mean":
        keys += [k for k in params if k[0] in "wb" and k[1:].isdigit()]
    return keys


def make_alignment(cfg: DictConfig) -> AlignmentLoss:
    """The client-side alignment terms of the configured ablation."""
    m = cfg.model
    return AlignmentLoss(alpha=float(m.alpha), beta=float(m.beta), tau=float(m.tau), tau0=float(m.tau0),
                         sigma=float(m.sigma), centre=bool(m.centre), mask=m.gsa_mask, reduction=m.gsa_reduction,
                         mode=m.alignment, chunk=int(m.align_chunk), use_ica=bool(cfg.ablation.ica),
                         use_gsa=bool(cfg.ablation.gsa), fast_anchors=int(m.fast_anchors))


class FederatedModule(L.LightningModule):
    """All clients' parameters, the server state and the round logic of one federated run."""

    def __init__(self, cfg: DictConfig, data: FedData):
        super().__init__()
        self.automatic_optimization = False
        self.cfg, self.data = cfg, data
        self.compute_device = resolve_device(cfg.device)
        init_gen = torch.Generator().manual_seed(int(cfg.seed))
        self.state: Params = init_params(cfg.model, data.n_users, data.n_items, init_gen)
        self.keys = shared_keys(cfg.ablation, self.state)
        self.server: Params = {k: self.state[k][0].clone() for k in self.keys}
        self.gen = torch.Generator().manual_seed(int(cfg.seed) + 1)
        candidates = torch.cat([torch.as_tensor(data.val_negatives), torch.as_tensor(data.test_negatives)], 1).numpy()
        self.sampler = NegativeSampler(excluded_for_training(
            cfg.protocol.train_negative_pool, data.train_matrix(), data.interacted_matrix(), candidates))
        self.train_ptr = torch.as_tensor(data.train_ptr)
        self.train_items = torch.as_tensor(data.train_items)
        self.evaluator = Evaluator(data, tuple(cfg.eval.ks), bool(cfg.protocol.full_ranking))
        self.history: list[dict] = []
        self.align = make_alignment(cfg) if (cfg.ablation.ica or cfg.ablation.gsa) else None
        self.central = CentralTrainer(cfg, data.n_users, data.n_items, self.compute_device) if cfg.ablation.central else None

    def train_dataloader(self) -> DataLoader:
        """One dummy batch per epoch: each epoch is one federated round."""
        return DataLoader([0], batch_size=1)

    def configure_optimizers(self) -> None:
        """Optimisers are per client and per round, inside `train_cohort`."""
        return None

    def choose_clients(self) -> torch.Tensor:
        """The clients of this round: a random `fl.client_fraction` of all (all by default)."""
        n = self.data.n_users
        k = max(1, round(float(self.cfg.fl.client_fraction) * n))
        if k >= n:
            return torch.arange(n)
        return torch.randperm(n, generator=self.gen)[:k].sort().values

    def chunk_params(self, rows: torch.Tensor) -> Params:
        """Copy the parameters of clients `rows` onto the compute device."""
        return {k: v[rows].to(self.compute_device) for k, v in self.state.items()}

    def run_round(self) -> dict[str, float]:
        """One federated round; returns its metrics, losses and phase timings."""
        cfg, fl = self.cfg, self.cfg.fl
        timings: dict[str, float] = {}
        tic = time.perf_counter()
        clients = self.choose_clients()
        samples = sample_round(self.train_ptr, self.train_items, self.sampler,
                               int(cfg.protocol.train_negatives), self.gen)
        steps = local_steps(samples, clients, int(fl.local_epochs), int(fl.batch_size))
        chunks = chunks_by_steps(clients, steps, fl.chunk_size)
        fails = torch.rand(self.data.n_users, generator=self.gen) < float(fl.dropout)
        timings["time/sample"] = time.perf_counter() - tic
        if self.central is not None:
            return self.run_central_round(samples, timings)
        agg = MeanAggregator()
        sims = None
        if self.align is not None:
            sims = SimilarityAggregator(self.data.n_items, float(cfg.model.sigma), bool(cfg.model.centre),
                                        int(cfg.server.sim_block), self.compute_device)
        dense = self.align.value_and_grad if self.align is not None and self.align.active else None
        losses: dict[str, float] = {}
        train_time, upload_time = 0.0, 0.0
        for rows in chunks:
            tic = time.perf_counter()
            params = self.chunk_params(rows)
            for k in self.keys:
                params[k].copy_(self.server[k].to(self.compute_device).expand_as(params[k]))
            layout = batch_layout(samples, rows, int(fl.local_epochs), int(fl.batch_size), self.gen)
            chunk_losses = train_cohort(params, samples, layout, cfg.optim, self.data.n_items, cfg.model.loss, dense)
            for k, v in chunk_losses.items():
                losses[k] = losses.get(k, 0.0) + v * len(rows) / len(clients)
            for k, v in params.items():
                self.state[k][rows] = v.to(self.state[k].device)
            train_time += time.perf_counter() - tic
            tic = time.perf_counter()
            uploaded = ~fails[rows].to(self.compute_device)
            agg.add(params, self.keys, uploaded)
            if sims is not None:
                sims.add(params["items"], uploaded)
            upload_time += time.perf_counter() - tic
        timings["time/train"] = train_time
        tic = time.perf_counter()
        self.server = agg.result(self.server)
        timings["time/aggregate"] = time.perf_counter() - tic + upload_time
        comm_stats = self.server_alignment(sims, len(clients), timings) if sims is not None else {}
        tic = time.perf_counter()
        metrics = self.evaluate()
        timings["time/eval"] = time.perf_counter() - tic
        out = {**metrics, **{f"loss/{k}": v for k, v in losses.items()}, **comm_stats, **timings}
        out["clients"] = float(len(clients))
        out["steps"] = float(steps.sum())  # client-steps of local training this round
        out["reported"] = float(len(clients) - int(fails[clients].sum()))
        return out

    def server_alignment(self, sims: SimilarityAggregator, n_clients: int, timings: dict[str, float]) -> dict[str, float]:
        """S_g = mean upload, communities by modularity, broadcast; returns the community statistics."""
        global_sim = sims.mean()
        if global_sim is None:
            return {}
        tic = time.perf_counter()
        comms = detect(global_sim, float(self.cfg.model.sigma), self.cfg.server.community,
                       float(self.cfg.server.resolution), int(self.cfg.seed))
        timings["time/community"] = time.perf_counter() - tic
        sizes = comms.sizes
        stats = {"comm/communities": float(len(sizes)), "comm/largest": float(sizes.max()),
                 "comm/singletons": float((sizes == 1).sum()), "comm/non_singleton": float((sizes > 1).sum()),
                 "comm/modularity": comms.modularity, "comm/edges": float(comms.edges),
                 "comm/upload_nnz_mean": sims.nnz / max(sims.count, 1)}
        if self.align.labels is not None:
            stats["comm/ari_prev"] = adjusted_rand_index(self.align.labels.numpy(), comms.labels)
        self.align.update(torch.as_tensor(comms.labels), global_sim.cpu())
        return stats

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
        size = int(self.cfg.fl.chunk_size or self.data.n_users)
        return [torch.arange(i, min(i + size, self.data.n_users)) for i in range(0, self.data.n_users, size)]

    def evaluate(self) -> dict[str, float]:
        """Every client scored with its own current parameters."""
        def score(rows: torch.Tensor, item_ids: torch.Tensor | None) -> torch.Tensor:
            params = self.chunk_params(rows)
            with torch.no_grad():
                if item_ids is None:
                    return score_all_items(params)
                return forward(params, item_ids.to(self.compute_device))

        return self.evaluator.run(score, self.eval_chunks())

    def training_step(self, batch, batch_idx: int) -> None:
        """Run one round and record it."""
        tic = time.perf_counter()
        row = {"round": self.current_epoch + 1, **self.run_round()}
        row["time/round"] = time.perf_counter() - tic
        self.history.append(row)
        for logger in self.loggers:
            logger.log_metrics({k: v for k, v in row.items() if k != "round"}, step=row["round"])
        patience = self.cfg.eval.patience
        if patience is not None:
            best = max(range(len(self.history)), key=lambda i: (self.history[i]["val/hit@10"], -i))
            if len(self.history) - 1 - best >= int(patience):
                self.trainer.should_stop = True

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Client states, server state, RNG state and history go into the checkpoint."""
        checkpoint["federated"] = {"state": self.state, "server": self.server, "gen": self.gen.get_state(),
                                   "history": self.history,
                                   "central": self.central.state_dict() if self.central else None,
                                   "align": (self.align.labels, self.align.global_sim) if self.align else None}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore what `on_save_checkpoint` stored."""
        fed = checkpoint["federated"]
        self.state, self.server, self.history = fed["state"], fed["server"], fed["history"]
        self.gen.set_state(fed["gen"])
        if self.central is not None:
            self.central.load_state_dict(fed["central"])
        if self.align is not None:
            self.align.update(*fed["align"])
