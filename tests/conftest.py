"""Shared fixtures: the real Hydra config, an isolated split cache, and the real data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import src
from src.cli.config import load_config

SHARED_DATA = Path(src.__file__).resolve().parents[2] / "shared" / "data"

requires_real_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real datasets not found at {SHARED_DATA}")


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory):
    """Point every default cache location at a temporary folder for the whole session.

    Also drops ALIGNFEDREC_DATA so that a user's own data root cannot change what the tests read, and
    under pytest-xdist (`make test`) gives each worker one torch thread.
    """
    mp = pytest.MonkeyPatch()
    mp.setenv("ALIGNFEDREC_CACHE", str(tmp_path_factory.mktemp("alignfedrec-cache")))
    mp.delenv("ALIGNFEDREC_DATA", raising=False)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # `make test` runs TEST_WORKERS (2) pytest workers: one torch thread each (and in the runs they
        # start), so that the workers do not oversubscribe a 2-core machine
        import torch

        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("MKL_NUM_THREADS", "1")
        torch.set_num_threads(1)
    yield
    mp.undo()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder given as `data.cache_dir` to every composed config (never the user cache): one for the whole
    session, its xdist workers included (the split cache is written atomically), so each real split is built once."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return tmp_path_factory.mktemp("splits")
    shared = tmp_path_factory.getbasetemp().parent / "splits"
    shared.mkdir(exist_ok=True)
    return shared


@pytest.fixture(scope="session")
def compose_cfg(cache_dir: Path):
    """`compose_cfg(overrides)` composes conf/ through `src.cli.config.load_config` (Hydra compose).

    `data.cache_dir` is set to the session's temporary cache unless the overrides set it.
    """

    def compose(overrides: list[str] | None = None):
        overrides = list(overrides or [])
        if not any(o.startswith("data.cache_dir=") for o in overrides):
            overrides.append(f"data.cache_dir='{cache_dir}'")
        return load_config(overrides)

    return compose


@pytest.fixture(scope="session")
def real_build(compose_cfg):
    """`real_build(dataset, protocol, seed)` builds a real dataset once per session from ../shared/data."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA}")
    from src.data.dataset import build

    built: dict[tuple[str, str, int], object] = {}

    def get(dataset: str, protocol: str = "paper", seed: int = 0):
        key = (dataset, protocol, seed)
        if key not in built:
            cfg = compose_cfg(
                [f"dataset={dataset}", f"protocol={protocol}", f"seed={seed}", f"data.root='{SHARED_DATA}'"]
            )
            built[key] = build(cfg.dataset, cfg.protocol, cfg.seed, cfg.data.root, cfg.data.cache_dir)
        return built[key]

    return get


@pytest.fixture
def one_thread():
    """One torch thread for the test (tiny tensors; the bench reports the thread count), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The wandb module with W&B offline, silent, keyless and writing under `<tmp_path>/wandb-dir` (skipped without
    wandb)."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (tmp_path / "wandb-dir").mkdir()
    return wandb
