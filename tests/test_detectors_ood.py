"""The ``ood`` detector, and the synthetic traffic shared by the tests of the batched detectors.

Benign traffic is digit-like: 10 class prototypes drawn as strokes on an 8x8 grid with
values 0..16, sent as 64-feature vectors (prototype x brightness + noise, rounded and
clipped, like sklearn's digits). Column 0 is always blank, so the covariance is singular.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

import numpy as np
import pytest
from pydantic import ValidationError

from exporter.detectors.base import Batch, Detector, ModelContext, Reference, Signals, State
from exporter.detectors.ood import OodDetector, OodParams, trimmed_window_means, whitening
from exporter.events import Event
from exporter.detectors.kit import Scaling
from tests.synthetic import judge, savez_roundtrip

DetectorT = TypeVar("DetectorT", bound=Detector)

DIM = 64
CLASSES = 10


# ---------------------------------------------------------------------------
# Synthetic traffic (imported by the other detector test files)
# ---------------------------------------------------------------------------


def _prototypes() -> np.ndarray:
    rng = np.random.default_rng(7)
    protos = np.zeros((CLASSES, 8, 8))
    for k in range(CLASSES):
        for _ in range(3):  # three strokes inside columns 1..6
            r0, r1 = sorted(rng.integers(0, 8, 2))
            c0, c1 = rng.integers(1, 7, 2)
            for t in np.linspace(0.0, 1.0, 10):
                protos[k, int(round(r0 + (r1 - r0) * t)), int(round(c0 + (c1 - c0) * t))] = 16.0
    return protos.reshape(CLASSES, DIM)


PROTOTYPES = _prototypes()
_NOISE = np.ones(DIM)
_NOISE.reshape(8, 8)[:, 0] = 0.0  # column 0 is always blank: constant features


def digits(rng: np.random.Generator, n: int, classes: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` digit-like samples (n, 64) with values 0..16, and their classes."""
    y = rng.integers(CLASSES, size=n) if classes is None else rng.choice(np.asarray(classes), size=n)
    x = PROTOTYPES[y] * rng.uniform(0.6, 1.0, size=(n, 1)) + rng.normal(0.0, 1.5, size=(n, DIM)) * _NOISE
    return np.clip(np.rint(x), 0, 16), y


def uniform_random(rng: np.random.Generator, n: int) -> np.ndarray:
    """Tramèr-style queries: uniform in the feature box, rounded like real inputs."""
    return np.rint(rng.uniform(0, 16, size=(n, DIM)))


PERMUTATION = np.random.default_rng(3).permutation(DIM)


def permuted(x: np.ndarray) -> np.ndarray:
    """Natural data made off-distribution: the same values, features shuffled (Knockoff-style)."""
    return x[:, PERMUTATION]


def model_probs(x: np.ndarray, temperature: float = 30.0) -> np.ndarray:
    """A nearest-prototype softmax 'victim model': p_k ∝ exp(-|x - proto_k|^2 / (2 T^2))."""
    d2 = ((x[:, None, :] - PROTOTYPES[None, :, :]) ** 2).sum(axis=2)
    logits = -d2 / (2.0 * temperature**2)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def benign_reference(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, Scaling]:
    """Benign reference vectors and the feature scaling learned from them."""
    x, _ = digits(np.random.default_rng(seed), n)
    return x, Scaling.fit(x)


def context(scaling: Scaling | None) -> ModelContext:
    return ModelContext(name="m", modality="tabular", input_dim=DIM, num_classes=CLASSES, scaling=scaling)


def events(
    client: str,
    x: np.ndarray | None = None,
    probs: np.ndarray | None = None,
    ts: Iterable[float] | None = None,
    n: int | None = None,
) -> list[Event]:
    """Events of one client; vectors ``x`` and/or probabilities ``probs``, times ``ts`` (default 0, 1, 2, ...)."""
    count = n if n is not None else (x.shape[0] if x is not None else probs.shape[0])  # type: ignore[union-attr]
    times = list(ts) if ts is not None else [float(i) for i in range(count)]
    return [
        Event(
            client,
            "m",
            float(times[i]),
            "tabular",
            vector=None if x is None else x[i],
            probs=None if probs is None else probs[i],
        )
        for i in range(count)
    ]


def run(det: Detector, evs: list[Event], sizes: Sequence[int] | int = 32, state: State | None = None) -> tuple[Signals, State]:
    """Feed ``evs`` to ``det`` in batches of ``sizes`` (cycled); NaN / unflagged where a batch gave None."""
    state = det.init_state() if state is None else state
    sizes = [sizes] if isinstance(sizes, int) else list(sizes)
    values, flagged = [], []
    i = j = 0
    while i < len(evs):
        chunk = evs[i : i + sizes[j % len(sizes)]]
        i += len(chunk)
        j += 1
        sig = judge(det, state, Batch(chunk[0].client, "m", chunk))
        if sig is None:
            sig = Signals.constant(len(chunk), np.nan, False)
        assert sig.values.shape == (len(chunk),) and sig.flagged.shape == (len(chunk),)
        judged = sig.values[~np.isnan(sig.values)]
        assert ((judged >= 0.0) & (judged <= 1.0)).all()
        values.append(sig.values)
        flagged.append(sig.flagged)
    return Signals(np.concatenate(values), np.concatenate(flagged)), state


def assert_same_signals(a: Signals, b: Signals) -> None:
    np.testing.assert_allclose(a.values, b.values, rtol=1e-9, atol=1e-12, equal_nan=True)
    np.testing.assert_array_equal(a.flagged, b.flagged)


def first_flag(sig: Signals) -> int | None:
    """1-based index of the first flagged event, or None."""
    hits = np.flatnonzero(sig.flagged)
    return int(hits[0]) + 1 if hits.size else None


# ---------------------------------------------------------------------------
# ood
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> tuple[np.ndarray, Scaling]:
    return benign_reference()


def calibrated_detector(cls: type[DetectorT], reference: tuple[np.ndarray, Scaling], **params: object) -> DetectorT:
    """A ``cls`` detector fitted on the benign ``reference`` (through a savez round trip, as a profile is)."""
    x, scaling = reference
    det = cls(cls.Params(**params), context(scaling))
    ref = det.fit(Reference(vectors=x, probs=None, scaling=scaling))
    assert ref is not None
    det.load_reference(savez_roundtrip(ref))
    return det


def calibrated(reference: tuple[np.ndarray, Scaling], **params: object) -> OodDetector:
    return calibrated_detector(OodDetector, reference, **params)


def uncalibrated(reference: tuple[np.ndarray, Scaling]) -> OodDetector:
    return OodDetector(OodParams(), context(reference[1]))


def test_params_are_validated_and_documented() -> None:
    p = OodParams()
    assert (p.window, p.min_events, p.threshold, p.min_threshold, p.scale, p.trim, p.shrinkage) == (64, 20, 0.9, 0.6, 1.0, 0.1, 0.05)
    assert OodDetector.threshold_param == "threshold" and OodDetector.name == "ood" and OodDetector.default_enabled
    for field in OodParams.model_fields.values():
        if field.description is None:
            continue
        assert len(field.description) > 20
    with pytest.raises(ValidationError):
        OodParams(window=10, min_events=11)
    with pytest.raises(ValidationError):
        OodParams(trim=0.5)
    with pytest.raises(ValidationError):
        OodParams(scale=0.0)
    with pytest.raises(ValidationError):
        OodParams(bogus=1)


def test_whitening_handles_a_singular_covariance(reference: tuple[np.ndarray, Scaling]) -> None:
    x, _ = reference
    assert np.linalg.matrix_rank(np.cov(x, rowvar=False)) < DIM  # blank column 0
    mean, w = whitening(x, 0.05)
    assert w.shape == (DIM, DIM) and w.dtype == np.float32 and np.isfinite(w).all()
    np.testing.assert_allclose(w, w.T, atol=1e-4)
    _, wd = whitening(x, 0.05, full=False)
    assert wd.shape == (DIM,) and np.isfinite(wd).all()
    # Constant inputs everywhere: no division by zero.
    _, w0 = whitening(np.zeros((10, 4)), 0.05)
    assert np.isfinite(w0).all()


def test_iid_benign_clients_are_not_flagged(reference: tuple[np.ndarray, Scaling]) -> None:
    det = calibrated(reference)
    flagged, finals = 0, []
    for c in range(50):
        x, _ = digits(np.random.default_rng(100 + c), 120)
        sig, _ = run(det, events(f"b{c}", x))
        flagged += bool(sig.flagged.any())
        finals.append(sig.values[-1])
    assert flagged <= 1
    # scale 1 puts a typical benign client near 0.5, well under the 0.75 threshold
    assert 0.4 < float(np.median(finals)) < 0.6


@pytest.mark.parametrize(
    "attack",
    ["uniform", "permuted", "interleaved_uniform", "interleaved_permuted"],
)
def test_off_distribution_attacks_are_flagged(reference: tuple[np.ndarray, Scaling], attack: str) -> None:
    det = calibrated(reference)
    rng = np.random.default_rng(11)
    natural, _ = digits(rng, 100)
    if attack == "uniform":
        x = uniform_random(rng, 100)
    elif attack == "permuted":
        x = permuted(natural)
    else:
        bad = uniform_random(rng, 100) if attack == "interleaved_uniform" else permuted(digits(rng, 100)[0])
        x = np.empty((200, DIM))
        x[0::2], x[1::2] = bad, natural  # 1:1 with natural queries
    sig, _ = run(det, events("attacker", x))
    assert first_flag(sig) == 20  # as soon as min_events queries are judged
    assert sig.flagged[20:].all()
    assert sig.values[-1] > 0.85


def test_flipped_images_are_flagged_with_a_reference(reference: tuple[np.ndarray, Scaling]) -> None:
    x, _ = digits(np.random.default_rng(12), 100)
    flipped = x.reshape(-1, 8, 8)[:, :, ::-1].reshape(-1, DIM)  # plausible pixels, wrong places
    sig, _ = run(calibrated(reference), events("flip", flipped))
    assert sig.flagged[-1]


def test_nothing_is_judged_without_a_reference(reference: tuple[np.ndarray, Scaling]) -> None:
    rng = np.random.default_rng(13)
    for det in (uncalibrated(reference), OodDetector(OodParams(), ModelContext("m", "tabular", None, None, None))):
        assert judge(det, det.init_state(), Batch("c", "m", events("c", uniform_random(rng, 30)))) is None
    # A reference fitted on the model's live baseline (too few samples for a full covariance): diagonal, and it judges.
    det = uncalibrated(reference)
    small = reference[0][:100]
    ref = det.fit(Reference(vectors=small, probs=None, scaling=Scaling.fit(small)))
    assert ref is not None and ref["whitening"].shape == (DIM,)
    det.load_reference(ref)
    assert first_flag(run(det, events("u", uniform_random(rng, 60)))[0]) == 20


def test_batching_does_not_change_results(reference: tuple[np.ndarray, Scaling]) -> None:
    rng = np.random.default_rng(14)
    x = np.concatenate([digits(rng, 90)[0], uniform_random(rng, 70), digits(rng, 40)[0]])
    for det in (calibrated(reference), calibrated(reference, trim=0.0)):
        evs = events("c", x)
        one, s1 = run(det, evs, 1)
        for sizes in (32, 200, (5, 1, 64, 3, 17)):
            other, s2 = run(det, evs, sizes)
            assert_same_signals(one, other)
            np.testing.assert_array_equal(s1["dist_buf"], s2["dist_buf"])
            assert int(s1["dist_count"]) == int(s2["dist_count"]) == 200


def test_trimmed_window_means_match_a_direct_computation() -> None:
    rng = np.random.default_rng(15)
    seq = rng.exponential(size=150)
    window, trim = 16, 0.25
    for split in (0, 5, 16, 40):
        old = seq[max(0, split - window) : split]
        got, sizes = trimmed_window_means(old, seq[split:], split, window, trim)
        np.testing.assert_array_equal(sizes, np.minimum(np.arange(split + 1, 151), window))
        for t, value in enumerate(got):
            win = np.sort(seq[max(0, split + t + 1 - window) : split + t + 1])
            keep = len(win) - int(np.floor(trim * len(win)))
            assert value == pytest.approx(win[:keep].mean(), rel=1e-12)


def test_trimming_absorbs_a_few_wild_benign_queries(reference: tuple[np.ndarray, Scaling]) -> None:
    det = calibrated(reference)
    x, _ = digits(np.random.default_rng(16), 100)
    x[[30, 45, 60]] = 16.0  # three glitched, all-white inputs within one window
    sig, state = run(det, events("c", x))
    assert not sig.flagged.any()
    assert det.statistic(state) < 2.0 * det._level


def test_state_is_small_fixed_and_snapshot_safe(reference: tuple[np.ndarray, Scaling]) -> None:
    det = calibrated(reference)
    state = det.init_state()
    assert sum(a.nbytes for a in state.values()) == 4 * 64 + 8
    x, _ = digits(np.random.default_rng(17), 300)
    _, state = run(det, events("c", x), state=state)
    assert sum(a.nbytes for a in state.values()) == 4 * 64 + 8
    restored = savez_roundtrip(state)
    a, _ = run(det, events("c", x[:50]), state={k: v.copy() for k, v in state.items()})
    b, _ = run(det, events("c", x[:50]), state=restored)
    assert_same_signals(a, b)


def test_reference_fits_high_dimensional_inputs_diagonally() -> None:
    rng = np.random.default_rng(18)
    x = rng.normal(size=(300, 40))
    det = OodDetector(OodParams(max_full_dim=32), ModelContext("m", "tabular", 40, None, None))
    ref = det.fit(Reference(vectors=x, probs=None, scaling=None))
    assert ref is not None and ref["whitening"].shape == (40,)
    det.load_reference(savez_roundtrip(ref))
    far = rng.normal(size=(40, 40)) * 5.0
    assert run(det, events("c", far))[0].flagged[-1]
    assert not run(det, events("d", rng.normal(size=(40, 40))))[0].flagged.any()
    with pytest.raises(ValueError):
        OodDetector(OodParams(), ModelContext("m", "tabular", 41, None, None)).load_reference(ref)


def test_inputs_without_vectors_are_not_judged(reference: tuple[np.ndarray, Scaling]) -> None:
    det = calibrated(reference)
    text = [Event("c", "m", 0.0, "text", text="hello")]
    assert judge(det, det.init_state(), Batch("c", "m", text)) is None
    assert det.fit(Reference(vectors=None, probs=None, scaling=None)) is None
