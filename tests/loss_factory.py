"""The AlignmentLoss the alignment tests build (`test_losses.py`, `test_fast_grad.py`): one factory, the tests'
constants, each test naming only what it varies."""

from __future__ import annotations

from src.alignment.losses import AlignmentLoss

TAU, TAU0, ALPHA, BETA = 0.3, 0.5, 0.7, 5.0


def make_loss(
    mode: str = "exact",
    mask: str = "local",
    reduction: str = "mean",
    use_ica: bool = True,
    use_gsa: bool = True,
    chunk: int = 2,
    sigma: float = 0.45,
    centre: bool = True,
    fast_anchors: int = 64,
    fast_gsa: str = "rows",
    fast_block: int | None = None,
    fast_kernel: str = "fused",
    gsa_graph: tuple[float, int | None] | None = None,
    block: int = 4_194_304,
) -> AlignmentLoss:
    return AlignmentLoss(
        alpha=ALPHA,
        beta=BETA,
        tau=TAU,
        tau0=TAU0,
        sigma=sigma,
        centre=centre,
        mask=mask,
        reduction=reduction,
        mode=mode,
        chunk=chunk,
        use_ica=use_ica,
        use_gsa=use_gsa,
        fast_anchors=fast_anchors,
        fast_gsa=fast_gsa,
        fast_block=fast_block,
        fast_kernel=fast_kernel,
        gsa_graph=gsa_graph,
        block=block,
    )
