"""Server-side community detection on the global similarity graph (METHOD.md section 3, step 2).

Edges are the item pairs with S_g >= sigma, weighted by S_g (modularity needs non-negative
weights, so sigma must be >= 0 for a non-empty graph of positive weights); communities maximise
weighted modularity with Leiden (igraph's `community_leiden` with the modularity objective, or
leidenalg's ModularityVertexPartition / RBConfigurationVertexPartition), seeded. The reported
modularity uses `resolution`; `leidenalg` (ModularityVertexPartition) optimises resolution 1.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from src.alignment.graph import graph_pairs

if TYPE_CHECKING:
    import igraph as ig

METHODS = ("igraph", "leidenalg", "leidenalg_rb")


@dataclass
class Communities:
    """Item labels 0..K-1 and the facts logged each round."""

    labels: np.ndarray
    modularity: float
    edges: int

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels)


def weighted_graph(sim: torch.Tensor, sigma: float, knn: int | None = None) -> ig.Graph:
    """The server graph (`graph_pairs`) for igraph, weighted by sim."""
    # imported here: igraph (and the matplotlib it loads) costs ~2 s of start-up, which every process that
    # never builds a graph (a Flower ClientApp, each round) would pay
    import igraph as ig

    src, dst = graph_pairs(sim, sigma, knn)
    graph = ig.Graph(n=sim.shape[0], edges=list(zip(src.tolist(), dst.tolist())))
    graph.es["weight"] = sim[src, dst].double().tolist()
    return graph


def detect(
    sim: torch.Tensor, sigma: float, method: str, resolution: float, seed: int, knn: int | None = None
) -> Communities:
    """Maximise modularity on the thresholded graph (or, with `knn`, the k-nearest-neighbour graph);
    isolated items become singleton communities."""
    import igraph as ig
    import leidenalg

    graph = weighted_graph(sim, sigma, knn)
    weights = graph.es["weight"] if graph.ecount() else None
    if method == "igraph":
        ig.set_random_number_generator(random.Random(seed))
        part = graph.community_leiden(
            objective_function="modularity", weights=weights, resolution=resolution, n_iterations=-1
        )
        membership = part.membership
    elif method == "leidenalg":
        membership = leidenalg.find_partition(
            graph, leidenalg.ModularityVertexPartition, weights=weights, seed=seed
        ).membership
    elif method == "leidenalg_rb":
        membership = leidenalg.find_partition(
            graph, leidenalg.RBConfigurationVertexPartition, weights=weights, resolution_parameter=resolution, seed=seed
        ).membership
    else:
        raise ValueError(f"ablation.community={method!r}; expected one of {METHODS}")
    labels = relabel(np.asarray(membership))
    q = graph.modularity(labels.tolist(), weights=weights, resolution=resolution) if graph.ecount() else 0.0
    return Communities(labels=labels, modularity=float(q), edges=graph.ecount())


def relabel(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 0..K-1 by order of first appearance (a canonical form)."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    return order[inverse].astype(np.int64)


def _pairs(counts: np.ndarray) -> float:
    """Number of unordered pairs within each count, summed."""
    counts = counts.astype(np.float64)
    return float((counts * (counts - 1) / 2).sum())


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings (1 = identical partitions, ~0 = chance agreement)."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), dtype=np.int64)
    np.add.at(table, (ai, bi), 1)
    index, rows, cols = _pairs(table), _pairs(table.sum(1)), _pairs(table.sum(0))
    total = len(a) * (len(a) - 1) / 2
    expected = rows * cols / total if total else 0.0
    maximum = (rows + cols) / 2
    if maximum == expected:
        return 1.0
    return float((index - expected) / (maximum - expected))
