"""The fast alignment's value and gradient by a small C kernel (`fast_align.c`; built by `src/runtime/native.py`).

`fast_grad.fast_value_and_grad` in torch makes about thirty passes over [clients x anchors x items] and
[clients x items x d] buffers larger than the cache, around three batched products whose shapes (K = 64 rows
against m items, d = 32) run well below this machine's product rate. The C kernel takes one client at a time:
its normalised table, community sums, anchor rows (ICA's softmax, Eq. 3-4; GSA's masked differences, Eq. 10) and
the gradient through the products and the normalisation, all in cache, in register tiles. Same values and
gradient as the torch form to float rounding (its exp is a polynomial within a few ulps; tests/test_native_align.py).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

from src.runtime import native

SOURCE = Path(__file__).with_name("fast_align.c")
DIM = 32  # the embedding width the kernel is written for (model.dim); other widths use the torch form
GSA_MASKS = {"local": 0, "global": 1, "union": 2}


@cache
def kernel(defines: tuple[str, ...] = ()):
    """The C function `fast_align`, typed (built for this CPU's vector width; `defines` as `native.library`)."""
    fn = native.library(SOURCE, defines).fast_align
    fn.restype = None
    i64, ptr, f32, i32 = native.I64, native.PTR, native.F32, native.INT
    fn.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, f32, f32, f32, f32, f32, i32, i32, i32]
    fn.argtypes += [ptr, ptr, ptr, i32, ptr]
    return fn


def applies(table: torch.Tensor) -> bool:
    """Whether the kernel takes these tables: float32 on the CPU, width `DIM`."""
    return table.dtype == torch.float32 and table.device.type == "cpu" and table.shape[-1] == DIM


def value_and_grad(
    table: torch.Tensor,
    anchors: torch.Tensor,
    anchor_valid: torch.Tensor,
    *,
    labels: torch.Tensor | None,
    sizes: torch.Tensor | None,
    global_sim: torch.Tensor | None,
    alpha: float,
    beta: float,
    tau: float,
    tau0: float,
    sigma: float,
    centre: bool,
    mask: str,
    reduction: str,
    graph: torch.Tensor | None = None,
    threads: int = 1,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """`fast_grad.fast_value_and_grad` (same arguments and results) for tables [C, m, 32] (float32, CPU) on
    `threads` threads."""
    if mask not in GSA_MASKS:
        raise ValueError(f"ablation.gsa_mask={mask!r}; expected local, global or union")
    if not applies(table):
        raise ValueError(
            f"the fast-alignment kernel takes float32 CPU tables [C, m, {DIM}], got {table.dtype} "
            f"{tuple(table.shape)} on {table.device}"
        )
    c, m, _ = table.shape
    k = anchors.shape[1]
    if anchors.numel() and (int(anchors.min()) < 0 or int(anchors.max()) >= m):
        raise ValueError(f"anchors must index the {m} items, got [{int(anchors.min())}, {int(anchors.max())}]")
    if labels is not None and (labels.shape != (m,) or int(labels.min()) < 0 or int(labels.max()) >= len(sizes)):
        raise ValueError(f"labels must give each of the {m} items one of the {len(sizes)} communities")
    table = table.detach().contiguous()
    anchors = anchors.contiguous().long()
    valid = anchor_valid.contiguous().to(torch.uint8)
    labels = None if labels is None else labels.contiguous().long()
    sizes = None if sizes is None else sizes.contiguous().long()
    gsim = None if global_sim is None else global_sim.contiguous().float()
    graph = None if graph is None or gsim is None else graph.contiguous().view(torch.uint8)
    ica = torch.zeros(c, dtype=torch.float32)
    gsa = torch.zeros(c, dtype=torch.float32)
    grad = torch.empty_like(table)

    def ptr(t: torch.Tensor | None) -> int:
        return 0 if t is None else t.data_ptr()

    n_labels = 0 if sizes is None else sizes.shape[0]
    args = (ptr(table), c, k, m, ptr(anchors), ptr(valid), ptr(labels), ptr(sizes), n_labels, ptr(gsim), ptr(graph))
    args += (alpha, beta, tau, tau0, sigma, int(centre), GSA_MASKS[mask], int(reduction == "mean"))
    status = torch.zeros(1, dtype=torch.int32)
    args += (ptr(ica), ptr(gsa), ptr(grad), threads, ptr(status))
    kernel()(*args)
    if status.item():
        raise MemoryError(f"fast_align: a thread could not allocate its buffers ({k} x {m} floats and more)")
    values = {}
    if labels is not None:
        values["ica"] = ica
    if gsim is not None:
        values["gsa"] = gsa
    return values, grad
