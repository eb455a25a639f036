"""The bulk histogram exposes exactly what prometheus-client's Histogram would."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from exporter.metrics import CONFIDENCE_BUCKETS, BulkHistogram


def test_bulk_histogram_matches_prometheus_client_histogram() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.uniform(0, 1, 500), np.asarray(CONFIDENCE_BUCKETS), [0.0, 1.0, 1.5, np.nan]])
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    bulk = BulkHistogram("h_demo", "A demo.", "model", CONFIDENCE_BUCKETS)
    ours.register(bulk)
    reference = Histogram("h_demo", "A demo.", ["model"], buckets=CONFIDENCE_BUCKETS, registry=theirs)
    bulk.observe_many("a", values[:300])
    bulk.observe_many("a", values[300:])
    bulk.observe_many("b", np.zeros(0))  # an empty batch creates the series at zero
    for v in values[~np.isnan(values)]:
        reference.labels("a").observe(float(v))
    reference.labels("b")
    # sums may differ in the last bits (summation order): compare them as numbers
    mine, ref = generate_latest(ours).decode(), generate_latest(theirs).decode()
    strip = lambda text: [line for line in text.splitlines() if "_sum" not in line and "_created" not in line]  # noqa: E731
    assert strip(mine) == strip(ref)
    sums = lambda text: [float(line.split()[-1]) for line in text.splitlines() if line.startswith("h_demo_sum")]  # noqa: E731
    np.testing.assert_allclose(sums(mine), sums(ref))
    assert 'h_demo_bucket{le="+Inf",model="a"} 523.0' in mine
