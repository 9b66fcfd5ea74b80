"""`python -m src.gpucheck [--device cuda] [--datasets ml-100k,ml-1m,filmtrust,lastfm-2k] [--clients 48]`

Every path of a round on the compute device against the CPU, per dataset, before a GPU's minutes
are spent on a campaign (`make gpu-check`). For each dataset and path (PFedRec, AlignFedRec with
the fast and with the exact alignment: local training, the server's mean and similarity
aggregation, communities, the broadcast, evaluation) it runs two rounds on the first `--clients`
clients of the real split (an eighth of them for the exact path) twice, on the device (cohorts
sized from its free memory) and on the
CPU (cohorts of 128), from the same seed, and compares the client tables, the server state, S_g
and the losses (relative to their largest magnitude, within `--rtol`, default 1e-4), the
community labels (adjusted Rand index) and the metrics. Then, unless `--no-full`, one full-size
round of each fast path on the device: seconds per phase and peak GPU memory.

Exit status 1 when any comparison fails. `--device cpu --datasets synthetic --no-full` runs in
`make test`, so the check itself cannot break unseen.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from src.cli.config import load_config
from src.data.dataset import load
from src.rounds.simulator import FederatedModule
from src.runtime.checks import check_output_file
from src.runtime.errors import OneLineParser
from src.runtime.results import publish_report
from src.server.communities import adjusted_rand_index

PATHS = {
    "pfedrec": ["ablation=backbone"],
    "fast": ["ablation=full", "model.alignment=fast"],
    "exact": ["ablation=full", "model.alignment=exact"],
    "fed_itemknn": ["ablation=fed_itemknn"],  # sparse item-kNN scoring on the device
}
DATASETS = ("ml-100k", "ml-1m", "filmtrust", "lastfm-2k")


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(|b|, 1e-12): a difference relative to the tensor's own scale."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) if b.numel() else 0.0


def build(overrides: list[str], device: str, chunk: str) -> FederatedModule:
    """A federated module for `overrides` on `device` with cohorts of `chunk` (an int or auto)."""
    cfg = load_config([*overrides, f"device={device}", f"fl.chunk_size={chunk}"])
    torch.manual_seed(int(cfg.seed))
    return FederatedModule(cfg, load(cfg))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(overrides: list[str], device: str, rounds: int) -> dict[str, Any]:
    """Run `rounds` rounds on the device and on the CPU; every difference that matters, and the device's seconds."""
    dev = build(overrides, device, "auto")
    cpu = build(overrides, "cpu", "128")
    phases: dict[str, float] = {}
    rows_dev, rows_cpu = [], []
    # the two modules step in lockstep, one round at a time between syncs (the timing and the comparison need it;
    # the Lightning Trainer would run each to the end)
    for _ in range(rounds):
        sync(dev.compute_device)
        rows_dev.append(dev.run_round())
        sync(dev.compute_device)
        rows_cpu.append(cpu.run_round())
        dev.history.append(rows_dev[-1])
        cpu.history.append(rows_cpu[-1])
    for key, value in rows_dev[-1].items():
        if key.startswith("time/"):
            phases[key[5:]] = value
    diffs = {f"state/{k}": rel_diff(dev.state[k], cpu.state[k]) for k in cpu.state}
    diffs |= {f"server/{k}": rel_diff(dev.server[k], cpu.server[k]) for k in cpu.server}
    if cpu.broadcast.global_sim is not None:
        diffs["S_g"] = rel_diff(dev.broadcast.global_sim, cpu.broadcast.global_sim)
    for key in rows_cpu[-1]:
        if key.startswith("loss/"):
            diffs[key] = abs(rows_dev[-1][key] - rows_cpu[-1][key]) / max(abs(rows_cpu[-1][key]), 1e-12)
    out: dict[str, Any] = {
        "diffs": diffs,
        "seconds": phases,
        "chunk_size_device": dev.chunk_size,
        "metrics_abs_diff": max(
            (abs(rows_dev[-1][k] - rows_cpu[-1][k]) for k in rows_cpu[-1] if k.startswith(("val/", "test/"))),
            default=0.0,
        ),
    }
    if cpu.broadcast.labels is not None:
        out["community_ari"] = adjusted_rand_index(np.asarray(dev.broadcast.labels), np.asarray(cpu.broadcast.labels))
    return out


def full_round(overrides: list[str], device: str) -> dict[str, Any]:
    """One warm-up and one timed full-size round on the device: seconds per phase, peak GPU memory."""
    module = build(overrides, device, "auto")
    dev = module.compute_device
    module.history.append(module.run_round())
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    sync(dev)
    tic = time.perf_counter()
    row = module.run_round()
    sync(dev)
    return {
        "round_s": time.perf_counter() - tic,
        "seconds": {k[5:]: v for k, v in row.items() if k.startswith("time/")},
        "peak_gpu_mib": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
        "chunk_size": module.chunk_size,
        "clients": module.data.n_users,
        "items": module.data.n_items,
    }


def check(datasets: list[str], device: str, clients: int, rtol: float, full: bool, extra: list[str]) -> dict[str, Any]:
    """The report: per dataset and path, the comparison and (with `full`) the full-size round."""
    report: dict[str, Any] = {
        "device": device,
        "rtol": rtol,
        "clients": clients,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "results": [],
        "ok": True,
    }
    for dataset in datasets:
        for path, path_overrides in PATHS.items():
            overrides = [f"dataset={dataset}", "protocol=paper", "seed=0", *path_overrides, *extra]
            tic = time.perf_counter()
            entry: dict[str, Any] = {"dataset": dataset, "path": path}
            subset = clients if path != "exact" else max(4, clients // 8)  # exact is O(m^2) per step on the CPU side
            entry |= compare([*overrides, f"data.max_users={subset}"], device, rounds=2)
            worst = max(entry["diffs"].values(), default=0.0)
            entry["worst_rel_diff"] = worst
            entry["ok"] = worst <= rtol and entry.get("community_ari", 1.0) > 0.99
            if full and path != "exact":
                entry["full"] = full_round(overrides, device)
            entry["check_s"] = time.perf_counter() - tic
            report["ok"] &= entry["ok"]
            report["results"].append(entry)
            print(line(entry), flush=True)
    return report


def line(entry: dict[str, Any]) -> str:
    """One printed line per dataset and path."""
    seconds = " ".join(f"{k} {v:.3f}" for k, v in entry["seconds"].items())
    text = (
        f"{'ok  ' if entry['ok'] else 'FAIL'} {entry['dataset']:<10} {entry['path']:<8} worst rel diff "
        f"{entry['worst_rel_diff']:.1e}, community ARI {entry.get('community_ari', float('nan')):.3f}, metrics "
        f"|diff| {entry['metrics_abs_diff']:.4f}; subset round s: {seconds}"
    )
    if "full" in entry:
        f = entry["full"]
        peak = "-" if f["peak_gpu_mib"] is None else f"{f['peak_gpu_mib']:.0f} MiB"
        text += (
            f"\n     full round ({f['clients']} x {f['items']}, chunk {f['chunk_size']}): {f['round_s']:.2f} s ("
            + " ".join(f"{k} {v:.2f}" for k, v in f["seconds"].items())
            + f"), peak GPU {peak}"
        )
    return text


def parser() -> OneLineParser:
    """The command line of `python -m src.gpucheck` (whose docstring lists these options for `--help`)."""
    parser = OneLineParser(prog="python -m src.gpucheck", description=__doc__.split("\n\n")[1])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--clients", type=int, default=48, help="clients of the subset compared with the CPU")
    parser.add_argument("--rtol", type=float, default=1e-4)
    parser.add_argument("--no-full", action="store_true", help="skip the full-size timing rounds")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run (e.g. dataset.n_users=30)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Check, print a line per dataset and path, write the report; 0 when every path agrees."""
    ns = parser().parse_args(argv)
    load_config([f"device={ns.device}"])  # device=cuda without a GPU is refused here, before any data is read
    check_output_file("--out", ns.out)
    report = check(ns.datasets.split(","), ns.device, ns.clients, ns.rtol, not ns.no_full, ns.overrides)
    publish_report(ns.out, report, "gpu-check: " + ("all paths agree" if report["ok"] else "SOME PATHS DIFFER"))
    return 0 if report["ok"] else 1
