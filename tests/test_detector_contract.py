"""The contract every registered detector keeps, checked on each of them (as scikit-learn's ``check_estimator`` does).

- **Fixed state layout:** the arrays of ``init_state`` keep their keys, shapes and dtypes whatever is fed.
- **Bounded state:** its size does not grow with the number of events.
- **Snapshot round trip:** a state written with ``np.savez`` and read back (no pickle) continues exactly as the original.
- **Batching:** a batch gives the same flags and state as its events one at a time, however cut
  (the cross-client stage, ``prepare``, included), and the same values up to float rounding
  (a sum taken in another order may differ in its last bits).
- **NaN means "not judged":** events a detector cannot judge get NaN and no flag; a flag has a
  finite value in [0, 1]; a whole batch with nothing to judge gives None.
- **Reference:** ``fit`` on benign data gives a state that ``load_reference`` takes back after a savez round trip.
"""

from __future__ import annotations

import numpy as np
import pytest

from exporter.detectors import BUILTIN, resolve_detectors
from exporter.detectors.base import Batch, Detector, ModelContext, Reference, Signals, State
from exporter.detectors.kit import Scaling
from exporter.events import Event
from tests.synthetic import WORLD, D, K, hopskipjump, jbda, judge, savez_roundtrip, simba

SPECS = resolve_detectors({name: {"enabled": True} for name in BUILTIN})  # every built-in, the ones off by default too


def fitted(name: str) -> Detector:
    """Detector ``name`` on a digits-like model, with the model's scaling and its reference fitted on benign data."""
    cls, params = SPECS[name]
    rng = np.random.default_rng(1)
    benign = WORLD.sample(rng, 3000)
    scaling = Scaling.fit(benign)
    det = cls(params, ModelContext("m", "tabular", D, K, scaling, tuple(SPECS)))
    ref = det.fit(Reference(benign, WORLD.predict(benign), scaling))
    if ref is not None:
        det.load_reference(savez_roundtrip(ref))
    return det


def traffic(seed: int = 0) -> list[Event]:
    """One client's events: natural queries, searches, augmentation steps, exact repeats, and
    events most detectors cannot judge (text, no vector, label-only answers)."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([WORLD.sample(rng, 60), hopskipjump(rng, 60), jbda(rng, 160)[100:], simba(rng, 40)])
    x = np.concatenate([x, x[:15]])  # exact repeats
    probs = WORLD.predict(x)
    out: list[Event] = []
    for i, (v, p) in enumerate(zip(x, probs)):
        ts = 1000.0 + i * 0.7
        if i % 23 == 5:
            out.append(Event("c", "m", ts, "text", text=f"a text {i}"))
        elif i % 29 == 7:
            out.append(Event("c", "m", ts, "tabular", vector=v, label=str(int(p.argmax()))))
        elif i % 31 == 11:
            out.append(Event("c", "m", ts, "tabular"))  # an input the detectors cannot read
        else:
            out.append(Event("c", "m", ts, "tabular", vector=v, probs=p))
    return out


def feed(det: Detector, state: State, events: list[Event], sizes: list[int]) -> Signals:
    """The events in batches of ``sizes`` (cycled); per event, NaN / unflagged where a batch gave None."""
    values, flags = [], []
    i = j = 0
    while i < len(events):
        chunk = events[i : i + sizes[j % len(sizes)]]
        i, j = i + len(chunk), j + 1
        sig = judge(det, state, Batch("c", "m", chunk))
        if sig is None:
            sig = Signals.constant(len(chunk), np.nan, False)
        check_signals(det, sig, len(chunk))
        values.append(sig.values)
        flags.append(sig.flagged)
    return Signals(np.concatenate(values), np.concatenate(flags))


def check_signals(det: Detector, sig: Signals, n: int) -> None:
    values, flagged = sig
    assert values.shape == (n,) and flagged.shape == (n,) and values.dtype == np.float64 and flagged.dtype == np.bool_
    judged = ~np.isnan(values)
    assert ((values[judged] >= 0.0) & (values[judged] <= 1.0)).all()
    assert not flagged[~judged].any(), f"{det.name}: an event that was not judged flags"


def layout(state: State) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {k: (v.shape, v.dtype) for k, v in state.items()}


@pytest.fixture(params=sorted(SPECS), ids=sorted(SPECS))
def name(request: pytest.FixtureRequest) -> str:
    return request.param


def test_state_layout_is_fixed_and_bounded(name: str) -> None:
    det = fitted(name)
    state = det.init_state()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    before = layout(state)
    size = sum(v.nbytes for v in state.values())
    events = traffic() * 3  # several times any window
    feed(det, state, events, [1, 64, 7, 300])
    assert layout(state) == before
    assert sum(v.nbytes for v in state.values()) == size


def test_a_batch_is_its_events_one_at_a_time(name: str) -> None:
    events = traffic(1)
    det = fitted(name)
    one_state = det.init_state()
    one = feed(det, one_state, events, [1])
    assert (~np.isnan(one.values)).any(), f"{name} judged nothing: the check would be vacuous"
    for sizes in ([len(events)], [37], [5, 1, 90, 13]):
        other = fitted(name)  # a fresh detector: state shared across clients starts alike
        state = other.init_state()
        got = feed(other, state, events, sizes)
        np.testing.assert_allclose(got.values, one.values, rtol=1e-9, atol=1e-12, err_msg=f"{name}, batches of {sizes}")
        np.testing.assert_array_equal(got.flagged, one.flagged)
        for key in one_state:
            np.testing.assert_allclose(state[key], one_state[key], rtol=1e-9, atol=1e-12, err_msg=f"{name}: state {key}")


def test_state_survives_a_snapshot_round_trip(name: str) -> None:
    events = traffic(2)
    det = fitted(name)
    straight = feed(det, det.init_state(), events, [16])
    first = fitted(name)
    state = first.init_state()
    head = feed(first, state, events[:120], [16])
    shared = first.shared_state()
    second = fitted(name)  # a restarted process
    if shared is not None:
        second.load_shared_state(savez_roundtrip(shared))
    tail = feed(second, savez_roundtrip(state), events[120:], [16])
    np.testing.assert_allclose(np.concatenate([head.values, tail.values]), straight.values, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(np.concatenate([head.flagged, tail.flagged]), straight.flagged)


JUDGES_TIME = {"rate"}  # judges when events arrive, which every event has


def test_nothing_to_judge_is_none_not_a_score(name: str) -> None:
    det = fitted(name)
    state = det.init_state()
    bare = [Event("c", "m", 1.0 + i, "tabular") for i in range(3)]  # no input, no answer
    sig = judge(det, state, Batch("c", "m", bare))
    if name in JUDGES_TIME:
        assert sig is not None and not np.isnan(sig.values).any()
    else:
        assert sig is None, f"{name} scored events it cannot judge"


def test_a_reference_survives_a_round_trip(name: str) -> None:
    cls, params = SPECS[name]
    benign = WORLD.sample(np.random.default_rng(3), 3000)
    scaling = Scaling.fit(benign)
    det = cls(params, ModelContext("m", "tabular", D, K, scaling, tuple(SPECS)))
    ref = det.fit(Reference(benign, WORLD.predict(benign), scaling))
    if ref is None:
        pytest.skip(f"{name} learns nothing from a reference")
    assert all(isinstance(v, np.ndarray) for v in ref.values())
    det.load_reference(savez_roundtrip(ref))
    with pytest.raises((ValueError, KeyError, TypeError)):
        det.load_reference({k: np.zeros(1) for k in ref})  # a reference of another shape is refused, not misread
