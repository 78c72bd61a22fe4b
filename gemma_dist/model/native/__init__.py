"""Native CPU kernels: C sources beside this file, compiled on first use and loaded with ctypes.

A kernel builds with the system C compiler ($CC, else cc) for x86-64 with AVX2 and FMA, into
$GEMMA_DIST_CACHE/native (default ~/.cache/gemma_dist/native) under a name that hashes the source,
the headers beside it (shared row helpers such as norm_row.h) and the flags, so an edited source
rebuilds and concurrent processes (a replica's shard workers) never load a half-written library.
Where it cannot build (no compiler, another architecture, a CPU without AVX2) `load` raises
NativeUnavailable with the reason: callers that need the kernel fail loudly; none falls back silently.
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

SOURCES = Path(__file__).resolve().parent
# -fopenmp: a kernel splits its work over OpenMP threads. In a torch process libgomp.so.1 is torch's
# own, already loaded, so the kernel shares the warm thread team torch's ops use (no second pool).
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-shared", "-fPIC", "-fopenmp")


class NativeUnavailable(RuntimeError):
    """A native kernel cannot be built or loaded on this machine (the message says why)."""


def cpu_has_avx2() -> bool:
    """Whether this CPU runs AVX2 + FMA + F16C code (Linux /proc/cpuinfo flags; every AVX2 CPU has F16C)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return {"avx2", "fma", "f16c"} <= set(flags.split())


def _cache_dir() -> Path:
    from gemma_dist.model.loading.default_model import cache_root

    return cache_root() / "native"


@cache
def load(name: str, defines: tuple[tuple[str, str], ...] = (), hold_gil: bool = False) -> ctypes.CDLL:
    """The shared library of `name`.c built with -D`defines` (built once per source and flags);
    with `hold_gil` its functions run holding the GIL (ctypes.PyDLL), else they release it."""
    if not cpu_has_avx2():
        raise NativeUnavailable(f"{name}: needs an x86-64 CPU with AVX2 and FMA (this is {platform.machine()})")
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise NativeUnavailable(f"{name}: no C compiler ({compiler!r} not found; set $CC or install gcc)")
    source = SOURCES / f"{name}.c"
    flags = list(FLAGS) + [f"-D{key}={value}" for key, value in defines]
    headers = b"".join(header.read_bytes() for header in sorted(SOURCES.glob("*.h")))  # what sources may include
    digest = hashlib.sha256(source.read_bytes() + headers + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{name}-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run([compiler, *flags, "-o", str(built), str(source), "-lm"],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise NativeUnavailable(f"{name}: {compiler} failed: {result.stderr.strip()[-2000:]}")
            os.replace(built, target)  # atomic: another process sees the whole library or none
    return ctypes.PyDLL(str(target)) if hold_gil else ctypes.CDLL(str(target))
