"""Process-wide settings for speed, applied by the command line before numpy loads.

Each one is a default: an operator's own environment variable wins.

- **One BLAS thread** (``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``).
  Detectors multiply small matrices, one client's batch at a time, under the pipeline's
  lock, so BLAS worker threads only add synchronisation: a replay of 100,000 events took
  19-21 s with two threads and 9 s with one.
- **No transparent huge pages for numpy's arrays** (``NUMPY_MADVISE_HUGEPAGE=0``). numpy
  asks the kernel for huge pages on every array of 4 MiB or more. Where the kernel then
  compacts memory to find them (``/sys/kernel/mm/transparent_hugepage/defrag`` set to
  ``madvise``, the kernel's default), each new large array stalls, such as the 32 MiB table
  that the ``fingerprint`` index rebuilds as it grows.
- **A 64 MiB pad at the top of glibc's heap** (``mallopt(M_TOP_PAD)``). With glibc's
  default the heap grows and shrinks by small steps as blocks of events are judged, and
  the kernel zeroes the same memory again each time it grows: the pad keeps at most
  64 MiB of freed memory for reuse. Setting it also stops glibc from adjusting the size
  from which an allocation gets a mapping of its own; left where it happened to be, that
  size would depend on what the process freed before, so it is set as well
  (``M_MMAP_THRESHOLD``): 32 MiB, the most glibc's own adjustment goes to. Where the
  operator tunes glibc's allocator (``MALLOC_TOP_PAD_``, ``MALLOC_MMAP_THRESHOLD_``,
  ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_MAX_``, or ``glibc.malloc`` tunables in
  ``GLIBC_TUNABLES``), the heap is left to that, and so it is on other C libraries.

What they gain and cost: docs/performance.md, "Process settings" (``bench/throughput.py``).
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, MutableMapping

ENVIRONMENT: dict[str, str] = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMPY_MADVISE_HUGEPAGE": "0",
}
M_TOP_PAD = -2  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
HEAP: tuple[tuple[int, int], ...] = ((M_MMAP_THRESHOLD, 32 << 20), (M_TOP_PAD, 64 << 20))  # (parameter, bytes)
GLIBC_MALLOC_VARIABLES = ("MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_")


def tune_process(environ: MutableMapping[str, str] | None = None, libc: Any = None) -> bool:
    """Apply the settings above that the environment does not set; call before numpy loads.

    ``environ`` (default ``os.environ``) and ``libc`` (default: the C library of this
    process, on glibc only) are parameters for tests. Returns whether the heap was tuned.
    Never raises: on another C library, or one without ``mallopt``, the heap is left as it is.
    """
    env = os.environ if environ is None else environ
    for name, value in ENVIRONMENT.items():
        env.setdefault(name, value)
    if any(name in env for name in GLIBC_MALLOC_VARIABLES) or "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        return False  # glibc read the operator's own settings at start-up
    if libc is None:
        if not _glibc():
            return False
        try:
            libc = ctypes.CDLL(None)  # the process's own symbols, glibc's among them
        except OSError:
            return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    try:
        return all([bool(mallopt(param, value)) for param, value in HEAP])  # 1 on success
    except (OSError, TypeError, ValueError):
        return False


def _glibc() -> bool:
    """Whether this process runs on glibc (``mallopt``'s parameter numbers are glibc's)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # no such name here (not glibc, not Unix)
        return False
