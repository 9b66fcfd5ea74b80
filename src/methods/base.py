"""What a federated method is (in the spirit of a Flower `Strategy`): one object per `ablation=` value.

A method says, for one round,
- what a client trains with besides its own BCE loss (`dense_loss`, given the last broadcast),
- which parameters start from the server's values and are sent back (`shared_keys`),
- what a chunk of clients releases (`release`, client side; the values as the server decodes them),
- how the server sums the releases (`RoundSums`) and turns them into its new state and broadcast
  (`server_round`),
- how many bytes crossed the network (`traffic`),
- and how a client scores items at evaluation when not with its own model (`client_scorer`).

The simulator (`src/rounds/simulator.py`) and the Flower apps (`src/flower/`) call these same
methods; only the transport differs. A method is chosen by `ablation.method`, the name of a module
in `src/methods/` whose `build(cfg, device)` returns it; `conf/ablation/<name>.yaml` sets that key and the
method's own values. A centralised method (no clients) instead has `central = True` and is trained
on pooled samples (`src/methods/central.py`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType

import torch
from omegaconf import DictConfig

from src.alignment.broadcast import Broadcast
from src.alignment.release import ChunkUploads, ReleasedBlock
from src.clients.cohort import DenseLoss
from src.clients.model import Params
from src.comm.codec import embedding_bytes, shared_traffic
from src.comm.privacy import NoiseStreams
from src.data.dataset import FedData
from src.evaluation.evaluator import ScoreFn
from src.server.aggregation import MeanAggregator
from src.server.global_similarity import SimilaritySum


@dataclass
class Release:
    """What the uploading clients of one chunk send: their shared parameters [n, ...] and, for a
    similarity-sharing method, their released similarity blocks (an iterator, consumed once)."""

    users: torch.Tensor  # [n] client ids that sent
    shared: Params
    blocks: Iterator[ReleasedBlock] | None = None


class RoundSums:
    """The server's sums of one round's releases: the shared parameters' mean and, when the method shares
    similarities, their sum with each sender's nonzero count (and entries, for delta accounting)."""

    def __init__(
        self,
        n_items: int,
        device: torch.device,
        similarity: bool,
        entries: bool = False,
        support: bool = False,
        start: Params | None = None,
    ):
        self.mean = MeanAggregator()
        self.start = start  # the shared item table the clients started from, to count the rows each changed
        self.changed_rows: list[int] = []
        self.sims = SimilaritySum(n_items, device, support) if similarity else None
        self.n_items, self.device, self.keep_entries = n_items, device, entries
        self.senders: list[int] = []
        self.clip: float | None = None  # user-level DP: the L2 norm the server enforces on each decoded upload
        self.nnz: list[torch.Tensor] = []
        self.entries: list[tuple[torch.Tensor, torch.Tensor]] = []

    def count_changed_rows(self, shared: Params) -> None:
        """With `start` (`comm.tables=rows`): the rows of each uploaded item table [n, m, d] that changed."""
        if self.start is not None and "items" in shared:
            table = shared["items"]
            self.changed_rows.extend((table != self.start["items"].to(table.device)).any(-1).sum(-1).tolist())

    def add(self, release: Release) -> None:
        """Sum one chunk's release (the simulator: blocks straight into the sum, never a whole matrix)."""
        self.mean.add(release.shared, len(release.users))
        self.count_changed_rows(release.shared)
        self.senders.extend(release.users.tolist())
        if release.blocks is None or self.sims is None:
            return
        uploads = ChunkUploads(len(release.users), self.n_items, self.device, self.keep_entries)
        for blk in release.blocks:
            uploads.add(blk)
            self.sims.add_block(blk)
        self.sims.count += len(release.users)
        self.nnz.append(uploads.nnz())
        if self.keep_entries:
            self.entries.extend(uploads.client_entries())

    def add_decoded(self, users: torch.Tensor, shared: Params, entries: list[tuple[torch.Tensor, ...]]) -> None:
        """Sum one node's decoded reply (Flower): shared parameters [n, ...] and (rows, cols, values) per upload."""
        self.mean.add(shared, len(users))
        self.count_changed_rows(shared)
        self.senders.extend(users.tolist())
        for rows, cols, vals in entries:
            vals = vals.float()  # the decoded values in the clients' dtype, as the simulator's releases hold them
            if self.clip is not None:
                vals = self.clipped(rows, cols, vals)
            self.sims.add_entries(rows, cols, vals)
            self.sims.count += 1
            self.nnz.append(torch.tensor([2 * len(rows)]))
            if self.keep_entries:  # as the simulator lists them: sorted positions j * m + k (j < k), values
                keys = rows.long() * self.n_items + cols.long()
                order = torch.argsort(keys)
                self.entries.append((keys[order].cpu(), vals[order].float().cpu()))

    def add_secure(self, users: torch.Tensor, upper: torch.Tensor, support: torch.Tensor | None, count: int) -> None:
        """Sum a round's secure sum (Flower with SecAgg+: src/flower/secagg.py): the uploads' upper triangles
        [m, m], their holder counts, and how many uploads they hold, as one total the server cannot split; each of
        `users` [n] sent a dense upload (every pair), which the traffic counts. The server cannot clip an upload it
        never sees: `privacy.clip` holds by the clients' own clipping alone."""
        self.senders.extend(users.tolist())
        self.sims.upper += upper.to(self.sims.upper.device)
        if self.sims.support is not None and support is not None:
            self.sims.support += support.to(self.sims.support.device)
        self.sims.count += count
        self.nnz.append(torch.full((len(users),), self.n_items * (self.n_items - 1), dtype=torch.long))

    def clipped(self, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        """One decoded upload's values [k] scaled to L2 norm `clip` when above it (entries at one position summed
        first, as the server adds them): the server enforces the bound it accounts for, whatever a node sent. An
        upload its node clipped (norm <= clip, to float rounding) is left as it is."""
        keys = rows.long() * self.n_items + cols.long()
        unique, index = torch.unique(keys, return_inverse=True)
        norm = float(torch.zeros(len(unique), dtype=torch.float64).index_add_(0, index, vals.double()).norm())
        return vals * (self.clip / norm) if norm > self.clip * (1 + 1e-5) else vals

    def sender_nnz(self) -> torch.Tensor:
        """Whole-matrix nonzeros of every similarity upload this round [senders]."""
        return torch.cat(self.nnz) if self.nnz else torch.zeros(0, dtype=torch.long)


@dataclass
class ServerRound:
    """The server's new state after a round: shared parameters, the broadcast, and the round's statistics.
    `global_sim` is S_g as aggregated (before encoding), for evaluation-only diagnostics."""

    shared: Params
    broadcast: Broadcast
    stats: dict[str, float] = field(default_factory=dict)
    global_sim: torch.Tensor | None = None


class Method:
    """A federated method; this base shares no parameters, adds no loss and sends nothing (override)."""

    name: str
    central = False  # True: no clients; trained on pooled samples (src/methods/central.py)
    # (ablation.item_table, ablation.score_fn) as the method implements them, whatever a yaml says; None: it reads them
    tables: tuple[str, str] | None = None
    no_reference: str | None = None  # why `src.bench` has no per-client reference to compare it with, or None
    uploads_similarity = False  # True: clients send similarity uploads and receive a Broadcast

    def shared_keys(self, params: Params) -> list[str]:
        """Parameter names every client starts the round from (the server's mean) and uploads."""
        return []

    def holder_counts(self) -> bool:
        """Whether the server's sums count each pair's uploads besides summing them (`RoundSums` support)."""
        return False

    def uploads_in(self, round_: int) -> bool:
        """Whether the chosen clients upload in round `round_` (1-based); in the others they train and send nothing."""
        return True

    def empty_broadcast(self) -> Broadcast:
        """The broadcast before the first round: nothing yet (a method without similarity uploads never reads it; its
        threshold is then moot)."""
        return Broadcast.empty(1.0)

    def dense_loss(self, broadcast: Broadcast) -> DenseLoss | None:
        """Extra loss terms on the item tables during local training, or None."""
        return None

    def graph_rule(self) -> tuple[float, int | None] | None:
        """(sigma, k) of the server's item graph (S_g >= sigma, or each item's k nearest); None: the method
        builds no server graph (nothing for the graph diagnostics to count)."""
        return None

    def client_scorer(self, broadcast: Broadcast, data: FedData, device: torch.device) -> ScoreFn | None:
        """How a client scores items at evaluation, given the broadcast it holds and its own training positives
        (each client reads its own row of `data`); None: with its own model."""
        return None

    def release(
        self, params: Params, users: torch.Tensor, uploaded: torch.Tensor, noise: NoiseStreams, entries: bool
    ) -> Release:
        """Client side: what the clients `users` [C] of a trained chunk marked `uploaded` [C] (CPU bool) send."""
        mask = uploaded.to(params["items"].device)
        keys = self.shared_keys(params)
        return Release(users[uploaded], {k: params[k][mask] for k in keys})

    def round_sums(
        self, n_items: int, device: torch.device, entries: bool = False, start: Params | None = None
    ) -> RoundSums:
        """The server's empty sums for a round (`start`: the shared parameters the round starts from, to count
        the table rows each upload changed)."""
        return RoundSums(n_items, device, self.uploads_similarity, entries, start=start)

    def server_round(
        self, sums: RoundSums, shared: Params, broadcast: Broadcast, seed: int, n_clients: int
    ) -> ServerRound:
        """Server side: the mean of the shared parameters (the previous values when nobody reported)."""
        return ServerRound(sums.mean.result(shared), broadcast)

    def traffic(
        self, sums: RoundSums, sizes: torch.Tensor | None, n_clients: int, shared: Params, round_: int, dim: int
    ) -> dict[str, float]:
        """Bytes uploaded and downloaded this round by the `n_clients` chosen (`sizes`: each similarity
        upload's bytes, for methods that send them), and what embedding sharing would cost."""
        out = {
            "comm/embedding_bytes": float(embedding_bytes(sums.n_items, dim)),
            "comm/uploaders": float(len(sums.senders)),
        }
        return out | shared_traffic(list(shared.values()), len(sums.senders), n_clients)


def method_module(cfg: DictConfig) -> ModuleType:
    """The module of `ablation.method` in src/methods/: `build(cfg, device)`, `METHOD` (the class it builds), and
    optionally `validate(cfg)` and `NOT_FEDERATED` (why the Flower app refuses the method)."""
    return importlib.import_module(f"src.methods.{cfg.ablation.method}")


def method_class(cfg: DictConfig) -> type[Method]:
    """The class `ablation.method` builds, whose traits (`uploads_similarity`, `central`) the config checks read
    before any method is built."""
    return method_module(cfg).METHOD


def not_federated(cfg: DictConfig) -> str | None:
    """Why the Flower app refuses the configured method (its module's `NOT_FEDERATED`), or None: it deploys."""
    return getattr(method_module(cfg), "NOT_FEDERATED", None)


def build_method(cfg: DictConfig, device: torch.device) -> Method:
    """The method of `ablation.method` (a module of src/methods/ with `build(cfg, device)`), built once per run
    (block sizes for `device`)."""
    return method_module(cfg).build(cfg, device)
