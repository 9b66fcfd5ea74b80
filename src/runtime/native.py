"""Small C kernels of this project, built once per machine at first use and loaded with ctypes.

Each kernel is one C file beside the Python module that calls it (`src/alignment/upper_sums.c`,
`src/alignment/fast_align.c`, `src/perf/fma_peak.c`), written with GCC vector extensions and no intrinsics, built
with the C compiler on PATH (`$CC`, else `cc`, else `gcc`) at -O3 -march=native into
`$ALIGNFEDREC_CACHE/native/` (default ~/.cache/alignfedrec), named by a hash of the source, the compiler, the
flags and the CPU, so a cache shared between machines never loads a build made for another CPU. The kernels'
vectors are the CPU's own width (16 floats with AVX-512, 8 with AVX2: `vector_lanes`, passed as -DVL=; a wider
GCC vector is lowered through memory) and their register tiles shrink with it: `compute=native` uses them on CPUs with
AVX-512 or AVX2 and FMA, where they were measured (`fast_cpu`). Built with -fopenmp where the compiler has it: the
kernels' threads then come from the OpenMP runtime torch has loaded (libgomp.so.1 is resolved to the copy already in
the process), so a kernel's threads never spin beside torch's idle pool on a machine with few cores.
`compute.kernel` (conf/compute/) says whether runs use them.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from src.runtime.cache import default_cache_dir

I64, PTR, F32, INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int


def compiler() -> str | None:
    """The C compiler to build with: $CC, else cc, else gcc on PATH; None when there is none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def usable(*sources: Path) -> bool:
    """Whether these kernels can be built here: a C compiler and their sources (a Flower FAB carries no C files)."""
    return compiler() is not None and all(source.is_file() for source in sources)


def vector_lanes() -> int:
    """float32 lanes of this CPU's vector registers, the width the kernels are built for (`-DVL=`): 16 with
    AVX-512, 8 with AVX2 + FMA, else 4."""
    flags = set(_cpu().split())
    return 16 if "avx512f" in flags else 8 if {"avx2", "fma"} <= flags else 4


def fast_cpu() -> bool:
    """Whether this CPU has the vector units the kernels' tiles are sized and measured for: AVX-512, or AVX2 + FMA."""
    return vector_lanes() > 4


def _cpu() -> str:
    """What -march=native depends on: the CPU's model and feature flags (Linux), else the platform's name."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(keep))


@cache
def library(source: Path, defines: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The built kernel of `source` (building it first when this machine has no build of this source yet), with
    `defines` (`("VL=16",)`: another vector width than this CPU's, as the tests build)."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("compute=native: no C compiler found ($CC, cc or gcc on PATH); use compute=fused")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    except OSError as err:
        raise RuntimeError(f"compute=native: the C compiler {cc!r} cannot be run ({err})") from err
    if not any(d.startswith("VL=") for d in defines):
        defines = (*defines, f"VL={vector_lanes()}")
    flags = ["-O3", "-march=native", "-shared", "-fPIC", *(f"-D{d}" for d in defines)]
    ident = source.read_bytes() + version.encode() + " ".join(flags).encode() + _cpu().encode()
    folder = default_cache_dir() / "native"
    target = folder / f"{source.stem}-{hashlib.sha256(ident + platform.machine().encode()).hexdigest()[:16]}.so"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        try:
            cmd = [cc, *flags, "-fopenmp", "-o", tmp, str(source), "-lm"]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0 and "openmp" in done.stderr.lower():  # no OpenMP: the kernel on one thread
                cmd.remove("-fopenmp")
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"compute=native: building {source} failed ({' '.join(cmd)}):\n{done.stderr}")
            os.chmod(tmp, 0o755)  # mkstemp made it private; a shared cache is read by others
            os.replace(tmp, target)  # atomic: a concurrent build of the same key writes the same file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return ctypes.CDLL(str(target))
