"""Leave-one-out split on hand-made frames: the tie rule, FilmTrust/Lastfm quirks, de-duplication, ids.

Expected values are worked out by hand from the rule in the docstring of src/data/split.py:
latest time = test, second latest = validation; among equal times the row that comes first in
the file counts as more recent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hand_split import hand_split

from src.data.raw import read_filmtrust, read_lastfm, read_ml1m_original
from src.data.split import dedupe_pairs, leave_one_out


def make_frame(rows: list[tuple]) -> pd.DataFrame:
    """rows = [(user, item, time), ...] in file order; `row` is the position in that list."""
    users, items, times = zip(*rows)
    return pd.DataFrame(
        {"user": list(users), "item": list(items), "time": list(times), "row": np.arange(len(rows), dtype=np.int64)}
    )


def split_by_original_ids(frame: pd.DataFrame) -> dict:
    """{user: (test item, val item, sorted train items)} in the original ids of the frame."""
    loo = leave_one_out(frame)
    out = {}
    for code, user in enumerate(loo.user_ids):
        train = loo.train_items[loo.train_users == code]
        out[user] = (
            loo.item_ids[loo.test_items[code]],
            loo.item_ids[loo.val_items[code]],
            sorted(loo.item_ids[train].tolist()),
        )
    return out


def test_distinct_times_latest_is_test_second_latest_is_val():
    frame = make_frame(
        [("u", "x", 10), ("u", "y", 30), ("u", "z", 20), ("u", "w", 5), ("v", "x", 7), ("v", "w", 9), ("v", "y", 8)]
    )
    result = split_by_original_ids(frame)
    assert result["u"] == ("y", "z", ["w", "x"])
    assert result["v"] == ("w", "y", ["x"])


def test_equal_latest_times_first_row_in_file_is_test_next_tied_row_is_val():
    # p, q, r share the latest time; p comes first in the file, then q, then r.
    frame = make_frame([("u", "s", 1), ("u", "p", 5), ("u", "q", 5), ("u", "r", 5)])
    assert split_by_original_ids(frame)["u"] == ("p", "q", ["r", "s"])


def test_tie_at_second_latest_time_first_row_is_val():
    frame = make_frame([("u", "a", 2), ("u", "b", 2), ("u", "c", 9), ("u", "d", 2)])
    assert split_by_original_ids(frame)["u"] == ("c", "a", ["b", "d"])


def test_tie_rule_uses_file_row_not_frame_position():
    # The same rows, handed over shuffled: `row` (the position in the file) decides ties.
    frame = make_frame([("u", "s", 1), ("u", "p", 5), ("u", "q", 5), ("u", "r", 5)])
    shuffled = frame.iloc[[3, 2, 0, 1]].reset_index(drop=True)
    assert split_by_original_ids(shuffled)["u"] == ("p", "q", ["r", "s"])


def test_all_times_equal_first_two_rows_are_test_and_val():
    frame = make_frame([("u", i, 0) for i in (7, 3, 5, 1)])
    assert split_by_original_ids(frame)["u"] == (7, 3, [1, 5])


def test_filmtrust_time_is_row_order_last_row_is_test(tmp_path: Path):
    folder = tmp_path / "filmtrust"
    folder.mkdir()
    # user 1: items 10, 20, 30, 40 in this order; user 2 interleaved: 50, 60, 70.
    lines = ["1 10 2", "2 50 1", "1 20 4", "2 60 3.5", "1 30 3", "2 70 2", "1 40 1"]
    (folder / "ratings.txt").write_text("\n".join(lines))  # no trailing newline, like the original
    raw = read_filmtrust(folder, drop_first_row=False)
    result = split_by_original_ids(raw.frame)
    assert result[1] == (40, 30, [10, 20])
    assert result[2] == (70, 60, [50])


def test_ml1m_ratings_dat_time_is_the_timestamp_ties_by_row(tmp_path: Path):
    """The original ML-1M file (`make data` downloads it; the shared data holds only the partial files): `::`
    separated, latin-1, the timestamp is the time, and among equal times the earlier row counts as more recent."""
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    lines = [
        "1::1193::5::978300760",
        "2::3068::4::978299000",
        "1::661::3::978302109",  # user 1's latest time, tied with the next row: this one is the test item
        "1::914::3::978302109",  # then this one the validation item
        "2::1537::4::978299620",
        "1::3408::4::978300275",
        "2::647::3::978299351",
    ]
    (folder / "ratings.dat").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    raw = read_ml1m_original(folder)
    assert len(raw.frame) == 7
    result = split_by_original_ids(raw.frame)
    assert result[1] == (661, 914, [1193, 3408])
    assert result[2] == (1537, 647, [3068])


def test_filmtrust_lineage_quirk_drops_first_raw_row(tmp_path: Path):
    folder = tmp_path / "filmtrust"
    folder.mkdir()
    lines = ["1 10 2", "1 20 4", "1 30 3", "1 40 1"]
    (folder / "ratings.txt").write_text("\n".join(lines) + "\n")
    raw = read_filmtrust(folder, drop_first_row=True)
    assert sorted(raw.frame["item"].tolist()) == [20, 30, 40]
    assert split_by_original_ids(raw.frame)[1] == (40, 30, [20])


LASTFM_HEADER = "userID\tartistID\ttagID\tday\tmonth\tyear"


def write_lastfm(folder: Path, rows: list[tuple[int, int, int, int, int, int]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text = "\r\n".join([LASTFM_HEADER] + ["\t".join(map(str, r)) for r in rows]) + "\r\n"
    (folder / "user_taggedartists.dat").write_text(text, newline="")


def test_lastfm_repeated_pairs_without_dedupe_test_can_equal_val_and_train(tmp_path: Path):
    folder = tmp_path / "lastfm-2k"
    # user 2 tags artist 52 three times (twice on the latest day) and artist 60 once.
    write_lastfm(
        folder,
        [
            (2, 52, 13, 1, 4, 2009),
            (2, 60, 13, 1, 5, 2009),
            (2, 52, 14, 1, 5, 2011),
            (2, 52, 15, 1, 5, 2011),
        ],
    )
    raw = read_lastfm(folder)
    assert len(raw.frame) == 4
    test, val, train = split_by_original_ids(raw.frame)[2]
    assert test == 52 and val == 52
    assert 52 in train and train == [52, 60]


def test_the_summary_counts_users_whose_held_out_items_are_not_new_to_them():
    """`held_out_overlap` against a per-user count with sets, on a split whose training positives repeat items and
    may hold the held-out ones (Lastfm-2k under the paper protocol: 832, 816 and 994 of 1,600 users)."""
    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 6, size=40)
    train = [rng.integers(0, 8, size=n) for n in sizes]
    val, test = rng.integers(0, 8, size=40), rng.integers(0, 8, size=40)
    data = hand_split(8, train, val, test, np.zeros((40, 1), dtype=int), np.zeros((40, 1), dtype=int), "paper")
    expected = {
        "val_is_test": sum(int(v == t) for v, t in zip(val, test)),
        "test_in_train": sum(int(t in set(items)) for t, items in zip(test, train)),
        "val_in_train": sum(int(v in set(items)) for v, items in zip(val, train)),
    }
    assert data.summary()["held_out_overlap"] == expected
    assert 0 < min(expected.values()) and max(expected.values()) < 40


def test_lastfm_time_is_the_date_ties_by_row(tmp_path: Path):
    folder = tmp_path / "lastfm-2k"
    # Dates out of file order; year outranks month outranks day. Two rows on the latest day.
    write_lastfm(
        folder,
        [
            (5, 1, 1, 31, 12, 2008),
            (5, 2, 1, 1, 1, 2010),
            (5, 3, 1, 2, 1, 2010),
            (5, 4, 1, 30, 11, 2009),
            (5, 5, 1, 2, 1, 2010),
        ],
    )
    raw = read_lastfm(folder)
    assert split_by_original_ids(raw.frame)[5] == (3, 5, [1, 2, 4])


def test_dedupe_keeps_first_occurrence_in_time():
    frame = make_frame(
        [
            ("u", "A", 5),  # row 0: later in time than rows 1 and 2
            ("u", "A", 2),  # row 1: earliest time, first of the tie -> kept
            ("u", "B", 3),  # row 2
            ("u", "A", 2),  # row 3: same time as row 1 but later in the file
            ("v", "A", 9),  # row 4: another user, same item: not a duplicate
            ("u", "B", 1),  # row 5: earlier than row 2 -> kept instead of row 2
        ]
    )
    out = dedupe_pairs(frame)
    kept = sorted(zip(out["user"], out["item"], out["time"], out["row"]))
    assert kept == [("u", "A", 2, 1), ("u", "B", 1, 5), ("v", "A", 9, 4)]
    # the result stays in file order
    assert out["row"].tolist() == sorted(out["row"].tolist())


def test_dedupe_then_split_has_distinct_held_out_items():
    frame = make_frame([("u", "A", 1), ("u", "B", 2), ("u", "A", 3), ("u", "A", 4), ("u", "C", 0)])
    # first occurrences: A@1, B@2, C@0 -> test B, val A, train C
    assert split_by_original_ids(dedupe_pairs(frame))["u"] == ("B", "A", ["C"])


@pytest.mark.parametrize("n_rows", [1, 2])
def test_user_with_fewer_than_three_rows_raises_clear_error(n_rows: int):
    rows = [("ok", i, i) for i in range(3)] + [("short_user", 100 + i, i) for i in range(n_rows)]
    with pytest.raises(ValueError) as err:
        leave_one_out(make_frame(rows))
    msg = str(err.value)
    assert "short_user" in msg and "3" in msg and str(n_rows) in msg


def test_ids_mapped_in_order_of_first_appearance_in_file():
    rows = [
        ("c", "z", 1),
        ("a", "y", 1),
        ("c", "x", 2),
        ("b", "z", 3),
        ("a", "w", 2),
        ("b", "y", 1),
        ("a", "z", 3),
        ("c", "w", 3),
        ("b", "x", 2),
    ]
    frame = make_frame(rows)
    shuffled = frame.sample(frac=1.0, random_state=3).reset_index(drop=True)
    for f in (frame, shuffled):
        loo = leave_one_out(f)
        assert loo.user_ids.tolist() == ["c", "a", "b"]
        assert loo.item_ids.tolist() == ["z", "y", "x", "w"]
        assert (loo.n_users, loo.n_items) == (3, 4)
        # every row lands somewhere: train + val + test reproduce the input pairs
        pairs = {(loo.user_ids[u], loo.item_ids[i]) for u, i in zip(loo.train_users, loo.train_items)}
        pairs |= {(loo.user_ids[u], loo.item_ids[loo.val_items[u]]) for u in range(3)}
        pairs |= {(loo.user_ids[u], loo.item_ids[loo.test_items[u]]) for u in range(3)}
        assert pairs == {(u, i) for u, i, _ in rows}
        # user c: z@1, x@2, w@3 -> test w, val x
        assert loo.item_ids[loo.test_items[0]] == "w" and loo.item_ids[loo.val_items[0]] == "x"
        # training positives are grouped by user code
        assert np.all(np.diff(loo.train_users) >= 0)
