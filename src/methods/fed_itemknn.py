"""Federated item-kNN over the shared similarity (this project's method, not the paper's; README
"Does similarity sharing transfer?").

Clients train their own model (BCE only, no alignment term, one random initialisation each) and
upload what AlignFedRec's clients upload: their thresholded item-item similarity. The server
averages the uploads into S_g (the paper's mean over all uploaders) and broadcasts it, without
communities, on the pairs some item keeps among its k largest entries (all a client's kernel
needs). A client scores item i by item-kNN on what it received:

    score(u, i) = sum over j in train(u) of S_k[i, j],

S_k keeping each item's `ablation.k` largest entries of S_g (itself excluded), as the pooled
`itemknn` calibration does with co-occurrence cosine. S_g counts how many clients hold a pair above
sigma, and two items a client trained on as positives end up similar in its table, so S_g carries
co-occurrence; no embedding ever leaves a client. A client evaluates with the broadcast it holds
(the previous round's S_g), as a Flower node does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from src.alignment.broadcast import Broadcast
from src.alignment.graph import graph_mask
from src.clients.model import Params
from src.comm.codec import quantise
from src.config import schema
from src.data.dataset import FedData
from src.evaluation.evaluator import ScoreFn
from src.methods import alignfedrec
from src.methods.alignfedrec import AlignFedRec
from src.methods.base import RoundSums, ServerRound
from src.methods.calibration import ItemKNNScorer, keep_top_k


def neighbour_kernel(global_sim: torch.Tensor, k: int) -> torch.Tensor:
    """S_k [m, m] sparse CSR: row i keeps the k largest positive entries of S_g [m, m] (not S_g[i, i])."""
    return keep_top_k(lambda start, stop: global_sim[start:stop], global_sim.shape[0], k)


def low_rank(global_sim: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-r approximation [m, m] of the symmetric S_g [m, m] (its r eigenpairs of largest magnitude),
    with a zero diagonal: co-occurrence is low rank, per-entry noise is not (post-processing of the release)."""
    values, vectors = torch.linalg.eigh(global_sim.double())
    keep = values.abs().argsort(descending=True)[:rank]
    approx = (vectors[:, keep] * values[keep]) @ vectors[:, keep].T
    return approx.fill_diagonal_(0.0).to(global_sim.dtype)


@dataclass(frozen=True)
class FedItemKNN(AlignFedRec):
    """AlignFedRec's uploads and S_g, no alignment loss, no communities; clients score by item-kNN on S_g."""

    k: int = 50
    upload_round: int | None = None  # one-shot: the clients upload in this round only (None: every round)
    rank: int | None = None  # S_g replaced by its best rank-r approximation at the server (None: as aggregated)

    def uploads_in(self, round_: int) -> bool:
        """Every round, or only `upload_round` (one-shot: a user-level DP budget is spent once)."""
        return self.upload_round is None or round_ == self.upload_round

    def graph_rule(self) -> tuple[float, int]:
        """The broadcast's graph: each item's k largest S_g entries (for the diagnostics; no communities)."""
        return 0.0, self.k

    def client_scorer(self, broadcast: Broadcast, data: FedData, device: torch.device) -> ScoreFn:
        """Item-kNN on the S_g the client holds (all scores equal before the first broadcast)."""
        if broadcast.global_sim is None:
            return lambda rows, items: torch.zeros(len(rows), data.n_items if items is None else items.shape[1])
        train = torch.as_tensor(data.train_matrix())
        return ItemKNNScorer(train, neighbour_kernel(broadcast.global_sim, self.k), device).score

    def server_round(
        self, sums: RoundSums, shared: Params, broadcast: Broadcast, seed: int, n_clients: int
    ) -> ServerRound:
        """S_g = mean upload (or support mean), broadcast as encoded on its k-nearest-neighbour pairs, without
        community labels."""
        global_sim = self.aggregate(sums)
        if global_sim is None:  # nobody reported: the clients keep the last broadcast
            return ServerRound(shared, broadcast)
        if self.rank is not None:
            global_sim = low_rank(global_sim, self.rank)
        quantised = quantise(global_sim, 0.0, 1.0, self.encoding.bits).cpu()
        # only the pairs some item keeps as a neighbour are sent (at most m k): each row's kept entries are among
        # them and every other entry sent in a row is no larger and, when equal, of a higher index than the
        # row's own last kept one, so a client's kernel (the same rule, ties to the lower index) is the one of
        # the whole S_g (`graph_mask`: the kNN graph's pairs, by the same rule)
        sent = torch.where(graph_mask(quantised, 0.0, self.k), quantised, 0.0)
        stats = self.download_stats(sent, None, n_clients)
        return ServerRound(shared, Broadcast(None, sent, self.spec.sigma), stats, global_sim)


@dataclass(kw_only=True)
class FedItemKNNKeys(alignfedrec.AlignFedRecKeys):
    """AlignFedRec's keys (its release's sigma, centre and aggregate are read) with `k` neighbours, the one-shot
    upload round and the rank of the released S_g; no alignment term: clients train alone and score by item-kNN on
    S_g."""

    k: int = schema.key(schema.integer(1))
    # added after runs were stored: every earlier run uploaded every round and released S_g at full rank
    upload_round: Any = schema.key(schema.integer(1, nullable=True), added=None)
    rank: Any = schema.key(schema.integer(1, nullable=True), added=None)

    def check(self) -> None:
        expected = "false for fed_itemknn (clients train without alignment terms and score by item-kNN on S_g)"
        for name in ("ica", "gsa", "central"):
            if getattr(self, name):
                schema.refuse(f"ablation.{name}", True, expected)


METHOD = FedItemKNN
KEYS = FedItemKNNKeys


def validate(cfg: DictConfig) -> None:
    """The upload round is below fl.rounds; AlignFedRec's server-graph rules."""
    upload = cfg.ablation.upload_round
    if upload is not None and upload >= cfg.fl.rounds:
        schema.refuse(
            "ablation.upload_round",
            upload,
            f"null or below fl.rounds={cfg.fl.rounds} (the clients score with the broadcast of that round from the "
            "next round on)",
        )
    alignfedrec.validate(cfg)


def build(cfg: DictConfig, device: torch.device) -> FedItemKNN:
    """AlignFedRec's release, encoding and privacy values (no alignment terms), with `ablation.k` neighbours."""
    base = alignfedrec.build(cfg, device)
    fields = {name: getattr(base, name) for name in base.__dataclass_fields__}
    upload, rank = cfg.ablation.upload_round, cfg.ablation.rank
    return FedItemKNN(
        **fields,
        k=int(cfg.ablation.k),
        upload_round=None if upload is None else int(upload),
        rank=None if rank is None else int(rank),
    )
