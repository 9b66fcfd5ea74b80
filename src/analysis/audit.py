"""`python -m src.audit [overrides]`: what an honest-but-curious server learns from one upload.

Trains `fl.rounds` rounds as `src.run` would (no run folder; a one-shot method up to the round it uploads in),
then, for `audit.clients` random
clients, takes the matrix each uploads (thresholded, with the configured Laplace noise and
quantisation, exactly as the aggregator would decode it) and mounts two attacks with nothing else
but that matrix and the broadcast global matrix S_g:

1. Interaction inference: score every item by its row in the upload (row sum, row degree, and the
   L1 distance of the row from S_g's row) and report the ROC AUC of each score against the client's
   training positives (mean over clients; 0.5 = chance); and a learned attack: a logistic regression on all
   of these scores, trained on half of the attacked clients and applied to the other half (`learned`).
2. Embedding recovery up to rotation: complete the matrix to rank d (known entries = the uploaded
   ones and the unit diagonal, unknown entries held below sigma, alternating projections), factor
   it, align the factor to the client's true normalised table by orthogonal Procrustes and report
   the mean cosine between recovered and true item vectors. The same alignment of a random table of
   the same shape gives the chance level, reported beside it.
3. With user-level DP (`privacy.clip` and noise; src/comm/user_dp.py) the server's noise does not hide an upload from
   the server, which sees it before adding noise (1 and 2 are unchanged); what it protects is the release. A
   worst-case attacker who knows all uploads but whether the target took part tests the noisy sum for the
   target's upload (`release_audit`): its AUC, and the Gaussian mechanism's value beside it.

Prints a table and writes JSON to `audit.out` (atomically), by default into a folder of its own,
`outputs/audit/<dataset>-<ablation>-<protocol>-s<seed>_<time>/audit.json`.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from src.alignment.release import ReleaseSpec, release_blocks
from src.alignment.similarity import normalised
from src.cli.config import ConfigError, load_config, validate
from src.data.dataset import load
from src.methods.base import build_method
from src.rounds.simulator import FederatedModule, fit_rounds
from src.runtime.checks import check_output_file
from src.runtime.loggers import run_name
from src.runtime.results import publish_report, select_key
from src.server.global_similarity import SimilaritySum


def decoded_upload(table: torch.Tensor, spec: ReleaseSpec, generator: torch.Generator) -> torch.Tensor:
    """The m x m matrix the server decodes from one client's upload (symmetric, zero diagonal): the
    client's own release (`src/alignment/release.py`) summed by the server alone, so noise, threshold,
    top-k and quantisation are the ones a run applies."""
    total = SimilaritySum(table.shape[0], table.device)
    for blk in release_blocks(table.double().unsqueeze(0), spec, [generator]):
        total.add_block(blk)
    return total.upper + total.upper.T


def auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """ROC AUC = P(score of a positive > score of a negative), ties counting one half."""
    pos, neg = np.sort(scores[truth]), np.sort(scores[~truth])
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    below = np.searchsorted(neg, pos, side="left")
    equal = np.searchsorted(neg, pos, side="right") - below
    return float((below + 0.5 * equal).sum() / (len(pos) * len(neg)))


def membership_scores(upload: torch.Tensor, global_sim: torch.Tensor | None) -> dict[str, np.ndarray]:
    """Per-item scores the server can compute from the upload (and the broadcast S_g)."""
    up = upload.double()
    out = {"row_sum": up.sum(1).numpy(), "row_degree": (up != 0).sum(1).double().numpy()}
    if global_sim is not None:
        out["distance_from_global"] = (up - global_sim.double()).abs().sum(1).numpy()
    return out


def standardised(features: np.ndarray) -> np.ndarray:
    """Each column of one client's per-item features [m, F] to mean 0 and std 1 (a constant column to 0), so a
    model learnt on other clients reads relative scores, whatever a client's scale."""
    std = features.std(axis=0)
    return (features - features.mean(axis=0)) / np.where(std > 0, std, 1.0)


def fit_logistic(x: np.ndarray, y: np.ndarray, ridge: float = 1e-3, steps: int = 25) -> np.ndarray:
    """Logistic regression weights [F + 1] (the last is the bias) by Newton's method on the class-balanced
    log-loss with an L2 ridge: x [n, F] features, y [n] bool labels."""
    xb = np.hstack([x, np.ones((len(x), 1))])
    weight = np.where(y, 0.5 / max(y.sum(), 1), 0.5 / max((~y).sum(), 1))
    w = np.zeros(xb.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(xb @ w, -30, 30)))
        grad = xb.T @ (weight * (p - y)) + ridge * w
        hess = (xb * (weight * p * (1 - p))[:, None]).T @ xb + ridge * np.eye(len(w))
        w -= np.linalg.solve(hess, grad)
    return w


def learned_aucs(features: list[np.ndarray], truths: list[np.ndarray], folds: int = 2) -> list[float]:
    """The learned membership attack: a logistic regression on every per-item score of the upload (standardised
    within each client), trained on the other folds' attacked clients and applied to held-out ones (cross-fitting:
    no client is scored by a model that saw its upload); the AUC of each client [clients]. features: one [m, F]
    array per client; truths: one [m] bool array per client."""
    out = [float("nan")] * len(features)  # with fewer clients than folds there is nobody to learn from: NaN
    for fold in range(folds):
        held = [i for i in range(len(features)) if i % folds == fold]
        seen = [i for i in range(len(features)) if i % folds != fold]
        if not held or not seen:
            continue
        w = fit_logistic(
            np.concatenate([standardised(features[i]) for i in seen]), np.concatenate([truths[i] for i in seen])
        )
        for i in held:
            out[i] = auc(standardised(features[i]) @ w[:-1] + w[-1], truths[i])
    return out


def stacked(scores: dict[str, np.ndarray]) -> np.ndarray:
    """A client's per-item scores as features [m, F], in the scores' name order."""
    return np.stack([scores[k] for k in sorted(scores)], axis=1)


def complete_rank_d(upload: torch.Tensor, d: int, sigma: float, iters: int) -> torch.Tensor:
    """A rank-d factor X [m, d] with X Xᵀ ≈ the upload where known, < sigma where dropped."""
    known = upload != 0
    z = upload.double().clone()
    z.fill_diagonal_(1.0)
    known.fill_diagonal_(True)
    x = torch.zeros(upload.shape[0], d, dtype=torch.float64)
    for _ in range(max(iters, 1)):
        vals, vecs = torch.linalg.eigh(z.float())
        top = vals[-d:].double().clamp(min=0)
        x = vecs[:, -d:].double() * top.sqrt()
        low = x @ x.T
        z = torch.where(known, upload.double(), torch.minimum(low, torch.tensor(sigma, dtype=torch.float64)))
        z.fill_diagonal_(1.0)
    return x


def aligned_cosine(x: torch.Tensor, target: torch.Tensor) -> float:
    """Mean cosine between the rows of x R and target, R the orthogonal Procrustes rotation."""
    u, _, vt = torch.linalg.svd(x.T @ target)
    rotated = x @ (u @ vt)
    cos = torch.nn.functional.cosine_similarity(rotated, target, dim=1)
    return float(cos.mean())


def table_scores(upload: torch.Tensor, start: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-item scores a server computes from one item-table upload [m, d] and the table it sent [m, d]: how far
    each row moved in the client's local training, and whether it moved at all."""
    moved = (upload.double() - start.double()).norm(dim=1)
    return {"row_change": moved.numpy(), "row_changed": (moved > 0).double().numpy()}


def table_audit(cfg, overrides, module, data, start, n_clients: int, train_s: float) -> dict[str, Any]:
    """The membership attack on the item-table uploads of parameter-sharing methods (PFedRec, FedAvg): a client's
    last-round upload against the table the server sent it. The upload is the client's item table itself, so its
    embeddings are recovered exactly (cosine 1 by construction)."""
    gen, chosen = attacked_clients(cfg, data.n_users, n_clients)
    aucs: dict[str, list[float]] = {}
    features, truths = [], []
    for u in chosen:
        truth = training_items(data, u)
        scores = table_scores(module.state["items"][u], start)
        for name, score in scores.items():
            aucs.setdefault(name, []).append(auc(score, truth))
        features.append(stacked(scores))
        truths.append(truth)
    aucs["learned"] = learned_aucs(features, truths)
    dp = module.strategy.dp
    return {
        **report_fields(cfg, overrides, module, len(chosen), train_s, aucs),
        **({} if dp is None or dp.noise_multiplier == 0 else release_audit(module, chosen, gen)),
        "upload": "item table",
        "upload_nnz_mean": float(int(data.n_items) * int(cfg.model.dim)),
        "recovery_cosine": 1.0,
        "recovery_cosine_chance": float("nan"),
    }


def attacked_clients(cfg, n_users: int, n_clients: int) -> tuple[torch.Generator, list[int]]:
    """The audit's generator and the `n_clients` random clients it attacks (sorted)."""
    gen = torch.Generator().manual_seed(int(cfg.seed) + 11)
    return gen, torch.randperm(n_users, generator=gen)[:n_clients].sort().values.tolist()


def training_items(data, u: int) -> np.ndarray:
    """Client u's training positives as a boolean mask over the items [m]: the attacks' truth."""
    truth = np.zeros(data.n_items, dtype=bool)
    truth[np.asarray(data.train_items)[data.train_ptr[u] : data.train_ptr[u + 1]]] = True
    return truth


def release_audit(module: FederatedModule, chosen: list[int], gen: torch.Generator, draws: int = 25) -> dict:
    """User-level DP seen from the release: a worst-case attacker who knows every upload but the target's presence
    tests whether the noisy sum holds the target's clipped upload v by t = <sum - others, v>, on `draws` noise
    draws of the server's own mechanism per world; the AUC of t over the two worlds, against the Gaussian
    mechanism's Phi(|v| / (sqrt(2) z C)) (src/comm/user_dp.py)."""
    dp = module.strategy.dp
    aucs, analytic = [], []
    for u in chosen:
        v = decoded_upload(module.state["items"][u], module.method.spec, gen).triu(1)
        norm = float(v.norm())
        if norm == 0:
            continue
        stats = []
        for world in (0, 1):
            for _ in range(draws):
                noise = torch.zeros_like(v)
                dp.add_noise(noise, torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=gen))))
                stats.append(float(((noise + world * v) * v).sum()))
        t = np.array(stats)
        aucs.append(auc(t, np.arange(2 * draws) >= draws))
        z, c = dp.noise_multiplier, dp.clip
        analytic.append(0.5 * math.erfc(-norm / (2 * z * c)))  # Phi(|v| / (sqrt 2 z C)) = erfc(-|v| / (2 z C)) / 2
    return {
        "user_epsilon": module.history[-1]["privacy/user_epsilon"],
        "user_delta": dp.delta,
        "user_noise_multiplier": dp.noise_multiplier,
        "release_membership_auc": float(np.mean(aucs)),
        "release_membership_auc_gaussian": float(np.mean(analytic)),
    }


def report_fields(cfg, overrides, module, clients: int, train_s: float, aucs: dict[str, list[float]]) -> dict:
    """What every audit report holds: the run, where it stopped, and each score's AUC over the clients."""
    last, select = module.history[-1], select_key(cfg)
    aucs = {k: v for k, v in aucs.items() if np.isfinite(v).any()}  # the learned attack needs two clients or more
    return {
        "dataset": cfg.dataset.name,
        "protocol": cfg.protocol.name,
        "ablation": cfg.ablation.name,
        "rounds": int(cfg.fl.rounds),
        "attacked_round": len(module.history),  # the uploads attacked (a one-shot method's upload round)
        "clients": clients,
        "overrides": list(overrides),
        "train_s": train_s,
        "val_hit@10_last": last.get("val/hit@10"),  # None when eval.ks lacks 10
        "select": select,
        "val_select_last": last.get(select),
        "membership_auc": {k: float(np.nanmean(v)) for k, v in aucs.items()},
        "membership_auc_std": {k: float(np.nanstd(v)) for k, v in aucs.items()},
    }


def audit(cfg, overrides: list[str]) -> dict[str, Any]:
    """Run the attacks described in the module docstring; return the report."""
    validate(cfg)  # audit.clients, audit.recovery_iters, audit.out, device, ... before any data is read
    n_clients = cfg.audit.clients
    method = build_method(cfg, torch.device("cpu"))
    shares_table = "items" in method.shared_keys({"items": torch.zeros(1)})  # PFedRec, FedAvg: the item table
    if not (method.uploads_similarity or shares_table):
        raise ConfigError(
            f"config ablation={cfg.ablation.name!r} uploads neither a similarity matrix nor an item table; expected a "
            "sharing ablation (full, no_ica, no_gsa, knn_ica, knn_full, fed_itemknn, backbone, fedavg)"
        )
    torch.manual_seed(int(cfg.seed))
    data = load(cfg)
    module = FederatedModule(cfg, data)
    tic = time.perf_counter()
    # the last round the clients upload in (a one-shot method uploads once): its uploads are attacked
    rounds = max(r for r in range(1, int(cfg.fl.rounds) + 1) if method.uploads_in(r))
    fit_rounds(module, rounds - 1)
    start = module.server["items"].detach().clone() if shares_table else None  # what the last round's clients got
    fit_rounds(module, 1)
    train_s = time.perf_counter() - tic
    if shares_table:
        return table_audit(cfg, overrides, module, data, start, n_clients, train_s)
    gen, chosen = attacked_clients(cfg, data.n_users, n_clients)
    spec = module.method.spec  # the method's release: its threshold and centring
    sigma, d = float(spec.sigma), int(cfg.model.dim)
    global_sim = module.server_sim  # what an honest-but-curious server holds (fed_itemknn broadcasts less)
    aucs: dict[str, list[float]] = {}
    recovered, chance, features, truths = [], [], [], []
    for u in chosen:
        table = module.state["items"][u]
        upload = decoded_upload(table, module.method.spec, gen)
        truth = training_items(data, u)
        scores = membership_scores(upload, global_sim)
        for name, score in scores.items():
            aucs.setdefault(name, []).append(auc(score, truth))
        features.append(stacked(scores))
        truths.append(truth)
        target = normalised(table.double().unsqueeze(0), bool(spec.centre))[0]
        x = complete_rank_d(upload, d, sigma, int(cfg.audit.recovery_iters))
        recovered.append(aligned_cosine(x, target))
        noise_x = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        chance.append(aligned_cosine(noise_x, target))
    aucs["learned"] = learned_aucs(features, truths)
    dp = module.strategy.dp
    return {
        **report_fields(cfg, overrides, module, len(chosen), train_s, aucs),
        **({} if dp is None or dp.noise_multiplier == 0 else release_audit(module, chosen, gen)),
        "sigma": sigma,
        "noise_scale": module.method.spec.noise,
        "epsilon_round_entry": module.method.eps_round,
        "bits": module.strategy.encoding.bits,
        "upload_nnz_mean": module.history[-1].get("comm/upload_nnz_mean"),
        "recovery_cosine": float(np.mean(recovered)),
        "recovery_cosine_chance": float(np.mean(chance)),
    }


def table(report: dict[str, Any]) -> str:
    """The human-readable summary of an audit report."""
    if report.get("upload") == "item table":
        lines = [
            f"audit: {report['dataset']} / {report['ablation']} / {report['protocol']}, the item-table uploads of "
            f"round {report['rounds']}, {report['clients']} clients, "
            f"{report['select']} {report['val_select_last']:.4f}",
            "",
            "interaction inference (ROC AUC vs training positives, 0.5 = chance):",
        ]
        for name, value in report["membership_auc"].items():
            lines.append(f"  {name:<22}{value:.4f} ± {report['membership_auc_std'][name]:.4f}")
        return "\n".join([*lines, "", "embedding recovery: the upload is the client's item table (exact)"])
    eps = report["epsilon_round_entry"]
    lines = [
        f"audit: {report['dataset']} / {report['ablation']} / {report['protocol']}, after {report['rounds']} "
        f"rounds, {report['clients']} clients, sigma {report['sigma']}, noise b={report['noise_scale']:.4g}"
        f" (epsilon per entry per round {'-' if eps is None else f'{eps:.4g}'}), {report['bits']}-bit",
        f"upload nonzeros per client {report['upload_nnz_mean']:.0f}, "
        f"{report['select']} {report['val_select_last']:.4f}",
        "",
        "interaction inference (ROC AUC vs training positives, 0.5 = chance):",
    ]
    for name, value in report["membership_auc"].items():
        lines.append(f"  {name:<22}{value:.4f} ± {report['membership_auc_std'][name]:.4f}")
    lines += [
        "",
        "embedding recovery up to rotation (mean cosine to the true normalised item vectors):",
        f"  recovered from the upload  {report['recovery_cosine']:.4f}",
        f"  random table (chance)      {report['recovery_cosine_chance']:.4f}",
    ]
    if "release_membership_auc" in report:
        lines += [
            "",
            f"user-level DP (epsilon {report['user_epsilon']:.3g} at delta {report['user_delta']:.3g}): whether a user "
            "took part, from the noisy release by a worst-case attacker (ROC AUC, 0.5 = chance):",
            f"  measured                   {report['release_membership_auc']:.4f}",
            f"  Gaussian mechanism         {report['release_membership_auc_gaussian']:.4f}",
        ]
    return "\n".join(lines)


def default_out(cfg: DictConfig) -> str:
    """The audit's own run folder when `audit.out` is null: outputs/audit/<run name>_<time>/audit.json."""
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    return f"outputs/audit/{run_name(cfg)}_{stamp}/audit.json"


def main(argv: list[str]) -> dict[str, Any]:
    """Compose the config from `argv`, run the audit, print the table, write `audit.out`."""
    cfg = load_config(argv)
    out = str(cfg.audit.out or default_out(cfg))
    check_output_file("audit.out", out)
    report = audit(cfg, argv)
    publish_report(out, report, table(report))
    return report
