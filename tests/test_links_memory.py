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
from exporter.detectors.links import LinksDetector, LinksParams, index_rows, row_bytes
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
