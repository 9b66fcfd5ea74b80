"""The real datasets in ../shared/data: sizes of METHOD.md section 4, the split, negatives, cache, CLI.

The expected splits are recomputed here from the raw files with the csv module and plain Python
(latest time = test, second latest = validation, ties: the earlier line of the file is the more
recent; ids in order of first appearance), independently of src/data.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import statistics
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

import src.data.dataset as dataset_mod
from tests.conftest import SHARED_DATA, requires_real_data

pytestmark = requires_real_data

REPO_ROOT = Path(__file__).resolve().parents[1]

# METHOD.md section 4
SIZES = {
    "ml-100k": (943, 1682, 100_000),
    "ml-1m": (6040, 3706, 1_000_209),
    "filmtrust": (1227, 2059, 34_888),
    "lastfm-2k": (1600, 12454, 185_650),
}
DATASETS = list(SIZES)


# ---------------------------------------------------------------- independent readers


def first_appearance(values) -> dict:
    ids: dict = {}
    for v in values:
        if v not in ids:
            ids[v] = len(ids)
    return ids


def loo_reference(rows: list[tuple]) -> dict:
    """rows = [(user, item, time)] in file order -> {user: (test, val, Counter(train items))}.

    Most recent first: larger time first, then smaller line number first.
    """
    per_user: dict = defaultdict(list)
    for line, (user, item, time) in enumerate(rows):
        per_user[user].append((time, line, item))
    out = {}
    for user, events in per_user.items():
        events.sort(key=lambda e: e[1])  # file order
        events.sort(key=lambda e: e[0], reverse=True)  # stable: latest first, ties keep file order
        out[user] = (events[0][2], events[1][2], Counter(e[2] for e in events[2:]))
    return out


def keep_users_with_at_least(rows: list[tuple], n: int) -> list[tuple]:
    counts = Counter(r[0] for r in rows)
    return [r for r in rows if counts[r[0]] >= n]


def read_ml100k_rows() -> list[tuple]:
    with open(SHARED_DATA / "ml-100k" / "u.data", newline="") as fh:
        return [(int(u), int(i), int(t)) for u, i, _r, t in csv.reader(fh, delimiter="\t")]


def read_filmtrust_rows(drop_first: bool) -> list[tuple]:
    with open(SHARED_DATA / "filmtrust" / "ratings.txt", newline="") as fh:
        rows = [(int(u), int(i)) for u, i, _r in csv.reader(fh, delimiter=" ")]
    rows = rows[1:] if drop_first else rows
    return [(u, i, line) for line, (u, i) in enumerate(rows)]  # time = row order


def read_lastfm_rows() -> list[tuple]:
    with open(SHARED_DATA / "lastfm-2k" / "user_taggedartists.dat", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        next(reader)
        return [(int(u), int(a), (int(y), int(m), int(d))) for u, a, _t, d, m, y in reader]


def user_rows(data, u: int) -> tuple[int, int, Counter]:
    train = data.train_items[data.train_ptr[u] : data.train_ptr[u + 1]]
    return int(data.test_items[u]), int(data.val_items[u]), Counter(train.tolist())


def check_against_reference(data, rows: list[tuple]) -> None:
    """Compare every user's test, val and training items to the independent split of `rows`."""
    users = first_appearance(r[0] for r in rows)
    items = first_appearance(r[1] for r in rows)
    assert (data.n_users, data.n_items) == (len(users), len(items))
    ref = loo_reference(rows)
    for user, (test, val, train) in ref.items():
        u = users[user]
        got_test, got_val, got_train = user_rows(data, u)
        assert got_test == items[test], f"user {user}: test item"
        assert got_val == items[val], f"user {user}: validation item"
        assert got_train == Counter({items[i]: c for i, c in train.items()}), f"user {user}: training items"


# ---------------------------------------------------------------- sizes and generic invariants


@pytest.mark.parametrize("name", DATASETS)
def test_paper_sizes_match_method_section_4(real_build, name):
    data = real_build(name)
    users, items, interactions = SIZES[name]
    s = data.summary()
    assert (data.n_users, data.n_items) == (users, items)
    assert (s["users"], s["items"], s["interactions"]) == (users, items, interactions)
    assert len(data.train_items) + 2 * users == interactions
    assert s["train"] == interactions - 2 * users and s["val"] == s["test"] == users
    assert s["protocol"] == "paper" and s["seed"] == 0
    assert Path(s["folder"]) == SHARED_DATA / name
    assert s["verified"] is True


@pytest.mark.parametrize("name", DATASETS)
def test_one_val_one_test_and_198_clean_negatives_per_user(real_build, name):
    data = real_build(name)
    n_users, n_items = data.n_users, data.n_items
    assert data.val_items.shape == data.test_items.shape == (n_users,)
    assert data.train_ptr.shape == (n_users + 1,) and data.train_ptr[0] == 0
    assert np.all(np.diff(data.train_ptr) >= 1)
    for arr in (data.val_items, data.test_items, data.train_items):
        assert arr.min() >= 0 and arr.max() < n_items
    assert data.val_negatives.shape == (n_users, 99) and data.test_negatives.shape == (n_users, 99)
    assert data.summary()["eval_negatives_per_user"] == 198

    seen = np.zeros((n_users, n_items), dtype=bool)
    owners = np.repeat(np.arange(n_users), np.diff(data.train_ptr))
    seen[owners, data.train_items] = True
    seen[np.arange(n_users), data.val_items] = True
    seen[np.arange(n_users), data.test_items] = True
    negs = np.concatenate([data.val_negatives, data.test_negatives], axis=1)
    assert negs.min() >= 0 and negs.max() < n_items
    assert not seen[np.arange(n_users)[:, None], negs].any(), "an evaluation negative was interacted"
    srt = np.sort(negs, axis=1)
    assert not np.any(srt[:, 1:] == srt[:, :-1]), "repeated evaluation negatives"
    # every item that exists was interacted by somebody
    assert seen.any(axis=0).all()


# ---------------------------------------------------------------- splits recomputed from the raw files


def test_ml100k_split_matches_independent_computation(real_build):
    check_against_reference(real_build("ml-100k"), read_ml100k_rows())


def test_filmtrust_split_matches_independent_computation(real_build):
    rows = keep_users_with_at_least(read_filmtrust_rows(drop_first=True), 5)
    assert (len({r[0] for r in rows}), len({r[1] for r in rows}), len(rows)) == SIZES["filmtrust"]
    check_against_reference(real_build("filmtrust"), rows)


def test_lastfm_split_matches_independent_computation(real_build):
    rows = keep_users_with_at_least(read_lastfm_rows(), 5)
    assert (len({r[0] for r in rows}), len({r[1] for r in rows}), len(rows)) == SIZES["lastfm-2k"]
    data = real_build("lastfm-2k")
    check_against_reference(data, rows)
    # paper protocol keeps repeated pairs: the test item can be the validation item and a training item
    same = data.test_items == data.val_items
    assert same.any()
    u = int(np.flatnonzero(same)[0])
    assert data.test_items[u] in data.train_items[data.train_ptr[u] : data.train_ptr[u + 1]]
    # how many users (docs/data.md): the validation item is the test item for over half of them
    assert data.summary()["held_out_overlap"] == {"val_is_test": 832, "test_in_train": 816, "val_in_train": 994}


def read_ml1m_reference() -> tuple[dict, dict, dict, dict]:
    """(user id map, item id map, {user: (test movie, val movie, n_ratings)}, {user: Counter(movies)})."""
    folder = SHARED_DATA / "ml-1m"
    with gzip.open(folder / "chronological_order.tsv.gz", "rt", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        by_line = sorted((int(r["line"]), int(r["user"]), int(r["movie"])) for r in reader)
    assert [b[0] for b in by_line[:3]] == [1, 2, 3] and len(by_line) == 1_000_209
    users = first_appearance(b[1] for b in by_line)
    items = first_appearance(b[2] for b in by_line)
    movies: dict = defaultdict(Counter)
    for _, user, movie in by_line:
        movies[user][movie] += 1
    split = {}
    with open(folder / "pfedrec_loo_split.tsv", newline="") as fh:
        for r in csv.DictReader(fh, delimiter="\t"):
            val = r["val_movie"] or r["val_candidates"].split("|")[0]
            split[int(r["user"])] = (int(r["test_movie"]), int(val), int(r["n_ratings"]), r["val_status"])
    return users, items, split, movies


def test_ml1m_split_matches_pfedrec_loo_file(real_build):
    data = real_build("ml-1m")
    users, items, split, movies = read_ml1m_reference()
    assert len(split) == 6040 and (len(users), len(items)) == (6040, 3706)
    assert sum(1 for s in split.values() if s[3] == "ambiguous") == 20
    for user, (test, val, n_ratings, _status) in split.items():
        u = users[user]
        got_test, got_val, got_train = user_rows(data, u)
        assert got_test == items[test], f"user {user}: test item"
        assert got_val == items[val], f"user {user}: validation item"
        assert sum(got_train.values()) == n_ratings - 2, f"user {user}: training count"
        expected_train = movies[user] - Counter({test: 1, val: 1})
        assert got_train == Counter({items[m]: c for m, c in expected_train.items()}), f"user {user}"


# ---------------------------------------------------------------- seeds and the cache


def test_same_seed_same_negatives_other_seed_different(real_build, compose_cfg):
    a = real_build("filmtrust", "paper", 0)
    b = real_build("filmtrust", "paper", 1)
    # a fresh build of seed 0 in an empty cache draws the same negatives again
    from src.data.dataset import build

    cfg = compose_cfg(["dataset=filmtrust", "protocol=paper", "seed=0", f"data.root='{SHARED_DATA}'"])
    fresh_cache = Path(os.environ["ALIGNFEDREC_CACHE"]) / "fresh-seed-check"
    c = build(cfg.dataset, cfg.protocol, cfg.seed, cfg.data.root, str(fresh_cache))
    assert np.array_equal(a.val_negatives, c.val_negatives) and np.array_equal(a.test_negatives, c.test_negatives)
    assert not np.array_equal(a.val_negatives, b.val_negatives)
    assert not np.array_equal(a.test_negatives, b.test_negatives)
    # the split itself does not depend on the seed
    assert np.array_equal(a.test_items, b.test_items) and np.array_equal(a.train_items, b.train_items)


def test_cache_file_written_and_reused(compose_cfg, tmp_path: Path, monkeypatch):
    cache_dir = tmp_path / "splits"  # its own: the session's cache is written by other workers meanwhile
    cfg = compose_cfg(
        ["dataset=ml-100k", "protocol=paper", "seed=0", f"data.root='{SHARED_DATA}'", f"data.cache_dir='{cache_dir}'"]
    )
    first = dataset_mod.build(cfg.dataset, cfg.protocol, cfg.seed, cfg.data.root, cfg.data.cache_dir)
    files = sorted(cache_dir.glob("ml-100k-paper-seed0-*.npz"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns

    def must_not_run(*args, **kwargs):
        raise AssertionError("the split was recomputed instead of read from the cache")

    monkeypatch.setattr(dataset_mod, "leave_one_out", must_not_run)
    monkeypatch.setattr(dataset_mod.raw, "read_ml100k", must_not_run)  # a cache hit does not even parse u.data
    monkeypatch.setattr(dataset_mod, "draw_eval_negatives", must_not_run)
    second = dataset_mod.build(cfg.dataset, cfg.protocol, cfg.seed, cfg.data.root, cfg.data.cache_dir)
    assert files[0].stat().st_mtime_ns == mtime
    for field in ("train_ptr", "train_items", "val_items", "test_items", "val_negatives", "test_negatives"):
        assert np.array_equal(getattr(first, field), getattr(second, field)), field
    assert second.summary() == first.summary()
    assert first.split_file == second.split_file == str(files[0])  # both say which file holds the split


# ---------------------------------------------------------------- the CLI


def test_cli_prints_one_json_summary(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != "ALIGNFEDREC_DATA"}
    env["ALIGNFEDREC_CACHE"] = str(tmp_path / "cache")
    proc = subprocess.run(
        [sys.executable, "-m", "src.data", "dataset=filmtrust", "protocol=clean"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)  # the whole stdout is one JSON object
    assert isinstance(summary, dict)
    for key in (
        "users",
        "items",
        "interactions",
        "train",
        "val",
        "test",
        "interactions_per_user",
        "protocol",
        "seed",
        "folder",
        "verified",
    ):
        assert key in summary, key
    assert summary["verified"] is True
    assert set(summary["interactions_per_user"]) >= {"min", "median", "max"}
    assert summary["protocol"] == "clean" and summary["seed"] == 0
    assert Path(summary["folder"]) == SHARED_DATA / "filmtrust"
    assert list((tmp_path / "cache" / "splits").glob("filmtrust-clean-seed0-*.npz"))

    # clean protocol: no lineage quirk (first row kept), users with >= 5 rows, repeated pairs removed
    rows = keep_users_with_at_least(read_filmtrust_rows(drop_first=False), 5)
    pairs = {(u, i) for u, i, _ in rows}
    per_user = Counter(u for u, _ in pairs)
    per_user = {u: c for u, c in per_user.items() if c >= 3}
    n_items = len({i for u, i in pairs if u in per_user})
    assert summary["users"] == len(per_user)
    assert summary["items"] == n_items
    assert summary["interactions"] == sum(per_user.values())
    assert summary["train"] + summary["val"] + summary["test"] == summary["interactions"]
    assert summary["val"] == summary["test"] == summary["users"]
    counts = list(per_user.values())
    assert summary["interactions_per_user"] == {
        "min": min(counts),
        "median": statistics.median(counts),
        "max": max(counts),
    }


# sha256 of every array of the split at seed 0 (arrays_digest: train, validation and test items, the evaluation
# negatives, item ids), pinned 2026-12-07 at ea79a38, equal to the cached splits the campaign's runs read that day
# (numpy's default_rng draws the negatives)
PINNED_SPLITS = {
    ("ml-100k", "paper"): "bd362a59fd597240e0606f01086659969736877cb6f315fa90963548568c4353",
    ("ml-100k", "clean"): "bd362a59fd597240e0606f01086659969736877cb6f315fa90963548568c4353",
    ("ml-1m", "paper"): "5759b4756b86028b369fc0b9a78b33d5cc1936135f6f2443bead76772783bb09",
    ("ml-1m", "clean"): "5759b4756b86028b369fc0b9a78b33d5cc1936135f6f2443bead76772783bb09",
    ("filmtrust", "paper"): "1a1b21825d704c1bf5613b8e6aed5924f64292ad56fa23c044d6e7e84b40ee55",
    ("filmtrust", "clean"): "d7d21d2f245f16feadce598bf7358b3b273c1e80026e73fce686f213510dd93e",
    ("lastfm-2k", "paper"): "75f9bb3deba61a62a6b9a72ed6ff512c6af4cb0698e96c832936d69d4b7a52ca",
    ("lastfm-2k", "clean"): "8d7009296c599f270d82cef4e00ab61a208cdafa79bc0d12cc20d447de0b60fa",
}


@pytest.mark.parametrize("name,protocol", list(PINNED_SPLITS))
def test_the_split_and_its_negatives_are_pinned(name: str, protocol: str, real_build, cache_dir: Path) -> None:
    """A change to the reading, the split or the negatives' draw (or a numpy whose generator draws otherwise)
    changes every number a run reports: runs made after it are not comparable with those in results/runs. (The
    split the default config's key names, as this session's code built it in the session's cache.)"""
    split = Path(real_build(name, protocol, 0).split_file)
    assert split.parent == cache_dir
    with np.load(split) as arrays:
        digest = str(arrays["digest"])
    assert digest == PINNED_SPLITS[name, protocol], (
        "the split differs from the pinned one the stored runs were made with: restore it, or bump CACHE_VERSION "
        "(src/data/dataset.py), rerun the stored runs and pin the new digests"
    )
