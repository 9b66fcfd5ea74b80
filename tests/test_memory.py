"""`fl.chunk_size=auto`: the cohort follows the free memory of the device."""

from __future__ import annotations

import pytest

from src.cli.config import ConfigError
from src.data.dataset import build
from src.rounds import memory
from src.rounds.simulator import FederatedModule


def test_auto_chunk_size_fits_the_budget():
    per = memory.bytes_per_client(1682, 32, "fast", 64, 256)
    assert per > memory.bytes_per_client(1682, 32, None, 64, 256)
    size = memory.auto_chunk_size(943, per, free=2**30, fraction=0.5)
    assert size * per <= 2**29 < (size + 1) * per
    assert memory.auto_chunk_size(943, per, free=2**40, fraction=0.5) == 943
    assert memory.auto_chunk_size(943, per, free=10, fraction=0.5) == 1
    assert memory.free_bytes(memory.torch.device("cpu")) > 0


def test_module_uses_the_free_memory(compose_cfg, monkeypatch):
    cfg = compose_cfg(["dataset=synthetic", "fl.chunk_size=auto", "fl.memory_fraction=0.5"])
    data = build(cfg.dataset, cfg.protocol, 0, cfg.data.root, cfg.data.cache_dir)
    per = memory.bytes_per_client(
        data.n_items, int(cfg.model.dim), "fast", int(cfg.model.fast_anchors), int(cfg.fl.batch_size)
    )
    monkeypatch.setattr("src.rounds.memory.free_bytes", lambda device: 2 * 7 * per)
    module = FederatedModule(cfg, data)
    assert module.chunk_size == 7
    out = module.run_round()
    assert out["clients"] == data.n_users
    with pytest.raises(ConfigError, match="fl.chunk_size"):
        compose_cfg(["fl.chunk_size=lots"])
