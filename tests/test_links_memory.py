"""The ``links`` index's memory is bounded in bytes, whatever the input length.

A model's input length can be chosen by the client that sends its first event (up to
``limits.max_input_values``). At ``max_queries`` rows the index would grow with it (about
2 GiB at 4,096 features), so the rows kept are as many as fit in ``max_index_mib``: the
default length of 64 features keeps ``max_queries``, wide inputs keep fewer, and a query is
compared only with the queries the smaller index still holds.
"""

from __future__ import annotations

import numpy as np
import pytest

from exporter.detectors.base import Block, ModelContext, Reference
from exporter.detectors.kit import Scaling
from exporter.detectors.links import LinksDetector, LinksParams, first_pairs, index_rows, row_bytes
from exporter.events import Event
from tests.synthetic import savez_roundtrip
from tests.test_links_repeats import detector, send, synthetic

MiB = 2**20
ROWS = ("_U", "_S", "_Up", "_lo", "_hi", "_ts", "_digest", "_client", "_far_seen", "_reach")


def wide(dim: int, **params: object) -> LinksDetector:
    rng = np.random.default_rng(dim)
    benign = rng.integers(0, 17, (600, dim)).astype(float)
    scaling = Scaling.fit(benign)
    det = LinksDetector(LinksParams(**params), ModelContext("m", "tabular", dim, 10, scaling, ("links",)))
    ref = det.fit(Reference(benign, None, scaling))
    assert ref is not None
    det.load_reference(savez_roundtrip(ref))
    return det


def test_the_default_input_length_keeps_max_queries() -> None:
    det = detector()
    assert det._cap == LinksParams().max_queries == 65_536
    assert det._cap * row_bytes(det._cols.size, det.params.probe) <= 64 * MiB


@pytest.mark.parametrize("dim", [784, 2048, 4096])
def test_wide_inputs_keep_as_many_queries_as_fit_in_max_index_mib(dim: int) -> None:
    det = wide(dim)
    assert det._cols.size == dim
    assert det._cap == index_rows(det.params, dim) < det.params.max_queries
    assert 60 * MiB < det._cap * row_bytes(dim, det.params.probe) <= 64 * MiB


def test_a_full_wide_index_holds_no_more_than_its_budget() -> None:
    det = wide(2048, max_index_mib=16.0)
    rng = np.random.default_rng(0)
    sent = 0
    while sent < det._cap + 1500:  # past the capacity: the oldest rows are overwritten
        x = rng.integers(0, 17, (500, 2048)).astype(float)
        det.prepare(Block("m", [Event(f"c{i % 7}", "m", 1000.0 + sent + i, "tabular", vector=v) for i, v in enumerate(x)]))
        sent += x.shape[0]
    assert det._alloc == det._cap and det.index_size() == det._cap
    held = sum(getattr(det, name).nbytes for name in ROWS)
    assert held == det._cap * row_bytes(2048, det.params.probe) <= 16 * MiB and det._cap > 2 * det.params.chunk
    assert len(det._filed) <= det._cap + det._cap // 4 + det.params.chunk


def test_the_capacity_is_never_below_two_chunks() -> None:
    assert index_rows(LinksParams(max_index_mib=0.001), 4096) == 2 * LinksParams().chunk


def test_a_query_links_to_what_the_smaller_index_still_holds_and_not_to_what_it_overwrote() -> None:
    det = detector(distinct_repeats=0, max_index_mib=0.5)
    assert det._cap < 1000
    states: dict[str, dict] = {}
    points = synthetic(det._cap + 300, 31)
    send(det, states, "alice", points, 1000.0)
    linked, _ = send(det, states, "bob", points[-20:], 5000.0)
    assert linked.all()  # off-manifold inputs alice sent last: still indexed
    linked, _ = send(det, states, "carol", points[:20], 6000.0)
    assert not linked.any()  # her first ones were overwritten


def test_first_pairs_keeps_each_candidate_once_per_query_in_candidate_order() -> None:
    mask = np.array([[True, True, True, False], [True, True, False, True]])
    pos = np.array([[7, 3, 7, 3], [3, 3, 9, 5]])
    qi, ki = first_pairs(mask, pos)
    assert list(zip(qi.tolist(), ki.tolist())) == [(0, 0), (0, 1), (1, 0), (1, 3)]


def _pairs(det: LinksDetector, steps: bool) -> tuple[np.ndarray, np.ndarray]:
    """Two clients' inputs in a tight cluster far off the data: distinct inputs of each (near
    links: every query's candidates are the cluster's earlier points, each found by most of the
    tables), or, with ``steps``, 128 seeds apart from one another and a step of an eighth of
    the range from each by the first, and the same step again from each by the second (the
    full test of steps: it continues the first's). Returns, per query of the second client, whether it was linked and
    its first parent."""
    dim = det._dim
    rng = np.random.default_rng(5)
    states: dict[str, dict] = {}
    if steps:
        x = 100.0 + rng.integers(0, 17, (128, dim))  # seeds off the data, each far from the others
        send(det, states, "mallory", np.concatenate([x, x + 2.0]), 1000.0)  # a chunk of 256: its steps are final
        return send(det, states, "trudy", x + 4.0, 2000.0)
    x = np.full((256, dim), 100.0)
    x[:, :12] += rng.integers(-1, 2, (256, 12))
    x[:, 12] += np.arange(256) * 1e-3
    send(det, states, "mallory", x, 1000.0)
    return send(det, states, "trudy", x + 0.05, 2000.0)  # nearer the other's than its own inputs


@pytest.mark.parametrize("steps", [False, True])
def test_near_inputs_compare_each_pair_once_in_blocks_of_bounded_size(monkeypatch: pytest.MonkeyPatch, steps: bool) -> None:
    """A query's candidates come from 16 tables, and near one another one entry comes back from
    most of them. The full comparisons (near links, the full test of steps) gathered a row of
    the input's width per (query, candidate) pair, duplicates included, all at once: one client
    sending a tight cluster off the data on a model of 4,096 features made a block take 9.2 s
    and the process 2.3 GiB (bench/links_cluster.py). Each pair is compared once now (the
    cluster fails without that), in blocks of at most _PAIR_VALUES values, with the same links."""
    from exporter.detectors import links as links_module

    dim = 256
    expected = _pairs(wide(dim), steps)
    assert expected[0].sum() >= 10  # of 128 or 256
    name = "_continues" if steps else "_rms"
    real = getattr(LinksDetector, name)
    seen: list[np.ndarray] = []

    def spy(self: LinksDetector, a: np.ndarray, b: np.ndarray, *rest: np.ndarray) -> tuple[np.ndarray, np.ndarray] | np.ndarray:
        seen.append(np.concatenate([a, b if b.ndim == 2 else b[:, None].astype(a.dtype)], axis=1))  # (query, candidate)
        return real(self, a, b, *rest)

    monkeypatch.setattr(LinksDetector, name, spy)
    monkeypatch.setattr(links_module, "_PAIR_VALUES", 8 * dim)
    linked, parents = _pairs(wide(dim), steps)
    assert len(seen) > 1 and max(len(rows) for rows in seen) <= 8
    if not steps:  # (every change of the steps is the same: only a query and its candidate's row tell pairs apart)
        pairs = np.concatenate(seen)
        assert np.unique(pairs, axis=0).shape[0] == pairs.shape[0]  # no (query, candidate) pair twice
    assert (linked == expected[0]).all() and (parents == expected[1]).all()


def test_the_bucket_tables_are_made_only_once_a_reference_gives_the_units() -> None:
    """Every admitted model gets a links detector; before its reference (no calibration, a
    live baseline not yet learned, or never: a model of inputs no reference fits) it found no
    candidates, but held its bucket tables all the same, 34 MiB at the defaults: sixteen
    models of two-value inputs took half a GiB."""
    p = LinksParams()
    bare = LinksDetector(p, ModelContext("m", "tabular", 64, 10, None, ("links",)))
    tables = ("_slots", "_fill", "_step_slots", "_step_fill", "_own_slots", "_own_fill")
    assert sum(getattr(bare, name).nbytes for name in tables) == 0
    det = detector()
    assert det._slots.size == (p.tables << p.bucket_bits) * p.depth and det._step_fill.size == 1 << p.step_bits
    assert det._own_slots.nbytes + det._own_fill.nbytes == 4096 * (8 * p.own_candidates + 8)  # as docs/groups.md, Cost, says
