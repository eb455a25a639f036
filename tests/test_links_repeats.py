"""The ``links`` detector's evidence from exact repeats: an off-manifold input another client sent
first links the repeater to that client; natural inputs, a client's own repeats and a few shared
fixtures link nobody. Driven block by block, as the pipeline does (no simulator needed)."""

from __future__ import annotations

import numpy as np
import pytest

from exporter.detectors.base import Batch, Block, ModelContext, Reference
from exporter.detectors.fingerprint import client_key
from exporter.detectors.kit import Scaling
from exporter.detectors.links import LinksDetector, LinksParams, nearest_rms
from exporter.events import Event
from tests.synthetic import WORLD, D, K, savez_roundtrip


def detector(**params: object) -> LinksDetector:
    """``links`` with its reference fitted on 3,000 benign digits-like inputs (saved and loaded, as a profile is)."""
    benign = WORLD.sample(np.random.default_rng(1), 3000)
    scaling = Scaling.fit(benign)
    det = LinksDetector(LinksParams(**params), ModelContext("m", "tabular", D, K, scaling, ("links",)))
    ref = det.fit(Reference(benign, WORLD.predict(benign), scaling))
    assert ref is not None
    det.load_reference(savez_roundtrip(ref))
    return det


def synthetic(n: int, seed: int) -> np.ndarray:
    """Inputs uniform in three times the benign box: far from the benign data (in the box itself,
    this synthetic world's noisy inputs lie only about twice as far from the anchors as natural
    ones, below ``far_factor``)."""
    benign = WORLD.sample(np.random.default_rng(1), 3000)
    lo, hi = benign.min(axis=0), benign.max(axis=0)
    return lo + (hi - lo) * np.random.default_rng(seed).uniform(-1.0, 2.0, (n, D))


def send(det: LinksDetector, states: dict[str, dict], client: str, x: np.ndarray, t0: float) -> tuple[np.ndarray, np.ndarray]:
    """One block of ``client``'s queries ``x``; returns, per query, whether it stayed linked after the
    client's update, and the first parent key."""
    events = [Event(client, "m", t0 + i, "tabular", vector=v) for i, v in enumerate(x)]
    block = Block("m", events)
    det.prepare(block)
    det.update(states.setdefault(client, det.init_state()), Batch(client, "m", events, block, np.arange(len(events))))
    linked, parents = block.prepared["links"][1:3]  # the update drops links in the block, where groups read them
    return linked.copy(), parents[:, 0].copy()


def test_the_reference_keeps_anchors_and_a_positive_far_distance() -> None:
    det = detector()
    assert det._anchors is not None and det._anchors.shape[0] == 1024 and det._far > 0.0
    near = nearest_rms(det._units(WORLD.sample(np.random.default_rng(3), 500)), det._anchors)
    far = nearest_rms(det._units(synthetic(500, 0)), det._anchors)
    assert (near < det._far).all() and (far > det._far).all()  # natural inputs on the manifold, the test's synthetic ones off it


@pytest.mark.parametrize("offset", [0.0, 1e4, 1e5])
def test_the_off_manifold_test_holds_for_features_far_from_zero(offset: float) -> None:
    """Features whose values sit far from zero against their spread (coordinates, pressures):
    the float32 distances to the anchors, taken from zero, lost the differences to rounding,
    and at offsets of 1e4 spreads no input was off the manifold. The units start at the benign
    mean now; the test agrees with distances taken in float64."""
    rng = np.random.default_rng(8)
    scales = rng.uniform(0.5, 2.0, 30)
    benign = offset + rng.normal(0.0, 1.0, (3000, 30)) * scales
    scaling = Scaling.fit(benign)
    det = LinksDetector(LinksParams(), ModelContext("m", "tabular", 30, K, scaling, ("links",)))
    ref = det.fit(Reference(benign, None, scaling))
    assert ref is not None
    det.load_reference(savez_roundtrip(ref))
    near = offset + rng.normal(0.0, 1.0, (300, 30)) * scales
    away = near + rng.choice([-1.0, 1.0], (300, 30)) * scales * rng.uniform(2.0, 6.0, (300, 1))
    queries = np.concatenate([near, away])
    span, anchors = ref["span"], np.asarray(ref["anchors"], dtype=np.float64)
    exact = np.array([np.sqrt((((q - anchors) / span) ** 2).mean(axis=1)).min() for q in queries])
    off = exact > det._far
    assert 100 < off.sum() < 500  # both kinds are there
    assert (nearest_rms(det._units(queries), det._anchors) > det._far).tolist() == off.tolist()


def test_a_repeat_of_another_clients_off_manifold_input_links_the_repeater_only() -> None:
    det = detector(distinct_repeats=0)
    states: dict[str, dict] = {}
    points = synthetic(20, 2)
    natural = WORLD.sample(np.random.default_rng(3), 20)
    send(det, states, "alice", np.concatenate([points, natural]), 1000.0)
    linked, parent = send(det, states, "bob", np.concatenate([points, natural]), 2000.0)
    assert linked[:20].all() and (parent[:20] == client_key("alice")).all()  # off-manifold: linked to alice
    assert not linked[20:].any()  # natural inputs: repeats of them are no evidence
    linked, _ = send(det, states, "alice", points, 3000.0)
    assert not linked.any()  # alice's own inputs: she sent them first
    linked, _ = send(det, states, "bob", points, 4000.0)
    assert not linked.any()  # bob repeats what he already repeated: it counts once


def test_the_first_distinct_repeats_do_not_count() -> None:
    det = detector()  # distinct_repeats 8
    states: dict[str, dict] = {}
    points = synthetic(12, 4)
    send(det, states, "alice", points, 1000.0)
    linked, _ = send(det, states, "bob", points, 2000.0)
    assert linked.tolist() == [False] * 8 + [True] * 4


def test_without_anchors_a_repeat_links_nobody() -> None:
    det = detector(anchors=0, distinct_repeats=0)
    assert det._anchors is None
    states: dict[str, dict] = {}
    points = synthetic(20, 5)
    send(det, states, "alice", points, 1000.0)
    linked, _ = send(det, states, "bob", points, 2000.0)
    assert not linked.any()


@pytest.mark.parametrize(
    "change",
    [
        {"anchors": np.zeros((1, D), dtype=np.float32)},  # one anchor: no spacing
        {"anchors": np.zeros((5, D - 1), dtype=np.float32)},  # not one value per feature
        {"anchors": np.full((5, D), np.nan, dtype=np.float32)},
        {"far": np.array(0.0)},
        {"far": np.array(np.inf)},
    ],
)
def test_a_reference_with_bad_anchors_is_refused(change: dict[str, np.ndarray]) -> None:
    det = detector()
    benign = WORLD.sample(np.random.default_rng(1), 3000)
    ref = det.fit(Reference(benign, None, Scaling.fit(benign)))
    assert ref is not None
    with pytest.raises(ValueError, match="links reference"):
        det.load_reference({**ref, **change})


def test_a_reference_without_anchors_still_loads() -> None:
    det = detector()
    benign = WORLD.sample(np.random.default_rng(1), 3000)
    ref = det.fit(Reference(benign, None, Scaling.fit(benign)))
    assert ref is not None
    det.load_reference({k: v for k, v in ref.items() if k not in ("anchors", "far")})
    assert det._anchors is None and det._inv is not None


def test_nearest_rms_block_by_block_and_without_self() -> None:
    q = np.array([[0.0, 0.0], [0.5, 0.5], [0.1, 0.0], [0.0, 0.1], [0.9, 1.1], [0.6, 0.2]])
    a = np.array([[0.0, 0.0], [1.0, 1.0]])
    expected = [0.0, 0.5, np.sqrt(0.005), np.sqrt(0.005), 0.1, np.sqrt(0.2)]
    assert nearest_rms(q, a, block=4) == pytest.approx(expected)  # two blocks: the second starts at row 4
    assert nearest_rms(q.astype(np.float32), a.astype(np.float32)) == pytest.approx(expected, abs=1e-6)
    assert nearest_rms(q, q, exclude_self=True, block=4) == pytest.approx([np.sqrt(0.005), np.sqrt(0.05), np.sqrt(0.005), np.sqrt(0.005), np.sqrt(0.26), np.sqrt(0.05)])
