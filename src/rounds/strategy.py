"""The server side of every round, whatever carries the messages (in the spirit of a Flower `Strategy`).

`configure_fit` chooses the round's clients and their simulated failures and says what they start from
(a `FitPlan`); the clients train and release (`local.py` + the method's `release`) into the method's
`RoundSums`; `aggregate_fit` turns those sums into the server's new state and broadcast, and gives the
round's server statistics (traffic, communities, timings). The Lightning simulator (`simulator.py`) and
the Flower ServerApp (`src/flower/server_app.py`) run every round through one `RoundStrategy`: they differ
only in how a plan reaches the clients and how the releases reach the sums.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from src.alignment.broadcast import Broadcast
from src.clients.model import Params
from src.comm.codec import Encoding, Ledger
from src.comm.privacy import NoiseStreams
from src.comm.user_dp import UserLevelDP, server_generator
from src.data.dataset import FedData
from src.methods.base import Method, RoundSums, ServerRound
from src.runtime.checks import ConfigError
from src.server.diagnostics import GraphDiagnostics


def choose_clients(n_users: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """The clients of a round: a random `fraction` of all, sorted (all when 1)."""
    k = max(1, round(float(fraction) * n_users))
    if k >= n_users:
        return torch.arange(n_users)
    return torch.randperm(n_users, generator=generator)[:k].sort().values


def draw_failures(n_users: int, dropout: float, generator: torch.Generator) -> torch.Tensor:
    """Simulated failures to report [n_users] (drawn every round, even at 0, so the stream stays aligned)."""
    return torch.rand(n_users, generator=generator) < float(dropout)


@dataclass
class FitPlan:
    """One round's instructions to the clients."""

    round: int
    clients: torch.Tensor  # [k] the chosen client ids, sorted
    # [n_users] bool: clients that train and send nothing: simulated failures (`fl.dropout`), or everyone in a round
    # the method does not upload in (`Method.uploads_in`)
    failed: torch.Tensor
    shared: Params  # the server's shared parameters every chosen client starts from
    broadcast: Broadcast  # what the clients hold (the last broadcast) while training and at evaluation
    noise: NoiseStreams  # each client's upload noise stream this round

    def uploads(self, users: torch.Tensor) -> torch.Tensor:
        """Which of `users` [C] send their upload [C] bool."""
        return ~self.failed[users]

    @property
    def absent(self) -> torch.Tensor:
        """The chosen clients that fail to report."""
        return self.clients[self.failed[self.clients]]


class RoundStrategy:
    """The server's state between rounds and its two steps of a round."""

    def __init__(self, cfg: DictConfig, method: Method, data: FedData, shared: Params, device: torch.device):
        """`shared`: the server's starting parameters (client 0's draw); with `diag.graph` and a method that builds
        a graph, the evaluation-only graph diagnostics of the broadcasts (src/server/diagnostics.py)."""
        self.method, self.n_users, self.n_items, self.device = method, data.n_users, data.n_items, device
        rule = method.graph_rule()
        graph = OmegaConf.select(cfg, "diag.graph", default=False) and rule is not None
        self.diag = GraphDiagnostics(data, *rule) if graph else None
        self.fraction, self.dropout = float(cfg.fl.client_fraction), float(cfg.fl.dropout)
        self.seed, self.dim = int(cfg.seed), int(cfg.model.dim)
        self.shared = shared
        self.broadcast = method.empty_broadcast()
        self.global_sim: torch.Tensor | None = None  # S_g as the server aggregated it (the broadcast may hold less)
        self.gen = torch.Generator().manual_seed(self.seed + 1)
        self.encoding = Encoding.from_cfg(cfg.comm)
        self.ledger = Ledger(self.encoding, data.n_items)
        # user-level DP of the similarity sum (privacy.clip; src/comm/user_dp.py), its budget spread over the rounds
        # the method uploads in
        rounds = range(1, int(cfg.fl.rounds) + 1)
        self.dp = UserLevelDP.from_cfg(cfg, data.n_users, sum(method.uploads_in(r) for r in rounds))
        self.releases = 0  # rounds whose noisy sum the server released

    def configure_fit(self, round_: int) -> FitPlan:
        """Choose the round's clients and their failures; the plan they train from."""
        clients = choose_clients(self.n_users, self.fraction, self.gen)
        failed = draw_failures(self.n_users, self.dropout, self.gen)
        if not self.method.uploads_in(round_):
            failed = torch.ones_like(failed)
        return FitPlan(round_, clients, failed, self.shared, self.broadcast, NoiseStreams(self.seed, round_))

    def round_sums(self) -> RoundSums:
        """The server's empty sums of a round (listing each upload's entries when delta encoding counts them, and
        the start table when its changed rows are counted)."""
        start = self.shared if self.rows_counted else None
        sums = self.method.round_sums(self.n_items, self.device, entries=self.encoding.delta, start=start)
        sums.clip = None if self.dp is None else self.dp.clip  # decoded uploads are clipped again (Flower)
        return sums

    @property
    def rows_counted(self) -> bool:
        """`comm.tables=rows` and the method shares an item table."""
        return self.encoding.tables == "rows" and "items" in self.shared

    def aggregate_fit(self, plan: FitPlan, sums: RoundSums) -> tuple[dict[str, float], ServerRound]:
        """The method's server step on the round's sums; the server's new state; the round's server statistics."""
        tic = time.perf_counter()
        if self.dp is not None and sums.sims.count > 0:  # the noisy sum over the chosen clients, a public count
            self.dp.add_noise(sums.sims.upper, server_generator(self.seed, plan.round, self.dp.secret))
            sums.sims.count = len(plan.clients)
            self.releases += 1
        result = self.method.server_round(sums, self.shared, plan.broadcast, self.seed, len(plan.clients))
        self.shared, self.broadcast = result.shared, result.broadcast
        if result.global_sim is not None:
            self.global_sim = result.global_sim
        # what the server makes of the sums once a round (S_g, the broadcast); the communities are timed apart
        stats = {"time/server": time.perf_counter() - tic - result.stats.get("time/community", 0.0)}
        sizes = None
        if self.method.uploads_similarity:
            sizes = self.ledger.similarity_uploads(sums.senders, sums.sender_nnz(), sums.entries or None)
        stats.update(self.method.traffic(sums, sizes, len(plan.clients), self.shared, plan.round, self.dim))
        if self.rows_counted:  # the tables as their changed rows (what a lossless sparse encoding sends)
            rest = sum(4 * v.numel() for k, v in self.shared.items() if k != "items")
            before, after = plan.shared["items"], self.shared["items"]
            stats.update(self.ledger.table_traffic(plan.round, plan.clients, sums.changed_rows, before, after, rest))
        stats.update(result.stats)
        if self.diag is not None and result.global_sim is not None:  # evaluation-only (src/server/diagnostics.py)
            labels = result.broadcast.labels
            stats.update(self.diag(result.global_sim, None if labels is None else labels.numpy()))
        if self.dp is not None:
            stats.update(self.dp.spent(self.releases))
        stats["clients"] = float(len(plan.clients))
        stats["reported"] = float(len(sums.senders))
        return stats, result

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the server."""
        return {
            "server": self.shared,
            "gen": self.gen.get_state(),
            "align": (self.broadcast.labels, self.broadcast.global_sim) if self.method.uploads_similarity else None,
            "ledger": self.ledger.state_dict(),
            "diag_first_edge_keys": None if self.diag is None else self.diag.first_edges,
            "releases": self.releases,
            "noise_multiplier": None if self.dp is None else self.dp.noise_multiplier,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` kept."""
        self.shared = state["server"]
        self.gen.set_state(state["gen"])
        if self.method.uploads_similarity:
            self.broadcast = Broadcast(*state["align"], self.broadcast.sigma)
        self.ledger.load_state_dict(state.get("ledger", {}))
        self.releases = state.get("releases", 0)
        before = state.get("noise_multiplier")
        if self.dp is not None and before is not None and abs(before - self.dp.noise_multiplier) > 1e-9:
            # the accountant composes releases of one z: a resume that recalibrates z (more fl.rounds to spend the
            # same target epsilon over) would report less epsilon than its earlier releases spent
            raise ConfigError(
                f"the resumed run's rounds released with noise multiplier {before:.6g}, this config calibrates "
                f"{self.dp.noise_multiplier:.6g}; expected the fl.rounds and privacy.* the run started with"
            )
        if self.diag is not None:
            self.diag.restore(state)
