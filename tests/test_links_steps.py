"""``links``: which earlier point a query's own step is taken from, and the chains that follow from it."""

from __future__ import annotations

import numpy as np
import pytest

from exporter.detectors import links as links_module
from exporter.detectors.fingerprint import client_key
from tests.synthetic import WORLD
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


def _repeated_steps(same_signs: bool) -> tuple[int, int]:
    """Alice makes two sign steps from each of a hundred seeds (her second steps continue her
    first: verified steps, filed in the table of steps). Bob then makes one step from each of
    his own hundred seeds, with the signs of alice's second steps (``same_signs``) or with
    others. Returns how many of bob's steps are linked, and how many of those to alice."""
    det = detector(chunk=16)
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
    send(det, states, "bob", b0, 1700.0)
    send(det, states, "erin", WORLD.sample(rng, 16), 1900.0)
    signs = second if same_signs else np.where(rng.random(a0.shape) < 0.5, -1.0, 1.0)
    linked, parent = send(det, states, "bob", b0 + STEP * signs, 2000.0)
    return int(linked.sum()), int((linked & (parent == client_key("alice"))).sum())


def test_a_step_that_repeats_another_clients_verified_step_links_to_that_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bob never starts from alice's points, but his steps repeat her verified ones size for size
    and sign for sign: the table of steps links him to her. Steps with other signs do not. The
    changes tested against the table one per block link the same."""
    linked, to_alice = _repeated_steps(same_signs=True)
    assert to_alice >= 50 and to_alice == linked  # of 100 (the index's buckets miss some of bob's own seeds)
    assert _repeated_steps(same_signs=False)[0] == 0
    monkeypatch.setattr(links_module, "_ALIKE_VALUES", 1)
    assert _repeated_steps(same_signs=True) == (linked, to_alice)


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
