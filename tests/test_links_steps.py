"""``links``: which earlier point a query's own step is taken from, and the chains that follow from it."""

from __future__ import annotations

import numpy as np
import pytest

from exporter.detectors import links as links_module
from exporter.detectors.base import Batch, Block
from exporter.detectors.fingerprint import client_key
from exporter.detectors.links import LinksDetector
from exporter.events import Event
from tests.synthetic import D, WORLD, savez_roundtrip
from tests.test_links_repeats import detector, send

STEP = 2.0  # an eighth of the pixels' range (a JbDA step of 0.125; the independent generator draws 0.05 to 0.3)


def _chains(decoys: bool) -> tuple[int, int]:
    """A hundred two-step chains of a split with large sign steps: alice sends natural seeds, bob a
    sign step from each, dave a second sign step from each of bob's. With ``decoys``, carol first
    sends, beside each of bob's points, an input one pixel away from it, nearer than the seed. Returns how many of dave's queries are linked, and how many of those to bob."""
    det = detector(chunk=16)
    states: dict[str, dict] = {}
    rng = np.random.default_rng(11)
    seeds = WORLD.sample(rng, 100)
    away = np.where(seeds < 8, 1.0, -1.0)  # every pixel moves, none is clipped at 0 or 16
    first = seeds + STEP * away
    second = first + STEP * np.where(first < 8, 1.0, -1.0)
    send(det, states, "alice", seeds, 1000.0)
    if decoys:
        near = first.copy()
        near[:, 0] = np.where(near[:, 0] < 16, near[:, 0] + 1, near[:, 0] - 1)  # one pixel: below the precision floor of a step
        send(det, states, "carol", near, 1100.0)
    send(det, states, "bob", first, 1200.0)
    send(det, states, "erin", WORLD.sample(rng, 16), 1300.0)  # completes bob's chunk: his steps become usable
    linked, parent = send(det, states, "dave", second, 1400.0)
    return int(linked.sum()), int((linked & (parent == client_key("bob"))).sum())


def test_a_sign_step_is_taken_from_the_point_it_was_made_from_though_another_lies_nearer() -> None:
    """Bob's points are an eighth of the range from their seeds on every pixel. Their own steps must
    be their changes from the seeds, though alice's other seeds, or carol's inputs one pixel
    away, lie nearer: then dave's second steps repeat them and link dave to bob. Taken from the
    nearest point instead (the rule before sign steps were looked for), half as many chains link
    without carol's inputs, and none to bob with them."""
    plain_linked, plain_bob = _chains(decoys=False)
    _, to_bob = _chains(decoys=True)
    assert plain_linked >= 50 and plain_bob == plain_linked  # of 100 chains (the index's buckets miss some)
    # Carol's inputs are one pixel from bob's points, so a few of dave's continue hers as well.
    assert to_bob >= 0.75 * plain_bob


@pytest.mark.parametrize("even", [5, 6, 8])
def test_a_sign_step_moves_three_quarters_of_the_probe_features_by_one_size(even: int) -> None:
    """Of two candidates, the farther one's change moves ``even`` of the 8 probe features by one
    size. It is taken as the point stepped from only from 6 on; with fewer (honest changes between
    integer inputs can move a few by one size), the nearest is."""
    det = detector()
    r = det._probe
    assert r == 8
    ad = np.empty((1, 2, r), dtype=np.float32)
    ad[0, 0] = [0.11, 0.13, 0.17, 0.19, 0.23, 0.29, 0.31, 0.37]  # the nearer candidate: sizes all different
    ad[0, 1] = 0.25
    ad[0, 1, even:] = np.linspace(0.12, 0.2, r - even)  # the rest moved by other sizes
    picked = det._parent(ad, np.ones((1, 2), dtype=bool), np.array([[0.5, 0.9]]))
    assert int(picked[0]) == (1 if even >= 6 else 0)


def _repeated_steps(same_signs: bool, late: float | None = None, busy: int = 0, **params: object) -> tuple[int, int]:
    """Alice makes two sign steps from each of a hundred seeds (her second steps continue her
    first: verified steps, filed in the table of steps). Bob makes two steps from each of his
    own hundred seeds, the second with the signs of alice's second steps (``same_signs``) or
    with others; with ``late``, the block of bob's second steps starts with one query of
    mallory's stamped then; with ``busy``, erin sends that many inputs around each of bob's
    first steps, every pixel one away, before his second (busier traffic in the same buckets). Returns how
    many of bob's second steps are linked, and how many of those to alice."""
    det = detector(chunk=16, **params)
    states: dict[str, dict] = {}
    rng = np.random.default_rng(13)
    a0, b0 = WORLD.sample(rng, 100), WORLD.sample(rng, 100)
    first = np.where(rng.random(a0.shape) < 0.5, -1.0, 1.0)
    second = np.where(rng.random(a0.shape) < 0.5, -1.0, 1.0)  # not along the first: a turn, which is filed
    a1 = a0 + STEP * first
    send(det, states, "alice", np.concatenate([a0, a1]), 1000.0)
    send(det, states, "erin", WORLD.sample(rng, 16), 1300.0)
    send(det, states, "alice", a1 + STEP * second, 1400.0)
    send(det, states, "erin", WORLD.sample(rng, 16), 1600.0)
    b1 = b0 + STEP * np.where(rng.random(b0.shape) < 0.5, -1.0, 1.0)
    send(det, states, "bob", np.concatenate([b0, b1]), 1700.0)
    send(det, states, "erin", WORLD.sample(rng, 16), 1900.0)
    if busy:
        near = np.repeat(b1, busy, axis=0)
        near = np.clip(near + rng.choice([-1.0, 1.0], near.shape), 0.0, 16.0)  # every pixel by one: below a step's floor
        send(det, states, "erin", near, 1950.0 - len(near))
    signs = second if same_signs else np.where(rng.random(a0.shape) < 0.5, -1.0, 1.0)
    if late is None:
        linked, parent = send(det, states, "bob", b1 + STEP * signs, 2000.0)
    else:
        events = [Event("mallory", "m", late, "tabular", vector=WORLD.sample(rng, 1)[0])]
        events += [Event("bob", "m", 2000.0 + i, "tabular", vector=v) for i, v in enumerate(b1 + STEP * signs)]
        block = Block("m", events)
        det.prepare(block)
        for client, rows in (("mallory", np.arange(1)), ("bob", np.arange(1, len(events)))):
            det.update(states.setdefault(client, det.init_state()), Batch(client, "m", [events[i] for i in rows], block, rows))
        linked, parent = block.prepared["links"][1][1:], block.prepared["links"][2][1:, 0]
    return int(linked.sum()), int((linked & (parent == client_key("alice"))).sum())


def test_a_step_that_repeats_another_clients_verified_step_links_to_that_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bob never starts from alice's points, but his second steps, which continue his first,
    repeat her verified ones size for size and sign for sign: the table of steps links him to
    her. Steps with other signs do not. The changes tested against the table one per block
    link the same."""
    linked, to_alice = _repeated_steps(same_signs=True)
    assert to_alice >= 50 and to_alice == linked  # of 100 (the index's buckets miss some of bob's own seeds)
    assert _repeated_steps(same_signs=False)[0] == 0
    monkeypatch.setattr(links_module, "_PAIR_VALUES", 1)
    assert _repeated_steps(same_signs=True) == (linked, to_alice)


def test_a_key_that_grows_its_own_lattice_finds_its_own_points_when_busier_traffic_pushed_them_out_of_the_buckets() -> None:
    """Bob's second steps continue his own first steps, but erin then sends 80 inputs around each
    of those, every pixel one away, most in the same buckets as that point: the shared buckets
    forget most of bob's points before his second steps come. His own last queries are his
    candidates too, so his steps are still verified and repeat alice's; without them
    (``own_candidates: 0``), fewer than half are. (Each of bob's second steps comes 100 of his
    queries after the point it continues: his last 128 hold it, the default 64 would not.)"""
    quiet = _repeated_steps(same_signs=True)[1]
    linked, to_alice = _repeated_steps(same_signs=True, busy=80, own_candidates=128)
    assert to_alice == linked and to_alice >= 0.9 * quiet  # of 100 (quiet: as many as without erin)
    assert quiet >= 90
    assert _repeated_steps(same_signs=True, busy=80, own_candidates=0)[0] <= 0.5 * quiet
    assert _repeated_steps(same_signs=False, busy=80, own_candidates=128)[0] == 0


def test_a_later_query_at_the_start_of_a_block_does_not_hide_the_table_of_steps_from_the_others() -> None:
    """Whether a piece of a block reads the table of steps was decided by its first query's time:
    one query stamped past the table's window at the head of a block (any client can send one)
    kept every other query of its piece from being compared, and the result depended on how the
    events were cut into blocks. The earliest query of the piece decides now."""
    plain = _repeated_steps(same_signs=True)
    assert plain[1] >= 50
    assert _repeated_steps(same_signs=True, late=2000.0 + 3600.0 * 1.5) == plain


def test_an_attacker_who_files_the_differences_between_records_as_its_steps_frames_nobody() -> None:
    """Framing through the table of steps. Mallory knows the records an honest client sends
    (a public dataset), not when. For a hundred pairs of them (a record and a neighbour), she
    makes a verified step equal to their difference, far off the data: a, a + s, then
    a + s + d (s is d with half its signs flipped, so the last continues the step s with a
    turn, and is filed). The honest client then sends its records, the neighbour first: each
    change from its own earlier record repeats one of mallory's steps, sign for sign. A natural
    record continues no step of its own, so the change is no step of an exploration, and
    nobody is linked (before, almost every record was linked to mallory)."""
    det = detector(chunk=16)
    states: dict[str, dict] = {}
    rng = np.random.default_rng(17)
    first = WORLD.sample(rng, 100)
    then = np.clip(first + rng.choice([-3.0, -2.0, 2.0, 3.0], first.shape), 0, 16)  # a neighbouring record
    d = then - first
    a = 48.0 + 16.0 * rng.random(first.shape)  # far off the data (pixels are 0 to 16), each triple apart
    s = d * np.where(rng.random(d.shape) < 0.5, -1.0, 1.0)
    send(det, states, "mallory-b", np.concatenate([a, a + s]), 1000.0)
    send(det, states, "erin", WORLD.sample(rng, 16), 1300.0)
    linked, _ = send(det, states, "mallory-a", a + s + d, 1400.0)
    assert linked.sum() >= 50  # her steps are verified: they continue mallory-b's
    send(det, states, "erin", WORLD.sample(rng, 16), 1600.0)
    send(det, states, "honest", first, 1700.0)
    send(det, states, "erin", WORLD.sample(rng, 16), 1900.0)
    linked, _ = send(det, states, "honest", then, 2000.0)
    assert int(linked.sum()) == 0, int(linked.sum())


def test_steps_move_alike_when_every_sign_agrees_or_every_one_is_flipped_and_most_sizes_agree() -> None:
    """``_moves_alike`` row by row: the same step, the opposite step, one sign changed, a quarter
    of the sizes changed, most features unmoved."""
    det = detector()
    width = det._cols.size
    step = np.full(width, STEP / 16, dtype=np.float32) * np.where(np.arange(width) % 3 == 0, -1.0, 1.0).astype(np.float32)
    one_sign = step.copy()
    one_sign[5] *= -1
    sizes = step.copy()
    sizes[: width // 4] *= 1.5  # a quarter of the features: more than 1 - agreement
    few = np.zeros_like(step)
    few[:4] = step[:4]
    other = np.stack([step, -step, one_sign, sizes, few])
    got = det._moves_alike(np.broadcast_to(step, other.shape), other)
    assert got.tolist() == [True, True, False, False, False]


@pytest.mark.parametrize("test", ["_moves_alike", "_continues"])
def test_a_step_moves_at_least_min_moved_features_or_every_moving_feature_of_a_narrower_model(test: str) -> None:
    """Both tests of two steps want ``min_moved_features`` features moved by both, not only the
    share ``min_moved``: on a few features, equal sizes agree by chance. A model with fewer moving
    features needs all of them."""
    def passes(det: LinksDetector, moved: int) -> bool:
        step = np.zeros(det._cols.size, dtype=np.float32)
        step[:moved] = STEP / 16
        extra = (np.ones(1, dtype=bool),) if test == "_continues" else ()  # another client's step (the stricter case)
        got = getattr(det, test)(step[None, :], step[None, :], *extra)
        return bool((got[0] if test == "_continues" else got)[0])  # _continues: (whether it repeats, whether straight)

    share = detector()  # the default floor (8) is below 0.3 of the moving features here: the share decides
    width = share._cols.size
    assert width * share.params.min_moved > share.params.min_moved_features
    low = int(np.ceil(width * share.params.min_moved))
    assert (passes(share, low - 1), passes(share, low)) == (False, True)
    count = detector(min_moved_features=low + 10)
    assert (passes(count, low + 9), passes(count, low + 10)) == (False, True)
    narrow = detector(min_moved_features=4096)  # more than the model has: every moving feature
    assert (passes(narrow, width - 1), passes(narrow, width)) == (False, True)


def _scaled_chains(det: LinksDetector, last_filed: bool = True) -> tuple[int, int]:
    """Two rounds of a hundred two-step chains of a split whose sign steps scale every pixel its own
    way (1.5 to 3 pixels: no sign step in the features' ranges). Each round: one key sends natural
    seeds, a second one a step from each, a third a second step from each of the second's. Returns
    how many of the second round's second steps are linked, and how many of the second round's
    queries were linked to a client of the first round. Without ``last_filed``, the last chunk's
    verified steps are left pending (its chunk is not complete)."""
    states: dict[str, dict] = {}
    rng = np.random.default_rng(17)
    scale = rng.permutation(np.linspace(1.5, 3.0, D))
    linked_round, to_first = 0, 0
    for round_, (seeder, stepper, chainer) in enumerate((("alice", "bob", "dave"), ("carol", "erin", "frank"))):
        seeds = WORLD.sample(rng, 100)
        first = seeds + scale * np.where(seeds < 8, 1.0, -1.0)
        second = first + scale * np.where(first < 8, 1.0, -1.0)
        t = 1000.0 + 1000.0 * round_
        send(det, states, seeder, seeds, t)
        send(det, states, stepper, first, t + 200.0)
        send(det, states, "zoe", WORLD.sample(rng, 16), t + 400.0)  # completes the chunk: the steps become usable
        linked, parent = send(det, states, chainer, second, t + 600.0)
        if round_ == 0 or last_filed:
            send(det, states, "zoe", WORLD.sample(rng, 16), t + 800.0)  # completes the chunk: its verified steps are filed
        linked_round = int(linked.sum())
        to_first += round_ * int(np.isin(parent[linked], [client_key(c) for c in ("alice", "bob", "dave")]).sum())
    return linked_round, to_first


def test_a_step_with_the_sizes_of_a_recent_verified_step_is_taken_from_the_point_it_was_made_from() -> None:
    """A split whose steps scale each pixel differently makes no sign step in the features' ranges,
    so a query's own step is taken from its nearest candidate, often another seed, and most of its
    chains are missed (3 of 100 link here). The chains of the first round that do link are verified
    steps; their sizes are the attack's own, and in the second round they find the point each step
    was made from: more chains link (62 of 100, to the second round's clients, who continued them)."""
    without, _ = _scaled_chains(detector(chunk=16, known_steps=0))
    with_known, to_first = _scaled_chains(detector(chunk=16, known_steps=16))
    assert without <= 20  # of 100
    assert with_known >= 50 and with_known >= without + 30  # (the index's buckets miss some)
    assert to_first == 0  # the second round's chains continue its own keys' steps


def _scaled_walk(cut: int) -> tuple[np.ndarray, np.ndarray, LinksDetector]:
    """1,500 queries in blocks of ``cut``: half from 300 honest clients, half a split over 10 keys
    whose every point is one of its last 200 moved by a sign step that scales each pixel its own
    way (clipped at the box: new sizes keep appearing). Returns each query's link flag and first
    peer, and the detector."""
    det = detector(chunk=16)
    rng = np.random.default_rng(3)
    scale = rng.permutation(np.linspace(1.5, 3.0, D))
    points = list(WORLD.sample(rng, 20))
    honest = WORLD.sample(rng, 1500)
    events = []
    for i in range(1500):
        if rng.random() < 0.5:
            parent = points[-1 - int(rng.integers(min(len(points), 200)))]
            points.append(np.clip(parent + scale * np.where(rng.random(D) < 0.5, -1.0, 1.0), 0, 16))
            events.append(Event(f"split-{rng.integers(10)}", "m", 1000.0 + i, "tabular", vector=points[-1]))
        else:
            events.append(Event(f"honest-{rng.integers(300)}", "m", 1000.0 + i, "tabular", vector=honest[i]))
    linked, parents = [], []
    for start in range(0, len(events), cut):
        block = Block("m", events[start : start + cut])
        det.prepare(block)
        linked.append(block.prepared["links"][1].copy())
        parents.append(block.prepared["links"][2][:, 0].copy())
    return np.concatenate(linked), np.concatenate(parents), det


def test_known_sizes_link_the_same_whatever_the_blocks() -> None:
    """The known sizes are learnt as a chunk's steps are filed, before any query of the next chunk
    takes its own step: every query of a chunk reads them as they were at its start, so blocks of
    7 queries, or of 1, link as one block does and leave the same sizes. (Filed after the first
    piece of a chunk had taken its own steps, as they once were, blocks of 7 linked one query more.)"""
    linked, parents, whole = _scaled_walk(10**6)
    assert linked.sum() >= 100 and np.isfinite(whole._known_time).sum() >= 8
    for cut in (7, 1):
        other_linked, other_parents, det = _scaled_walk(cut)
        np.testing.assert_array_equal(other_linked, linked)
        np.testing.assert_array_equal(other_parents, parents)
        np.testing.assert_array_equal(det._known_size, whole._known_size)
        np.testing.assert_array_equal(det._known_time, whole._known_time)


def test_a_known_size_picks_a_candidate_only_on_three_quarters_of_the_probe_features_and_within_the_window() -> None:
    """Of two candidates, the farther one's change has a known step's sizes on ``same`` of the 8
    probe features (none is a sign step: every size differs). It is taken from 6 on, and only
    for a query sent within ``steps_window`` of that step."""
    det = detector(steps_window=100.0)
    r = det._probe
    size = np.array([0.11, 0.13, 0.17, 0.19, 0.23, 0.29, 0.31, 0.37], dtype=np.float32)
    det._remember(size[None, :], np.array([1000.0]), [])
    for same in range(4, r + 1):
        ad = np.empty((1, 2, r), dtype=np.float32)
        ad[0, 0] = size[::-1] * 0.9  # the nearer candidate
        ad[0, 1] = size
        ad[0, 1, same:] *= 1.5
        alive, dist = np.ones((1, 2), dtype=bool), np.array([[0.5, 0.9]])
        assert int(det._parent(ad, alive, dist, np.array([1050.0]))[0]) == (1 if same >= 6 else 0)
        assert int(det._parent(ad, alive, dist, np.array([1101.0]))[0]) == 0  # past the window
        assert int(det._parent(ad, alive, dist)[0]) == 0  # no times: the nearest


def test_known_sizes_are_distinct_bounded_and_kept_by_their_latest_use() -> None:
    """A size already known brings its time forward and takes no new place; a new size takes the
    place of the one seen longest ago; a size that moves too few probe features is not kept."""
    det = detector(known_steps=3)
    r = det._probe
    base = np.linspace(0.1, 0.3, r).astype(np.float32)
    sizes = np.stack([base, base * 1.001, base * 2, base * 3])  # the second repeats the first within tolerance
    det._remember(sizes, np.array([10.0, 20.0, 30.0, 40.0]), [])
    assert sorted(det._known_time.tolist()) == [20.0, 30.0, 40.0]
    assert np.allclose(np.sort(det._known_size[:, 0]), base[0] * np.array([1, 2, 3]), rtol=0.01)
    det._remember((base * 4)[None, :], np.array([50.0]), [])  # replaces the one seen at 20 (the first size)
    assert sorted(det._known_time.tolist()) == [30.0, 40.0, 50.0]
    assert not np.isclose(det._known_size[:, 0], base[0]).any()
    few = base * 5
    few[: r // 2] = 0.0  # moves half the probe features
    det._remember(few[None, :], np.array([60.0]), [])
    assert sorted(det._known_time.tolist()) == [30.0, 40.0, 50.0]
    det._remember((base * 2)[None, :], np.array([70.0]), [])  # known: refreshed in place
    assert sorted(det._known_time.tolist()) == [40.0, 50.0, 70.0]


def test_known_sizes_survive_a_restart() -> None:
    """The known sizes are saved with the index; sizes or times that are not finite are refused."""
    first = detector(chunk=16)
    _scaled_chains(first)
    assert np.isfinite(first._known_time).sum() >= 1
    saved = savez_roundtrip(first.shared_state())
    second = detector(chunk=16)
    second.load_shared_state(saved)
    np.testing.assert_array_equal(second._known_size, first._known_size)
    np.testing.assert_array_equal(second._known_time, first._known_time)
    for part, value in (("known_size", np.nan), ("known_size", -1.0), ("known_time", np.inf), ("known_time", np.nan)):
        broken = dict(saved)
        broken[part] = np.array(saved[part], copy=True)
        broken[part].reshape(-1)[0] = value
        with pytest.raises(ValueError, match="known step sizes"):
            detector(chunk=16).load_shared_state(broken)


def test_the_clients_own_queries_survive_a_restart_and_a_snapshot_without_them_loads() -> None:
    """The table of the clients' own queries is saved with the index. A snapshot of an earlier
    version has none: it loads, with the table empty; one of other parameters is refused."""
    first = detector(chunk=16)
    send(first, {}, "alice", WORLD.sample(np.random.default_rng(3), 40), 1000.0)
    saved = savez_roundtrip(first.shared_state())
    second = detector(chunk=16)
    second.load_shared_state(saved)
    assert (second._own_fill > 0).any()
    np.testing.assert_array_equal(second._own_slots, first._own_slots)
    np.testing.assert_array_equal(second._own_fill, first._own_fill)
    older = {k: v for k, v in saved.items() if k not in ("own_slots", "own_fill")}
    third = detector(chunk=16)
    third.load_shared_state(older)
    assert third.index_size() == 40 and not third._own_fill.any() and (third._own_slots == -1).all()
    for dropped in ("own_slots", "own_fill"):  # one without the other
        with pytest.raises(ValueError, match="does not fit"):
            detector(chunk=16).load_shared_state({k: v for k, v in saved.items() if k != dropped})
    with pytest.raises(ValueError, match="does not fit"):
        detector(chunk=16, own_candidates=8).load_shared_state(saved)


def test_a_block_that_fails_halfway_leaves_the_known_sizes_as_they_were() -> None:
    """The first piece of the block files the last chunk's pending verified steps, which brings their
    size's time forward; the third fails. Everything the index holds, the known sizes included, is as
    before the block, and the block sent again gives what it gives a detector that never saw it fail."""
    a, b = detector(chunk=16), detector(chunk=16)
    for det in (a, b):
        _scaled_chains(det, last_filed=False)
    before = a.shared_state()
    x = WORLD.sample(np.random.default_rng(6), 64)
    piece, calls = a._piece, 0

    def failing(*args):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 3:
            raise MemoryError
        return piece(*args)

    a._piece = failing  # type: ignore[method-assign]
    with pytest.raises(MemoryError):
        send(a, {}, "zoe", x, 2800.0)
    del a._piece
    assert calls == 3
    for key, value in before.items():
        np.testing.assert_array_equal(a.shared_state()[key], value)
    send(a, {}, "zoe", x, 2800.0)
    send(b, {}, "zoe", x, 2800.0)
    assert a._known_time.max() > before["known_time"].max()  # what the failed block had learnt, learnt again
    for key, value in b.shared_state().items():
        np.testing.assert_array_equal(a.shared_state()[key], value)


@pytest.mark.parametrize("entries", [10, 64, 65, 3000])
def test_add_peers_names_each_rows_first_distinct_peers_after_those_it_has(entries: int) -> None:
    """``links.add_peers`` gives what naming the peers one entry at a time gives (the first distinct
    peers of each row, in order, in its free slots, after those already named), whether it goes
    one by one (up to ``_FEW_PEERS`` entries) or sorts first (more: a client chooses how many
    matches its queries make, so that path keeps only the first few distinct peers of a row)."""
    rng = np.random.default_rng(entries)
    rows = rng.integers(0, 12, entries)
    peers = rng.integers(1, 6, entries).astype(np.uint64)
    parents = np.zeros((12, 2), dtype=np.uint64)
    parents[:4, 0] = rng.integers(1, 6, 4)  # some rows already name a peer
    parents[4, :] = [7, 8]  # one is full
    expected = parents.copy()
    for row, peer in zip(rows.tolist(), peers.tolist()):
        slot = expected[row]
        if peer not in slot and (slot == 0).any():
            slot[int(np.argmax(slot == 0))] = peer
    links_module.add_peers(parents, rows, peers)
    assert (parents == expected).all()
    assert (parents[4] == [7, 8]).all() and (parents[rows, 0] != 0).all()


def test_inputs_far_outside_tiny_ranges_raise_no_warning_and_keep_the_index_finite() -> None:
    """A model whose features span a millionth, sent inputs of 1e15 (valid JSON numbers within the
    decoder's bound): their cells overflow int64. Each such input once printed a RuntimeWarning
    from numpy's cast, text on stderr that a client chose to cause; now they hash quietly, and the
    index and its snapshot stay whole."""
    import warnings

    from exporter.detectors.base import ModelContext, Reference
    from exporter.detectors.kit import Scaling
    from exporter.detectors.links import LinksParams

    rng = np.random.default_rng(0)
    benign = rng.normal(0.0, 1.0, (3000, 30)) * 1e-6
    scaling = Scaling.fit(benign)
    det = LinksDetector(LinksParams(), ModelContext("m", "tabular", 30, 10, scaling, ("links",)))
    det.load_reference(savez_roundtrip(det.fit(Reference(benign, None, scaling))))
    x = rng.choice([-1.0, 1.0], (256, 30)) * rng.uniform(1e14, 1e15, (256, 1))
    events = [Event(f"a{i % 4}", "m", 1000.0 + i, "tabular", vector=v) for i, v in enumerate(x)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        det.prepare(Block("m", events))
    assert det.index_size() == 256 and np.isfinite(det._U[:256]).all()
    det.load_shared_state(savez_roundtrip(det.shared_state()))
    assert det.index_size() == 256
