"""The server's sums of plain uploads by a small C kernel (`upper_sums.c`), built once per machine at first use.

The compiled torch tile (`release.summed_plain_block`) runs the similarity product as a separate GEMM whose
[clients x rows x columns] output goes through memory before the threshold and the sum read it back; with
d = 32 multiply-adds per entry that round trip costs as much as the product. The C kernel keeps each client's
products in registers, thresholds and adds them to a cache-resident tile summed over the chunk's clients, and
counts them (README, Benchmark: about 2.5x the compiled tile on ML-1M). Same pairs as the fp32 product but for
cosines within float rounding of sigma; sums in fp32 over a chunk's clients as the compiled tile does
(tests/test_native_sums.py).

Built with the C compiler on PATH (`$CC`, else `cc`, else `gcc`) at -O3 -march=native into
`$ALIGNFEDREC_CACHE/native/` (default ~/.cache/alignfedrec), named by a hash of the source, the compiler and
the CPU, so a cache shared between machines never loads a build made for another CPU.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import torch

from src.data.download import default_cache_dir

SOURCE = Path(__file__).with_name("upper_sums.c")
MR, NR = 8, 32  # the kernel's register tile: rows, columns
TILE_ROWS, TILE_COLS = 128, 256  # its cache tile: a multiple of MR rows x a multiple of NR columns (measured)
_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


def compiler() -> str | None:
    """The C compiler to build with: $CC, else cc, else gcc on PATH; None when there is none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cpu() -> str:
    """What -march=native depends on: the CPU's model and feature flags (Linux), else the platform's name."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(keep))


@cache
def library() -> ctypes.CDLL:
    """The built kernel (building it first when this machine has no build of this source yet)."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("compute.native: no C compiler found ($CC, cc or gcc on PATH); set compute.native=false")
    source = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(source + version.encode() + _cpu().encode() + platform.machine().encode()).hexdigest()[:16]
    folder = default_cache_dir() / "native"
    target = folder / f"upper_sums-{key}.so"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        cmd = [cc, "-O3", "-march=native", "-shared", "-fPIC", "-o", tmp, str(SOURCE)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"compute.native: building {SOURCE} failed ({' '.join(cmd)}):\n{done.stderr}")
        os.replace(tmp, target)  # atomic: a concurrent build of the same key writes the same file
    lib = ctypes.CDLL(str(target))
    lib.upper_sums.restype = None
    lib.upper_sums.argtypes = [_PTR, _PTR, _I64, _I64, _I64, _I64, ctypes.c_float, _I64, _I64, _PTR, _PTR, _PTR]
    lib.upper_sums.argtypes += [_I64, _I64, _PTR]
    return lib


@cache
def _workers(n: int) -> ThreadPoolExecutor:
    """Threads that call the kernel (ctypes releases the GIL; the kernel's tiles are shared by an atomic counter)."""
    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="upper_sums")


def padded(e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's operands from normalised tables e [C, m, d] (float32, CPU): e with its rows padded with zeros
    to a multiple of 32 [C, mp, d], and its transpose [C, d, mp]."""
    c, m, d = e.shape
    mp = -(-m // NR) * NR
    rows = torch.zeros(c, mp, d, dtype=torch.float32)
    rows[:, :m] = e
    return rows, rows.transpose(1, 2).contiguous()


def band_sums(
    rows: torch.Tensor, cols: torch.Tensor, m: int, below: float, r0: int, r1: int, held: bool, threads: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Plain uploads of item rows [r0, r1) against items r0.. (strict upper triangle, entries > `below`), from
    `padded` operands: their sum over the clients [r1 - r0, m - r0] (float32), with `held` how many clients
    send each entry (int32, else None), and each client's entry count [C] (int64). r0 a multiple of TILE_ROWS."""
    if r0 % TILE_ROWS or (r1 % TILE_ROWS and r1 != m):
        raise ValueError(f"band [{r0}, {r1}) must start and end on a multiple of {TILE_ROWS} rows (or end at m={m})")
    c, mp, d = rows.shape
    total = torch.zeros(r1 - r0, m - r0, dtype=torch.float32)
    hold = torch.zeros(r1 - r0, m - r0, dtype=torch.int32) if held else None
    counts = torch.zeros(c, dtype=torch.int64)
    nxt = torch.zeros(1, dtype=torch.int64)
    args = (rows.data_ptr(), cols.data_ptr(), c, m, mp, d, below, r0, r1, total.data_ptr())
    args += (0 if hold is None else hold.data_ptr(), counts.data_ptr(), TILE_ROWS, TILE_COLS, nxt.data_ptr())
    kernel = library().upper_sums
    if threads <= 1:
        kernel(*args)
    else:
        for job in [_workers(threads).submit(kernel, *args) for _ in range(threads)]:
            job.result()
    return total, hold, counts
