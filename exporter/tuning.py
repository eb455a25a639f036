"""Process-wide settings for speed, applied by the command line before numpy loads.

Each one is a default: an operator's own environment variable wins.

- **One BLAS thread** (``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``).
  Detectors multiply small matrices, one client's batch at a time, under the pipeline's
  lock, so BLAS worker threads only add synchronisation: a replay of 100,000 events took
  19-21 s with two threads and 9 s with one.
- **No transparent huge pages for numpy's arrays** (``NUMPY_MADVISE_HUGEPAGE=0``). numpy
  asks the kernel for huge pages on every array of 4 MiB or more. Where the kernel then
  compacts memory to find them (``/sys/kernel/mm/transparent_hugepage/defrag`` set to
  ``madvise``, Debian's default), each new large array stalls: rebuilding the
  ``fingerprint`` index's 32 MiB table took 320-350 ms with them and 83 ms without.
- **A 64 MiB pad at the top of glibc's heap** (``mallopt(M_TOP_PAD)``; the
  ``MALLOC_TOP_PAD_`` variable wins, and other C libraries are left alone). With glibc's
  default of 128 KiB the heap grows and shrinks by small steps as blocks of events are
  judged (1,544 ``brk`` calls in one replay of 100,000 events, 22 with the pad), and the
  kernel zeroes the same memory again each time it grows: the pad keeps at most 64 MiB
  of freed memory for reuse.

Together they made the first replay in a fresh process 15 to 18 % faster
(``bench/throughput.py``; docs/performance.md, run 10, gives the figures and commands).
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
M_TOP_PAD = -2  # glibc's mallopt parameter number (malloc.h)
HEAP_TOP_PAD = 64 << 20  # bytes
TOP_PAD_VARIABLE = "MALLOC_TOP_PAD_"  # glibc reads it at start-up; set, it wins over HEAP_TOP_PAD


def tune_process(environ: MutableMapping[str, str] | None = None, libc: Any = None) -> bool:
    """Apply the settings above that the environment does not set; call before numpy loads.

    ``environ`` (default ``os.environ``) and ``libc`` (default: the C library of this
    process, on glibc only) are parameters for tests. Returns whether the heap's pad was
    set. Never raises: on another C library, or one without ``mallopt``, the heap is left
    as it is.
    """
    env = os.environ if environ is None else environ
    for name, value in ENVIRONMENT.items():
        env.setdefault(name, value)
    if TOP_PAD_VARIABLE in env:
        return False
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
        return bool(mallopt(M_TOP_PAD, HEAP_TOP_PAD))  # 1 on success
    except (OSError, TypeError, ValueError):
        return False


def _glibc() -> bool:
    """Whether this process runs on glibc (``mallopt``'s parameter numbers are glibc's)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # no such name here (not glibc, not Unix)
        return False
