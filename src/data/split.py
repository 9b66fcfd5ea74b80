"""Leave-one-out by time, the lineage's tie rule, pair de-duplication and id mapping.

Tie rule (PFedRec's `rank(method='first', ascending=False)` on the timestamp in file order):
a later time is more recent; among equal times the row that comes FIRST in the file counts as
the more recent one. The most recent interaction is the test item, the second most recent the
validation item, the rest are training positives. FilmTrust has no times, so time = row order
and the last row of a user is the test item.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pandas is imported where a raw file is read or split: a run from the split cache needs none
    import pandas as pd


def recency_rank(frame: pd.DataFrame) -> np.ndarray:
    """Per-row recency within its user: 0 = most recent, by (time desc, row asc)."""
    order = np.lexsort((frame["row"].to_numpy(), -frame["time"].to_numpy(), frame["user"].to_numpy()))
    users = frame["user"].to_numpy()[order]
    starts = np.r_[0, np.flatnonzero(users[1:] != users[:-1]) + 1]
    counts = np.diff(np.r_[starts, len(users)])
    pos = np.arange(len(users)) - np.repeat(starts, counts)
    rank = np.empty(len(frame), dtype=np.int64)
    rank[order] = pos
    return rank


def dedupe_pairs(frame: pd.DataFrame) -> pd.DataFrame:
    """Keep one row per (user, item): its first occurrence in time (ties: earliest row)."""
    ordered = frame.sort_values(["user", "item", "time", "row"], kind="stable")
    first = ordered.drop_duplicates(["user", "item"], keep="first")
    return first.sort_values("row", kind="stable").reset_index(drop=True)


def filter_min_interactions(frame: pd.DataFrame, min_count: int) -> pd.DataFrame:
    """Drop users with fewer than `min_count` rows."""
    counts = frame.groupby("user")["item"].transform("size")
    return frame[counts >= min_count].reset_index(drop=True)


@dataclass
class LeaveOneOut:
    """A leave-one-out split over contiguous ids 0..n_users-1 and 0..n_items-1."""

    n_users: int
    n_items: int
    train_users: np.ndarray
    train_items: np.ndarray
    val_items: np.ndarray
    test_items: np.ndarray
    user_ids: np.ndarray
    item_ids: np.ndarray


def leave_one_out(frame: pd.DataFrame) -> LeaveOneOut:
    """Split each user's rows: most recent to test, second to validation, the rest to training.

    Ids are mapped to 0.. in order of first appearance in the file, as the lineage does. A
    `recency` column, if present, replaces the time rule (larger = more recent).
    """
    import pandas as pd

    frame = frame.sort_values("row", kind="stable").reset_index(drop=True)
    user_codes, user_ids = pd.factorize(frame["user"], sort=False)
    item_codes, item_ids = pd.factorize(frame["item"], sort=False)
    per_user = np.bincount(user_codes)
    if per_user.min() < 3:
        bad = user_ids[int(np.argmin(per_user))]
        raise ValueError(f"user {bad} has {per_user.min()} interactions; leave-one-out needs >= 3")
    if "recency" in frame:
        tmp = pd.DataFrame({"user": user_codes, "time": frame["recency"].to_numpy(), "row": frame["row"].to_numpy()})
    else:
        tmp = pd.DataFrame({"user": user_codes, "time": frame["time"].to_numpy(), "row": frame["row"].to_numpy()})
    rank = recency_rank(tmp)
    n_users = len(user_ids)
    test = np.full(n_users, -1, dtype=np.int64)
    val = np.full(n_users, -1, dtype=np.int64)
    test[user_codes[rank == 0]] = item_codes[rank == 0]
    val[user_codes[rank == 1]] = item_codes[rank == 1]
    train = rank >= 2
    order = np.argsort(user_codes[train], kind="stable")
    return LeaveOneOut(
        n_users=n_users,
        n_items=len(item_ids),
        train_users=user_codes[train][order].astype(np.int64),
        train_items=item_codes[train][order].astype(np.int64),
        val_items=val,
        test_items=test,
        user_ids=np.asarray(user_ids),
        item_ids=np.asarray(item_ids),
    )
