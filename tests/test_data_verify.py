"""Trustworthy data: local files are checked against their known digests, split caches against theirs.

Modified inputs are copies of the real files in a pytest tmp_path; ../shared/data is only read.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

import src.data.dataset as dataset_mod
import src.data.paths as paths_mod
from src.data.dataset import LAYOUTS, SplitCacheError, build, load
from src.data.download import KNOWN_FILES, DataIntegrityError, file_digests, verify_known
from src.data.paths import ENV_VAR, candidate_roots
from tests.conftest import SHARED_DATA, requires_real_data

FILMTRUST_SHA256 = "5aba3481d6eecfd1275e49d50eaa6d3525fa0afd95c91b30ec832390af8a6f9c"


def sha256_of(path: Path) -> str:
    """Independent sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_dataset(root: Path, name: str, files: list[str]) -> Path:
    """Copy `files` of a real dataset into `root/<name>/` and return that folder."""
    folder = root / name
    folder.mkdir(parents=True)
    for f in files:
        shutil.copyfile(SHARED_DATA / name / f, folder / f)
    return folder


def change_first_id(path: Path) -> None:
    """Change the item id of the first line of a space-separated ratings file."""
    lines = path.read_bytes().split(b"\n")
    user, item, rating = lines[0].split(b" ")
    lines[0] = b" ".join([user, str(int(item) + 1).encode(), rating])
    path.write_bytes(b"\n".join(lines))


def cut_at_line(path: Path, n: int) -> None:
    """Keep only the first `n` lines of a file."""
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:n]))


@pytest.fixture
def no_split_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make reading and splitting fail loudly, to show that a refusal comes before either."""

    def must_not_run(*args, **kwargs):
        raise AssertionError("the files were read or split before they were verified")

    for reader in ("read_ml100k", "read_ml1m_original", "read_ml1m_partial", "read_filmtrust", "read_lastfm"):
        monkeypatch.setattr(dataset_mod.raw, reader, must_not_run)
    monkeypatch.setattr(dataset_mod, "leave_one_out", must_not_run)
    monkeypatch.setattr(dataset_mod, "draw_eval_negatives", must_not_run)


def build_cfg(compose_cfg, overrides: list[str]):
    """Compose the real config and build its split (verification as `data.verify` says)."""
    cfg = compose_cfg(overrides)
    return build(cfg.dataset, cfg.protocol, cfg.seed, cfg.data.root, cfg.data.cache_dir, verify=cfg.data.verify)


# ---------------------------------------------------------------- the table of known files


def test_every_file_a_reader_uses_has_a_known_digest():
    for name, layouts in LAYOUTS.items():
        for files, _reader in layouts:
            for f in files:
                assert (name, f) in KNOWN_FILES, (name, f)
                assert KNOWN_FILES[name, f].expected_digests(), (name, f)


@requires_real_data
@pytest.mark.parametrize("name, files", [(n, fs) for n, layouts in LAYOUTS.items() for fs, _ in layouts])
def test_known_digests_match_the_shared_files(name: str, files: list[str]):
    for f in files:
        path = SHARED_DATA / name / f
        if not path.is_file():
            pytest.skip(f"{path} absent (ml-1m ratings.dat is not in ../shared/data)")
        verify_known(name, path, file_digests(path))


def test_ml1m_partial_digests_are_those_of_the_shared_readme():
    assert KNOWN_FILES["ml-1m", "chronological_order.tsv.gz"].sha256 == (
        "8a1d303126316516a3f25c41b88047ad265b8cd79dbebcdce76d1e8dd7249239"
    )
    assert KNOWN_FILES["ml-1m", "pfedrec_loo_split.tsv"].sha256 == (
        "0c563f62008e9f5174b642ea31d7faaf185e64f3dd581c05def49e87c41ef7b9"
    )


# ---------------------------------------------------------------- modified local files are refused


@requires_real_data
@pytest.mark.parametrize("modify", [change_first_id, lambda p: cut_at_line(p, 20_000)], ids=["one-id", "cut"])
def test_modified_filmtrust_refused_before_any_split_work(compose_cfg, tmp_path: Path, no_split_work, modify):
    folder = copy_dataset(tmp_path / "data", "filmtrust", ["ratings.txt"])
    bad = folder / "ratings.txt"
    modify(bad)
    cache = tmp_path / "cache"
    with pytest.raises(DataIntegrityError) as err:
        build_cfg(compose_cfg, ["dataset=filmtrust", f"data.root='{tmp_path / 'data'}'", f"data.cache_dir='{cache}'"])
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert str(bad) in msg
    assert FILMTRUST_SHA256 in msg and sha256_of(bad) in msg
    assert f"python -m src.data.download filmtrust --dest {tmp_path / 'data'}" in msg
    assert "../shared/data/README.md" in msg and "data.verify=false" in msg
    assert not cache.exists()


@requires_real_data
def test_truncated_ml1m_partial_gzip_refused_as_integrity_error(compose_cfg, tmp_path: Path, no_split_work):
    folder = copy_dataset(tmp_path, "ml-1m", ["chronological_order.tsv.gz", "pfedrec_loo_split.tsv"])
    bad = folder / "chronological_order.tsv.gz"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # a partial copy: the gzip stream is cut
    with pytest.raises(DataIntegrityError, match="chronological_order.tsv.gz") as err:
        build_cfg(compose_cfg, ["dataset=ml-1m", f"data.root='{tmp_path}'"])
    assert KNOWN_FILES["ml-1m", "chronological_order.tsv.gz"].sha256 in str(err.value)


@requires_real_data
def test_modified_ml1m_split_file_refused(compose_cfg, tmp_path: Path, no_split_work):
    folder = copy_dataset(tmp_path, "ml-1m", ["chronological_order.tsv.gz", "pfedrec_loo_split.tsv"])
    cut_at_line(folder / "pfedrec_loo_split.tsv", 20)
    with pytest.raises(DataIntegrityError, match="pfedrec_loo_split.tsv"):
        build_cfg(compose_cfg, ["dataset=ml-1m", f"data.root='{tmp_path}'"])


@requires_real_data
def test_modified_file_in_download_cache_refused(compose_cfg, tmp_path: Path, monkeypatch, no_split_work):
    monkeypatch.setattr(paths_mod, "SHARED_DATA", tmp_path / "no-shared-data")
    monkeypatch.setenv("ALIGNFEDREC_CACHE", str(tmp_path / "cache"))
    folder = copy_dataset(tmp_path / "cache" / "data", "filmtrust", ["ratings.txt"])
    change_first_id(folder / "ratings.txt")
    with pytest.raises(DataIntegrityError, match=str(folder / "ratings.txt")):
        build_cfg(compose_cfg, ["dataset=filmtrust", f"data.cache_dir='{tmp_path / 'splits'}'"])


# ---------------------------------------------------------------- data.verify and the summary


@requires_real_data
def test_verified_copy_says_verified_and_exact(compose_cfg, tmp_path: Path):
    copy_dataset(tmp_path / "data", "filmtrust", ["ratings.txt"])
    cfg = compose_cfg(
        [
            "dataset=filmtrust",
            "protocol=paper",
            f"data.root='{tmp_path / 'data'}'",
            f"data.cache_dir='{tmp_path / 'cache'}'",
        ]
    )
    assert cfg.data.verify is True
    s = load(cfg).summary()
    assert s["verified"] is True and s["exact_lineage_split"] is True


@requires_real_data
def test_verify_false_uses_modified_data_and_never_claims_exactness(compose_cfg, tmp_path: Path):
    folder = copy_dataset(tmp_path / "data", "filmtrust", ["ratings.txt"])
    # line 2 (the paper protocol's lineage reader drops line 1) rates an item id no line has: the split holds it
    lines = (folder / "ratings.txt").read_bytes().split(b"\n")
    new_item = max(int(line.split(b" ")[1]) for line in lines if line.strip()) + 1
    user, _, rating = lines[1].split(b" ")
    lines[1] = b" ".join([user, str(new_item).encode(), rating])
    (folder / "ratings.txt").write_bytes(b"\n".join(lines))
    common = [
        "dataset=filmtrust",
        "protocol=paper",
        f"data.root='{tmp_path / 'data'}'",
        f"data.cache_dir='{tmp_path / 'cache'}'",
    ]
    for _ in range(2):  # a fresh build, then the cached split
        data = load(compose_cfg([*common, "data.verify=false"]))
        assert new_item in set(np.asarray(data.item_ids).tolist())  # the modified data is what was split
        s = data.summary()
        assert s["verified"] is False and s["exact_lineage_split"] is False
        assert any("data.verify=false" in n and "ratings.txt" in n for n in s["notes"])
    with pytest.raises(DataIntegrityError):  # the cached split of modified data is not served as verified
        load(compose_cfg(common))


@requires_real_data
def test_verify_false_on_good_files_is_still_not_verified(compose_cfg, tmp_path: Path):
    copy_dataset(tmp_path / "data", "filmtrust", ["ratings.txt"])
    common = [
        "dataset=filmtrust",
        "protocol=paper",
        f"data.root='{tmp_path / 'data'}'",
        f"data.cache_dir='{tmp_path / 'cache'}'",
    ]
    assert load(compose_cfg(common)).summary()["verified"] is True
    s = load(compose_cfg([*common, "data.verify=false"])).summary()  # same split, from the cache
    assert s["verified"] is False and s["exact_lineage_split"] is False
    assert load(compose_cfg(common)).summary()["exact_lineage_split"] is True


def test_synthetic_data_is_not_verified(compose_cfg, tmp_path: Path):
    s = load(compose_cfg(["dataset=synthetic", f"data.cache_dir='{tmp_path}'"])).summary()
    assert s["verified"] is None and s["exact_lineage_split"] is False


# ---------------------------------------------------------------- $ALIGNFEDREC_DATA


def test_data_env_var_to_missing_folder_is_an_error(monkeypatch, tmp_path: Path):
    missing = tmp_path / "nowhere"
    monkeypatch.setenv(ENV_VAR, str(missing))
    with pytest.raises(FileNotFoundError) as err:
        candidate_roots(None)
    assert ENV_VAR in str(err.value) and str(missing) in str(err.value)


def test_data_env_var_to_existing_folder_is_a_root(monkeypatch, tmp_path: Path):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert (ENV_VAR, tmp_path) in candidate_roots(None)


# ---------------------------------------------------------------- the split cache


def synthetic_cache(compose_cfg, tmp_path: Path) -> tuple[list[str], Path]:
    """Build the synthetic split into a fresh cache; return its overrides and the cache file."""
    overrides = ["dataset=synthetic", f"data.cache_dir='{tmp_path}'"]
    load(compose_cfg(overrides))
    (path,) = tmp_path.glob("synthetic-*.npz")
    return overrides, path


def test_cache_file_carries_a_digest_and_leaves_no_temporary_file(compose_cfg, tmp_path: Path):
    _, path = synthetic_cache(compose_cfg, tmp_path)
    with np.load(path) as z:
        assert "digest" in z.files and len(str(z["digest"])) == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_damaged_cache_file_is_reported_with_its_path(compose_cfg, tmp_path: Path, damage: str):
    overrides, path = synthetic_cache(compose_cfg, tmp_path)
    good = load(compose_cfg(overrides))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        with np.load(path) as z:
            needle = z["test_negatives"].tobytes()[:64]
        at = bytes(data).index(needle) + 8
        data[at] ^= 0xFF
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(SplitCacheError) as err:
        load(compose_cfg(overrides))
    msg = str(err.value)
    assert str(path) in msg and "delete it to rebuild the split" in msg
    path.unlink()
    again = load(compose_cfg(overrides))
    assert np.array_equal(again.test_negatives, good.test_negatives)


def test_cache_file_rewritten_with_other_arrays_is_refused(compose_cfg, tmp_path: Path):
    overrides, path = synthetic_cache(compose_cfg, tmp_path)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["test_items"] = arrays["test_items"][::-1].copy()  # a valid zip whose content is not what was written
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    with pytest.raises(SplitCacheError, match="differs from the digest"):
        load(compose_cfg(overrides))
