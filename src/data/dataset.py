"""From config to a cached, split, protocol-ready dataset (`FedData`) and its summary."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from src.data import raw
from src.data.download import KNOWN_FILES, digest_mismatch, file_digests, verify_known
from src.data.paths import candidate_roots, resolve_dataset_dir
from src.data.protocols import (
    TooFewNegatives,
    all_interactions,
    check_available,
    draw_eval_negatives,
    interaction_matrix,
)
from src.data.split import dedupe_pairs, filter_min_interactions, leave_one_out
from src.data.synthetic import planted_communities
from src.runtime.atomic import atomic_path
from src.runtime.cache import default_cache_dir
from src.runtime.checks import ConfigError
from src.runtime.errors import UserError

# 2: the .npz holds `digest` (sha256 of its arrays) and `exact`; 3: `item_ids` (original id of each item index)
CACHE_VERSION = 3
SPLIT_ARRAYS = (
    "shape",
    "exact",
    "train_ptr",
    "train_items",
    "val_items",
    "test_items",
    "val_negatives",
    "test_negatives",
    "notes",
)

# dataset -> the file sets a reader can use, preferred first, each with its reader(folder, lineage_quirks)
LAYOUTS: dict[str, list[tuple[list[str], Callable[[Path, bool], raw.RawRatings]]]] = {
    "ml-100k": [(["u.data"], lambda folder, quirks: raw.read_ml100k(folder))],
    "ml-1m": [
        (["ratings.dat"], lambda folder, quirks: raw.read_ml1m_original(folder)),
        (["chronological_order.tsv.gz", "pfedrec_loo_split.tsv"], lambda folder, quirks: raw.read_ml1m_partial(folder)),
    ],
    "filmtrust": [(["ratings.txt"], lambda folder, quirks: raw.read_filmtrust(folder, quirks))],
    "lastfm-2k": [(["user_taggedartists.dat"], lambda folder, quirks: raw.read_lastfm(folder))],
}


class SplitCacheError(UserError, ValueError):
    """A cached split file cannot be read or its content digest differs: it must not be used."""

    def __init__(self, path: Path, reason: str) -> None:
        """Name the file, what is wrong and what to do."""
        self.path = path
        super().__init__(f"split cache {path} is corrupt or truncated ({reason}); delete it to rebuild the split")


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
    item_ids: np.ndarray | None = None  # original id of each item index [m] (genres, diagnostics)
    verified: bool | None = None
    split_file: str | None = None  # the cached .npz this split was read from or written to (a head() keeps it)

    @property
    def train_users(self) -> np.ndarray:
        """User index of every training positive."""
        return np.repeat(np.arange(self.n_users), np.diff(self.train_ptr))

    def train_matrix(self) -> np.ndarray:
        """Boolean [users, items]: True at training positives."""
        return interaction_matrix(self.n_users, self.n_items, self.train_users, self.train_items)

    def interacted_matrix(self) -> np.ndarray:
        """Boolean [users, items]: True at every interaction (training and held-out)."""
        return all_interactions(
            self.n_users, self.n_items, self.train_users, self.train_items, self.val_items, self.test_items
        )

    def head(self, n: int) -> FedData:
        """The first `n` clients of the split (all items kept): smoke tests and parity checks only."""
        if n >= self.n_users:
            return self
        end = int(self.train_ptr[n])
        return dataclasses.replace(
            self,
            n_users=n,
            train_ptr=self.train_ptr[: n + 1],
            train_items=self.train_items[:end],
            val_items=self.val_items[:n],
            test_items=self.test_items[:n],
            val_negatives=self.val_negatives[:n],
            test_negatives=self.test_negatives[:n],
            notes=[*self.notes, f"first {n} users only (data.max_users)"],
        )

    def summary(self) -> dict:
        """The facts a user checks first: sizes, per-user spread, protocol, seed, source.

        `verified`: this run checked every file read against its known digests (null for synthetic data);
        the split is the lineage's exact split only on verified files.
        """
        per_user = np.diff(self.train_ptr) + 2
        return {
            "dataset": self.name,
            "protocol": self.protocol,
            "seed": self.seed,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": int(per_user.sum()),
            "train": int(len(self.train_items)),
            "val": int(self.n_users),
            "test": int(self.n_users),
            "interactions_per_user": {
                "min": int(per_user.min()),
                "median": float(np.median(per_user)),
                "max": int(per_user.max()),
            },
            "eval_negatives_per_user": int(self.val_negatives.shape[1] + self.test_negatives.shape[1]),
            "folder": self.folder,
            "verified": self.verified,
            "exact_lineage_split": bool(self.exact and self.verified),
            "notes": self.notes,
            "held_out_overlap": self.held_out_overlap(),
        }

    def held_out_overlap(self) -> dict[str, int]:
        """Users whose held-out items are not new to them: the validation item is the test item, the test or the
        validation item is also a training positive. All 0 under the clean protocol; Lastfm-2k's repeated pairs,
        kept under the paper protocol (lineage behaviour), make its validation there largely a look at the test
        item."""
        owner = self.train_users

        def users_training_on(held: np.ndarray) -> int:
            """Users with held[u] among their training positives (held: one item per user, [n])."""
            return int(np.unique(owner[self.train_items == held[owner]]).size)

        return {
            "val_is_test": int((self.val_items == self.test_items).sum()),
            "test_in_train": users_training_on(self.test_items),
            "val_in_train": users_training_on(self.val_items),
        }


def locate(dataset: DictConfig, root: str | None) -> tuple[Path, list[Path]]:
    """The folder of a real dataset and the files its reader will use (the first complete file set)."""
    name = dataset.name
    if name not in LAYOUTS:
        raise ValueError(f"dataset={name!r}; expected one of {', '.join(LAYOUTS)}, synthetic")
    layouts = LAYOUTS[name]
    folder = resolve_dataset_dir(name, [files for files, _ in layouts], root)
    files = next(files for files, _ in layouts if all((folder / f).is_file() for f in files))
    return folder, [folder / f for f in files]


def check_located(cfg: DictConfig) -> None:
    """Before any job starts: a real dataset is where `data.root` (or $ALIGNFEDREC_DATA) says; one found in none of
    the roots is left to the download, which fails in one line too (`DataNotFound`, `DownloadError`)."""
    if cfg.dataset.name == "synthetic":
        return
    if cfg.data.root:
        locate(cfg.dataset, str(cfg.data.root))
    else:
        candidate_roots(None)


def read_located(name: str, folder: Path, files: list[Path], lineage_quirks: bool) -> raw.RawRatings:
    """Run the reader of the file set `files` in `folder`, and check that it read exactly those files."""
    reader = next(read for fs, read in LAYOUTS[name] if [folder / f for f in fs] == files)
    ratings = reader(folder, lineage_quirks)
    if [Path(p) for p in ratings.files] != files:
        raise RuntimeError(f"the {name} reader read {ratings.files}, but {files} were located and verified")
    return ratings


def read_synthetic(dataset: DictConfig) -> tuple[raw.RawRatings, np.ndarray]:
    """The synthetic dataset's ratings and planted item communities [m] (unit tests only)."""
    return planted_communities(
        dataset.n_users,
        dataset.n_items,
        dataset.n_communities,
        dataset.per_user,
        dataset.affinity,
        dataset.generator_seed,
    )


def check_files(name: str, digests: dict[Path, tuple[str, str]], verify: bool) -> tuple[bool, list[str]]:
    """Refuse files whose digests differ from KNOWN_FILES when `verify`; return (verified, notes for the run)."""
    if verify:
        for path, found in digests.items():
            verify_known(name, path, found)
        return True, []
    differ = [
        p.name
        for p, found in digests.items()
        if (name, p.name) not in KNOWN_FILES or digest_mismatch(KNOWN_FILES[name, p.name], found)
    ]
    return False, [
        f"data.verify=false: files not verified; differing from the known release: "
        f"{', '.join(differ) if differ else 'none'}"
    ]


def spare_negatives(protocol: DictConfig) -> int:
    """Never-interacted items each user must keep outside its evaluation candidates: one when the training-negative
    pool leaves the candidates out (it must still have a negative to draw), else none."""
    return int(protocol.train_negative_pool == "non_train_non_candidates")


def too_few_negatives(err: TooFewNegatives, name: str, half: int, spare: int) -> ConfigError:
    """`protocol.eval_negatives`' one-line refusal for a user without enough never-interacted items."""
    kept = " and protocol.train_negative_pool=non_train_non_candidates keeps one out of them" if spare else ""
    most = (err.available - spare) // 2
    expected = f"at most {most}" if most >= 1 else "a dataset or pool that leaves every user a negative to draw"
    return ConfigError(
        f"protocol.eval_negatives={half} is too large for {name}: user index {err.user} has "
        f"{err.available} never-interacted items, the protocol draws {half} for validation and {half} for "
        f"test{kept}; expected {expected}"
    )


def check_spare(arrays: dict[str, np.ndarray], name: str, protocol: DictConfig) -> None:
    """A cached split (its key leaves the training-negative pool out: the pool draws nothing of it) checked for the
    pool as a fresh draw is: every user keeps `spare_negatives` items outside its candidates."""
    spare = spare_negatives(protocol)
    if not spare:
        return
    available = int(arrays["shape"][1]) - (np.diff(arrays["train_ptr"]) + 2)  # all but training and held-out items
    count = int(arrays["val_negatives"].shape[1] + arrays["test_negatives"].shape[1])
    try:
        check_available(available, count, spare)
    except TooFewNegatives as err:
        raise too_few_negatives(err, name, int(protocol.eval_negatives), spare) from None


def cache_key(dataset: DictConfig, protocol: DictConfig, seed: int, source_sha: str) -> str:
    """Hash of everything the split depends on."""
    payload = json.dumps(
        {
            "v": CACHE_VERSION,
            "dataset": OmegaConf.to_container(dataset, resolve=True),
            "dedupe": bool(protocol.dedupe_pairs),
            "quirks": bool(protocol.lineage_quirks),
            "negatives": int(protocol.eval_negatives),
            "seed": int(seed),
            "source": source_sha,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over every array's name, dtype, shape and bytes: what a split cache file must still hold."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write an .npz holding `arrays` plus their `digest`, atomically, so readers never see half a file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, digest=np.array(arrays_digest(arrays)), **arrays)


def load_npz_verified(path: Path, required: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Read an .npz written by `save_npz_atomic`; SplitCacheError when unreadable, incomplete or altered."""
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise SplitCacheError(path, f"unreadable: {exc}") from exc
    stored = arrays.pop("digest", None)
    missing = [k for k in required if k not in arrays]
    if stored is None or missing:
        raise SplitCacheError(path, f"missing {', '.join(missing or ['digest'])}")
    if str(stored) != arrays_digest(arrays):
        raise SplitCacheError(path, "its content differs from the digest written with it")
    return arrays


def build(
    dataset: DictConfig,
    protocol: DictConfig,
    seed: int,
    root: str | None = None,
    cache_dir: str | None = None,
    verify: bool = True,
) -> FedData:
    """Locate and verify the files, then read, filter, split and draw the evaluation negatives.

    Every file a reader uses is checked against KNOWN_FILES before anything is read or split (DataIntegrityError
    on a mismatch) unless `verify` is False; synthetic data is not verified. The split is cached under a key
    of the config and the files' sha256, and reused when keyed equal.
    """
    synthetic = dataset.name == "synthetic"
    folder, files = (None, []) if synthetic else locate(dataset, root)
    digests = {p: file_digests(p) for p in files}
    verified, run_notes = (None, []) if synthetic else check_files(dataset.name, digests, verify)
    source_sha = hashlib.sha256("".join(sha for sha, _ in digests.values()).encode()).hexdigest()
    cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir() / "splits"
    key = cache_key(dataset, protocol, seed, source_sha)
    path = cache_root / f"{dataset.name}-{protocol.name}-seed{seed}-{key}.npz"
    meta = dict(
        name=dataset.name,
        protocol=protocol.name,
        seed=int(seed),
        verified=verified,
        folder=str(folder) if folder else "synthetic",
        split_file=str(path),
    )
    if path.is_file():
        arrays = load_npz_verified(path, SPLIT_ARRAYS)
        check_spare(arrays, dataset.name, protocol)
        notes = [*arrays.pop("notes").tolist(), *run_notes]
        community = arrays.pop("item_community", None)
        item_ids = arrays.pop("item_ids", None)
        n_users, n_items = (int(v) for v in arrays.pop("shape"))
        exact = bool(arrays.pop("exact"))
        return FedData(
            n_users=n_users,
            n_items=n_items,
            notes=notes,
            item_community=community,
            item_ids=item_ids,
            exact=exact,
            **meta,
            **arrays,
        )
    if synthetic:
        ratings, community = read_synthetic(dataset)
    else:
        ratings, community = read_located(dataset.name, folder, files, bool(protocol.lineage_quirks)), None
    frame = ratings.frame
    notes = list(ratings.notes)
    kept_rows = filter_min_interactions(frame, int(dataset.min_user_rows))
    if not len(kept_rows):
        most = int(frame.groupby("user").size().max()) if len(frame) else 0
        raise ConfigError(
            f"dataset.min_user_rows={dataset.min_user_rows} leaves no user of {dataset.name} (the most rows a user "
            f"has: {most}); expected at most {most}"
        )
    frame = kept_rows
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
    interacted = all_interactions(
        loo.n_users, loo.n_items, loo.train_users, loo.train_items, loo.val_items, loo.test_items
    )
    half, spare = int(protocol.eval_negatives), spare_negatives(protocol)
    try:
        negatives = draw_eval_negatives(interacted, 2 * half, seed, spare=spare)
    except TooFewNegatives as err:
        raise too_few_negatives(err, dataset.name, half, spare) from None
    if community is not None:
        community = community[loo.item_ids]
    data = FedData(
        n_users=loo.n_users,
        n_items=loo.n_items,
        train_ptr=ptr,
        train_items=loo.train_items,
        val_items=loo.val_items,
        test_items=loo.test_items,
        val_negatives=negatives[:, :half],
        test_negatives=negatives[:, half:],
        notes=[*notes, *run_notes],
        item_community=community,
        item_ids=np.asarray(loo.item_ids).astype(np.int64),
        exact=ratings.exact,
        **meta,
    )
    extra = {} if community is None else {"item_community": community}
    save_npz_atomic(
        path,
        shape=np.array([loo.n_users, loo.n_items]),
        exact=np.array(bool(ratings.exact)),
        train_ptr=ptr,
        train_items=loo.train_items,
        val_items=loo.val_items,
        test_items=loo.test_items,
        val_negatives=data.val_negatives,
        test_negatives=data.test_negatives,
        notes=np.array(notes, dtype=str),
        item_ids=data.item_ids,
        **extra,
    )
    return data


def load(cfg: DictConfig) -> FedData:
    """The dataset a run uses: `build` from the config, cut to `data.max_users` clients when set."""
    data = build(
        cfg.dataset,
        cfg.protocol,
        int(cfg.seed),
        cfg.data.root,
        cfg.data.cache_dir,
        verify=bool(cfg.data.verify),
    )
    max_users = cfg.data.get("max_users")
    return data if max_users is None else data.head(int(max_users))
