"""Small C kernels of this project, built once per machine at first use and loaded with ctypes.

Each kernel is one C file beside the Python module that calls it (`src/alignment/upper_sums.c`,
`src/alignment/anchor_rows.c`), written with GCC vector extensions and no intrinsics, built with the C compiler
on PATH (`$CC`, else `cc`, else `gcc`) at -O3 -march=native into `$ALIGNFEDREC_CACHE/native/` (default
~/.cache/alignfedrec), named by a hash of the source, the compiler and the CPU, so a cache shared between
machines never loads a build made for another CPU. Built with -fopenmp where the compiler has it: the kernels'
threads then come from the OpenMP runtime torch has loaded (libgomp.so.1 is resolved to the copy already in
the process), so a kernel's threads never spin beside torch's idle pool on a machine with few cores.
`compute.native` (conf/config.yaml) says whether runs use them.
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

from src.data.download import default_cache_dir

I64, PTR, F32, INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int


def compiler() -> str | None:
    """The C compiler to build with: $CC, else cc, else gcc on PATH; None when there is none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def usable(*sources: Path) -> bool:
    """Whether these kernels can be built here: a C compiler and their sources (a Flower FAB carries no C files)."""
    return compiler() is not None and all(source.is_file() for source in sources)


def _cpu() -> str:
    """What -march=native depends on: the CPU's model and feature flags (Linux), else the platform's name."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(keep))


@cache
def library(source: Path) -> ctypes.CDLL:
    """The built kernel of `source` (building it first when this machine has no build of this source yet)."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("compute.native: no C compiler found ($CC, cc or gcc on PATH); set compute.native=false")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    ident = source.read_bytes() + version.encode() + _cpu().encode() + platform.machine().encode()
    folder = default_cache_dir() / "native"
    target = folder / f"{source.stem}-{hashlib.sha256(ident).hexdigest()[:16]}.so"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        cmd = [cc, "-O3", "-march=native", "-shared", "-fPIC", "-fopenmp", "-o", tmp, str(source), "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:  # a compiler without OpenMP: the same kernel on one thread
            cmd.remove("-fopenmp")
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"compute.native: building {source} failed ({' '.join(cmd)}):\n{done.stderr}")
        os.replace(tmp, target)  # atomic: a concurrent build of the same key writes the same file
    return ctypes.CDLL(str(target))
