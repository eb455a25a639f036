"""The bucket index of the ``links`` detector, against a plain one-query-at-a-time model of it.

``recent`` and ``file`` are vectorized over a run of queries; they must give exactly what
filing the queries one by one into buckets that keep their ``depth`` most recent entries
gives. ``count_true`` must count like ``np.count_nonzero`` on every shape.
"""

from __future__ import annotations

import numpy as np
import pytest

from exporter.detectors.kit import count_true
from exporter.detectors.links import disjoint, file, recent, sent_within


def one_at_a_time(buckets: np.ndarray, held: list[list[int]], depth: int, ids: np.ndarray) -> np.ndarray:
    """Candidates of each query (most recent first per table, -1 for none), filing it after it looks."""
    n, tables = buckets.shape
    out = np.full((n, tables * depth), -1, dtype=np.int64)
    for q in range(n):
        for t in range(tables):
            seen = held[buckets[q, t]][-depth:][::-1]
            out[q, t * depth : t * depth + len(seen)] = seen
        for t in range(tables):
            held[buckets[q, t]].append(int(ids[q]))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_a_run_sees_and_files_what_one_query_at_a_time_would(seed: int) -> None:
    rng = np.random.default_rng(seed)
    tables, bits, depth = int(rng.integers(1, 6)), int(rng.integers(1, 5)), int(rng.integers(1, 7))
    nb = tables << bits
    fill = np.zeros(nb, dtype=np.int64)
    slots = np.full(nb * depth, -1, dtype=np.int64)
    held: list[list[int]] = [[] for _ in range(nb)]
    next_id = 0
    for _ in range(4):  # several runs: the later ones read what the earlier ones filed
        n = int(rng.integers(1, 40))
        buckets = rng.integers(0, 1 << bits, (n, tables)) + (np.arange(tables) << bits)  # few buckets: many shared
        ids = next_id + np.sort(rng.choice(3 * n, n, replace=False))
        next_id = int(ids[-1]) + 1
        expected = one_at_a_time(buckets, held, depth, ids)
        cand, order, starts, rank_sorted = recent(buckets, fill, slots, depth, ids)
        assert np.array_equal(cand, expected)
        undo: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        file(buckets, order, starts, rank_sorted, fill, slots, depth, undo, ids)
        assert fill.tolist() == [len(h) for h in held]
        for b, h in enumerate(held):
            kept = slots[b * depth : (b + 1) * depth]
            assert sorted(int(v) for v in kept if v >= 0) == sorted(h[-depth:])


@pytest.mark.parametrize("shape", [(5, 3, 8), (4, 7), (3, 2, 16), (6, 13), (2, 3, 1), (0, 8), (5, 0), (4, 3, 24), (9, 17)])
def test_count_true_counts_like_count_nonzero(shape: tuple[int, ...]) -> None:
    mask = np.random.default_rng(sum(shape)).random(shape) < 0.5
    assert np.array_equal(count_true(mask), np.count_nonzero(mask, axis=-1))
    assert np.array_equal(count_true(mask[..., ::2]), np.count_nonzero(mask[..., ::2], axis=-1))  # not contiguous
    assert np.array_equal(count_true(np.ones(shape, dtype=bool)), np.full(shape[:-1], shape[-1]))  # every byte 1: no carry


@pytest.mark.parametrize("seed", range(20))
def test_sent_within_answers_as_a_ring_checked_one_query_at_a_time(seed: int) -> None:
    rng = np.random.default_rng(seed)
    window = int(rng.integers(0, 9))
    ring: list[int] = []
    history = rng.integers(0, 6, int(rng.integers(0, 20))).astype(np.uint64)  # few values: many repeats
    for d in history.tolist():
        ring = (ring + [d])[-window:] if window else []
    digests = rng.integers(0, 6, int(rng.integers(0, 40))).astype(np.uint64)
    expected = []
    for d in digests.tolist():
        expected.append(d in ring)
        ring = (ring + [d])[-window:] if window else []
    got = sent_within(history[-window:] if window else history[:0], digests, window)
    assert got.tolist() == expected


@pytest.mark.parametrize("seed", range(5))
def test_disjoint_ranges_hold_what_the_ranges_hold(seed: int) -> None:
    """The union of random ranges (some empty, some nested or touching) as disjoint ranges: a value is in one
    of them exactly when it is in one of the ranges, and in at most one."""
    rng = np.random.default_rng(seed)
    lo = np.round(rng.uniform(0.0, 1.0, 12), 2).astype(np.float32)
    hi = (lo + np.round(rng.uniform(0.0, 0.2, 12), 2)).astype(np.float32)
    lo[rng.random(12) < 0.2] = np.inf
    hi[3] = lo[5] if np.isfinite(lo[5]) else hi[3]  # touching ends
    values = np.concatenate([rng.uniform(-0.1, 1.3, 2000), lo[np.isfinite(lo)], hi]).astype(np.float32)
    found = disjoint(lo, hi)
    assert all(a <= b for a, b in found) and all(b < c for (_, b), (c, _) in zip(found, found[1:]))
    inside = np.zeros(values.size, dtype=np.int64)
    for a, b in found:
        inside += (values >= a) & (values <= b)
    expected = ((values[:, None] >= lo) & (values[:, None] <= hi)).any(axis=1)
    assert inside.max() <= 1 and np.array_equal(inside == 1, expected)
