"""Core detectors: confidence, repetition, near_duplicate, and input canonicalization.

Traffic is synthesized with realistic shapes: 8x8 "digit" images with pixel values
0..16 sent as 64-feature vectors, 28x28 RGB photo-like pictures sent as base64 PNG/JPEG,
and short English sentences. Events go through the real :class:`Decoder` where the
input format matters (images, label outputs), and are built directly otherwise.

Detectors take batches (consecutive events of one client); the helpers below feed them
batches and unpack the per-event :class:`Signals` into one :class:`Step` (or None for an
event that could not be judged) per event, checking the output's shape on the way.
"""

from __future__ import annotations

import base64
import io
import itertools
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from exporter.canonical import canonical_digest, canonical_digests, canonical_text, round_significant, vector_digests
from exporter.config import Settings
from exporter.detectors import Batch, Detector, ModelContext, Signals, State, resolve_detectors
from exporter.detectors.confidence import (
    ConfidenceDetector,
    ConfidenceParams,
    label_score_confidence,
    label_score_confidences,
    probs_confidence,
    probs_confidences,
)
from exporter.detectors.kit import window_shares
from exporter.detectors.near_duplicate import NearDuplicateDetector, NearDuplicateParams, image_phash, text_simhash
from exporter.detectors.repetition import RepetitionDetector, RepetitionParams
from exporter.events import Decoder, Event
from exporter.detectors.kit import Scaling
from tests.synthetic import judge

# ---------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------

_SEGMENTS = np.random.default_rng(1234).integers(0, 8, size=(10, 3, 4))  # 10 "digits", 3 strokes each


def _digit_prototype(label: int) -> np.ndarray:
    """An 8x8 stroke drawing with values 0..16, one fixed shape per label."""
    img = np.zeros((8, 8))
    for x0, y0, x1, y1 in _SEGMENTS[label]:
        for t in np.linspace(0.0, 1.0, 12):
            img[int(round(y0 + (y1 - y0) * t)), int(round(x0 + (x1 - x0) * t))] = 16.0
    return img


def digit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` iid digit-like samples as (n, 64) float vectors of integers 0..16 (like sklearn's digits)."""
    out = np.empty((n, 64))
    for i in range(n):
        img = np.roll(_digit_prototype(int(rng.integers(10))), tuple(rng.integers(-1, 2, size=2)), axis=(0, 1))
        img = img * rng.uniform(0.6, 1.0) + rng.normal(0.0, 2.0, img.shape)
        out[i] = np.clip(np.rint(img), 0, 16).ravel()
    return out


def photo(seed: int, size: int = 28) -> np.ndarray:
    """A photo-like RGB uint8 picture: smooth colour gradients plus a few solid shapes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size, 3))
    for _ in range(6):
        fx, fy = rng.uniform(0.3, 3.0, 2)
        img += np.sin(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 2 * np.pi))[..., None] * rng.uniform(20, 60, 3)
    for _ in range(3):
        cx, cy = rng.uniform(0.1, 0.9, 2)
        r = rng.uniform(0.1, 0.3)
        img += (((x - cx) ** 2 + (y - cy) ** 2) < r * r)[..., None] * rng.uniform(-80, 80, 3)
    img = (img - img.min()) / (img.max() - img.min()) * 220 + 15
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(img: np.ndarray, fmt: str = "PNG", **save: Any) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt, **save)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def jpeg_roundtrip(img: np.ndarray, quality: int = 75) -> np.ndarray:
    data = base64.b64decode(encode(img, "JPEG", quality=quality))
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def brighten(img: np.ndarray, amount: int = 20) -> np.ndarray:
    return np.clip(img.astype(np.int16) + amount, 0, 255).astype(np.uint8)


def add_noise(img: np.ndarray, rng: np.random.Generator, sigma: float = 5.0) -> np.ndarray:
    return np.clip(img + rng.normal(0.0, sigma, img.shape), 0, 255).astype(np.uint8)


SENTENCES = [
    "Please summarize the following article about climate change in three sentences.",
    "I loved this movie, the acting was superb and the plot kept me hooked until the end.",
    "This product arrived broken and customer service never answered any of my emails.",
    "How do I reset my password on the mobile app without losing my saved settings?",
    "Can you recommend a good book about the history of the Roman empire?",
    "My order number is 48213 and the tracking page has not changed for a week.",
    "Translate this paragraph into German and keep the formal tone of the original.",
    "The battery drains far too fast since the latest firmware update was installed.",
    "What are the opening hours of the city library on public holidays?",
    "Write a short poem about the sea, the moon and a lighthouse keeper.",
    "Is it safe to take ibuprofen together with my blood pressure medication?",
    "The hotel room was clean, quiet and the breakfast buffet had plenty of choice.",
    "Explain the difference between a stock and a bond to a ten year old.",
    "Our quarterly revenue grew by twelve percent compared with last year.",
    "The train to Amsterdam was delayed by forty minutes because of a signal failure.",
    "Which hiking trails near the lake are suitable for families with small children?",
]

SUBSTITUTES = ["great", "awful", "quick", "blue", "small", "happy", "broken", "early", "strange", "simple"]

DECODER_SETTINGS = Settings(models={"img": {"modality": "image"}, "pix": {"modality": "image", "image_shape": [8, 8]}})


def decoder() -> Decoder:
    return Decoder(DECODER_SETTINGS)


def tabular_event(vec: np.ndarray, probs: np.ndarray | None = None, client: str = "c1") -> Event:
    return Event(client, "m", 0.0, "tabular", vector=np.asarray(vec, dtype=np.float64), probs=probs)


def text_event(text: str, client: str = "c1") -> Event:
    return Event(client, "m", 0.0, "text", text=text)


def image_event(dec: Decoder, img: np.ndarray, fmt: str = "PNG", **save: Any) -> Event:
    return dec.decode_object({"client": "c1", "model": "img", "ts": 1.0, "input": {"image_b64": encode(img, fmt, **save)}})


def tabular_context(scaling: Scaling | None, input_dim: int | None = 64) -> ModelContext:
    return ModelContext(name="m", modality="tabular", input_dim=input_dim, num_classes=10, scaling=scaling)


def fitted_scaling(rng: np.random.Generator, n: int = 500) -> Scaling:
    return Scaling.fit(np.array(list(digit_vectors(rng, n))))


class Step(NamedTuple):
    """A detector's verdict on the client right after one event."""

    value: float
    flagged: bool


def unpack(signals: Signals | None, n: int) -> list[Step | None]:
    """Check a detector's output for a batch of ``n`` events and split it per event."""
    if signals is None:
        return [None] * n
    assert isinstance(signals, Signals)
    values, flagged = signals
    assert isinstance(values, np.ndarray) and values.shape == (n,) and values.dtype == np.float64
    assert isinstance(flagged, np.ndarray) and flagged.shape == (n,) and flagged.dtype == np.bool_
    judged = ~np.isnan(values)
    assert judged.any(), "a batch with nothing judged must give None"
    assert np.all((values[judged] >= 0.0) & (values[judged] <= 1.0))
    assert not flagged[~judged].any(), "an event that was not judged cannot flag"
    return [Step(float(v), bool(f)) if j else None for v, f, j in zip(values, flagged, judged)]


def feed(detector: Detector, state: State, events: Iterable[Event]) -> list[Step | None]:
    """Run one batch through the detector."""
    events = list(events)
    return unpack(judge(detector, state, Batch("c", "m", events)), len(events))


def update1(detector: Detector, state: State, event: Event) -> Step | None:
    """A batch of one event."""
    return feed(detector, state, [event])[0]


def chunks(events: list[Event], sizes: Iterable[int]) -> Iterator[list[Event]]:
    i = 0
    for size in sizes:
        if i >= len(events):
            return
        yield events[i : i + size]
        i += size


def random_sizes(rng: np.random.Generator, high: int = 80) -> Iterator[int]:
    while True:
        yield int(rng.integers(1, high))


def run(detector: Detector, events: Iterable[Event], state: State | None = None, batch: int = 32) -> tuple[State, list[Step | None]]:
    """Feed the events in batches of ``batch``; one step per event."""
    state = detector.init_state() if state is None else state
    out: list[Step | None] = []
    for chunk in chunks(list(events), itertools.repeat(batch)):
        out += feed(detector, state, chunk)
    return state, out


def run_tabular(detector: Detector, vectors: Iterable[np.ndarray], state: State | None = None, batch: int = 32) -> tuple[State, list[Step | None]]:
    """Feed tabular events made of ``vectors`` in batches of ``batch``; one step per event."""
    return run(detector, [tabular_event(v) for v in vectors], state, batch)


def assert_valid_signals(signals: Iterable[Step | None]) -> None:
    for s in signals:
        if s is not None:
            assert 0.0 <= s.value <= 1.0
            assert isinstance(s.flagged, bool)


def last(signals: list[Step | None]) -> Step:
    sig = signals[-1]
    assert sig is not None
    return sig


def flagged_count(signals: Iterable[Step | None]) -> int:
    return sum(1 for s in signals if s is not None and s.flagged)


def savez_roundtrip(state: State, path: Path) -> State:
    np.savez(path, **state)
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def state_layout(state: State) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {k: (v.shape, v.dtype) for k, v in state.items()}


# ---------------------------------------------------------------------------
# Confidence measures
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 5, 10, 100, 1000])
def test_normalized_entropy_stays_in_unit_interval(k: int) -> None:
    rng = np.random.default_rng(k)
    uniform = np.full(k, 1.0 / k)
    assert probs_confidence(uniform, "entropy") == pytest.approx(0.0, abs=1e-9)
    one_hot = np.zeros(k)
    one_hot[k // 2] = 1.0
    assert probs_confidence(one_hot, "entropy") == pytest.approx(1.0)
    # Near-uniform with rounding noise, very peaked, and random Dirichlet answers.
    samples = [uniform * (1 + rng.normal(0, 1e-12, k)), rng.dirichlet(np.full(k, 0.01)), *rng.dirichlet(np.ones(k), size=50)]
    for p in samples:
        for measure in ("entropy", "max_prob", "margin"):
            c = probs_confidence(p, measure)  # type: ignore[arg-type]
            assert c is not None and 0.0 <= c <= 1.0


def test_confidence_measures() -> None:
    p = np.array([0.1, 0.7, 0.2])
    assert probs_confidence(p, "max_prob") == pytest.approx(0.7)
    assert probs_confidence(p, "margin") == pytest.approx(0.5)
    h = -np.sum(p * np.log(p))
    assert probs_confidence(p, "entropy") == pytest.approx(1 - h / np.log(3))
    # A two-class tie among 1000 classes: margin sees it, normalized entropy barely does.
    tie = np.zeros(1000)
    tie[:2] = 0.5
    assert probs_confidence(tie, "margin") == pytest.approx(0.0)
    assert probs_confidence(tie, "entropy") == pytest.approx(1 - np.log(2) / np.log(1000))
    assert probs_confidence(np.array([1.0]), "margin") is None
    assert probs_confidence(np.zeros(3), "entropy") is None


def test_label_score_confidence() -> None:
    assert label_score_confidence(0.9, "max_prob") == pytest.approx(0.9)
    assert label_score_confidence(0.9, "margin") == pytest.approx(0.8)
    assert label_score_confidence(0.3, "margin") == 0.0
    assert label_score_confidence(0.5, "entropy") == pytest.approx(0.0)
    assert label_score_confidence(1.0, "entropy") == pytest.approx(1.0)


def test_confidence_params() -> None:
    assert ConfidenceParams().measure == "margin"
    assert ConfidenceParams().threshold == 0.2
    assert ConfidenceParams(measure="entropy").threshold == 0.5
    assert ConfidenceParams(measure="max_prob").threshold == 0.6
    assert ConfidenceParams(measure="entropy", threshold=0.3).threshold == 0.3
    for bad in ({"threshold": 1.5}, {"measure": "gini"}, {"window": 10, "min_events": 11}, {"flag_ratio": 0}, {"windw": 3}):
        with pytest.raises(ValidationError):
            ConfidenceParams(**bad)


def confident_answer(rng: np.random.Generator, k: int = 10) -> np.ndarray:
    p = rng.dirichlet(np.full(k, 0.3))
    top = int(rng.integers(k))
    p = 0.05 * p
    p[top] += 0.95
    return p


def boundary_answer(rng: np.random.Generator, k: int = 10) -> np.ndarray:
    """What a boundary search sees: two classes nearly tied, the rest small."""
    a, b = rng.choice(k, size=2, replace=False)
    p = 0.1 * rng.dirichlet(np.ones(k))
    split = rng.uniform(0.42, 0.58)
    p[a] += 0.9 * split
    p[b] += 0.9 * (1 - split)
    return p


def confidence_detector(**params: Any) -> ConfidenceDetector:
    return ConfidenceDetector(ConfidenceParams(**params), ModelContext(name="m", modality="tabular", input_dim=64, num_classes=10))


@pytest.mark.parametrize("measure", ["margin", "max_prob"])
def test_confidence_flags_boundary_probing(measure: str) -> None:
    rng = np.random.default_rng(0)
    det = confidence_detector(measure=measure)
    x = digit_vectors(rng, 1)[0]
    _, signals = run(det, (tabular_event(x, boundary_answer(rng)) for _ in range(60)))
    assert_valid_signals(signals)
    # Never before min_events judged answers, then flagged for good.
    assert not any(s.flagged for s in signals[:19] if s is not None)
    assert all(s is not None and s.flagged for s in signals[19:])
    assert last(signals).value > 0.9


def test_confidence_entropy_flags_diffuse_answers() -> None:
    rng = np.random.default_rng(1)
    det = confidence_detector(measure="entropy")
    _, signals = run(det, (tabular_event(np.zeros(64), rng.dirichlet(np.ones(10))) for _ in range(50)))
    assert last(signals).flagged


@pytest.mark.parametrize("measure", ["margin", "max_prob", "entropy"])
def test_confidence_benign_traffic_stays_quiet(measure: str) -> None:
    rng = np.random.default_rng(2)
    det = confidence_detector(measure=measure)
    answers = [boundary_answer(rng) if rng.random() < 0.1 else confident_answer(rng) for _ in range(500)]
    _, signals = run(det, (tabular_event(np.zeros(64), p) for p in answers))
    assert_valid_signals(signals)
    assert flagged_count(signals) == 0
    assert max(s.value for s in signals if s is not None) < 0.3


def test_confidence_single_uncertain_answer_never_flags() -> None:
    det = confidence_detector(min_events=20)
    state = det.init_state()
    sig = update1(det, state, tabular_event(np.zeros(64), np.array([0.5, 0.5])))
    assert sig is not None and not sig.flagged
    assert sig.value == pytest.approx(1 / 20)  # ramps up, does not jump to 1


def test_confidence_label_outputs_via_decoder() -> None:
    dec = decoder()
    det = confidence_detector()
    state = det.init_state()
    label_only = dec.decode_object({"client": "c", "ts": 1, "input": [1.0, 2.0], "output": {"label": "cat"}})
    assert judge(det, state, Batch("c", "m", [label_only, label_only])) is None
    assert int(state["low_count"]) == 0  # not judged means not counted either
    scored = [dec.decode_object({"client": "c", "ts": 1, "input": [1.0, 2.0], "output": {"label": "cat", "score": 0.52}}) for _ in range(25)]
    _, signals = run(det, scored, state, batch=7)
    assert last(signals).flagged
    no_output = Event("c", "m", 0.0, "tabular", vector=np.zeros(2))
    assert judge(det, state, Batch("c", "m", [no_output])) is None
    # In a mixed batch, the events without a confidence get NaN and leave the window alone.
    steps = feed(det, state, [label_only, scored[0], no_output])
    assert steps[0] is None and steps[2] is None
    assert steps[1] is not None and steps[1].flagged
    assert int(state["low_count"]) == 26


def test_confidence_decoded_probabilities_and_logits() -> None:
    dec = decoder()
    det = confidence_detector()
    state = det.init_state()
    ev = dec.decode_object({"client": "c", "ts": 1, "input": [0.0, 1.0], "output": [0.05, 0.9, 0.05]})
    sig = update1(det, state, ev)
    assert sig is not None and sig.value == 0.0


def test_confidence_batch_with_several_class_counts() -> None:
    """Answers with another number of classes than the batch's first are judged all the same."""
    det = confidence_detector(min_events=1)
    events = [tabular_event(np.zeros(64), np.array([0.5, 0.5])), tabular_event(np.zeros(64), np.array([0.1, 0.8, 0.1]))]
    steps = feed(det, det.init_state(), events)
    state = det.init_state()
    assert steps == [update1(det, state, e) for e in events]
    assert steps[1] is not None and steps[1].value == pytest.approx(0.5)


def test_vectorized_confidences_match_the_scalar_ones() -> None:
    rng = np.random.default_rng(21)
    probs = rng.dirichlet(np.full(10, 0.5), size=200)
    probs[3] = np.nan
    probs[4] = 0.0
    for measure in ("margin", "max_prob", "entropy"):
        batch = probs_confidences(probs, measure)  # type: ignore[arg-type]
        single = [probs_confidence(p, measure) for p in probs]  # type: ignore[arg-type]
        assert np.array_equal(batch, np.array([np.nan if c is None else c for c in single]), equal_nan=True)
        scores = rng.random(50)
        assert np.array_equal(
            label_score_confidences(scores, measure),  # type: ignore[arg-type]
            np.array([label_score_confidence(x, measure) for x in scores]),  # type: ignore[arg-type]
        )


# ---------------------------------------------------------------------------
# Canonicalization
# ---------------------------------------------------------------------------


def test_round_significant() -> None:
    x = np.array([0.1 + 0.2, 0.3, -0.0, 1234567.89, 1.23456789e-300, 2.5e30, -7.0000004e-5])
    r = round_significant(x)
    assert r[0] == r[1] == 0.3
    assert r[2] == 0.0 and not np.signbit(r[2])
    assert list(r[3:]) == [1234570.0, 1.23457e-300, 2.5e30, -7e-5]
    rng = np.random.default_rng(3)
    v = rng.normal(size=2000) * 10.0 ** rng.integers(-30, 30, size=2000)
    assert np.array_equal(round_significant(v), np.array([float(f"{t:.5e}") for t in v]))
    # every magnitude a float64 has, subnormals and the edges of powers of ten included
    edges = [5e-324, -1e-310, 2.2250738585072014e-308, 1.7976931348623157e308, 1e-5, 999999.5, 9.999995e5, 9.9999949e5, 1e22, 1e23, 0.5, 123456.5]
    w = np.concatenate([rng.normal(size=4000) * 10.0 ** rng.uniform(-323, 307, size=4000), edges, np.nextafter(edges, 0), [np.nextafter(e, np.inf) for e in edges if abs(e) < 1e308]])
    assert np.array_equal(round_significant(w), np.array([float(f"{t:.5e}") for t in w]))
    # whole numbers, and non-finite values (which pass through)
    assert np.array_equal(round_significant(np.array([3.0, -17.0, 1e6, 12345678.0])), [3.0, -17.0, 1e6, 12345700.0])
    special = round_significant(np.array([np.inf, -np.inf, np.nan, 0.25]))
    assert special[0] == np.inf and special[1] == -np.inf and np.isnan(special[2]) and special[3] == 0.25


def test_vector_digests_tell_apart_every_single_change_and_order() -> None:
    rng = np.random.default_rng(5)
    base = rng.integers(0, 16, 64).astype(np.float64)
    variants = [base]
    for pos in range(64):  # one value changed, at every position
        v = base.copy()
        v[pos] += 1.0
        variants.append(v)
    variants.append(base[::-1].copy())  # same values, other order
    variants.append(np.roll(base, 1))
    digests = vector_digests(np.stack(variants))
    assert len(set(digests.tolist())) == len(variants)
    assert vector_digests(base[None, :63])[0] != vector_digests(base[None, :])[0]  # length matters
    # the batch path equals one row at a time, whatever the batch
    assert [int(vector_digests(v[None, :])[0]) for v in variants] == digests.tolist()
    many = vector_digests(rng.normal(size=(20_000, 8)))
    assert len(set(many.tolist())) == 20_000 and (many % 2 == 1).all()


def test_digest_tabular_absorbs_float_noise() -> None:
    a = tabular_event(np.array([0.1 + 0.2, 1.0, -0.0, 1e-7]))
    b = tabular_event(np.array([0.3, 1.0000000001, 0.0, 1.00000001e-7]))
    c = tabular_event(np.array([0.3, 1.00001, 0.0, 1e-7]))
    assert canonical_digest(a) == canonical_digest(b) != canonical_digest(c)
    assert 0 <= canonical_digest(a) < 2**64  # type: ignore[operator]
    assert a.cache["canonical_digest"] == canonical_digest(a)
    # Same numbers, different length: different input.
    assert canonical_digest(tabular_event(np.zeros(3))) != canonical_digest(tabular_event(np.zeros(4)))


def test_digest_text_canonical_form() -> None:
    assert canonical_text("  Ｈｅｌｌｏ\t\u00a0WORLD\n ") == "hello world"
    assert canonical_text("Straße ﬁle") == "strasse file"
    same = ["Hello   World", "hello world", " HELLO\nworld ", "Ｈｅｌｌｏ world"]
    digests = {canonical_digest(text_event(t)) for t in same}
    assert len(digests) == 1
    assert canonical_digest(text_event("hello world!")) not in digests


def test_digest_image_uses_pixels_not_file_bytes() -> None:
    dec = decoder()
    img = photo(7)
    png_fast = encode(img, "PNG", compress_level=1)
    png_small = encode(img, "PNG", optimize=True)
    assert png_fast != png_small
    events = [dec.decode_object({"client": "c", "model": "img", "ts": 1, "input": {"image_b64": b}}) for b in (png_fast, png_small)]
    assert canonical_digest(events[0]) == canonical_digest(events[1])
    changed = img.copy()
    changed[0, 0, 0] ^= 1
    assert canonical_digest(image_event(dec, changed)) != canonical_digest(events[0])
    # Same bytes as a text or another shape never collide with the image.
    flat = Event("c", "m", 0.0, "image", image=img.reshape(28 * 3, 28))
    assert canonical_digest(flat) != canonical_digest(events[0])


def test_digest_none_without_input() -> None:
    assert canonical_digest(Event("c", "m", 0.0, "tabular")) is None


# ---------------------------------------------------------------------------
# Repetition
# ---------------------------------------------------------------------------


def repetition_detector(**params: Any) -> RepetitionDetector:
    return RepetitionDetector(RepetitionParams(**params), tabular_context(None))


def test_repetition_flags_replayed_queries() -> None:
    rng = np.random.default_rng(4)
    queries = digit_vectors(rng, 5)
    det = repetition_detector()
    # The same 5 queries over and over, re-serialized each time (formatting noise).
    events = [tabular_event(queries[i % 5] * (1 + 1e-12)) for i in range(100)]
    _, signals = run(det, events)
    assert_valid_signals(signals)
    assert not any(s.flagged for s in signals[:19] if s is not None)
    assert last(signals).flagged
    assert last(signals).value == pytest.approx(95 / 100)


def test_repetition_benign_retries_stay_quiet() -> None:
    rng = np.random.default_rng(5)
    det = repetition_detector()
    vectors = digit_vectors(rng, 600)
    events: list[Event] = []
    for v in vectors:
        events.append(tabular_event(v))
        if rng.random() < 0.05:  # an occasional retry of the same request
            events.append(tabular_event(v))
    _, signals = run(det, events)
    assert_valid_signals(signals)
    assert flagged_count(signals) == 0
    assert 0.0 < last(signals).value < 0.15


def test_repetition_text_and_images() -> None:
    det = RepetitionDetector(RepetitionParams(), ModelContext(name="m", modality=None, input_dim=None, num_classes=None))
    variants = ["What is the capital of France?", "what is the capital of france?", "  WHAT is the capital   of France? "]
    _, signals = run(det, (text_event(variants[i % 3]) for i in range(30)))
    assert last(signals).flagged
    dec = decoder()
    img = photo(3)
    det_img = RepetitionDetector(RepetitionParams(), ModelContext(name="img", modality="image", input_dim=None, num_classes=None))
    _, signals = run(det_img, (image_event(dec, img, "PNG", compress_level=i % 9) for i in range(30)))
    assert last(signals).flagged


def test_repetition_forgets_beyond_window() -> None:
    det = repetition_detector(window=10, min_events=5)
    state = det.init_state()
    feed(det, state, [tabular_event(np.array([float(i)])) for i in range(10)])
    sig = update1(det, state, tabular_event(np.array([0.0])))  # 0 is among the last 10 inputs
    assert sig is not None and sig.value == pytest.approx(1 / 10)
    feed(det, state, [tabular_event(np.array([float(i)])) for i in range(10, 20)])  # push everything older out
    sig = update1(det, state, tabular_event(np.array([5.0])))
    assert sig is not None and sig.value == 0.0


def test_repetition_window_inside_one_batch() -> None:
    """Repeats inside a batch count, but only within ``window`` inputs of each other."""
    det = repetition_detector(window=3, min_events=1)
    a, b, c, d = (tabular_event(np.array([float(i)])) for i in range(4))
    steps = feed(det, det.init_state(), [a, a, b, c, d, a, b, b])
    # a(new) a(rep) b c d a(4 back: new) b(4 back: new) b(rep); values are shares of the last 3.
    expected_repeat = [False, True, False, False, False, False, False, True]
    ring: list[bool] = []
    for i, rep in enumerate(expected_repeat):
        ring = (ring + [rep])[-3:]
        assert steps[i] is not None and steps[i].value == pytest.approx(sum(ring) / len(ring))


def test_repetition_none_without_input() -> None:
    det = repetition_detector()
    assert judge(det, det.init_state(), Batch("c", "m", [Event("c", "m", 0.0, "tabular")] * 3)) is None
    steps = feed(det, det.init_state(), [Event("c", "m", 0.0, "tabular"), tabular_event(np.ones(3))])
    assert steps[0] is None and steps[1] == Step(0.0, False)


# ---------------------------------------------------------------------------
# Near-duplicate fingerprints
# ---------------------------------------------------------------------------


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def test_phash_matches_edited_copies_of_a_photo() -> None:
    rng = np.random.default_rng(6)
    tol = NearDuplicateParams().image_hamming_tolerance
    for seed in range(20):
        img = photo(seed)
        h = image_phash(img)
        assert h is not None
        for edited in (brighten(img), add_noise(img, rng), jpeg_roundtrip(img), jpeg_roundtrip(add_noise(brighten(img, 12), rng, 3.0))):
            assert hamming(h, image_phash(edited)) <= tol  # type: ignore[arg-type]


def test_phash_separates_different_photos() -> None:
    tol = NearDuplicateParams().image_hamming_tolerance
    hashes = [image_phash(photo(seed)) for seed in range(40)]
    assert min(hamming(a, b) for a, b in itertools.combinations(hashes, 2)) > tol  # type: ignore[arg-type]


def test_phash_handles_float_and_grey_pixels() -> None:
    img = photo(11)
    grey = img.mean(axis=2)
    h_grey = image_phash(grey.astype(np.uint8))
    assert h_grey is not None
    # The same grey picture as floats in 0..1 (pixels from a JSON array) hashes alike.
    assert hamming(h_grey, image_phash(grey / 255.0)) <= 2  # type: ignore[arg-type]
    assert image_phash(np.full((8, 8), 3.0)) is not None
    assert image_phash(np.zeros((0, 0))) is None


def one_word_changed(sentence: str, rng: np.random.Generator) -> str:
    words = sentence.split()
    i = int(rng.integers(len(words)))
    words[i] = SUBSTITUTES[int(rng.integers(len(SUBSTITUTES)))]
    return " ".join(words)


def test_simhash_one_word_changed_matches_unrelated_do_not() -> None:
    params = NearDuplicateParams()
    k, tol = params.text_shingle, params.text_hamming_tolerance
    hashes = [text_simhash(canonical_text(s), k) for s in SENTENCES]
    # Unrelated sentences are far apart.
    assert min(hamming(a, b) for a, b in itertools.combinations(hashes, 2)) > tol  # type: ignore[arg-type]
    # A one-word edit of a sentence is close in (almost) every case.
    rng = np.random.default_rng(7)
    dists = [hamming(h, text_simhash(canonical_text(one_word_changed(s, rng)), k)) for s, h in zip(SENTENCES, hashes) for _ in range(5)]  # type: ignore[arg-type]
    assert np.mean(np.array(dists) <= tol) >= 0.8
    assert np.median(dists) <= tol
    # A specific pair, and case/spacing noise which canonicalization removes entirely.
    a = "I loved this movie, the acting was superb and the plot kept me hooked until the end."
    b = "I loved this movie, the acting was terrible and the plot kept me hooked until the end."
    assert hamming(text_simhash(canonical_text(a), k), text_simhash(canonical_text(b), k)) <= tol  # type: ignore[arg-type]
    assert text_simhash(canonical_text(a), k) == text_simhash(canonical_text("  I LOVED this movie,  the acting was superb and the plot kept me hooked until the end."), k)


def test_simhash_edge_cases() -> None:
    assert text_simhash("", 4) is None
    assert text_simhash("ab", 4) is not None  # shorter than a shingle
    h = text_simhash("ünïcödé テキスト 🙂", 4)
    assert h is not None and 0 <= h < 2**64
    long_text = " ".join(SENTENCES) * 2000  # > 64k shingles: voted in chunks
    h_long = text_simhash(long_text, 4)
    assert h_long is not None and 0 <= h_long < 2**64


def test_simhash_is_stable_across_processes() -> None:
    code = "from exporter.detectors.near_duplicate import text_simhash; print(text_simhash('stable across processes', 4))"
    root = Path(__file__).resolve().parents[1]
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(root)}
        outputs.add(subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True).stdout.strip())
    assert outputs == {str(text_simhash("stable across processes", 4))}


# ---------------------------------------------------------------------------
# Near-duplicate detector
# ---------------------------------------------------------------------------


def image_context() -> ModelContext:
    return ModelContext(name="img", modality="image", input_dim=None, num_classes=10)


def text_context() -> ModelContext:
    return ModelContext(name="txt", modality="text", input_dim=None, num_classes=2)


def test_near_duplicate_flags_noisy_image_search() -> None:
    """HopSkipJump-like: one picture resubmitted with small, varying perturbations."""
    rng = np.random.default_rng(8)
    dec = decoder()
    base = photo(42)
    det = NearDuplicateDetector(NearDuplicateParams(), image_context())
    variants: list[Event] = []
    for i in range(60):
        v = add_noise(base, rng, 4.0)
        variants.append(image_event(dec, v, "JPEG", quality=90) if i % 3 == 0 else image_event(dec, v))
    state, signals = run(det, variants)
    assert_valid_signals(signals)
    assert not any(s.flagged for s in signals[:19] if s is not None)
    assert last(signals).flagged and last(signals).value > 0.9
    assert int(state["pairs"]) > 1000  # every variant matches most earlier ones


def test_near_duplicate_benign_images_stay_quiet() -> None:
    dec = decoder()
    det = NearDuplicateDetector(NearDuplicateParams(), image_context())
    _, signals = run(det, (image_event(dec, photo(1000 + i)) for i in range(150)))
    assert_valid_signals(signals)
    assert flagged_count(signals) == 0
    assert last(signals).value < 0.1


def test_near_duplicate_ignores_exact_repeats() -> None:
    """Exact repeats are the repetition detector's business."""
    dec = decoder()
    det = NearDuplicateDetector(NearDuplicateParams(), image_context())
    img = photo(5)
    state, signals = run(det, (image_event(dec, img, "PNG", compress_level=i % 9) for i in range(40)))
    assert last(signals).value == 0.0 and int(state["pairs"]) == 0
    sig = update1(det, state, image_event(dec, brighten(img, 3)))
    assert sig is not None and int(state["pairs"]) == 40


def test_near_duplicate_flat_pixels_with_image_shape() -> None:
    """Pixels sent as a JSON array with a configured image_shape are perceptually hashed."""
    rng = np.random.default_rng(9)
    dec = decoder()
    det = NearDuplicateDetector(NearDuplicateParams(), ModelContext(name="pix", modality="image", input_dim=64, num_classes=10))
    base = digit_vectors(rng, 1)[0]
    events = [dec.decode_object({"client": "c", "model": "pix", "ts": 1, "input": np.clip(base + rng.normal(0, 0.3, 64), 0, 16).tolist()}) for _ in range(40)]
    assert events[0].image is not None and events[0].image.shape == (8, 8)
    _, signals = run(det, events)
    assert last(signals).flagged


def test_near_duplicate_flags_word_substitution_search() -> None:
    """TextFooler-like: one sentence resubmitted with single words swapped."""
    rng = np.random.default_rng(10)
    det = NearDuplicateDetector(NearDuplicateParams(), text_context())
    seed = SENTENCES[1]
    _, signals = run(det, [text_event(seed)] + [text_event(one_word_changed(seed, rng)) for _ in range(60)])
    assert_valid_signals(signals)
    assert last(signals).flagged


def test_near_duplicate_benign_text_stays_quiet() -> None:
    rng = np.random.default_rng(11)
    det = NearDuplicateDetector(NearDuplicateParams(), text_context())
    _, signals = run(det, (text_event(SENTENCES[int(i)]) for i in rng.permutation(np.arange(200) % len(SENTENCES))))
    # Exact repeats of the same sentences do not count here.
    assert flagged_count(signals) == 0 and last(signals).value == 0.0
    assert judge(det, det.init_state(), Batch("c", "m", [text_event("   ")])) is None


def test_near_duplicate_flags_perturbed_tabular_queries() -> None:
    rng = np.random.default_rng(12)
    scaling = fitted_scaling(rng)
    det = NearDuplicateDetector(NearDuplicateParams(), tabular_context(scaling))
    base = digit_vectors(rng, 1)[0]
    # A boundary search walks around one input in steps far below the features' spread.
    probes = [base + rng.normal(0.0, 0.05, 64) for _ in range(60)]
    state, signals = run_tabular(det, probes)
    assert_valid_signals(signals)
    assert not any(s.flagged for s in signals[:19] if s is not None)
    assert last(signals).flagged and last(signals).value > 0.9
    assert state["vec"].shape == (100, 64) and state["vec"].dtype == np.float32


def test_near_duplicate_benign_tabular_stays_quiet() -> None:
    rng = np.random.default_rng(13)
    scaling = fitted_scaling(rng)
    det = NearDuplicateDetector(NearDuplicateParams(), tabular_context(scaling))
    _, signals = run_tabular(det, digit_vectors(rng, 400))
    assert_valid_signals(signals)
    assert flagged_count(signals) == 0 and last(signals).value == 0.0


def test_near_duplicate_projects_long_vectors() -> None:
    rng = np.random.default_rng(14)
    dim = 28 * 28 * 3
    scaling = Scaling.fit(np.array([photo(int(rng.integers(1 << 30))).ravel().astype(np.float64) for _ in range(50)]))
    ctx = ModelContext(name="flat", modality="image", input_dim=dim, num_classes=10, scaling=scaling)
    det = NearDuplicateDetector(NearDuplicateParams(), ctx)
    state = det.init_state()
    assert state["vec"].shape == (100, 128)
    base = photo(77).ravel().astype(np.float64)
    _, attack = run_tabular(det, [base + rng.normal(0.0, 1.0, dim) for _ in range(40)], state)
    assert last(attack).flagged
    _, benign = run_tabular(det, [photo(500 + i).ravel().astype(np.float64) for i in range(40)])
    assert flagged_count(benign) == 0


def test_near_duplicate_none_when_nothing_to_judge() -> None:
    no_dim = NearDuplicateDetector(NearDuplicateParams(), tabular_context(None, input_dim=None))
    state = no_dim.init_state()
    assert judge(no_dim, state, Batch("c", "m", [tabular_event(np.zeros(64))])) is None
    unscaled = NearDuplicateDetector(NearDuplicateParams(), tabular_context(None))
    assert judge(unscaled, unscaled.init_state(), Batch("c", "m", [tabular_event(np.zeros(64))] * 3)) is None  # no scaling yet
    det = NearDuplicateDetector(NearDuplicateParams(), tabular_context(fitted_scaling(np.random.default_rng(3))))
    state = det.init_state()
    assert state["hash"].shape == (0,)  # a tabular model needs no hash ring
    assert judge(det, state, Batch("c", "m", [Event("c", "m", 0.0, "tabular")])) is None
    assert judge(det, state, Batch("c", "m", [text_event("a text sent to a tabular model")])) is None
    steps = feed(det, state, [text_event("a text"), tabular_event(np.zeros(64)), Event("c", "m", 0.0, "tabular")])
    assert steps[0] is None and steps[2] is None
    assert steps[1] == Step(0.0, False) and int(state["count"]) == 1


def test_near_duplicate_errors_do_not_echo_inputs() -> None:
    det = NearDuplicateDetector(NearDuplicateParams(), tabular_context(fitted_scaling(np.random.default_rng(4))))
    secret = np.array([123.456789, 987.654321])
    state = det.init_state()
    with pytest.raises(ValueError) as err:
        judge(det, state, Batch("c", "m", [tabular_event(np.zeros(64)), tabular_event(secret)]))
    assert "123.45" not in str(err.value) and "987.65" not in str(err.value)
    assert int(state["count"]) == 0  # a failing batch leaves the state untouched


def test_near_duplicate_mixed_modalities_compare_within_kind() -> None:
    det = NearDuplicateDetector(NearDuplicateParams(), ModelContext(name="any", modality=None, input_dim=64, num_classes=None, scaling=fitted_scaling(np.random.default_rng(5))))
    dec = decoder()
    state = det.init_state()
    assert {k: v.shape for k, v in state.items()}["vec"] == (100, 64)
    steps = feed(det, state, [text_event(SENTENCES[0]), image_event(dec, photo(1)), tabular_event(np.ones(64))])
    assert steps[2] == Step(0.0, False)
    sig = update1(det, state, text_event(SENTENCES[0] + " Thanks!"))
    assert sig is not None and int(state["pairs"]) == 1
    # The same inputs in one batch: the text matches the earlier text only.
    state = det.init_state()
    feed(det, state, [text_event(SENTENCES[0]), image_event(dec, photo(1)), tabular_event(np.ones(64)), text_event(SENTENCES[0] + " Thanks!")])
    assert int(state["pairs"]) == 1


def test_near_duplicate_params() -> None:
    p = NearDuplicateParams()
    assert (p.window, p.min_events, p.flag_ratio, p.min_threshold) == (100, 40, 0.9, 0.3)
    assert (p.image_hamming_tolerance, p.text_hamming_tolerance, p.text_shingle, p.tabular_tolerance) == (8, 12, 4, 0.05)
    for bad in ({"image_hamming_tolerance": 65}, {"text_shingle": 0}, {"tabular_tolerance": 0}, {"window": 5, "min_events": 6}):
        with pytest.raises(ValidationError):
            NearDuplicateParams(**bad)


# ---------------------------------------------------------------------------
# Properties shared by all three detectors
# ---------------------------------------------------------------------------


def mixed_tabular_events(rng: np.random.Generator, n: int) -> Iterator[Event]:
    """Benign, replayed, perturbed and label-only traffic interleaved."""
    vectors = digit_vectors(rng, n)
    for i in range(n):
        r = rng.random()
        v = vectors[i] if r < 0.5 else vectors[max(i - 1, 0)] if r < 0.7 else vectors[0] + rng.normal(0, 0.05, 64)
        if rng.random() < 0.1:
            yield Event("c", "m", 0.0, "tabular", vector=v, label="3", label_score=None if rng.random() < 0.5 else float(rng.random()))
        else:
            yield tabular_event(v, boundary_answer(rng) if rng.random() < 0.5 else confident_answer(rng))


DetectorFactory = Callable[[Scaling], Detector]
FACTORIES: dict[str, DetectorFactory] = {
    "confidence": lambda scaling: ConfidenceDetector(ConfidenceParams(window=50), tabular_context(scaling)),
    "repetition": lambda scaling: RepetitionDetector(RepetitionParams(window=50), tabular_context(scaling)),
    "near_duplicate": lambda scaling: NearDuplicateDetector(NearDuplicateParams(window=50), tabular_context(scaling)),
}


@pytest.mark.parametrize("name", list(FACTORIES))
def test_state_is_fixed_size_numpy_and_scores_bounded(name: str) -> None:
    rng = np.random.default_rng(15)
    det = FACTORIES[name](fitted_scaling(rng))
    state = det.init_state()
    layout = state_layout(state)
    assert all(isinstance(v, np.ndarray) for v in state.values())
    signals: list[Step | None] = []
    for chunk in chunks(list(mixed_tabular_events(rng, 400)), random_sizes(rng, 120)):  # 8x the window, some batches longer than it
        signals += feed(det, state, chunk)
    assert state_layout(state) == layout
    assert all(isinstance(v, np.ndarray) for v in state.values())
    assert_valid_signals(signals)
    assert any(s is not None for s in signals)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_state_survives_savez_roundtrip(name: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(16)
    events = list(mixed_tabular_events(rng, 300))
    scaling_state = fitted_scaling(rng).state()

    straight = FACTORIES[name](Scaling.from_state(scaling_state))
    _, expected = run(straight, events)

    first = FACTORIES[name](Scaling.from_state(scaling_state))
    state, got = run(first, events[:170])
    reloaded = savez_roundtrip(state, tmp_path / "state.npz")
    assert state_layout(reloaded) == state_layout(state)
    assert first.state_version() == FACTORIES[name](Scaling.from_state(scaling_state)).state_version()
    second = FACTORIES[name](Scaling.from_state(scaling_state))  # a restarted process
    _, rest = run(second, events[170:], reloaded)
    assert got + rest == expected


def mixed_modality_events(rng: np.random.Generator, n: int) -> list[Event]:
    """Texts, pictures, vectors and input-less events of a model without a fixed modality.

    Each kind has its exact repeats (re-encoded, re-cased) and near-duplicates (one word
    changed, noisy pixels, small vector steps) next to unrelated inputs.
    """
    dec = decoder()
    base_vec = digit_vectors(rng, 1)[0]
    pictures = [photo(seed) for seed in range(3)]
    out: list[Event] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.3:
            s = SENTENCES[int(rng.integers(len(SENTENCES)))]
            t = rng.random()
            out.append(text_event(s if t < 0.4 else s.upper() if t < 0.6 else one_word_changed(SENTENCES[1], rng)))
        elif r < 0.5:
            img = pictures[int(rng.integers(len(pictures)))]
            out.append(image_event(dec, img if rng.random() < 0.3 else add_noise(img, rng, 4.0)))
        elif r < 0.55:
            out.append(Event("c", "m", 0.0, "tabular"))
        else:
            t = rng.random()
            v = digit_vectors(rng, 1)[0] if t < 0.4 else base_vec if t < 0.6 else base_vec + rng.normal(0.0, 0.05, 64)
            out.append(tabular_event(v))
    return out


EQUIVALENCE_CASES: dict[str, tuple[DetectorFactory, str]] = {
    **{name: (factory, "tabular") for name, factory in FACTORIES.items()},
    "confidence_entropy": (lambda scaling: ConfidenceDetector(ConfidenceParams(window=30, measure="entropy"), tabular_context(scaling)), "tabular"),
    "near_duplicate_projected": (
        lambda scaling: NearDuplicateDetector(NearDuplicateParams(window=40, max_vector_dim=16), tabular_context(scaling)),
        "tabular",
    ),
    "repetition_mixed": (
        lambda scaling: RepetitionDetector(RepetitionParams(window=30, min_events=10), ModelContext("m", None, 64, None, scaling)),
        "mixed",
    ),
    "near_duplicate_mixed": (
        lambda scaling: NearDuplicateDetector(NearDuplicateParams(window=30, min_events=10), ModelContext("m", None, 64, None, scaling)),
        "mixed",
    ),
}


@pytest.mark.parametrize("name", list(EQUIVALENCE_CASES))
def test_batches_give_the_same_results_as_single_events(name: str) -> None:
    """A batch of m events gives exactly the per-event values, flags and state of m batches of one.

    Batch sizes are random and often longer than the window, so repeats and near
    duplicates fall inside batches, across batch boundaries and out of the window within
    a batch. The feature statistics stay fixed here: updating them is the pipeline's job.
    """
    factory, traffic = EQUIVALENCE_CASES[name]
    rng = np.random.default_rng(17)
    det = factory(fitted_scaling(rng))
    events = list(mixed_tabular_events(rng, 400)) if traffic == "tabular" else mixed_modality_events(rng, 300)

    single_state = det.init_state()
    single = [update1(det, single_state, e) for e in events]
    assert sum(s is not None for s in single) > len(events) // 2
    assert len({s.value for s in single if s is not None}) > 10  # the traffic moves the score around
    for trial in range(3):
        state = det.init_state()
        batched: list[Step | None] = []
        for chunk in chunks(events, random_sizes(rng, 90 if trial < 2 else 400)):
            batched += feed(det, state, chunk)
        assert batched == single
        for key, value in single_state.items():
            assert np.array_equal(state[key], value), key


def test_window_shares_match_a_plain_window() -> None:
    rng = np.random.default_rng(18)
    for window, min_events in ((1, 1), (5, 3), (50, 20)):
        buf = np.zeros(window, dtype=np.bool_)
        count = 0
        history: list[bool] = []
        for size in rng.integers(0, 3 * window, size=30):
            flags = rng.random(int(size)) < 0.4
            values, flagged = window_shares(buf, count, flags, min_events, 0.5)
            count += int(size)
            for i, f in enumerate(flags):
                history.append(bool(f))
                win = history[-window:]
                share = sum(win) / max(len(win), min_events)
                assert values[i] == share and flagged[i] == (len(win) >= min_events and share >= 0.5)
            assert sorted(buf[: min(count, window)].tolist()) == sorted(history[-window:])


def test_batched_digests_equal_single_digests() -> None:
    rng = np.random.default_rng(19)
    vectors = digit_vectors(rng, 50) * rng.choice([1.0, 1e-20, 1e25, 0.1], size=(50, 1))
    events = [tabular_event(v) for v in vectors] + [tabular_event(np.arange(3.0)), text_event("Hello"), Event("c", "m", 0.0, "tabular")]
    expected = [canonical_digest(Event(e.client, e.model, e.ts, e.modality, vector=e.vector, text=e.text)) for e in events]
    stacked = Batch("c", "m", events[:50]).vectors
    want = [d or 0 for d in expected]  # 0 marks an event without input
    assert canonical_digests(events[:50], stacked).tolist() == want[:50]
    assert canonical_digests(events).tolist() == want
    assert canonical_digests([Event(e.client, e.model, e.ts, e.modality, vector=e.vector, text=e.text) for e in events]).tolist() == want
    assert Batch("c", "m", events).digests.tolist() == want
    assert all(d % 2 == 1 for d in want[:-1])  # real digests are never 0


def test_registry_resolves_the_three_detectors() -> None:
    resolved = resolve_detectors({})
    core = {name: resolved[name] for name in list(resolved)[:3]}  # other detectors may follow them
    assert list(core) == ["confidence", "repetition", "near_duplicate"]
    assert [cls for cls, _ in core.values()] == [ConfidenceDetector, RepetitionDetector, NearDuplicateDetector]
    for cls in (ConfidenceDetector, RepetitionDetector, NearDuplicateDetector):
        for field in cls.Params.model_fields.values():
            assert field.description or field.annotation is bool  # 'enabled' comes from the base class
    with pytest.raises(ValueError, match="detectors.near_duplicate.min_events"):
        resolve_detectors({"near_duplicate": {"window": 10, "min_events": 50}})


def test_batch_views_of_a_mixed_batch_match_the_events() -> None:
    events = [
        Event("c", "m", 1.0, "tabular", vector=np.arange(3.0), probs=np.array([0.2, 0.8])),
        Event("c", "m", 2.0, "text", text="hi", label="spam", label_score=0.7),
        Event("c", "m", 3.0, "text", text="ho", label="ham"),
        Event("c", "m", 4.0, "tabular", vector=np.arange(3.0), probs=np.array([0.6, 0.4])),
    ]
    batch = Batch("c", "m", events)
    np.testing.assert_array_equal(batch.confidence, [0.8, 0.7, np.nan, 0.6])
    assert batch.predicted.tolist() == [1, -1, -1, 0]
    assert batch.flat_vectors is None and batch.vectors is None
    assert batch.digests.tolist() == [canonical_digest(e) for e in events]
    assert batch.digests[0] == batch.digests[3] != batch.digests[1]


def test_batch_views_stack_only_uniform_rows() -> None:
    def ev(vector: list[float] | None, probs: list[float] | None) -> Event:
        return Event("c", "m", 0.0, "tabular", vector=None if vector is None else np.array(vector), probs=None if probs is None else np.array(probs))

    uniform = Batch("c", "m", [ev([1.0, 2.0], [0.5, 0.5]), ev([3.0, 4.0], [0.25, 0.75])])
    np.testing.assert_array_equal(uniform.vectors, [[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(uniform.probs, [[0.5, 0.5], [0.25, 0.75]])
    assert uniform.vectors.dtype == np.float64
    for events in ([ev([1.0, 2.0], None), ev(None, None)], [ev(None, None), ev([1.0], None)], [ev([1.0, 2.0], None), ev([1.0], None)], [ev(None, None)] * 2):
        assert Batch("c", "m", events).vectors is None
    # probabilities: rows of another class count, or missing, are NaN rows
    mixed = Batch("c", "m", [ev([1.0], [0.5, 0.5]), ev([1.0], None), ev([1.0], [0.2, 0.3, 0.5])])
    np.testing.assert_array_equal(mixed.probs, [[0.5, 0.5], [np.nan, np.nan], [np.nan, np.nan]])
    assert Batch("c", "m", [ev([1.0], None)] * 2).probs is None


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e20])  # 1e20: float32 products overflow and are redone in float64
def test_near_duplicate_prefilter_decides_like_exact_distances(scale: float) -> None:
    det = NearDuplicateDetector(NearDuplicateParams(), tabular_context(None))
    tol, d = det.params.tabular_tolerance, 64
    rng = np.random.default_rng(21)
    a = (rng.normal(size=(120, d)) * scale).astype(np.float32)
    # pairs just inside and just outside the tolerance, and unrelated ones
    steps = rng.normal(size=(120, d))
    steps /= np.sqrt((steps**2).mean(axis=1, keepdims=True))
    factor = rng.choice([0.0, 0.5, 0.999, 1.001, 2.0, 1e3], size=(120, 1)) * tol * scale
    b = (a.astype(np.float64) + steps * factor).astype(np.float32)
    b[:10] = (rng.normal(size=(10, d)) * scale).astype(np.float32)
    wanted = rng.random((120, 120)) < 0.8
    got = det._close_vectors(a, b, wanted)
    diff = b.astype(np.float64)[:, None, :] - a.astype(np.float64)[None, :, :]
    exact = wanted & (np.sqrt((diff**2).mean(axis=2)) <= tol)
    np.testing.assert_array_equal(got, exact)
    assert exact.any() and (wanted & ~exact).any()
