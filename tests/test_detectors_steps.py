"""The ``steps`` detector's candidate search (its detection is tested with every detector's in
test_detectors_core.py and test_detector_contract.py)."""

from __future__ import annotations

import numpy as np
import pytest

from exporter.detectors.steps import _smallest


@pytest.mark.parametrize("seed", range(5))
def test_the_nearest_candidates_are_the_k_smallest_of_each_row_ties_and_unseen_columns_included(seed: int) -> None:
    """Rows with ties at their k-th value (repeats, and the inf of columns a query cannot see)
    take a slower path; every row must still get k distinct columns holding its k smallest values."""
    rng = np.random.default_rng(seed)
    for _ in range(300):
        m, k = int(rng.integers(1, 30)), int(rng.integers(1, 8))
        n = k + int(rng.integers(1, 40))
        d2 = rng.integers(0, 6, (m, n)).astype(np.float32)  # few values: many ties
        d2[rng.random((m, n)) < 0.3] = np.inf
        if rng.random() < 0.5:
            d2 += rng.random((m, n)).astype(np.float32)  # mostly no ties: the fast path
        got = _smallest(d2, k)
        assert got.shape == (m, k)
        assert all(len(set(row)) == k for row in got.tolist())
        expected = np.sort(np.partition(d2, k - 1, axis=1)[:, :k], axis=1)
        assert np.array_equal(np.sort(np.take_along_axis(d2, got, axis=1), axis=1), expected)
