"""The compute device of a run: which one, the settings that keep its results reproducible, and a count of
the host-device traffic of the round path.

`setup_device` runs once when a run starts (`FederatedModule.__init__`): it resolves `device` and, through
`configure`, pins what could otherwise change results on a GPU (`compute:` in conf/config.yaml):

- `compute.matmul_precision` (default `highest`): `torch.set_float32_matmul_precision`, so float32 matrix
  products stay IEEE float32 on every device; `high` allows TF32 (about 10 mantissa bits, faster on NVIDIA
  GPUs since Ampere; on CPUs with oneDNN TF32/bf16 support it changes CPU results too), `medium` bf16.
- `compute.deterministic` (default true), on CUDA only: `torch.use_deterministic_algorithms(True)` (float
  `index_add_` and the accumulating index puts of autograd then use their sorted, run-to-run identical
  kernels; an op that has no deterministic CUDA kernel raises RuntimeError at its first call instead of
  varying silently) and `CUBLAS_WORKSPACE_CONFIG=:4096:8` (set here when unset, before the run's first
  cuBLAS call; another deterministic value, `:16:8`, is kept; anything else is refused). On the CPU nothing
  is switched: its kernels are already deterministic, and the deterministic mode would change the CPU's
  accumulation order (`index_put_` with accumulate), hence its results.

The mode is process-wide: a CPU module built in the same process after a CUDA one (`src.gpucheck`) runs
under it too (its index puts then accumulate in sorted order, within rounding of a plain CPU run).

Tolerance that holds: on the CPU a fixed seed gives bit-identical rounds (tested exactly). On CUDA with
the defaults, the same seed on the same GPU model, driver, CUDA and torch versions is meant to repeat its
rounds bit for bit; this is not yet verified on a GPU. CUDA against the CPU is never bitwise (float32 sums
run in another order): `python -m src.gpucheck` requires client tables, S_g and losses within relative
1e-4 of the CPU's after two rounds; over many rounds the difference grows, and ranking metrics can differ
where near-tied scores swap.

`to_device` and `host_value` are how the round's step loop (`src/clients/cohort.py`), the alignment's
broadcast copies (`src/alignment/losses.py`), the server's mean (`src/server/aggregation.py`) and the centralised
baseline move tensors and read values back; `COUNTERS` counts their calls. Each call counts whether or not it
copies (on the CPU none does), so a CPU run counts what a CUDA run would move and wait for (`src.bench` prints
it per round).

`device_info`, `peak_rss_mib` and `run_resources` say what ran a bench or a run and its peak memory
(results.json `resources`).
"""

from __future__ import annotations

import os
import platform
import resource
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

MATMUL_PRECISIONS = ("highest", "high", "medium")
# the CUBLAS_WORKSPACE_CONFIG values under which cuBLAS is deterministic (CUDA >= 10.2)
DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")


@dataclass
class Counters:
    """Calls of `to_device` (tensors handed to a device) and `host_value` (device values read: a sync)."""

    transfers: int = 0
    syncs: int = 0

    def snapshot(self) -> dict[str, int]:
        """The counts now, as a plain dict."""
        return asdict(self)


COUNTERS = Counters()


def to_device(x: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`x` on `device` (as `dtype`), counted as one transfer; on the device it is already on, `x` itself."""
    COUNTERS.transfers += 1
    return x.to(device=device, dtype=dtype)


def host_value(x: torch.Tensor) -> Any:
    """`x` read on the host as Python numbers (`tolist`: a scalar for a 0-d tensor); one counted sync."""
    COUNTERS.syncs += 1
    return x.tolist()


def resolve_device(name: str) -> torch.device:
    """`auto` = cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def configure(device: torch.device, deterministic: bool = True, matmul_precision: str = "highest") -> None:
    """Pin the float32 matmul precision and, on CUDA, switch deterministic algorithms on or off (module doc)."""
    if matmul_precision not in MATMUL_PRECISIONS:
        raise ValueError(f"compute.matmul_precision={matmul_precision!r}; expected one of {MATMUL_PRECISIONS}")
    torch.set_float32_matmul_precision(matmul_precision)
    if device.type != "cuda":
        return
    if deterministic:
        cublas = os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", DETERMINISTIC_CUBLAS[0])
        if cublas not in DETERMINISTIC_CUBLAS:
            raise RuntimeError(
                f"CUBLAS_WORKSPACE_CONFIG={cublas!r} makes cuBLAS non-deterministic; unset it or "
                f"set {DETERMINISTIC_CUBLAS[0]} (or run with compute.deterministic=false)"
            )
    torch.use_deterministic_algorithms(deterministic)


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back (no mmap for large blocks,
    no trimming below 2 GiB of free heap): a round allocates and frees the same large temporaries chunk after
    chunk, and fresh pages fault in at a few GB/s (a 60 MB copy: 18.6 -> 3.0 ms). True when applied (glibc only)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def block_elements(cfg: DictConfig, key: str, device: torch.device) -> int:
    """A block size in elements (`model.align_block`, `server.sim_block`) for `device`: as configured on the
    CPU (cache-sized), times `compute.gpu_block_scale` on CUDA (few large kernels instead of many small ones)."""
    size = int(OmegaConf.select(cfg, key))
    if device.type != "cuda":
        return size
    return size * int(OmegaConf.select(cfg, "compute.gpu_block_scale", default=64))


def setup_device(cfg: DictConfig) -> torch.device:
    """The run's compute device (`device`), configured by `compute.*` (absent keys: their defaults)."""
    device = resolve_device(cfg.device)
    configure(
        device,
        bool(OmegaConf.select(cfg, "compute.deterministic", default=True)),
        str(OmegaConf.select(cfg, "compute.matmul_precision", default="highest")),
    )
    if OmegaConf.select(cfg, "compute.keep_heap", default=False):
        keep_freed_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # `run_resources`: this run's GPU peak, not an earlier job's
    return device


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_info(device: torch.device) -> dict[str, Any]:
    """What ran the bench or a run: GPU name, or CPU model; torch intra-op threads and visible CPU cores."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return {"type": device.type, "name": name, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}


def peak_rss_mib() -> float:
    """Peak resident set size of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def proc_kib(path: str, field: str) -> int | None:
    """A `Field:  N kB` line of a /proc file (`/proc/meminfo` MemAvailable, `/proc/<pid>/status` VmRSS) in KiB;
    None where the file or the field is not there (not Linux, a process gone)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def run_resources(device: torch.device) -> dict[str, Any]:
    """What ran a run and its peak memory: GPU memory since `setup_device`; resident memory of this process,
    which a resumed run counts from its last process and a Hydra multirun's later jobs share with earlier ones."""
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {**device_info(device), "peak_rss_mib": peak_rss_mib(), "peak_gpu_mib": gpu}
