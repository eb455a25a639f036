"""Stable 64-bit mixing shared by the detectors that hash inputs or pick reservoir slots.

Python's ``hash()`` is salted per process, so anything stored in a snapshot or compared
across processes uses these instead: fixed bijections on 64-bit integers, identical on
every platform and numpy version.
"""

from __future__ import annotations

import numpy as np

MASK64 = (1 << 64) - 1
_U64 = np.uint64
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer over a uint64 array (wrapping arithmetic), as a new array.

    A well-mixing bijection: one changed input bit flips about half of the output bits.
    """
    z = np.asarray(x, dtype=np.uint64) + _U64(_GOLDEN)
    z ^= z >> _U64(30)
    z *= _U64(_M1)
    z ^= z >> _U64(27)
    z *= _U64(_M2)
    z ^= z >> _U64(31)
    return z


def splitmix64_int(x: int) -> int:
    """:func:`splitmix64` of one Python int (cheaper than numpy for a single value)."""
    z = (x + _GOLDEN) & MASK64
    z = ((z ^ (z >> 30)) * _M1) & MASK64
    z = ((z ^ (z >> 27)) * _M2) & MASK64
    return z ^ (z >> 31)
