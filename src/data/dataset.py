"""From config to a cached, split, protocol-ready dataset (`FedData`) and its summary."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from src.data import raw
from src.data.download import default_cache_dir, file_digests
from src.data.paths import resolve_dataset_dir
from src.data.split import dedupe_pairs, filter_min_interactions, leave_one_out
from src.data.synthetic import planted_communities
from src.protocols import all_interactions, draw_eval_negatives, interaction_matrix

CACHE_VERSION = 1


@dataclass
class FedData:
    """One dataset split under one protocol and seed: every client's data as flat arrays.

    Training positives are grouped by user (`train_ptr` is the CSR pointer). Evaluation
    negatives: `val_negatives` rank the validation item, `test_negatives` the test item.
    """

    name: str
    protocol: str
    seed: int
    n_users: int
    n_items: int
    train_ptr: np.ndarray
    train_items: np.ndarray
    val_items: np.ndarray
    test_items: np.ndarray
    val_negatives: np.ndarray
    test_negatives: np.ndarray
    folder: str
    exact: bool
    notes: list[str] = field(default_factory=list)
    item_community: np.ndarray | None = None

    @property
    def train_users(self) -> np.ndarray:
        """User index of every training positive."""
        return np.repeat(np.arange(self.n_users), np.diff(self.train_ptr))

    def train_matrix(self) -> np.ndarray:
        """Boolean [users, items]: True at training positives."""
        return interaction_matrix(self.n_users, self.n_items, self.train_users, self.train_items)

    def interacted_matrix(self) -> np.ndarray:
        """Boolean [users, items]: True at every interaction (training and held-out)."""
        return all_interactions(self.n_users, self.n_items, self.train_users, self.train_items,
                                self.val_items, self.test_items)

    def head(self, n: int) -> "FedData":
        """The first `n` clients of the split (all items kept): smoke tests and parity checks only."""
        if n >= self.n_users:
            return self
        end = int(self.train_ptr[n])
        return dataclasses.replace(
            self, n_users=n, train_ptr=self.train_ptr[:n + 1], train_items=self.train_items[:end],
            val_items=self.val_items[:n], test_items=self.test_items[:n], val_negatives=self.val_negatives[:n],
            test_negatives=self.test_negatives[:n], notes=[*self.notes, f"first {n} users only (data.max_users)"])

    def summary(self) -> dict:
        """The facts a user checks first: sizes, per-user spread, protocol, seed, source."""
        per_user = np.diff(self.train_ptr) + 2
        return {
            "dataset": self.name, "protocol": self.protocol, "seed": self.seed,
            "users": self.n_users, "items": self.n_items, "interactions": int(per_user.sum()),
            "train": int(len(self.train_items)), "val": int(self.n_users), "test": int(self.n_users),
            "interactions_per_user": {"min": int(per_user.min()), "median": float(np.median(per_user)),
                                      "max": int(per_user.max())},
            "eval_negatives_per_user": int(self.val_negatives.shape[1] + self.test_negatives.shape[1]),
            "folder": self.folder, "exact_lineage_split": self.exact, "notes": self.notes,
        }


def read_raw(dataset: DictConfig, lineage_quirks: bool, root: str | None) -> tuple[raw.RawRatings, np.ndarray | None]:
    """Read the dataset named in config from the first data root that has it."""
    name = dataset.name
    if name == "synthetic":
        return planted_communities(dataset.n_users, dataset.n_items, dataset.n_communities,
                                   dataset.per_user, dataset.affinity, dataset.generator_seed)
    if name == "ml-100k":
        return raw.read_ml100k(resolve_dataset_dir(name, [["u.data"]], root)), None
    if name == "ml-1m":
        folder = resolve_dataset_dir(
            name, [["ratings.dat"], ["chronological_order.tsv.gz", "pfedrec_loo_split.tsv"]], root)
        if (folder / "ratings.dat").is_file():
            return raw.read_ml1m_original(folder), None
        return raw.read_ml1m_partial(folder), None
    if name == "filmtrust":
        return raw.read_filmtrust(resolve_dataset_dir(name, [["ratings.txt"]], root), lineage_quirks), None
    if name == "lastfm-2k":
        return raw.read_lastfm(resolve_dataset_dir(name, [["user_taggedartists.dat"]], root)), None
    raise ValueError(f"dataset={name!r}; expected one of ml-100k, ml-1m, filmtrust, lastfm-2k, synthetic")


def cache_key(dataset: DictConfig, protocol: DictConfig, seed: int, source_sha: str) -> str:
    """Hash of everything the split depends on."""
    payload = json.dumps({"v": CACHE_VERSION, "dataset": OmegaConf.to_container(dataset, resolve=True),
                          "dedupe": bool(protocol.dedupe_pairs), "quirks": bool(protocol.lineage_quirks),
                          "negatives": int(protocol.eval_negatives), "seed": int(seed), "source": source_sha},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write an .npz next to its final name, then rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build(dataset: DictConfig, protocol: DictConfig, seed: int, root: str | None = None,
          cache_dir: str | None = None) -> FedData:
    """Read, filter, split and draw the evaluation negatives; reuse the cached result when keyed equal."""
    ratings, community = read_raw(dataset, bool(protocol.lineage_quirks), root)
    source_sha = hashlib.sha256("".join(file_digests(p)[0] for p in ratings.files).encode()).hexdigest()
    cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir() / "splits"
    key = cache_key(dataset, protocol, seed, source_sha)
    path = cache_root / f"{dataset.name}-{protocol.name}-seed{seed}-{key}.npz"
    meta = dict(name=dataset.name, protocol=protocol.name, seed=int(seed),
                folder=str(ratings.folder) if ratings.folder else "synthetic", exact=ratings.exact)
    if path.is_file():
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        notes = list(arrays.pop("notes").tolist())
        community = arrays.pop("item_community", None)
        n_users, n_items = (int(v) for v in arrays.pop("shape"))
        return FedData(n_users=n_users, n_items=n_items, notes=notes, item_community=community, **meta, **arrays)
    frame = ratings.frame
    notes = list(ratings.notes)
    frame = filter_min_interactions(frame, int(dataset.min_user_rows))
    if protocol.dedupe_pairs:
        before = len(frame)
        frame = dedupe_pairs(frame)
        if before != len(frame):
            notes.append(f"{before - len(frame)} repeated (user, item) rows removed (clean protocol)")
    kept = filter_min_interactions(frame, 3)
    if frame["user"].nunique() != kept["user"].nunique():
        notes.append(f"{frame['user'].nunique() - kept['user'].nunique()} users with < 3 interactions dropped")
    loo = leave_one_out(kept)
    ptr = np.r_[0, np.cumsum(np.bincount(loo.train_users, minlength=loo.n_users))]
    interacted = all_interactions(loo.n_users, loo.n_items, loo.train_users, loo.train_items,
                                  loo.val_items, loo.test_items)
    half = int(protocol.eval_negatives)
    negatives = draw_eval_negatives(interacted, 2 * half, seed)
    if community is not None:
        community = community[loo.item_ids]
    data = FedData(n_users=loo.n_users, n_items=loo.n_items, train_ptr=ptr, train_items=loo.train_items,
                   val_items=loo.val_items, test_items=loo.test_items, val_negatives=negatives[:, :half],
                   test_negatives=negatives[:, half:], notes=notes, item_community=community, **meta)
    extra = {} if community is None else {"item_community": community}
    save_npz_atomic(path, shape=np.array([loo.n_users, loo.n_items]), train_ptr=ptr, train_items=loo.train_items,
                    val_items=loo.val_items, test_items=loo.test_items, val_negatives=data.val_negatives,
                    test_negatives=data.test_negatives, notes=np.array(notes, dtype=str), **extra)
    return data


def load(cfg: DictConfig) -> FedData:
    """The dataset a run uses: `build` from the config, cut to `data.max_users` clients when set."""
    data = build(cfg.dataset, cfg.protocol, int(cfg.seed), cfg.data.root, cfg.data.cache_dir)
    max_users = cfg.data.get("max_users")
    return data if max_users is None else data.head(int(max_users))
