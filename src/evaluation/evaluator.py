"""Evaluate every client on its validation and test item: sampled-99 ranking and full ranking."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from src.data.dataset import FedData
from src.evaluation.metrics import full_ranks, rank_metrics, sampled_ranks
from src.runtime.results import chance_level

ScoreFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


class Evaluator:
    """Holds the candidates of every user; `run` scores them chunk by chunk and returns metrics."""

    def __init__(self, data: FedData, ks: tuple[int, ...], full_ranking: bool):
        self.ks = tuple(int(k) for k in ks)
        self.full = full_ranking
        self.val_target = torch.as_tensor(data.val_items)
        self.test_target = torch.as_tensor(data.test_items)
        self.val_cand = torch.cat([self.val_target.unsqueeze(1), torch.as_tensor(data.val_negatives)], dim=1)
        self.test_cand = torch.cat([self.test_target.unsqueeze(1), torch.as_tensor(data.test_negatives)], dim=1)
        self.train = torch.as_tensor(data.train_matrix()) if full_ranking else None

    def run(self, score: ScoreFn, chunks: list[torch.Tensor]) -> dict[str, float]:
        """`score(rows, item_ids)` gives logits [C, L] of users `rows`; item_ids None = all items."""
        return self.metrics(self.ranks(score, chunks))

    def ranks(self, score: ScoreFn, chunks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """1-based rank of each chunk user's held-out item, per split (`val`, `test`, and `*_full`)."""
        ranks: dict[str, list[torch.Tensor]] = {"val": [], "test": [], "val_full": [], "test_full": []}
        for rows in chunks:
            cand = torch.cat([self.val_cand[rows], self.test_cand[rows]], dim=1)
            logits = score(rows, cand).float().cpu()
            width = self.val_cand.shape[1]
            val, test = logits[:, :width], logits[:, width:]
            ranks["val"].append(sampled_ranks(val[:, 0], val[:, 1:]))
            ranks["test"].append(sampled_ranks(test[:, 0], test[:, 1:]))
            if self.full:
                all_scores = score(rows, None).float().cpu()
                vt, tt = self.val_target[rows], self.test_target[rows]
                excl_val = self.train[rows].clone()
                excl_val[torch.arange(len(rows)), tt] = True
                excl_test = self.train[rows].clone()
                excl_test[torch.arange(len(rows)), vt] = True
                ranks["val_full"].append(full_ranks(all_scores, vt, excl_val))
                ranks["test_full"].append(full_ranks(all_scores, tt, excl_test))
        return {split: torch.cat(parts) for split, parts in ranks.items() if parts}

    def full_candidates(self) -> torch.Tensor:
        """[users] how many items each user's test item is ranked among by full ranking (`ranks`: every item but
        the user's training items and its validation item; the test item itself counted)."""
        if self.train is None:
            raise ValueError("full ranking is off (protocol.full_ranking=false): no full-ranking candidates")
        users = torch.arange(len(self.test_target))
        excluded = self.train.clone()
        excluded[users, self.val_target] = True
        excluded[users, self.test_target] = False
        return excluded.shape[1] - excluded.sum(dim=1)

    def chance(self) -> dict[str, float]:
        """A random scorer's expected test metrics: `test/<metric>@K` (1 held-out item among the sampled
        candidates) and, with full ranking, `test_full/<metric>@K`: the mean over users of the chance level among
        that user's candidates (not 1 of n_items: a user's training items are not ranked)."""
        out: dict[str, float] = {}
        for k in self.ks:
            out.update({f"test/{name}": v for name, v in chance_level(k, self.test_cand.shape[1]).items()})
        if self.full:
            sizes, n_users = np.unique(self.full_candidates().numpy(), return_counts=True)
            weights = n_users / n_users.sum()
            for k in self.ks:
                levels = [chance_level(k, int(c)) for c in sizes]
                for name in levels[0]:
                    out[f"test_full/{name}"] = float(np.dot(weights, [level[name] for level in levels]))
        return out

    def metrics(self, ranks: dict[str, torch.Tensor]) -> dict[str, float]:
        """hit@k, ndcg@k, ... over all users whose ranks are given (the mean over users)."""
        return split_metrics(ranks, self.ks)


def split_metrics(ranks: dict[str, torch.Tensor], ks: tuple[int, ...]) -> dict[str, float]:
    """`<split>/hit@k`, `<split>/ndcg@k`, ... of the ranks of each split (means over users)."""
    out: dict[str, float] = {}
    for split, r in ranks.items():
        out.update(rank_metrics(r, ks, prefix=f"{split}/"))
    return out
