"""The one splitmix64: array and scalar forms agree, and the values never change (they are stored)."""

from __future__ import annotations

import numpy as np

from exporter.hashing import MASK64, splitmix64, splitmix64_int


def test_array_and_int_forms_agree_and_are_stable() -> None:
    xs = [0, 1, 2, 12345, MASK64, 1 << 63, 0x6B6E6E2D72657376]
    assert splitmix64(np.array(xs, dtype=np.uint64)).tolist() == [splitmix64_int(x) for x in xs]
    # the reference value of splitmix64's finalizer at 0 (seed 0, first output of the generator)
    assert splitmix64_int(0) == 0xE220A8397B1DCDAF
    assert len({splitmix64_int(x) for x in range(10_000)}) == 10_000  # a bijection: no collisions
