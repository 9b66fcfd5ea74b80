"""Cohort sizes that follow the free memory of the compute device (`fl.chunk_size=auto`).

Client states live on the CPU (`FederatedModule.state`) and move to the compute device one cohort
(chunk) at a time; the cohort size bounds the device memory a round needs. With `auto` it is the
largest size whose estimated working set fits in `fl.memory_fraction` of the free memory.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from src.methods.base import build_method
from src.runtime.device import proc_kib


def free_bytes(device: torch.device) -> int:
    """Free memory of `device`: CUDA's free global memory, or MemAvailable of /proc/meminfo on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    available = proc_kib("/proc/meminfo", "MemAvailable")
    return 8 * 2**30 if available is None else available * 1024


def bytes_per_client(n_items: int, dim: int, alignment: str | None, fast_anchors: int, batch_size: int) -> int:
    """Estimated working set of one client in a training cohort (fp32).

    The item table with its gradient and two Adam moments (4 m d), the batch activations, and for
    AlignFedRec the alignment intermediates: fast mode keeps a few [anchors x m] tensors, exact mode
    is blocked separately (`model.align_block`) so only the normalised table and its gradient count.
    """
    per = 4 * (4 * n_items * dim + 8 * batch_size * dim)
    if alignment == "fast":
        per += 4 * (8 * fast_anchors * n_items + 3 * n_items * dim)
    elif alignment == "exact":
        per += 4 * 3 * n_items * dim
    return per


def auto_chunk_size(n_clients: int, per_client: int, free: int, fraction: float, cap: int | None = None) -> int:
    """The largest cohort (at least 1, at most every client and `cap`) whose working set fits fraction x free.

    `cap` (`fl.max_auto_chunk`) bounds what a large device would otherwise take in one cohort (all 6,040
    ML-1M clients on a 141 GB GPU): a cohort runs as many steps as its longest client, so one huge cohort
    pads short clients to the longest one of the whole round, and its stacked tensors grow past what the
    estimate counts (the batch index, the round's samples).
    """
    size = min(n_clients, int(fraction * free) // max(per_client, 1))
    return max(1, size if cap is None else min(size, int(cap)))


def resolve_chunk_size(cfg: DictConfig, n_items: int, n_clients: int, device: torch.device) -> int | None:
    """`fl.chunk_size` (an int, or null = all), or with `auto` the largest cohort of the `n_clients`
    a process holds that fits `fl.memory_fraction` of the free memory of `device` (src/rounds/memory.py).

    The simulator (all clients) and a Flower node (its own clients) both size their cohorts here.
    """
    size = cfg.fl.chunk_size
    if size != "auto":
        return size
    m = cfg.model
    method = build_method(cfg, device)
    aligned = method.uploads_similarity and method.loss.has_terms
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
