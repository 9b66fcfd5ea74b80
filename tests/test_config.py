"""Bad input fails early and says what is wrong: config ranges, unknown choices, bad files, checksums."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from hydra.errors import HydraException, MissingConfigException

import src.data.__main__ as data_cli
import src.data.dataset as dataset_mod
from src.cli.config import ConfigError, load_config
from src.data.dataset import build
from src.data.download import ChecksumError, FileSpec, verify_file
from src.data.raw import DataFormatError


def test_default_config_composes(compose_cfg):
    cfg = compose_cfg([])
    assert cfg.dataset.name == "ml-100k" and cfg.protocol.name == "clean"
    assert list(cfg.eval.ks) == [5, 10, 20]


@pytest.mark.parametrize(
    "override, key",
    [
        ("fl.rounds=-1", "fl.rounds"),
        ("fl.rounds=0", "fl.rounds"),
        ("ablation.sigma=1.5", "ablation.sigma"),
        ("ablation.sigma=-1.01", "ablation.sigma"),
        ("ablation.sigma=0", "ablation.sigma"),
        ("ablation.sigma=1", "ablation.sigma"),
        ("ablation.tau=0", "ablation.tau"),
        ("eval.ks=[0]", "eval.ks"),
        ("eval.ks=[5,-1]", "eval.ks"),
        ("eval.ks=[]", "eval.ks"),
        ("fl.client_fraction=0", "fl.client_fraction"),
        ("fl.client_fraction=1.5", "fl.client_fraction"),
        ("protocol.train_negative_pool=everything", "protocol.train_negative_pool"),
        ("comm.bits=3", "comm.bits"),
        ("comm.format=json", "comm.format"),
        ("comm.topk=0", "comm.topk"),
        ("privacy.epsilon=-1", "privacy.epsilon"),
        ("privacy.sensitivity=0", "privacy.sensitivity"),
        ("model.alignment=approx", "model.alignment"),
        ("model.fast_gsa=cols", "model.fast_gsa"),
        ("fl.memory_fraction=0", "fl.memory_fraction"),
    ],
)
def test_out_of_range_value_fails_validation_naming_the_key(compose_cfg, override, key):
    with pytest.raises(ConfigError) as err:
        compose_cfg([override])
    assert key in str(err.value)


@pytest.mark.parametrize(
    "override",
    ["ablation.sigma=0.999", "ablation.sigma=0.001", "fl.client_fraction=1", "ablation.tau=0.01", "eval.ks=[1,10]"],
)
def test_boundary_values_are_accepted(compose_cfg, override):
    compose_cfg([override])


def test_cli_validates_before_reading_any_data(monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("data was read before the config was validated")

    monkeypatch.setattr(data_cli, "build", must_not_run)
    monkeypatch.setattr(dataset_mod, "read_located", must_not_run)
    with pytest.raises(ConfigError, match="fl.rounds"):
        data_cli.main(["dataset=filmtrust", "fl.rounds=-1"])


@pytest.mark.parametrize(
    "group, valid",
    [
        ("dataset", ["filmtrust", "lastfm-2k", "ml-100k", "ml-1m", "synthetic"]),
        ("protocol", ["clean", "paper"]),
        ("ablation", ["backbone", "central", "fedavg", "local"]),
    ],
)
def test_unknown_choice_lists_valid_options(group, valid):
    with pytest.raises((MissingConfigException, HydraException)) as err:
        load_config([f"{group}=nope"])
    msg = str(err.value)
    assert "nope" in msg
    for option in valid:
        assert option in msg, f"{option!r} missing from: {msg}"


def test_malformed_line_names_file_and_line(compose_cfg, tmp_path: Path):
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    bad = folder / "u.data"
    bad.write_text("1\t10\t5\t881250949\n2\t20\t3\t881250950\n3\t30\t4\n4\t40\t2\t881250951\n")
    cache = tmp_path / "cache"
    cfg = compose_cfg(["dataset=ml-100k", f"data.root='{tmp_path}'", f"data.cache_dir='{cache}'"])
    with pytest.raises(DataFormatError) as err:
        build(cfg.dataset, cfg.protocol, cfg.seed, cfg.data.root, cfg.data.cache_dir, verify=False)
    msg = str(err.value)
    assert str(bad) in msg
    assert re.search(r"\bline 3\b", msg), msg
    assert not cache.exists() or not any(cache.iterdir())


def test_non_numeric_field_names_file_line_and_column(compose_cfg, tmp_path: Path):
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    bad = folder / "u.data"
    bad.write_text("1\t10\t5\t881250949\n2\t20\t3\t881250950\n3\t30\t4\t8812509\n4\tforty\t2\t881250951\n")
    cfg = compose_cfg(["dataset=ml-100k", f"data.root='{tmp_path}'"])
    with pytest.raises(DataFormatError) as err:
        build(cfg.dataset, cfg.protocol, cfg.seed, cfg.data.root, cfg.data.cache_dir, verify=False)
    msg = str(err.value)
    assert str(bad) in msg and re.search(r"\bline 4\b", msg) and "item" in msg and "forty" in msg


def test_configured_root_without_files_is_an_error(compose_cfg, tmp_path: Path):
    cfg = compose_cfg(["dataset=filmtrust", f"data.root='{tmp_path}'"])
    with pytest.raises(FileNotFoundError, match="filmtrust"):
        build(cfg.dataset, cfg.protocol, cfg.seed, cfg.data.root, cfg.data.cache_dir, verify=False)


def test_checksum_mismatch_names_expected_and_found(tmp_path: Path):
    data = b"1\t10\t5\t881250949\n"
    path = tmp_path / "u.data"
    path.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    verify_file(path, FileSpec("u.data", "u.data", sha256=sha, git_blob=blob))  # correct: no error

    wrong_sha = "0" * 64
    with pytest.raises(ChecksumError) as err:
        verify_file(path, FileSpec("u.data", "u.data", sha256=wrong_sha))
    msg = str(err.value)
    assert wrong_sha in msg and sha in msg and str(path) in msg

    wrong_blob = "f" * 40
    with pytest.raises(ChecksumError) as err:
        verify_file(path, FileSpec("u.data", "u.data", sha256=sha, git_blob=wrong_blob))
    msg = str(err.value)
    assert wrong_blob in msg and blob in msg
    assert err.value.expected == wrong_blob and err.value.found == blob


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["privacy.epsilon=1", "privacy.scale=0.1"], "privacy.scale"),
        (["privacy.epsilon=1", "comm.topk=8"], "comm.topk"),
    ],
)
def test_conflicting_privacy_and_encoding_options_name_the_key(compose_cfg, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_cfg(overrides)
