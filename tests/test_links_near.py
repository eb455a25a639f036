"""The ``links`` detector's evidence from nearness off the data: an off-manifold input that lies within
``near_factor`` anchor spacings of another client's earlier off-manifold input links its sender to
that client; inputs near the data, or farther apart, link nobody. Driven block by block, as the
pipeline does (no simulator needed)."""

from __future__ import annotations

import numpy as np
import pytest

from exporter.detectors.base import Batch, Block, Reference
from exporter.detectors.fingerprint import client_key
from exporter.detectors.kit import Scaling
from exporter.events import Event
from exporter.detectors.links import nearest_rms
from tests.synthetic import WORLD, D, savez_roundtrip
from tests.test_links_repeats import detector, send, synthetic


def moved(det, x: np.ndarray, spacings: float, seed: int) -> np.ndarray:
    """``x`` moved by exactly ``spacings`` anchor spacings (RMS over the moving features, in range
    units), in a random direction per row."""
    span = det._ref["span"]
    direction = np.random.default_rng(seed).choice([-1.0, 1.0], x.shape) * (span > 0)
    rms = np.sqrt((direction**2).sum(axis=1, keepdims=True) / (span > 0).sum())
    return x + direction / rms * spacings * float(det._ref["spacing"]) * span


def test_an_off_manifold_input_near_another_clients_links_its_sender_to_that_client() -> None:
    det = detector(distinct_repeats=0)
    states: dict[str, dict] = {}
    points = synthetic(20, 2)
    send(det, states, "alice", points, 1000.0)
    linked, parent = send(det, states, "bob", moved(det, points, 0.3, 1), 2000.0)
    assert linked.all() and (parent == client_key("alice")).all()
    linked, _ = send(det, states, "carol", moved(det, points, 3.0, 2), 3000.0)
    assert not linked.any()  # three spacings away: not near (near_factor 0.5)
    natural = WORLD.sample(np.random.default_rng(3), 20)
    send(det, states, "dave", natural, 4000.0)
    linked, _ = send(det, states, "erin", moved(det, natural, 0.3, 3), 5000.0)
    assert not linked.any()  # near each other, but near the data too: honest clients do that


@pytest.mark.parametrize("near", [0.2, 0.45, 0.55, 1.0])
def test_near_means_within_near_factor_anchor_spacings(near: float) -> None:
    det = detector(distinct_repeats=0)
    states: dict[str, dict] = {}
    points = synthetic(10, 4)
    send(det, states, "alice", points, 1000.0)
    linked, _ = send(det, states, "bob", moved(det, points, near, 5), 2000.0)
    assert linked.all() == (near <= 0.5) and linked.any() == (near <= 0.5)


def test_the_first_distinct_near_inputs_do_not_count() -> None:
    det = detector()  # distinct_repeats 8
    states: dict[str, dict] = {}
    points = synthetic(12, 6)
    send(det, states, "alice", points, 1000.0)
    linked, _ = send(det, states, "bob", moved(det, points, 0.3, 7), 2000.0)
    assert linked.tolist() == [False] * 8 + [True] * 4


@pytest.mark.parametrize("how", ["near_factor 0", "a reference without spacing"])
def test_without_near_factor_or_spacing_nearness_links_nobody(how: str) -> None:
    det = detector(distinct_repeats=0, near_factor=0.0) if how == "near_factor 0" else detector(distinct_repeats=0)
    points = synthetic(20, 8)
    close = moved(det, points, 0.3, 9)
    if how != "near_factor 0":
        benign = WORLD.sample(np.random.default_rng(1), 3000)
        ref = det.fit(Reference(benign, None, Scaling.fit(benign)))
        assert ref is not None
        det.load_reference({k: v for k, v in ref.items() if k != "spacing"})
    states: dict[str, dict] = {}
    send(det, states, "alice", points, 1000.0)
    linked, _ = send(det, states, "bob", close, 2000.0)
    assert not linked.any()
    linked, _ = send(det, states, "bob", points, 3000.0)
    assert linked.all()  # exact repeats still link


@pytest.mark.parametrize("spacing", [0.0, -1.0, np.nan, np.inf])
def test_a_reference_with_a_bad_spacing_is_refused(spacing: float) -> None:
    det = detector()
    benign = WORLD.sample(np.random.default_rng(1), 3000)
    ref = det.fit(Reference(benign, None, Scaling.fit(benign)))
    assert ref is not None
    with pytest.raises(ValueError, match="links reference: spacing"):
        det.load_reference({**ref, "spacing": np.array(spacing)})


def interleaved(block: int) -> list[bool]:
    """Three clients exploring one region off the data, their queries interleaved, fed in blocks
    of ``block`` events (each block prepared once, then updated client by client)."""
    det = detector(distinct_repeats=0)
    base = synthetic(40, 10)
    rng = np.random.default_rng(11)
    x = np.concatenate([moved(det, base, s, i) for i, s in enumerate(rng.uniform(0.05, 0.2, 3))])
    who = np.repeat(["k1", "k2", "k3"], 40)
    order = rng.permutation(x.shape[0])
    events = [Event(str(who[i]), "m", 1000.0 + n, "tabular", vector=x[i]) for n, i in enumerate(order)]
    states: dict[str, dict] = {}
    out: list[bool] = []
    for start in range(0, len(events), block):
        part = events[start : start + block]
        b = Block("m", part)
        det.prepare(b)
        for client in sorted({e.client for e in part}):
            rows = np.array([i for i, e in enumerate(part) if e.client == client])
            det.update(states.setdefault(client, det.init_state()), Batch(client, "m", [part[i] for i in rows], b, rows))
        out += b.prepared["links"][1].tolist()
    return out


def test_near_links_do_not_depend_on_how_the_traffic_is_cut_into_blocks() -> None:
    whole = interleaved(1000)
    assert sum(whole) >= 60  # most of the later queries find an earlier one of another key nearby
    assert interleaved(7) == whole and interleaved(1) == whole


def test_near_links_survive_a_restart() -> None:
    """The index is saved without its off-manifold flags; a restarted process computes them again
    from the saved inputs, so a query after the restart still links to an input from before."""
    first = detector(distinct_repeats=0)
    states: dict[str, dict] = {}
    points = synthetic(20, 12)
    send(first, states, "alice", points, 1000.0)
    second = detector(distinct_repeats=0)
    second.load_shared_state(savez_roundtrip(first.shared_state()))
    linked, parent = send(second, {}, "bob", moved(first, points, 0.3, 13), 2000.0)
    assert linked.all() and (parent == client_key("alice")).all()


def test_a_restart_knows_which_entry_holds_a_point_also_when_only_repeats_of_it_are_left() -> None:
    """Repeats take index rows but are not filed in the buckets. Once the first entry of a point
    has expired while a repeat of it is live, the next send of the point is a new point (filed
    anew), not a repeat: so also after a restart, which must not take the live repeat for the
    entry that holds the point (it did, and linked every later sender of those points)."""
    def restarted_and_not(first: object) -> tuple:
        out = []
        for det in (first, detector(distinct_repeats=0)):
            if det is not first:
                det.load_shared_state(savez_roundtrip(first.shared_state()))
            linked, parents = send(det, {}, "carol", points, 86_445.0)
            out.append((linked.tolist(), parents.tolist(), sorted(i for i in det._filed.values() if i >= 60)))
        return tuple(out)

    points = synthetic(20, 7)
    first = detector(distinct_repeats=0)  # the default TTL: a day
    send(first, {}, "alice", points, 0.0)  # ids 0-19, filed
    send(first, {}, "bob", points, 50.0)  # ids 20-39: repeats of alice's, not filed
    send(first, {}, "zoe", WORLD.sample(np.random.default_rng(2), 20), 86_440.0)  # alice's entries are past the TTL now, bob's not
    now, after_restart = restarted_and_not(first)
    assert now[2] == list(range(60, 80))  # carol's sends were filed as new points ...
    assert after_restart == now  # ... and the same after a restart


def test_anchors_come_from_the_calibration_inputs_as_sent() -> None:
    """Natural records with one extreme feature (0.3 % of them) are anchors as they were sent, so
    honest clients that send them, or copies near them, are on the manifold; anchors taken from
    the winsorized inputs would put them off it (and several clients sending them would link)."""
    from exporter.detectors.base import ModelContext
    from exporter.detectors.kit import winsorize
    from exporter.detectors.links import LinksDetector, LinksParams, nearest_rms

    rng = np.random.default_rng(14)
    raw = WORLD.sample(rng, 3000)
    outliers = rng.choice(3000, 9, replace=False)  # fewer than the winsorized 0.5 %: clipped to a common value
    col = int(np.argmax(raw.std(axis=0)))
    raw[outliers, col] += 20.0 * (raw[:, col].max() - raw[:, col].min())
    scaling = Scaling.fit(raw)

    def fitted(unclipped: np.ndarray | None) -> LinksDetector:
        det = LinksDetector(LinksParams(anchors=4096), ModelContext("m", "tabular", D, 10, scaling, ("links",)))
        ref = det.fit(Reference(winsorize(raw, Scaling.TRIM), None, scaling, unclipped=unclipped))
        assert ref is not None
        det.load_reference(ref)
        return det

    for det, off in ((fitted(raw), False), (fitted(None), True)):
        d = nearest_rms(det._units(raw[outliers]), det._anchors)
        assert ((d > det._far).mean() > 0.5) == off


def test_an_attacker_who_sends_inputs_near_an_honest_clients_frames_nobody_but_itself() -> None:
    """Framing: an honest client whose inputs drift off the data (each a small move from its last),
    and an attacker who sends a copy near each of them right after it. The attacker is linked to
    the honest client; the honest client, whose next input is as near the attacker's copy as its
    own last input, is never linked: it was in that region first."""
    det = detector()  # distinct_repeats 8: the framing has 40 inputs to get past it
    states: dict[str, dict] = {}
    path = [synthetic(1, 14)[0]]
    for i in range(39):
        path.append(moved(det, path[-1][None, :], 0.1, 100 + i)[0])
    honest, framer = [], []
    for i, p in enumerate(path):
        honest.append(send(det, states, "alice", p[None, :], 1000.0 + 10 * i)[0][0])
        framer.append(send(det, states, "mallory", moved(det, p[None, :], 0.05, 200 + i), 1005.0 + 10 * i))
    assert not any(honest)
    assert sum(bool(linked[0]) for linked, _ in framer) >= 20 and all(parent[0] == client_key("alice") for linked, parent in framer if linked[0])


def test_the_off_manifold_flags_are_those_of_the_distance_to_every_anchor() -> None:
    """Most queries are settled by a bound (an earlier query's distance to the anchors plus the
    distance between the two) instead of their distance to every anchor; the flags must be the
    same as measuring every query. Inputs between the data and far from it put many near the
    ``far`` boundary, where a wrong bound would show."""
    det = detector(distinct_repeats=0)
    rng = np.random.default_rng(21)
    natural = WORLD.sample(rng, 600)
    far = synthetic(600, 22)
    mix = rng.uniform(0.0, 1.0, (600, 1))
    x = np.concatenate([natural, far, natural + mix * (far - natural)])
    x = x[rng.permutation(x.shape[0])]
    states: dict[str, dict] = {}
    for n, start in enumerate(range(0, x.shape[0], 300)):  # several blocks, several clients
        send(det, states, f"c{n % 3}", x[start : start + 300], 1000.0 + start)
    rows = np.arange(det._next) % det._alloc
    exact = nearest_rms(det._U[rows], det._anchors, a_sq=det._anchor_sq)
    flags = det._far_seen[rows]
    assert ((flags == 2) == (exact > det._far)).all() and (flags > 0).all()
    reach = det._reach[rows]
    assert (reach >= exact - 1e-4).all()  # an upper bound ...
    assert np.allclose(reach[flags == 2], exact[flags == 2], rtol=1e-4)  # ... exact off the manifold
    bounded = reach > exact + 1e-3
    assert bounded.sum() > 100 and (flags[bounded] == 1).all()  # many were settled by the bound
    assert 0.2 < (flags == 2).mean() < 0.8


def test_a_saved_index_with_ids_out_of_range_is_refused_before_anything_changes() -> None:
    """A bucket that names a query the index never gave would make every later block fail (and be
    saved again): the load refuses it, and the detector goes on with what it had."""
    first = detector(distinct_repeats=0)
    send(first, {}, "alice", synthetic(600, 12), 1000.0)
    saved = savez_roundtrip(first.shared_state())
    lo, nxt = (int(v) for v in saved["ids"])
    chunk = first.params.chunk
    parts = (("slots", 10**9), ("step_slots", 10**9), ("own_slots", 10**9), ("fill", -5), ("own_fill", -5), ("slots", -7))
    cases = [{part: _with(saved[part], 3, value)} for part, value in parts]
    cases += [
        {"ids": np.array([lo + 2**62, nxt + 2**62])},  # ids that would pass int64 soon after: every later block would fail
        {"fill": _with(saved["fill"], 3, nxt + 1)},  # a bucket filed more often than there were queries
        {"pending": np.array([[0, nxt - 1]] * (2 * chunk + 1))},  # more pending steps than two chunks hold: a scan per block
        {"pending": np.array([[0, nxt - nxt % chunk - chunk - 1]])},  # a step of a chunk filed long ago
        {"filed": np.array([[int(saved["digest"][0]), lo + 1]], dtype=np.uint64)},  # an entry that holds another point
        {"U": _with(saved["U"], 5, np.nan)},  # an input that is no number (it made every later block slower)
    ]
    for change in cases:
        broken = dict(saved) | change
        second = detector(distinct_repeats=0)
        with pytest.raises(ValueError, match="out of range"):
            second.load_shared_state(broken)
        linked, _ = send(second, {}, "bob", synthetic(20, 14), 2000.0)  # still works: an empty index, no failure
        assert second.index_size() == 20 and not linked.any()


def test_expiry_finds_the_first_live_entry_as_a_scan_of_the_whole_index_would() -> None:
    """The index's oldest live id is searched for in windows that double (so a block pays for
    the entries that expired, not for the whole index): the same id as a scan of everything,
    with entries out of time order."""
    d = detector()
    n = 5000
    while d._alloc < n:
        d._grow()
    rng = np.random.default_rng(3)
    d._ts[:n] = np.sort(rng.uniform(0, 10_000, n)) + rng.normal(0, 300, n)  # roughly in id order
    d._next, d._oldest = n, 0
    for now in np.linspace(d.params.ttl_seconds, d.params.ttl_seconds + 11_000, 50):
        start = d._oldest
        d._expire(float(now))
        live = np.flatnonzero(d._ts[start:n] >= now - d.params.ttl_seconds)
        assert d._oldest == (start + int(live[0]) if live.size else n)
    assert d._oldest == n


def _with(array: np.ndarray, at: int, value: float) -> np.ndarray:
    out = np.array(array, copy=True)
    out.flat[at] = value
    return out
