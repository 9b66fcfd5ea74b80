"""AlignFedRec (Tu et al. 2026; METHOD.md section 3): item tables stay on the clients; each client
sends its thresholded item-item similarity; the server averages them into S_g, finds communities of
S_g, and broadcasts both; clients add ICA (Eq. 3-4) and/or GSA (Eq. 10) to their local loss.
`ablation=full` uses both terms, `no_ica` GSA only, `no_gsa` ICA only."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from src.alignment import native_align, native_sums
from src.alignment.broadcast import Broadcast
from src.alignment.losses import AlignmentLoss
from src.alignment.release import ReleaseSpec, release_blocks
from src.clients.cohort import DenseLoss
from src.clients.model import Params
from src.comm.codec import Encoding, embedding_bytes, labels_bytes, quantise, sparse_bytes
from src.comm.privacy import NoiseStreams, epsilon_spent, laplace_scale
from src.config import schema
from src.methods.base import Method, Release, RoundSums, ServerRound
from src.runtime import native
from src.runtime.device import block_elements
from src.server.global_similarity import communities

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlignFedRec(Method):
    """Similarity sharing with the alignment loss `loss`, uploads made by `spec`, communities by `community`."""

    name: str
    loss: AlignmentLoss
    spec: ReleaseSpec
    encoding: Encoding
    community: str
    resolution: float
    eps_round: float | None
    # this project's variants (not the paper's; docs/findings.md "Server-graph variants"): the community graph's
    # own threshold or k nearest neighbours, and S_g averaged over the uploads that hold each pair
    graph_sigma: float | None = None
    graph_knn: int | None = None
    support_mean: bool = False
    uploads_similarity = True
    tables = ("personal", "personal")  # neither leaves the client: only similarities are uploaded

    def empty_broadcast(self) -> Broadcast:
        """Nothing yet, thresholded at the uploads' sigma (the GSA mask's global part reads it)."""
        return Broadcast.empty(self.spec.sigma)

    def graph_rule(self) -> tuple[float, int | None]:
        """(sigma, k) of the server's community graph: S_g >= sigma, or each item's k nearest when k is set."""
        return (self.spec.sigma if self.graph_sigma is None else self.graph_sigma), self.graph_knn

    def dense_loss(self, broadcast: Broadcast) -> DenseLoss | None:
        """ICA/GSA against the last broadcast, once there is one the enabled terms need."""
        if not self.loss.active(broadcast):
            return None
        return partial(self.loss.value_and_grad, b=broadcast)

    def release(
        self, params: Params, users: torch.Tensor, uploaded: torch.Tensor, noise: NoiseStreams, entries: bool
    ) -> Release:
        """The uploading clients' similarity blocks (made lazily, in order; each client's noise from its own stream)."""
        mask = uploaded.to(params["items"].device)
        blocks = None
        if bool(uploaded.any()):
            gens = noise.for_clients(users[uploaded]) if self.spec.noise > 0 else None
            blocks = release_blocks(params["items"][mask], self.spec, gens, entries, held=self.support_mean)
        return Release(users[uploaded], {}, blocks)

    def round_sums(
        self, n_items: int, device: torch.device, entries: bool = False, start: Params | None = None
    ) -> RoundSums:
        """The server's empty sums; with `support_mean` they also count each pair's uploads."""
        return RoundSums(n_items, device, True, entries, support=self.holder_counts())

    def holder_counts(self) -> bool:
        """S_g averaged over each pair's holders (`ablation.aggregate=support_mean`) needs their counts."""
        return self.support_mean

    def server_round(
        self, sums: RoundSums, shared: Params, broadcast: Broadcast, seed: int, n_clients: int
    ) -> ServerRound:
        """S_g = mean upload, its communities by modularity, the broadcast as encoded (and its size)."""
        global_sim = self.aggregate(sums)
        if global_sim is None:  # nobody reported: the clients keep the last broadcast
            return ServerRound(shared, broadcast)
        tic = time.perf_counter()
        sigma, knn = self.graph_rule()
        comms, stats = communities(global_sim, sigma, self.community, self.resolution, seed, broadcast.labels, knn)
        stats["time/community"] = time.perf_counter() - tic
        sent = quantise(global_sim, 0.0, 1.0, self.encoding.bits).cpu()
        stats.update(self.download_stats(sent, len(comms.sizes), n_clients))
        return ServerRound(shared, Broadcast(torch.as_tensor(comms.labels), sent, self.spec.sigma), stats, global_sim)

    def aggregate(self, sums: RoundSums) -> torch.Tensor | None:
        """S_g [m, m]: the mean of the round's uploads (the paper's), or their support mean; None if none came."""
        return sums.sims.support_mean() if self.support_mean else sums.sims.mean()

    def download_stats(self, sent: torch.Tensor, n_labels: int | None, n_clients: int) -> dict[str, float]:
        """The broadcast's size per client and over the cohort: S_g's upper-triangle nonzeros, encoded, and the
        community labels (`n_labels` communities; None: no labels are sent)."""
        m = sent.shape[0]
        nnz = int(torch.count_nonzero(torch.triu(sent, diagonal=1)))
        down = sparse_bytes(nnz, m, self.encoding.format, self.encoding.bits)
        down = float(down + (0 if n_labels is None else labels_bytes(m, n_labels)))
        return {"comm/download_bytes_mean": down, "comm/download_bytes_total": down * n_clients}

    def traffic(
        self, sums: RoundSums, sizes: torch.Tensor | None, n_clients: int, shared: Params, round_: int, dim: int
    ) -> dict[str, float]:
        """Similarity uploads as encoded (`sizes` [senders]), what embedding sharing would have cost, and ε."""
        m = sums.n_items
        nnz = sums.sender_nnz()
        sizes = torch.zeros(0, dtype=torch.float64) if sizes is None else sizes
        out = {
            "comm/embedding_bytes": float(embedding_bytes(m, dim)),
            "comm/uploaders": float(len(sums.senders)),
            "comm/upload_nnz_mean": float(nnz.double().mean()) if len(nnz) else 0.0,
            "comm/upload_bytes_mean": float(sizes.mean()) if len(sizes) else 0.0,
            "comm/upload_bytes_total": float(sizes.sum()),
        }
        releases = sum(self.uploads_in(r) for r in range(1, round_ + 1))  # a round without uploads spends no ε
        return out | epsilon_spent(self.eps_round, releases, m)


def native_kernels(device: torch.device) -> bool:
    """Whether a `compute=native` run uses the C kernels: on a CPU with AVX-512 or AVX2 (where they were measured)
    when they build here, else the torch path (`compute=fused`), said in the log. On another device: never."""
    if device.type != "cpu" or not (native.usable(native_sums.SOURCE, native_align.SOURCE) and native.fast_cpu()):
        return False
    try:
        native_sums.kernel(), native_align.kernel()
    except (RuntimeError, OSError) as err:
        log.warning("compute=native: the C kernels did not build, the torch path runs instead (%s)", err)
        return False
    return True


@dataclass(kw_only=True)
class AlignFedRecKeys(schema.Ablation):
    """The method's hyperparameters (conf/ablation/full.yaml; METHOD.md sections 2-3) and this project's server-graph
    variants. Every similarity-sharing method has them (fed_itemknn uses the release's: sigma, centre, aggregate)."""

    alpha: float = schema.key(schema.NON_NEGATIVE)
    beta: float = schema.key(schema.NON_NEGATIVE)
    tau: float = schema.key(schema.POSITIVE)
    tau0: float = schema.key(schema.POSITIVE)
    # sigma thresholds cosines: entries below it are not uploaded, uploads are quantised over [sigma, 1], and the
    # server graph keeps S_g >= sigma; 0 or less would upload (nearly) every pair, 1 none (docs/configuration.md)
    sigma: float = schema.key(schema.number(lambda x: 0 < x < 1, "in (0, 1), a cosine threshold (the paper's 0.5)"))
    centre: bool = schema.key(schema.BOOLEAN)
    gsa_mask: str = schema.key(schema.one_of("local", "global", "union"))
    gsa_reduction: str = schema.key(schema.one_of("sum", "mean"))
    community: str = schema.key(schema.one_of("igraph", "leidenalg", "leidenalg_rb"))
    resolution: float = schema.key(schema.POSITIVE)
    # added after runs were stored: every earlier run had the paper's threshold graph and mean
    graph: str = schema.key(schema.one_of("threshold", "knn"), added="threshold")
    graph_sigma: Any = schema.key(
        schema.number(lambda x: 0 < x < 1, "in (0, 1), a cosine threshold", nullable=True), added=None
    )
    graph_k: int = schema.key(schema.integer(1), added=10)
    aggregate: str = schema.key(schema.one_of("mean", "support_mean"), added="mean")
    gsa_on_graph: bool = schema.key(schema.BOOLEAN, added=False)


METHOD = AlignFedRec
KEYS = AlignFedRecKeys


def validate(cfg: DictConfig) -> None:
    """`model.fast_gsa=pairs` has no union mask (its pairs are the global mask's); `ablation.gsa_on_graph` replaces the
    global part of GSA's mask, so it needs the fast rows form of GSA with a global mask."""
    a, m = cfg.ablation, cfg.model
    if a.gsa and m.alignment == "fast" and m.fast_gsa == "pairs" and a.gsa_mask == "union":
        schema.refuse(
            "ablation.gsa_mask",
            "union",
            "local or global with model.fast_gsa=pairs (its pairs are the global mask's, so union would run as global)",
        )
    if not (a.gsa_on_graph and a.gsa):
        return
    if not (m.alignment == "fast" and m.fast_gsa == "rows" and a.gsa_mask in ("global", "union")):
        schema.refuse(
            "ablation.gsa_on_graph",
            True,
            "model.alignment=fast, model.fast_gsa=rows and ablation.gsa_mask=global or union (it replaces the global "
            f"part of GSA's mask; got alignment={m.alignment}, fast_gsa={m.fast_gsa}, gsa_mask={a.gsa_mask})",
        )


def build(cfg: DictConfig, device: torch.device) -> AlignFedRec:
    """AlignFedRec with the run's keys, model, encoding and privacy values (blocks sized for `device`)."""
    a, m = cfg.ablation, cfg.model
    p = cfg.privacy
    # compiled kernels are measured on the CPU only; on another device they stay eager (docs/performance.md)
    compiled = bool(OmegaConf.select(cfg, "compute.compile", default=False)) and device.type == "cpu"
    kernel = str(cfg.compute.kernel)  # native | fused | reference (conf/compute/)
    use_native = kernel == "native" and native_kernels(device)
    knn = int(a.graph_k) if a.graph == "knn" else None
    graph_sigma = float(a.sigma if a.graph_sigma is None else a.graph_sigma)
    on_graph = bool(a.gsa_on_graph)
    noise, eps_round = laplace_scale(
        None if p.epsilon is None else float(p.epsilon),
        None if p.scale is None else float(p.scale),
        float(p.sensitivity),
    )
    encoding = Encoding.from_cfg(cfg.comm)
    loss = AlignmentLoss(
        alpha=float(a.alpha),
        beta=float(a.beta),
        tau=float(a.tau),
        tau0=float(a.tau0),
        sigma=float(a.sigma),
        centre=bool(a.centre),
        mask=str(a.gsa_mask),
        reduction=str(a.gsa_reduction),
        mode=str(m.alignment),
        chunk=int(m.align_chunk),
        use_ica=bool(a.ica),
        use_gsa=bool(a.gsa),
        fast_anchors=int(m.fast_anchors),
        block=block_elements(cfg, "model.align_block", device),
        fast_gsa=str(m.fast_gsa),
        fast_block=None if m.get("fast_block") is None else block_elements(cfg, "model.fast_block", device),
        fast_kernel="reference" if kernel == "reference" else "fused",
        compile=compiled,
        native_threads=torch.get_num_threads() if use_native else 0,
        gsa_graph=(graph_sigma, knn) if on_graph else None,
    )
    spec = ReleaseSpec(
        float(a.sigma),
        bool(a.centre),
        block_elements(cfg, "server.sim_block", device),
        noise=noise,
        topk=encoding.topk,
        bits=encoding.bits,
        compile=compiled,
        native=use_native,
        threads=torch.get_num_threads(),
        clip=None if p.clip is None else float(p.clip),
    )
    return AlignFedRec(
        str(a.name),
        loss,
        spec,
        encoding,
        str(a.community),
        float(a.resolution),
        eps_round,
        graph_sigma,
        knn,
        a.aggregate == "support_mean",
    )
