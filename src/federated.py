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
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from src.central import make_central
from src.cohort import sample_round
from src.comm import Encoding, Ledger, embedding_bytes, quantise, shared_traffic
from src.data.dataset import FedData
from src.device import block_elements, resolve_device, setup_device  # noqa: F401 (resolve_device: re-exported for old imports)
from src.diagnostics import GraphDiagnostics
from src.evaluation import Evaluator
from src.losses import AlignmentLoss
from src.memory import auto_chunk_size, bytes_per_client, free_bytes
from src.model import Params, init_params
from src.privacy import epsilon_spent, laplace_scale
from src.results import best_round, select_key
from src.rounds import (
    ClientPool,
    choose_clients,
    draw_failures,
    evaluate_clients,
    server_alignment,
    train_clients,
    training_sampler,
)
from src.server import MeanAggregator
from src.similarity import SimilarityAggregator


def shared_keys(ablation: DictConfig, params: Params) -> list[str]:
    """Parameter names the server averages under this method."""
    keys = ["items"] if ablation.item_table == "mean" else []
    if ablation.score_fn == "mean":
        keys += [k for k in params if k[0] in "wb" and k[1:].isdigit()]
    return keys


def make_alignment(cfg: DictConfig, device: torch.device | None = None) -> AlignmentLoss:
    """The client-side alignment terms of the configured ablation (exact blocks sized for `device`)."""
    m = cfg.model
    return AlignmentLoss(
        alpha=float(m.alpha),
        beta=float(m.beta),
        tau=float(m.tau),
        tau0=float(m.tau0),
        sigma=float(m.sigma),
        centre=bool(m.centre),
        mask=m.gsa_mask,
        reduction=m.gsa_reduction,
        mode=m.alignment,
        chunk=int(m.align_chunk),
        use_ica=bool(cfg.ablation.ica),
        use_gsa=bool(cfg.ablation.gsa),
        fast_anchors=int(m.fast_anchors),
        block=block_elements(cfg, "model.align_block", device or torch.device("cpu")),
        fast_gsa=str(m.fast_gsa),
    )


def resolve_chunk_size(cfg: DictConfig, n_items: int, n_clients: int, device: torch.device) -> int | None:
    """`fl.chunk_size` (an int, or null = all), or with `auto` the largest cohort of the `n_clients`
    a process holds that fits `fl.memory_fraction` of the free memory of `device` (src/memory.py).

    The simulator (all clients) and a Flower node (its own clients) both size their cohorts here.
    """
    size = cfg.fl.chunk_size
    if size != "auto":
        return size
    m = cfg.model
    aligned = bool(cfg.ablation.ica or cfg.ablation.gsa)
    per = bytes_per_client(
        n_items, int(m.dim), m.alignment if aligned else None, int(m.fast_anchors), int(cfg.fl.batch_size)
    )
    return auto_chunk_size(
        n_clients,
        per,
        free_bytes(device),
        float(cfg.fl.memory_fraction),
        OmegaConf.select(cfg, "fl.max_auto_chunk", default=None),
    )


class FederatedModule(L.LightningModule):
    """All clients' parameters, the server state and the round logic of one federated run."""

    def __init__(self, cfg: DictConfig, data: FedData):
        super().__init__()
        self.automatic_optimization = False
        self.cfg, self.data = cfg, data
        self.compute_device = setup_device(cfg)  # first: before any CUDA work of the run
        init_gen = torch.Generator().manual_seed(int(cfg.seed))
        self.state: Params = init_params(cfg.model, data.n_users, data.n_items, init_gen)
        self.keys = shared_keys(cfg.ablation, self.state)
        self.server: Params = {k: self.state[k][0].clone() for k in self.keys}
        self.gen = torch.Generator().manual_seed(int(cfg.seed) + 1)
        self.sampler = training_sampler(cfg, data)
        self.train_ptr = torch.as_tensor(data.train_ptr)
        self.train_items = torch.as_tensor(data.train_items)
        self.evaluator = Evaluator(data, tuple(cfg.eval.ks), bool(cfg.protocol.full_ranking))
        self.history: list[dict] = []
        self.diag = (
            GraphDiagnostics(data, float(cfg.model.sigma))
            if OmegaConf.select(cfg, "diag.graph", default=False) and (cfg.ablation.ica or cfg.ablation.gsa)
            else None
        )
        self.align = make_alignment(cfg, self.compute_device) if (cfg.ablation.ica or cfg.ablation.gsa) else None
        self.central = make_central(cfg, data, self.compute_device) if cfg.ablation.central else None
        self.chunk_size = self.resolve_chunk_size()
        self.encoding = Encoding.from_cfg(cfg.comm)
        self.ledger = Ledger(self.encoding, data.n_items)
        self.noise_scale, self.eps_round = laplace_scale(cfg.privacy)
        self.noise_gen = torch.Generator().manual_seed(int(cfg.seed) + 3)

    def resolve_chunk_size(self) -> int | None:
        """`fl.chunk_size`, or with `auto` the cohort that fits the free memory of the compute device."""
        return resolve_chunk_size(self.cfg, self.data.n_items, self.data.n_users, self.compute_device)

    def train_dataloader(self) -> DataLoader:
        """One dummy batch per epoch: each epoch is one federated round."""
        return DataLoader([0], batch_size=1)

    def configure_optimizers(self) -> None:
        """Optimisers are per client and per round, inside `train_cohort`."""
        return None

    @property
    def pool(self) -> ClientPool:
        """Every client, row = client id."""
        return ClientPool(torch.arange(self.data.n_users), self.state)

    def run_round(self) -> dict[str, float]:
        """One federated round; returns its metrics, losses and phase timings."""
        cfg, fl = self.cfg, self.cfg.fl
        timings: dict[str, float] = {}
        tic = time.perf_counter()
        clients = choose_clients(self.data.n_users, float(fl.client_fraction), self.gen)
        fails = draw_failures(self.data.n_users, float(fl.dropout), self.gen)
        timings["time/sample"] = time.perf_counter() - tic
        if self.central is not None:
            samples = sample_round(
                self.train_ptr,
                self.train_items,
                self.sampler,
                int(cfg.protocol.train_negatives),
                int(cfg.seed),
                self.current_round(),
            )
            return self.run_central_round(samples, timings)
        agg = MeanAggregator()
        sims = None
        if self.align is not None:
            sims = SimilarityAggregator(
                self.data.n_items,
                float(cfg.model.sigma),
                bool(cfg.model.centre),
                block_elements(cfg, "server.sim_block", self.compute_device),
                self.compute_device,
                noise=self.noise_scale,
                topk=self.encoding.topk,
                bits=self.encoding.bits,
                collect=self.encoding.delta,
                generator=self.noise_gen,
            )
        senders: list[int] = []

        def upload(params: Params, rows: torch.Tensor) -> None:
            """The chunk's clients that did not fail send their shared parameters and similarity."""
            uploaded = ~fails[rows].to(self.compute_device)
            agg.add(params, self.keys, uploaded)
            senders.extend(rows[uploaded.cpu()].tolist())
            if sims is not None:
                sims.add(params["items"], uploaded)

        dense = self.align.value_and_grad if self.align is not None and self.align.active else None
        work = train_clients(
            cfg,
            self.pool,
            clients,
            self.data,
            self.sampler,
            self.server,
            dense,
            self.current_round(),
            self.compute_device,
            self.chunk_size,
            upload,
        )
        timings["time/train"] = work.train_s
        tic = time.perf_counter()
        self.server = agg.result(self.server)
        timings["time/aggregate"] = time.perf_counter() - tic + work.upload_s
        comm_stats = self.traffic(senders, len(clients), sims)
        if sims is not None:
            comm_stats.update(self.server_alignment(sims, len(clients), timings))
        tic = time.perf_counter()
        metrics = self.evaluate()
        timings["time/eval"] = time.perf_counter() - tic
        out = {**metrics, **{f"loss/{k}": v for k, v in work.losses.items()}, **comm_stats, **timings}
        out["clients"] = float(len(clients))
        out["steps"] = float(work.steps.sum())  # client-steps of local training this round
        out["reported"] = float(len(clients) - int(fails[clients].sum()))
        return out

    def traffic(self, senders: list[int], n_clients: int, sims: SimilarityAggregator | None) -> dict[str, float]:
        """Bytes uploaded this round as encoded, and what embedding sharing would have cost."""
        m, d = self.data.n_items, int(self.cfg.model.dim)
        out = {"comm/embedding_bytes": float(embedding_bytes(m, d)), "comm/uploaders": float(len(senders))}
        if sims is None:
            return out | shared_traffic([self.state[k][0] for k in self.keys], len(senders), n_clients)
        nnz = torch.cat(sims.client_nnz) if sims.client_nnz else torch.zeros(0)
        sizes = self.ledger.similarity_uploads(senders, nnz, sims.entries if self.encoding.delta else None)
        out["comm/upload_nnz_mean"] = float(nnz.double().mean()) if len(nnz) else 0.0
        out["comm/upload_bytes_mean"] = float(sizes.mean()) if len(sizes) else 0.0
        out["comm/upload_bytes_total"] = float(sizes.sum())
        out.update(epsilon_spent(self.eps_round, self.current_round(), m))
        return out

    def current_round(self) -> int:
        """1-based index of the round being run."""
        return len(self.history) + 1

    def server_alignment(
        self, sims: SimilarityAggregator, n_clients: int, timings: dict[str, float]
    ) -> dict[str, float]:
        """S_g = mean upload, communities by modularity, broadcast (encoded, counted); returns the statistics."""
        global_sim = sims.mean()
        if global_sim is None:
            return {}
        tic = time.perf_counter()
        comms, stats = server_alignment(self.cfg, global_sim, self.align.labels)
        timings["time/community"] = time.perf_counter() - tic
        if self.diag is not None:  # evaluation-only: uses the clients' training data (src/diagnostics.py)
            stats.update(self.diag(global_sim, comms.labels))
        broadcast = quantise(global_sim, 0.0, 1.0, self.encoding.bits).cpu()
        down = float(self.ledger.similarity_download(broadcast, len(comms.sizes)))
        stats.update({"comm/download_bytes_mean": down, "comm/download_bytes_total": down * n_clients})
        self.align.update(torch.as_tensor(comms.labels), broadcast)
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
        size = int(self.chunk_size or self.data.n_users)
        return [torch.arange(i, min(i + size, self.data.n_users)) for i in range(0, self.data.n_users, size)]

    def evaluate(self) -> dict[str, float]:
        """Every client scored with its own current parameters."""
        return self.evaluator.metrics(evaluate_clients(self.evaluator, self.pool, self.compute_device, self.chunk_size))

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
            best = best_round(self.history, select_key(self.cfg))  # the rule results.json uses
            if row["round"] - best["round"] >= int(patience):
                self.trainer.should_stop = True

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Client states, server state, RNG state and history go into the checkpoint."""
        checkpoint["federated"] = {
            "state": self.state,
            "server": self.server,
            "gen": self.gen.get_state(),
            "history": self.history,
            "central": self.central.state_dict() if self.central else None,
            "align": (self.align.labels, self.align.global_sim) if self.align else None,
            "ledger": self.ledger.state_dict(),
            "noise_gen": self.noise_gen.get_state(),
            "diag_first_edges": None if self.diag is None else self.diag.first_edges,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore what `on_save_checkpoint` stored."""
        fed = checkpoint["federated"]
        self.state, self.server, self.history = fed["state"], fed["server"], fed["history"]
        self.gen.set_state(fed["gen"])
        if self.central is not None:
            self.central.load_state_dict(fed["central"])
        if self.align is not None:
            self.align.update(*fed["align"])
        self.ledger.load_state_dict(fed.get("ledger", {}))
        if "noise_gen" in fed:
            self.noise_gen.set_state(fed["noise_gen"])
        if self.diag is not None:
            self.diag.first_edges = fed.get("diag_first_edges")
