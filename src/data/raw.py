"""Readers for the original dataset files: each returns one row per rating, in file order.

Columns of every reader's frame: `user`, `item` (original ids), `time` (sortable, larger is
later) and `row` (0-based position in the source file, the tie-breaker). ML-1M read from the
partial files in ../shared/data instead carries `recency` (see `split.py`).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from src.runtime.errors import UserError

if TYPE_CHECKING:  # pandas is imported where a raw file is read or split: a run from the split cache needs none
    import pandas as pd


class DataFormatError(UserError, ValueError):
    """A dataset file is empty, or a line of it does not have the expected shape; names file and line."""


@dataclass
class RawRatings:
    """Ratings as read from the files, with the facts the summary must report."""

    frame: pd.DataFrame
    folder: Path
    files: list[Path]
    exact: bool = True
    notes: list[str] = field(default_factory=list)


def read_table(
    path: Path, sep: str, names: list[str], numeric: list[str], header: bool = False, encoding: str = "utf-8"
) -> pd.DataFrame:
    """Read a delimited file as strings and convert `numeric` columns, naming the bad line on error.

    An empty file (no bytes, blank lines, or only its header) is a DataFormatError naming the file.
    """
    import pandas as pd

    opener = gzip.open if path.suffix == ".gz" else open
    skip = 1 if header else 0
    with opener(path, "rt", encoding=encoding, newline="") as fh:
        lines = fh.read().splitlines()
    body = lines[skip:]
    if not any(line.strip() for line in body):
        what = "only a header line" if header and lines else "no rows"
        raise DataFormatError(
            f"{path} is empty ({what}): expected rows of {len(names)} fields separated by {sep!r} ({', '.join(names)})"
        )
    parts = [ln.split(sep) for ln in body]
    for i, p in enumerate(parts):
        if len(p) != len(names):
            raise DataFormatError(
                f"{path}, line {i + 1 + skip}: expected {len(names)} fields separated by {sep!r} "
                f"({', '.join(names)}), found {len(p)}: {body[i][:80]!r}"
            )
    frame = pd.DataFrame(parts, columns=names)
    for col in numeric:
        values = pd.to_numeric(frame[col], errors="coerce")
        bad = np.flatnonzero(values.isna().to_numpy())
        if len(bad):
            i = int(bad[0])
            raise DataFormatError(
                f"{path}, line {i + 1 + skip}: column {col!r} must be a number, found {frame[col].iat[i]!r}"
            )
        frame[col] = values
    frame["row"] = np.arange(len(frame), dtype=np.int64)
    return frame


def read_ml100k(folder: Path) -> RawRatings:
    """`u.data`: user, item, rating, unix time; tab-separated, no header, random order."""
    path = folder / "u.data"
    df = read_table(path, "\t", ["user", "item", "rating", "time"], ["user", "item", "rating", "time"])
    return RawRatings(df[["user", "item", "time", "row"]], folder, [path])


def read_ml1m_original(folder: Path) -> RawRatings:
    """The original `ratings.dat` (UserID::MovieID::Rating::Timestamp), as the downloader fetches it."""
    path = folder / "ratings.dat"
    df = read_table(
        path, "::", ["user", "item", "rating", "time"], ["user", "item", "rating", "time"], encoding="latin-1"
    )
    return RawRatings(df[["user", "item", "time", "row"]], folder, [path])


def read_ml1m_partial(folder: Path) -> RawRatings:
    """ML-1M without `ratings.dat`: all pairs in file order plus the lineage's leave-one-out items.

    `chronological_order.tsv.gz` gives every (user, movie) pair and its line in ratings.dat;
    `pfedrec_loo_split.tsv` gives the lineage's test item (exact) and validation item (exact for
    6,020 users; for 20 the first of 2-3 candidates is taken). `recency` is 2 for test, 1 for
    validation and 0 for every training pair.
    """
    import pandas as pd

    order_path, split_path = folder / "chronological_order.tsv.gz", folder / "pfedrec_loo_split.tsv"
    order = read_table(
        order_path,
        "\t",
        ["user", "movie", "rank", "line", "timestamp", "rating", "same"],
        ["user", "movie", "rank", "line"],
        header=True,
    )
    split = read_table(
        split_path,
        "\t",
        [
            "user",
            "n_ratings",
            "top_group_size",
            "test_movie",
            "test_line",
            "test_timestamp",
            "test_rating",
            "val_movie",
            "val_candidates",
            "val_status",
            "timestamps_from",
        ],
        ["user", "test_movie", "test_line"],
        header=True,
    )
    val = split["val_movie"].where(split["val_movie"] != "", split["val_candidates"].str.split("|").str[0])
    split["val_item"] = pd.to_numeric(val).astype(np.int64)
    ambiguous = int((split["val_status"] == "ambiguous").sum())
    df = order.sort_values("line", kind="stable").rename(columns={"movie": "item"})
    df["row"] = df["line"].to_numpy() - 1
    df = df.merge(split[["user", "test_movie", "val_item"]], on="user", how="left", validate="many_to_one")
    recency = np.zeros(len(df), dtype=np.int64)
    recency[(df["item"] == df["val_item"]).to_numpy()] = 1
    recency[(df["item"] == df["test_movie"]).to_numpy()] = 2
    df["recency"] = recency
    df["time"] = 0
    notes = [
        f"ratings.dat is not stored here: split read from {split_path.name}; the validation item of "
        f"{ambiguous} users is ambiguous in the recovered data and the first listed candidate was taken"
    ]
    return RawRatings(
        df[["user", "item", "time", "row", "recency"]].reset_index(drop=True),
        folder,
        [order_path, split_path],
        exact=ambiguous == 0,
        notes=notes,
    )


def read_filmtrust(folder: Path, drop_first_row: bool) -> RawRatings:
    """`ratings.txt`: user item rating, space-separated; time is the row order.

    The lineage read the file with a header line and so lost its first rating (`drop_first_row`).
    """
    path = folder / "ratings.txt"
    df = read_table(path, " ", ["user", "item", "rating"], ["user", "item", "rating"])
    notes = []
    if drop_first_row:
        df = df.iloc[1:].reset_index(drop=True)
        notes.append("first row of ratings.txt dropped, as the lineage read it as a header")
    df["time"] = df["row"]
    return RawRatings(df[["user", "item", "time", "row"]], folder, [path], notes=notes)


def read_lastfm(folder: Path) -> RawRatings:
    """`user_taggedartists.dat`: one row per (user, artist, tag) with its date; time = the date."""
    path = folder / "user_taggedartists.dat"
    df = read_table(
        path,
        "\t",
        ["user", "item", "tag", "day", "month", "year"],
        ["user", "item", "tag", "day", "month", "year"],
        header=True,
    )
    df["time"] = (df["year"] * 10000 + df["month"] * 100 + df["day"]).astype(np.int64)
    notes = [
        "time = the tagging date; the lineage file has millisecond times for 3,517 rows of "
        "May 2011 that the public files lack, which can change the held-out items of up to 292 users"
    ]
    return RawRatings(df[["user", "item", "time", "row"]], folder, [path], exact=False, notes=notes)
