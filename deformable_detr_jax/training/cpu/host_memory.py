"""Keeping the host memory that a CPU training step frees, for the next step to reuse.

XLA:CPU allocates an execution's temporaries when it starts and frees them when it ends. glibc
serves a request from one of its worker threads out of that thread's heaps, of at most 64 MiB
each, and anything larger by `mmap`, unmapped again by `free`; it also gives memory back to the
system (trims) once enough of a heap is free. Either way the next step touches fresh pages, and
the kernel has to fault them in and zero them: 636,000 page faults and 1.5 s of system time per
R50 training step at batch 2, 384 x 512 (BENCHMARKS.md, "Host memory of a CPU step").

`configure_process()`, called once at a training entry point on CPU, sets glibc to map no
memory of its own and trim none, for the rest of the process: freed memory stays in the process
and is reused. Together with the step's temporaries split into buffers that fit a thread's heap
(`compiler.HEAP_BYTES`, `sized_step`), a step reuses the memory of the step before. The
process's resident memory stays at the step's peak: that memory is needed by every step anyway.

It applies on Linux with glibc only, and not where the user tunes glibc's allocator themselves
(`MALLOC_MMAP_MAX_`, `MALLOC_TRIM_THRESHOLD_`, `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TOP_PAD_`, or
malloc tunables in `GLIBC_TUNABLES`): their settings are kept.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import threading

# mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
USER_SETTINGS = (
    "MALLOC_MMAP_MAX_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
)

_lock = threading.Lock()
_configured = False


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def applies() -> bool:
    """Whether `configure_process` changes anything in this process."""
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    return _glibc() is not None


def _set(mmap_max: int, trim_threshold: int) -> None:
    libc = _glibc()
    libc.mallopt(M_MMAP_MAX, mmap_max)
    libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)


def configure_process(platform: str | None = None) -> bool:
    """For a process that trains on `platform` (default: JAX's default backend): on "cpu",
    glibc keeps the memory the process frees, from now on (see the module docstring). Returns
    whether it does. Elsewhere, or where `applies()` is False, nothing changes."""
    global _configured
    if platform is None:
        import jax

        platform = jax.default_backend()
    if platform != "cpu" or not applies():
        return False
    with _lock:
        if not _configured:
            _set(0, 2**31 - 1)
            _configured = True
    return True
