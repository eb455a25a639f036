"""Process-wide settings for speed, applied by the command line before numpy loads.

Each one is a default: an operator's own environment variable wins.

- **One BLAS thread** (``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``).
  Detectors multiply small matrices, one client's batch at a time, under the pipeline's
  lock, so BLAS worker threads only add synchronisation: a replay of 100,000 events took
  19-21 s with two threads and 9 s with one.
- **No transparent huge pages for numpy's arrays** (``NUMPY_MADVISE_HUGEPAGE=0``). numpy
  asks the kernel for huge pages on every array of 4 MiB or more. Where the kernel then
  compacts memory to find them (``/sys/kernel/mm/transparent_hugepage/defrag`` at
  ``madvise``, the kernel's default), each new large array stalls, such as the 32 MiB table
  that the ``fingerprint`` index rebuilds as it grows, or a block's stacked inputs.

What they gain: docs/performance.md, "Process settings" (``bench/throughput.py``).
"""

from __future__ import annotations

import os
from typing import MutableMapping

ENVIRONMENT: dict[str, str] = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMPY_MADVISE_HUGEPAGE": "0",
}


def tune_process(environ: MutableMapping[str, str] | None = None) -> None:
    """Set each variable of :data:`ENVIRONMENT` that the environment (default ``os.environ``)
    does not set. Call before numpy loads: numpy and the BLAS libraries read them then."""
    env = os.environ if environ is None else environ
    for name, value in ENVIRONMENT.items():
        env.setdefault(name, value)
