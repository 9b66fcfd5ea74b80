"""Ready for a GPU without one: the device settings, where server state lives, and the host-device traffic
of the round path, each checked on the CPU (the `meta` device or monkeypatched torch calls stand in for CUDA)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from src.alignment.broadcast import Broadcast
from src.cli.config import ConfigError
from src.clients.cohort import OptimSpec, batch_layout, sample_round, train_cohort
from src.clients.model import ModelSpec, init_params
from src.config.identity import resume_mismatch
from src.data.dataset import build
from src.flower.messages import Task, pack_task
from src.methods import alignfedrec
from src.methods.central import CentralTrainer
from src.methods.central import build as central_method
from src.rounds import memory
from src.rounds.memory import resolve_chunk_size
from src.rounds.simulator import FederatedModule
from src.runtime import device as dev
from src.server.aggregation import MeanAggregator
from tests.test_cohort_exact import N_ITEMS, NEGATIVES, make_problem

META = torch.device("meta")
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def highest_after(one_thread):
    """Tiny tensors (one thread is fastest); the matmul precision is process-wide: restore the default."""
    yield
    torch.set_float32_matmul_precision("highest")


@pytest.fixture
def fake_cuda(monkeypatch):
    """`configure` on a CUDA device without one: record the deterministic switch, start without the cuBLAS variable."""
    calls: list[bool] = []
    monkeypatch.setattr(dev.torch, "use_deterministic_algorithms", calls.append)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    return calls


def test_resolve_device(monkeypatch):
    assert dev.resolve_device("cpu") == torch.device("cpu")
    assert dev.resolve_device("cuda:1") == torch.device("cuda:1")
    for available, expected in ((True, "cuda"), (False, "cpu")):  # `auto`: the GPU when there is one
        monkeypatch.setattr(torch.cuda, "is_available", lambda available=available: available)
        assert dev.resolve_device("auto") == torch.device(expected)


def test_configure_on_cuda_is_deterministic(fake_cuda, monkeypatch):
    import os

    dev.configure(torch.device("cuda"), True, "highest")
    assert fake_cuda == [True] and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.get_float32_matmul_precision() == "highest"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the other deterministic value is kept
    dev.configure(torch.device("cuda:0"), True, "high")
    assert fake_cuda == [True, True] and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert torch.get_float32_matmul_precision() == "high"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    with pytest.raises(RuntimeError, match="CUBLAS_WORKSPACE_CONFIG"):
        dev.configure(torch.device("cuda"), True, "highest")
    dev.configure(torch.device("cuda"), False, "highest")  # opted out: switched off, the variable left alone
    assert fake_cuda == [True, True, False] and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":0:0"
    with pytest.raises(ValueError, match="matmul_precision"):
        dev.configure(torch.device("cuda"), True, "tf32")


def test_configure_on_cpu_switches_nothing(fake_cuda):
    import os

    dev.configure(torch.device("cpu"), True, "high")
    assert torch.get_float32_matmul_precision() == "high"
    dev.configure(torch.device("cpu"), True, "highest")
    assert torch.get_float32_matmul_precision() == "highest"
    assert fake_cuda == [] and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert not torch.are_deterministic_algorithms_enabled()


def test_run_configures_its_device_from_the_config(compose_cfg, monkeypatch):
    calls = []
    monkeypatch.setattr(dev, "configure", lambda *args: calls.append(args))
    cfg = compose_cfg(
        ["dataset=synthetic", "ablation=backbone", "compute.matmul_precision=high", "compute.deterministic=false"]
    )
    data = build(cfg.dataset, cfg.protocol, 0, cfg.data.root, cfg.data.cache_dir)
    FederatedModule(cfg, data)
    assert calls == [(torch.device("cpu"), False, "high")]
    calls.clear()
    del cfg.compute  # a config from before the block: its defaults
    assert dev.setup_device(cfg) == torch.device("cpu") and calls == [(torch.device("cpu"), True, "highest")]


@pytest.mark.parametrize(
    "override, key",
    [
        ("compute.deterministic=1", "compute.deterministic"),
        ("compute.matmul_precision=tf32", "compute.matmul_precision"),
        ("fl.max_auto_chunk=0", "fl.max_auto_chunk"),
        ("fl.max_auto_chunk=2.5", "fl.max_auto_chunk"),
    ],
)
def test_new_keys_are_validated(compose_cfg, override, key):
    with pytest.raises(ConfigError, match=key):
        compose_cfg([override])


def test_new_keys_match_their_neutral_default():
    """Checkpoints and stored runs from before these keys are the same runs as ones holding the defaults."""
    from src.cli.campaign import identity

    old = {"seed": 0, "fl": {"chunk_size": 128}}
    new = {
        "seed": 0,
        "fl": {"chunk_size": 128, "max_auto_chunk": 1024},
        "compute": {"deterministic": True, "matmul_precision": "highest"},
    }
    assert resume_mismatch(old, new) == [] and identity(old) == identity(new)
    tf32 = copy.deepcopy(new)
    tf32["compute"]["matmul_precision"] = "high"
    assert resume_mismatch(old, tf32) == ["compute.matmul_precision: '<absent>' -> 'high'"]
    assert identity(old) != identity(tf32)


def test_auto_chunk_is_capped(compose_cfg, monkeypatch):
    assert memory.auto_chunk_size(6040, 1000, free=2**40, fraction=0.5) == 6040
    assert memory.auto_chunk_size(6040, 1000, free=2**40, fraction=0.5, cap=1024) == 1024
    assert memory.auto_chunk_size(6040, 1000, free=10**6, fraction=0.5, cap=1024) == 500
    monkeypatch.setattr("src.rounds.memory.free_bytes", lambda device: 2**50)  # a device that fits everyone
    cfg = compose_cfg(["fl.chunk_size=auto"])
    assert resolve_chunk_size(cfg, 3706, 6040, torch.device("cpu")) == 1024
    cfg = compose_cfg(["fl.chunk_size=auto", "fl.max_auto_chunk=7"])
    assert resolve_chunk_size(cfg, 3706, 6040, torch.device("cpu")) == 7


def test_server_mean_lives_on_the_server_device():
    """Sums stay where the uploads are; the mean goes to the declared server device (CPU by default), so
    the Flower server can `.numpy()` it. `meta` stands in for a device other than the compute device."""
    params = {"items": torch.randn(4, 5, 3), "b0": torch.randn(4, 1)}
    previous = {"items": torch.zeros(5, 3), "b0": torch.zeros(1)}
    uploaded = torch.tensor([True, False, True, True])
    agg = MeanAggregator()
    syncs = dev.COUNTERS.syncs
    agg.add({k: v[uploaded] for k, v in params.items()}, 3)
    assert dev.COUNTERS.syncs == syncs and agg.count == 3  # the count comes from the CPU, no read-back
    out = agg.result(previous)
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in out.values())
    none = torch.zeros(0, dtype=torch.long)
    pack_task(Task(1, torch.arange(4), out, None, None, none))  # the Flower broadcast: `.numpy()` on each tensor
    elsewhere = MeanAggregator(META)
    elsewhere.add({k: v[uploaded] for k, v in params.items()}, 3)
    assert all(v.device == META for v in elsewhere.result(previous).values())


@pytest.mark.parametrize("mode", ["fast", "fast_pairs", "exact"])
def test_alignment_copies_the_broadcast_once_per_device(compose_cfg, mode):
    """Steps reuse the copies made at the first step after a broadcast (`meta` stands in for the GPU)."""
    extra = ["model.fast_gsa=pairs"] if mode == "fast_pairs" else []
    cfg = compose_cfg(["ablation=full", f"model.alignment={mode.split('_')[0]}", "model.dim=4", *extra])
    align = alignfedrec.build(cfg, CPU).loss
    m = 12
    g = torch.rand(m, m, generator=torch.Generator().manual_seed(0))
    g = (g + g.T) / 2
    g.fill_diagonal_(0)
    b = Broadcast(torch.arange(m) % 3, g, align.sigma)
    table = torch.randn(3, m, 4, device=META)
    anchors = torch.zeros(3, 5, dtype=torch.long, device=META)
    valid = torch.ones(3, 5, dtype=torch.bool, device=META)
    first = dev.COUNTERS.transfers
    align.value_and_grad(table, anchors, valid, b)
    copied = dev.COUNTERS.transfers - first
    assert copied == (4 if mode == "fast_pairs" else 3)  # labels, sizes and S_g (or its pairs and targets)
    cached = {name: b.on(name, META) for name in ("labels", "sizes", "global_sim", "pairs", "targets")}
    after = dev.COUNTERS.transfers
    for _ in range(3):
        align.value_and_grad(table, anchors, valid, b)
    assert dev.COUNTERS.transfers == after
    assert all(b.on(name, META) is t and t.device == META for name, t in cached.items())
    assert b.on("global_sim", CPU) is g  # on the device it is on: itself
    assert Broadcast(torch.arange(m) % 2, g, align.sigma).on("labels", META) is not cached["labels"]  # a new one


def test_cpu_steps_make_no_copy_of_the_broadcast(compose_cfg, monkeypatch):
    """On the CPU too: no `.to(` call on any broadcast tensor inside a step."""
    cfg = compose_cfg(["ablation=full", "model.alignment=fast", "model.dim=4"])
    align = alignfedrec.build(cfg, CPU).loss
    b = Broadcast(torch.arange(12) % 3, torch.rand(12, 12), align.sigma)
    broadcast = {id(getattr(b, n)) for n in ("labels", "sizes", "global_sim", "pairs", "targets")}
    table, anchors, valid = torch.randn(3, 12, 4), torch.zeros(3, 5, dtype=torch.long), torch.ones(3, 5).bool()
    align.value_and_grad(table, anchors, valid, b)
    moved = []
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        moved.append(id(self))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    align.value_and_grad(table, anchors, valid, b)
    assert moved and not broadcast & set(moved)


SYNC_METHODS = ("__bool__", "__int__", "__float__", "item", "tolist", "nonzero")


def cohort_traffic(cfg, batch_size: int, monkeypatch) -> tuple[int, dict[str, int], dict[str, float]]:
    """Train one chunk of 7 clients; (its number of local steps, counted calls, losses). Every Python-level
    read of a tensor's value (`bool`, `int`, `float`, `item`, `tolist`, `nonzero`) is counted as a sync."""
    ptr, items, sampler = make_problem([3, 1, 9, 2, 5, 1, 4])
    samples = sample_round(ptr, items, sampler, NEGATIVES, 1, 1)
    rows = torch.tensor([2, 0, 6, 1, 4, 3, 5])
    layout = batch_layout(samples, rows, 2, batch_size, 1, 1)
    init = init_params(ModelSpec.from_cfg(cfg.model), 7, N_ITEMS, torch.Generator().manual_seed(2))
    params = {k: v[rows].clone() for k, v in init.items()}
    g = torch.rand(N_ITEMS, N_ITEMS, generator=torch.Generator().manual_seed(3))
    dense = alignfedrec.build(cfg, CPU).dense_loss(Broadcast(torch.arange(N_ITEMS) % 5, g, float(cfg.ablation.sigma)))
    implicit = {"reads": 0}
    for name in SYNC_METHODS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            implicit["reads"] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    before = dev.COUNTERS.snapshot()
    losses = train_cohort(params, samples, layout, OptimSpec.from_cfg(cfg.optim), N_ITEMS, cfg.model.loss, dense)
    monkeypatch.undo()
    counts = {k: v - before[k] for k, v in dev.COUNTERS.snapshot().items()} | implicit
    return layout.index.shape[1], counts, losses


@pytest.mark.parametrize("optim", ["optim=adam", "optim=sgd"])
@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_step_loop_syncs_once_per_chunk(compose_cfg, monkeypatch, optim, mode):
    """Host-device traffic of a chunk does not grow with its local steps: O(chunks), not O(steps)."""
    cfg = compose_cfg([optim, "ablation=full", f"model.alignment={mode}", "model.dim=4"])
    few_steps, few, _ = cohort_traffic(cfg, 64, monkeypatch)
    many_steps, many, losses = cohort_traffic(cfg, 2, monkeypatch)
    assert few_steps == 2 and many_steps == 46
    assert many == few and many["reads"] > 0, (few, many)
    # one read of the losses; the chunk's batches, active flags and rows; the alignment's broadcast copies
    assert many["syncs"] == 1 and many["transfers"] == 5 + 3
    assert set(losses) == {"bce", "ica", "gsa"}


def test_round_syncs_do_not_grow_with_steps(compose_cfg):
    """A whole round: the counted syncs and transfers depend on the chunks only, not on the local steps."""
    per_round = {}
    for batch in (256, 4):
        cfg = compose_cfg(["dataset=synthetic", "ablation=full", "fl.chunk_size=16", f"fl.batch_size={batch}"])
        data = build(cfg.dataset, cfg.protocol, 0, cfg.data.root, cfg.data.cache_dir)
        module = FederatedModule(cfg, data)
        module.run_round()  # the first round has no broadcast yet
        before = dev.COUNTERS.snapshot()
        row = module.run_round()
        per_round[batch] = ({k: v - before[k] for k, v in dev.COUNTERS.snapshot().items()}, row["steps"])
    (few, few_steps), (many, many_steps) = per_round[256], per_round[4]
    assert many_steps > 10 * few_steps
    assert many == few, per_round
    chunks = -(-60 // 16)
    assert few["syncs"] == chunks  # per chunk: the losses (the count of uploads is known on the CPU)


def test_central_reads_the_losses_once_with_the_same_sum(compose_cfg):
    """The centralised baseline's loss, read once per round, is bit for bit the per-batch `float(loss)` sum."""
    cfg = compose_cfg(["dataset=synthetic", "ablation=central", "ablation.batch_size=7"])
    ptr, items, sampler = make_problem([3, 1, 9, 2, 5, 1, 4])
    samples = sample_round(ptr, items, sampler, NEGATIVES, 1, 1)
    method = central_method(cfg, CPU)
    new = CentralTrainer(method, 7, N_ITEMS, CPU)
    old = CentralTrainer(method, 7, N_ITEMS, CPU)
    old.model.load_state_dict(new.model.state_dict())  # the head draws from the global generator
    before = dev.COUNTERS.syncs
    got = new.train_round(samples, torch.Generator().manual_seed(5))["bce"]
    assert dev.COUNTERS.syncs == before + 1
    # the loop as it was: every batch's loss read as it is computed
    counts = samples.ptr[1:] - samples.ptr[:-1]
    users = torch.repeat_interleave(torch.arange(len(counts)), counts)
    order = torch.randperm(len(users), generator=torch.Generator().manual_seed(5))
    total, n = 0.0, 0
    for start in range(0, len(order), old.batch):
        idx = order[start : start + old.batch]
        loss = F.binary_cross_entropy_with_logits(old.model(users[idx], samples.items[idx]), samples.labels[idx])
        old.opt.zero_grad(set_to_none=True)
        loss.backward()
        old.opt.step()
        total += float(loss.detach()) * len(idx)
        n += len(idx)
    assert len(order) % old.batch and got == total / n
    for a, b in zip(new.model.parameters(), old.model.parameters()):
        assert torch.equal(a, b)


def test_central_fused_adam_is_the_per_op_adam(compose_cfg):
    """The centralised MF's fused Adam takes the per-op Adam's steps, up to float rounding, over a round."""
    cfg = compose_cfg(["dataset=synthetic", "ablation=central", "ablation.batch_size=4", "ablation.lr=0.01"])
    ptr, items, sampler = make_problem([3, 1, 9, 2, 5, 1, 4])
    samples = sample_round(ptr, items, sampler, NEGATIVES, 1, 1)
    method = central_method(cfg, CPU)
    fused = CentralTrainer(method, 7, N_ITEMS, CPU)
    per_op = CentralTrainer(method, 7, N_ITEMS, CPU, fused=False)
    assert fused.opt.defaults["fused"] and not per_op.opt.defaults["fused"]
    per_op.model.load_state_dict(fused.model.state_dict())  # the head draws from the global generator
    start = [p.detach().clone() for p in fused.model.parameters()]
    a = fused.train_round(samples, torch.Generator().manual_seed(5))["bce"]
    b = per_op.train_round(samples, torch.Generator().manual_seed(5))["bce"]
    assert a == pytest.approx(b, rel=1e-5)
    for x, y, x0 in zip(fused.model.parameters(), per_op.model.parameters(), start):
        assert not torch.equal(x, x0)
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_block_sizes_grow_on_cuda_only(compose_cfg):
    from src.runtime.device import block_elements

    cfg = compose_cfg(["dataset=synthetic"])
    cpu_block = int(cfg.server.sim_block)
    assert block_elements(cfg, "server.sim_block", torch.device("cpu")) == cpu_block
    scale = int(cfg.compute.gpu_block_scale)
    assert scale > 1
    assert block_elements(cfg, "server.sim_block", torch.device("cuda")) == cpu_block * scale
    assert block_elements(cfg, "model.align_block", torch.device("cuda")) == int(cfg.model.align_block) * scale
    assert alignfedrec.build(cfg, torch.device("cuda")).loss.block == int(cfg.model.align_block) * scale
    assert alignfedrec.build(cfg, CPU).loss.block == int(cfg.model.align_block)
