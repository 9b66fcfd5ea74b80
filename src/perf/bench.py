"""`python -m src.bench dataset=<name> ablation=<name> fl.rounds=<R> [overrides]`: where a round's time goes.

Builds the data and a `FederatedModule` as `src.run` does (no Lightning Trainer, no checkpoints,
no run folder), runs two warm-up rounds that are not counted (the second is the first that aligns, and
compiles what `compute.compile` compiles), then R rounds, and reports:

- seconds per round by phase (the `time/*` values `run_round` returns: sample, train, aggregate (the uploads
  made and summed, chunk by chunk), server (S_g and the broadcast, once a round),
  community, eval; a phase the method does not have counts 0) and the whole round, mean over R;
- client-steps per second: local steps of all chosen clients per round / train seconds;
- peak resident memory of the process (MiB), peak GPU memory allocated (MiB, null without CUDA),
  the device (GPU name, or CPU model and torch threads);
- host-device traffic per round: the tensors handed to the device and the values read back (each
  read a sync on a GPU) through `src/runtime/device.py`, mean over R; counted on the CPU too, where they cost
  nothing, so a CPU bench shows what a GPU round would do (a few per chunk, none per local step);
- a roofline of the train and aggregate phases (`roofline`): FLOPs and bytes of their dominant products
  per round from the shapes, the rates achieved, and this machine's ceilings measured in the same run
  (the same product class timed alone, the fp32 multiply-add peak from registers, and a large copy);
- with `bench.baseline` (overrides, e.g. `["model.fast_block=null"]`), the same figures for that
  implementation, benched first in a process of its own, and the ratios baseline / this;
- the stacked cohort against the per-client reference loop (`src/clients/reference.py`) doing the same
  work: `bench.reference_clients` random clients, one set of round samples and batch layout,
  trained once stacked (`train_cohort`, chunked as a round chunks them) and once client by client
  (`train_client`, nn.Module + torch.optim), from the same parameters, in this process. Reported:
  seconds per client each way and the speed-up, the client-steps each side ran (and the stacked
  side's padded slots: a chunk runs as many steps as its longest client, short ones masked), the
  mean BCE each way and the largest parameter difference after training. For AlignFedRec the
  stacked side runs the configured alignment (`model.alignment=exact|fast`) and the reference
  adds the exact loss written plainly per client (`ExactAlignment`): the speed-up is then that of
  the configured path over a straightforward per-client implementation of the method, and the
  parameter difference is only expected to be small when the stacked side is exact.

Prints a table and writes the same figures as JSON to `bench.out` (atomically).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from hydra.errors import HydraException
from omegaconf import DictConfig

from src.alignment.losses import EXACT_FUSED_MAX
from src.cli.config import load_config, validate
from src.clients.cohort import batch_layout, chunks_by_steps, local_steps, train_cohort
from src.clients.reference import ExactAlignment, client_batches, make_client, train_client
from src.data.dataset import load
from src.rounds.simulator import FederatedModule
from src.runtime import native
from src.runtime.checks import ConfigError, check_output_file
from src.runtime.device import COUNTERS, device_info, peak_rss_mib
from src.runtime.errors import UserError, describe
from src.runtime.results import publish_report, select_key

PHASES = ("sample", "train", "aggregate", "server", "community", "eval")
WARMUP = 2  # round 2 is the first with a broadcast to align to


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def product_rate(batch: int, rows: int, inner: int, cols: int, device: torch.device, repeats: int = 3) -> float:
    """GFLOP/s of this machine on one product class: [batch, rows, inner] @ [batch, inner, cols] in fp32 (best of
    `repeats`), the ceiling the train and aggregate phases are held against."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(batch, rows, inner, generator=gen).to(device)
    b = torch.randn(batch, inner, cols, generator=gen).to(device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up
        sync(device)
        tic = time.perf_counter()
        torch.bmm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - tic)
    return 2.0 * batch * rows * inner * cols / best / 1e9


def fma_rate(seconds: float = 0.15, repeats: int = 3) -> float | None:
    """GFLOP/s of this machine's fp32 multiply-adds from registers on torch's threads (`src/perf/fma_peak.c`, best of
    `repeats` runs of about `seconds`): the CPU's own peak, which no product can pass. None without a C compiler."""
    source = Path(__file__).with_name("fma_peak.c")
    if not native.usable(source):
        return None
    lib = native.library(source)
    fn = lib.fma_peak
    fn.restype, fn.argtypes = native.F32, [native.I64, native.INT]
    lanes = lib.fma_width()  # floats per register: the chains are that wide
    threads = torch.get_num_threads()
    fn(10_000, threads)
    iters, best = 1_000_000, float("inf")
    tic = time.perf_counter()
    fn(iters, threads)
    iters = max(1, int(iters * seconds / max(time.perf_counter() - tic, 1e-6)))
    for _ in range(repeats):
        tic = time.perf_counter()
        fn(iters, threads)
        best = min(best, time.perf_counter() - tic)
    return threads * iters * 12 * lanes * 2 / best / 1e9


def copy_rate(device: torch.device, mib: int = 256, repeats: int = 3) -> float:
    """GB/s of a large out-of-cache copy (read + write counted), the memory ceiling."""
    x = torch.empty(mib * 2**18, device=device).fill_(1.0)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(repeats + 1):
        sync(device)
        tic = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - tic)
    return 2 * x.numel() * 4 / best / 1e9


def roofline(cfg: DictConfig, module: FederatedModule, figures: dict[str, Any], rows: list[dict]) -> dict[str, Any]:
    """FLOPs and bytes per round of the train and aggregate phases' dominant products (from the shapes), their
    achieved rates, and this machine's own ceilings measured now: torch's product of the same shape class (the
    rate a phase built on torch's products can reach) and, on the CPU, the multiply-add peak (`fma_rate`: what no
    kernel can pass; the C kernels of `compute=native` are held against it).

    Train (AlignFedRec, fast): per client-step the anchor rows s = e_a e^T and their two gradient products,
    3 x 2 K m d FLOPs (K = model.fast_anchors), operands and result 3 x 4 (K d + m d + K m) bytes; exact mode:
    the same with K = m through the fused kernel (m^2 <= EXACT_FUSED_MAX), else 10 m^2 d FLOPs (the blocked
    ICA and GSA products). Aggregate: every uploader's upper-triangle block products,
    m (m + 1) d FLOPs, reading its table once per row block. BCE, optimiser and elementwise work are not counted
    as FLOPs: a low compute fraction with bytes near the copy rate says the phase is bound by memory traffic.
    """
    m, d, k = module.data.n_items, int(cfg.model.dim), int(cfg.model.fast_anchors)
    device = module.compute_device
    method = module.method
    secs = figures["seconds_per_round"]
    fma = fma_rate() if device.type == "cpu" else None
    out: dict[str, Any] = {"copy_gb_s": copy_rate(device), "fma_peak_gflop_s": fma}
    if not method.uploads_similarity:
        return out | {"note": "no alignment products: the method's rounds are BCE and optimiser steps only"}
    steps = figures["client_steps_per_round"] or 0.0
    uploaders = sum(r.get("comm/uploaders", 0.0) for r in rows) / len(rows)
    rows_per_block = 128
    if not method.loss.has_terms:  # fed_itemknn: uploads similarities, trains BCE only
        train_flops = train_bytes = 0.0
        train_peak = product_rate(1, rows_per_block, d, m, device)
    elif cfg.model.alignment == "fast":
        train_flops = steps * 6.0 * k * m * d
        train_bytes = steps * 3 * 4.0 * (k * d + m * d + k * m)
        sub = max(1, int(cfg.model.fast_block or k * m * 16) // (k * m))
        train_peak = product_rate(sub, k, d, m, device)
    elif cfg.compute.kernel != "reference" and m * m <= EXACT_FUSED_MAX:
        train_flops = steps * 6.0 * m * m * d
        train_bytes = steps * 3 * 4.0 * (2 * m * d + m * m)
        train_peak = product_rate(1, m, d, m, device)
    else:
        train_flops = steps * 10.0 * m * m * d
        train_bytes = steps * 4.0 * (2 * m * d + 3 * m * m)
        train_peak = product_rate(1, rows_per_block, d, m, device)
    agg_flops = uploaders * m * (m + 1.0) * d
    agg_bytes = uploaders * 4.0 * (m * d * -(-m // rows_per_block) + m * m / 2)
    per = max(1, int(cfg.server.sim_block) // (rows_per_block * m))
    agg_peak = product_rate(per, rows_per_block, d, m, device)
    for phase, flops, nbytes, peak in (
        ("train", train_flops, train_bytes, train_peak),
        ("aggregate", agg_flops, agg_bytes, agg_peak),
    ):
        t = secs[phase]
        rate = flops / t / 1e9 if t > 0 else None
        out[phase] = {
            "gflop_per_round": flops / 1e9,
            "gb_per_round": nbytes / 1e9,
            "achieved_gflop_s": rate,
            "achieved_gb_s": nbytes / t / 1e9 if t > 0 else None,
            "peak_gflop_s": peak,
            "compute_fraction": None if rate is None else rate / peak,
            "fma_fraction": None if rate is None or not fma else rate / fma,
        }
    return out


def round_figures(rows: list[dict[str, float]], round_s: list[float]) -> dict[str, Any]:
    """Mean seconds per phase and per round, client-steps per round and per train second."""
    n = len(rows)
    phases = {p: sum(r.get(f"time/{p}", 0.0) for r in rows) / n for p in PHASES}
    phases["round"] = sum(round_s) / n
    steps = [r["steps"] for r in rows if "steps" in r]
    train_s = sum(r.get("time/train", 0.0) for r in rows)
    per_round = sum(steps) / n if len(steps) == n else None
    per_second = sum(steps) / train_s if per_round is not None and train_s > 0 else None
    return {"seconds_per_round": phases, "client_steps_per_round": per_round, "client_steps_per_second": per_second}


def reference_comparison(module: FederatedModule, n_clients: int, generator: torch.Generator) -> dict[str, Any]:
    """Train `n_clients` random clients stacked and one by one on the same batches; time both.

    Both start from the clients' current parameters with the server's shared ones copied in (as a
    round starts), use the configured optimiser and the same samples and layout. Only the training
    calls are timed (`train_cohort` per chunk, `train_client` per client), not the set-up.
    """
    cfg, fl, device = module.cfg, module.cfg.fl, module.compute_device
    epochs, batch_size, n_items = int(fl.local_epochs), int(fl.batch_size), module.data.n_items
    k = min(n_clients, module.data.n_users)
    clients = torch.randperm(module.data.n_users, generator=generator)[:k].sort().values
    samples = module.round_samples()
    steps = local_steps(samples, clients, epochs, batch_size)
    chunks = [
        (rows, batch_layout(samples, rows, epochs, batch_size, int(cfg.seed), module.current_round()))
        for rows in chunks_by_steps(clients, steps, module.chunk_size)
    ]

    def start(rows: torch.Tensor) -> dict[str, torch.Tensor]:
        params = module.pool.params(rows, device)
        for key in module.server:
            params[key].copy_(module.server[key].to(device).expand_as(params[key]))
        return params

    dense = module.method.dense_loss(module.broadcast)
    align, b = (module.method.loss, module.broadcast) if dense is not None else (None, None)
    plain = None
    if align is not None:
        plain = ExactAlignment(
            align.alpha if align.use_ica else 0.0,
            align.beta if align.use_gsa else 0.0,
            align.tau,
            align.tau0,
            align.sigma,
            align.centre,
            align.mask,
            align.reduction,
            None if b.labels is None else b.labels.to(device),
            None if b.global_sim is None else b.global_sim.to(device),
        )
    stacked_s, stacked_steps, stacked_bce, padded = 0.0, 0, 0.0, 0
    reference_s, reference_losses, max_diff = 0.0, [], 0.0
    for rows, layout in chunks:
        init = start(rows)
        trained = {key: v.clone() for key, v in init.items()}
        sync(device)
        tic = time.perf_counter()
        losses = train_cohort(trained, samples, layout, module.local.optim, n_items, module.local.loss, dense)
        sync(device)
        stacked_s += time.perf_counter() - tic
        chunk_steps = int(layout.steps.sum())
        stacked_steps += chunk_steps
        padded += layout.index.shape[0] * layout.index.shape[1]
        stacked_bce += losses.get("bce", 0.0) * chunk_steps
        for row in range(len(rows)):
            client = make_client(cfg.model, n_items, init, row).to(device)
            batches = [(items.to(device), labels.to(device)) for items, labels in client_batches(samples, layout, row)]
            sync(device)
            tic = time.perf_counter()
            row_losses = train_client(client, batches, cfg.optim, n_items, plain)
            sync(device)
            reference_s += time.perf_counter() - tic
            reference_losses += row_losses
            for key, value in client.to_stacked().items():
                max_diff = max(max_diff, float((value - trained[key][row]).abs().max()))
    if align is None:
        note = "same work: the method is BCE only"
    else:
        note = f"with alignment: stacked {align.mode} mode, reference the exact loss written plainly per client"
    return {
        "clients": k,
        "chunks": len(chunks),
        "stacked_client_steps": stacked_steps,
        "reference_client_steps": len(reference_losses),
        "stacked_padded_steps": padded,
        "stacked_s": stacked_s,
        "reference_s": reference_s,
        "stacked_s_per_client": stacked_s / k,
        "reference_s_per_client": reference_s / k,
        "speedup": reference_s / stacked_s if stacked_s > 0 else None,
        "bce_stacked": stacked_bce / max(stacked_steps, 1),
        "bce_reference": sum(reference_losses) / max(len(reference_losses), 1),
        "max_abs_param_diff": max_diff,
        "alignment_included": align is not None,
        "stacked_alignment_mode": None if align is None else align.mode,
        "note": note,
    }


def fmt(value: Any, spec: str = ".4f", unit: str = "") -> str:
    """A number with its unit, or '-' for null."""
    return "-" if value is None else f"{value:{spec}}{unit}"


def table(report: dict[str, Any]) -> str:
    """The human-readable summary of a bench report."""
    cfg, dev = report["config"], report["device"]
    lines = [
        f"bench: {report['dataset']} / {report['ablation']} / {report['protocol']}, optim {cfg['optim']}, "
        f"{report['n_users']} clients x {report['n_items']} items, {report['rounds']} rounds after "
        f"{report['warmup_rounds']} warm-up",
        f"device: {dev['type']}, {dev['name']} (torch threads {dev['torch_threads']}, cpu cores {dev['cpu_count']})",
        "",
        f"{'phase':<12}{'s/round':>10}" + (f"{'baseline':>12}{'speed-up':>10}" if "baseline" in report else ""),
    ]
    for phase, v in report["seconds_per_round"].items():
        line = f"{phase:<12}{v:>10.4f}"
        if "baseline" in report:
            line += f"{report['baseline']['seconds_per_round'][phase]:>12.4f}"
            line += f"{fmt(report['speedup_vs_baseline'][f'{phase}_s'], '.2f', 'x'):>10}"
        lines.append(line)
    if "baseline" in report:
        lines += [
            f"baseline: {' '.join(report['baseline']['overrides'])}; peak resident memory "
            f"{report['baseline']['peak_rss_mib']:.1f} MiB (ratio {report['speedup_vs_baseline']['peak_rss']:.2f})"
        ]
    lines += [
        "",
        f"client-steps per round   {fmt(report['client_steps_per_round'], '.1f')}",
        f"client-steps per second  {fmt(report['client_steps_per_second'], '.1f')}",
        f"peak resident memory     {fmt(report['peak_rss_mib'], '.1f', ' MiB')}",
        f"peak GPU memory          {fmt(report['peak_gpu_mib'], '.1f', ' MiB')}",
        f"host-device per round    {report['host_device_per_round']['transfers']:.1f} transfers, "
        f"{report['host_device_per_round']['syncs']:.1f} syncs (calls through src/runtime/device.py)",
    ]
    roof = report.get("roofline") or {}
    fma = roof.get("fma_peak_gflop_s")
    peak = f", fp32 multiply-add peak {fma:.1f} GFLOP/s" if fma else ""
    lines += ["", f"roofline (copy rate {roof.get('copy_gb_s', 0.0):.1f} GB/s{peak} measured now):"]
    for phase in ("train", "aggregate"):
        r = roof.get(phase)
        if r is None:
            continue
        lines.append(
            f"  {phase:<10} {r['gflop_per_round']:10.1f} GFLOP {r['gb_per_round']:8.2f} GB/round, "
            f"{fmt(r['achieved_gflop_s'], '.1f')} GFLOP/s of {r['peak_gflop_s']:.1f} "
            f"({fmt(r['compute_fraction'], '.0%')}), {fmt(r['achieved_gb_s'], '.2f')} GB/s"
            + (f", {fmt(r.get('fma_fraction'), '.0%')} of the multiply-add peak" if r.get("fma_fraction") else "")
        )
    if "note" in roof:
        lines.append(f"  {roof['note']}")
    ref = report["reference"]
    if ref is None:
        lines += ["", f"stacked vs per-client reference: not run ({report['reference_note']})"]
    else:
        lines += [
            "",
            f"stacked vs per-client reference ({ref['clients']} random clients, same batches; {ref['note']}):",
            f"  stacked (train_cohort)   {ref['stacked_s_per_client'] * 1e3:10.3f} ms/client",
            f"  reference (one by one)   {ref['reference_s_per_client'] * 1e3:10.3f} ms/client",
            f"  speed-up                 {fmt(ref['speedup'], '.1f', 'x')}",
            f"  client-steps             {ref['stacked_client_steps']} stacked "
            f"({ref['stacked_padded_steps']} with padding to each chunk's longest client), "
            f"{ref['reference_client_steps']} reference",
            f"  mean BCE                 {ref['bce_stacked']:.6f} stacked, {ref['bce_reference']:.6f} reference "
            f"(max |param diff| {ref['max_abs_param_diff']:.2e})",
        ]
    return "\n".join(lines)


def bench(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """Run the benchmark described in the module docstring; return the report."""
    validate(cfg)  # bench.reference_clients, bench.out, device (cuda must exist), ... before any data is read
    n_ref = cfg.bench.reference_clients
    torch.manual_seed(int(cfg.seed))
    t0 = time.perf_counter()
    data = load(cfg)
    module = FederatedModule(cfg, data)
    device = module.compute_device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    setup_s = time.perf_counter() - t0
    # rounds are called one at a time between device syncs, not through the Lightning Trainer (src.audit and runs
    # use it): what is timed is the round's own work, with no Trainer hook inside the clock
    for _ in range(WARMUP):  # allocator, kernels, first-call overheads, compiling
        module.run_round()
    rows, round_s = [], []
    traffic = {"transfers": 0, "syncs": 0}
    for _ in range(int(cfg.fl.rounds)):
        sync(device)
        before = COUNTERS.snapshot()
        tic = time.perf_counter()
        rows.append(module.run_round())
        sync(device)
        round_s.append(time.perf_counter() - tic)
        traffic = {k: v + COUNTERS.snapshot()[k] - before[k] for k, v in traffic.items()}
    reference, reference_note = None, None
    if module.method.no_reference is not None:
        reference_note = f"ablation={cfg.ablation.name}: {module.method.no_reference}"
    elif n_ref == 0:
        reference_note = "bench.reference_clients=0"
    else:
        reference = reference_comparison(module, n_ref, torch.Generator().manual_seed(int(cfg.seed) + 7))
    figures = round_figures(rows, round_s)
    return {
        "dataset": cfg.dataset.name,
        "protocol": cfg.protocol.name,
        "ablation": cfg.ablation.name,
        "n_users": data.n_users,
        "n_items": data.n_items,
        "config": {
            "optim": cfg.optim.name,
            "seed": int(cfg.seed),
            "device": str(cfg.device),
            "local_epochs": int(cfg.fl.local_epochs),
            "batch_size": int(cfg.fl.batch_size),
            "chunk_size": module.chunk_size,
            "client_fraction": float(cfg.fl.client_fraction),
            "model_dim": int(cfg.model.dim),
        },
        "overrides": list(overrides),
        "device": device_info(device),
        "torch_version": torch.__version__,
        "rounds": int(cfg.fl.rounds),
        "warmup_rounds": WARMUP,
        "setup_s": setup_s,
        **figures,
        "roofline": roofline(cfg, module, figures, rows),
        "peak_rss_mib": peak_rss_mib(),
        "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "host_device_per_round": {k: v / int(cfg.fl.rounds) for k, v in traffic.items()},
        "reference": reference,
        "reference_note": reference_note,
        "val_hit@10_last": rows[-1].get("val/hit@10"),  # None when eval.ks lacks 10
        "select": select_key(cfg),
        "val_select_last": rows[-1].get(select_key(cfg)),
    }


def baseline_report(cfg: DictConfig, argv: list[str]) -> dict[str, Any]:
    """Bench `argv` + `bench.baseline` in a child process (so its peak memory is its own); its report."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "baseline.json"
        extra = [*cfg.bench.baseline, "bench.baseline=null", "bench.reference_clients=0", f"bench.out={out}"]
        subprocess.run([sys.executable, "-m", "src.bench", *argv, *extra], check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def ratios(baseline: dict[str, Any], report: dict[str, Any]) -> dict[str, float | None]:
    """baseline / this for the seconds of every phase (> 1: this is faster) and the peak resident memory."""
    out: dict[str, float | None] = {}
    for phase, mine in report["seconds_per_round"].items():
        theirs = baseline["seconds_per_round"][phase]
        out[f"{phase}_s"] = theirs / mine if mine > 0 else None
    out["peak_rss"] = baseline["peak_rss_mib"] / report["peak_rss_mib"]
    return out


def main(argv: list[str]) -> dict[str, Any]:
    """Compose the config from `argv` overrides, run the bench (after the baseline's, when set), print the table,
    write `bench.out`."""
    cfg = load_config(argv)
    validate(cfg)
    check_output_file("bench.out", str(cfg.bench.out))
    if cfg.bench.baseline is not None:  # the baseline's config, checked before either bench runs
        try:
            validate(load_config([*argv, *cfg.bench.baseline, "bench.baseline=null"]))
        except (UserError, HydraException) as err:
            raise ConfigError(f"bench.baseline={list(cfg.bench.baseline)}: {describe(err)}") from None
    before = baseline_report(cfg, argv) if cfg.bench.baseline is not None else None
    report = bench(cfg, argv)
    if before is not None:
        report["baseline"] = {**before, "overrides": list(cfg.bench.baseline)}
        report["speedup_vs_baseline"] = ratios(before, report)
    publish_report(cfg.bench.out, report, table(report))
    return report
