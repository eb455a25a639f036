"""Decoding: every input/output shape of the event contract, and every rejection reason."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from exporter import reasons
from exporter.config import Settings
from exporter.events import Decoder, Rejected

SECRET = 987654.321  # a recognisable "sensitive" input value that must never surface in messages


def decoder(**kw) -> Decoder:
    return Decoder(Settings(**kw))


def png_b64(arr: np.ndarray, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def test_tabular_with_probabilities() -> None:
    e = decoder().decode_line(json.dumps({"ts": 1764097200.5, "client": "k", "model": "digits", "input": [0, 3, 16], "output": [0.1, 0.9]}))
    assert (e.client, e.model, e.ts, e.modality) == ("k", "digits", 1764097200.5, "tabular")
    assert e.vector.tolist() == [0.0, 3.0, 16.0]
    assert e.probs.tolist() == pytest.approx([0.1, 0.9]) and e.confidence == pytest.approx(0.9) and e.predicted_class == 1


def test_defaults_for_model_and_timestamp() -> None:
    e = decoder().decode_object({"client": "k", "input": [1, 2]}, now=123.0)
    assert e.model == "default" and e.ts == 123.0 and e.probs is None


@pytest.mark.parametrize("ts, expected", [("2025-11-25T19:00:00Z", 1764097200.0), ("2025-11-25T20:00:00+01:00", 1764097200.0), (1764097200, 1764097200.0)])
def test_timestamps(ts: object, expected: float) -> None:
    assert decoder().decode_object({"client": "k", "ts": ts, "input": [1]}).ts == expected


def test_naive_timestamp_needs_a_default_zone() -> None:
    with pytest.raises(Rejected) as err:
        decoder().decode_object({"client": "k", "ts": "2025-11-25T19:00:00", "input": [1]})
    assert err.value.reason == reasons.INVALID_TIMESTAMP
    e = decoder(default_timezone="UTC").decode_object({"client": "k", "ts": "2025-11-25T19:00:00", "input": [1]})
    assert e.ts == 1764097200.0


def test_text_and_label_only() -> None:
    e = decoder().decode_object({"client": "k", "input": "Hello world", "output": {"label": "spam", "score": 0.7}})
    assert e.modality == "text" and e.text == "Hello world" and e.label == "spam" and e.confidence == 0.7
    e = decoder().decode_object({"client": "k", "model": "m2", "input": "x", "output": {"label": 3}})
    assert e.label == "3" and e.confidence is None


def test_image_png_and_jpeg() -> None:
    arr = (np.arange(28 * 28 * 3) % 256).astype(np.uint8).reshape(28, 28, 3)
    e = decoder().decode_object({"client": "k", "input": {"image_b64": png_b64(arr)}})
    assert e.modality == "image" and e.image.shape == (28, 28, 3) and (e.image == arr).all()
    e = decoder().decode_object({"client": "k", "model": "j", "input": {"image_b64": png_b64(arr, "JPEG")}})
    assert e.image.shape == (28, 28, 3)


def test_logits_are_softmaxed() -> None:
    d = decoder(models={"m": {"output": "logits"}})
    e = d.decode_object({"client": "k", "model": "m", "input": [1], "output": [2.0, 0.0, -1.0]})
    assert e.probs.sum() == pytest.approx(1.0) and e.probs.argmax() == 0


def test_field_mapping_with_dotted_paths() -> None:
    d = decoder(fields={"client": "req.auth.key", "input": "req.features", "output": "resp.probs", "ts": "time", "model": "svc"})
    e = d.decode_object({"req": {"auth": {"key": "k9"}, "features": [1, 2]}, "resp": {"probs": [0.5, 0.5]}, "time": 5.0, "svc": "m"})
    assert (e.client, e.model, e.ts) == ("k9", "m", 5.0)


def test_model_dimensions_learned_then_enforced() -> None:
    d = decoder()
    d.decode_object({"client": "k", "input": [1, 2, 3], "output": [0.5, 0.5]})
    with pytest.raises(Rejected) as err:
        d.decode_object({"client": "k", "input": [1, 2], "output": [0.5, 0.5]})
    assert err.value.reason == reasons.WRONG_DIMENSION and "expects 3" in err.value.message
    with pytest.raises(Rejected) as err:
        d.decode_object({"client": "k", "input": [1, 2, 3], "output": [0.2, 0.3, 0.5]})
    assert err.value.reason == reasons.WRONG_DIMENSION
    with pytest.raises(Rejected) as err:
        d.decode_object({"client": "k", "input": "now text"})
    assert err.value.reason == reasons.INVALID_INPUT


def test_configured_dimension() -> None:
    d = decoder(models={"digits": {"input_dim": 64}})
    with pytest.raises(Rejected) as err:
        d.decode_object({"client": "k", "model": "digits", "input": [SECRET] * 63})
    assert err.value.reason == reasons.WRONG_DIMENSION


@pytest.mark.parametrize(
    "line, reason",
    [
        (b"{not json", reasons.MALFORMED_JSON),
        (b"\xff\xfe{}", reasons.MALFORMED_JSON),
        (b"[1, 2]", reasons.NOT_AN_OBJECT),
        (json.dumps({"input": [SECRET]}).encode(), reasons.MISSING_CLIENT),
        (json.dumps({"client": 17, "input": [SECRET]}).encode(), reasons.INVALID_CLIENT),
        (json.dumps({"client": "k" * 300, "input": [SECRET]}).encode(), reasons.INVALID_CLIENT),
        (json.dumps({"client": "k", "model": 3, "input": [SECRET]}).encode(), reasons.INVALID_MODEL),
        (json.dumps({"client": "k", "ts": "yesterday", "input": [SECRET]}).encode(), reasons.INVALID_TIMESTAMP),
        (json.dumps({"client": "k"}).encode(), reasons.MISSING_INPUT),
        (json.dumps({"client": "k", "input": [SECRET, "x"]}).encode(), reasons.INVALID_INPUT),
        (json.dumps({"client": "k", "input": {"blob": SECRET}}).encode(), reasons.INVALID_INPUT),
        (b'{"client": "k", "input": [987654.321, NaN]}', reasons.NON_FINITE),
        (b'{"client": "k", "input": [987654.321, Infinity]}', reasons.NON_FINITE),
        (json.dumps({"client": "k", "input": [SECRET], "output": [0.7, 0.7]}).encode(), reasons.NOT_PROBABILITIES),
        (json.dumps({"client": "k", "input": [SECRET], "output": [-0.5, 1.5]}).encode(), reasons.NOT_PROBABILITIES),
        (json.dumps({"client": "k", "input": [SECRET], "output": [1.0]}).encode(), reasons.INVALID_OUTPUT),
        (json.dumps({"client": "k", "input": [SECRET], "output": "cat"}).encode(), reasons.INVALID_OUTPUT),
        (json.dumps({"client": "k", "input": [SECRET], "output": {"label": "a", "score": 2}}).encode(), reasons.NOT_PROBABILITIES),
        (json.dumps({"client": "k", "input": {"image_b64": "bm90IGFuIGltYWdl"}}).encode(), reasons.IMAGE_DECODE_ERROR),
        (json.dumps({"client": "k", "input": {"image_b64": "%%%"}}).encode(), reasons.IMAGE_DECODE_ERROR),
    ],
)
def test_rejections_name_a_reason_and_never_echo_inputs(line: bytes, reason: str) -> None:
    with pytest.raises(Rejected) as err:
        decoder().decode_line(line)
    assert err.value.reason == reason
    assert reason in reasons.ALL
    assert "987654" not in err.value.message and "bm90" not in err.value.message


# -- number arrays: the fast paths in _numbers and _output must accept and reject exactly -----
# what the plain definition does (numpy's type inference, then a per-element finiteness check).

BIG = 2**70  # a finite integer numpy cannot hold in 64 bits


def input_line(raw_json: str) -> bytes:
    return b'{"client": "k", "input": ' + raw_json.encode() + b"}"


@pytest.mark.parametrize(
    "raw_json, expected",
    [
        ("[true, 1]", [1.0, 1.0]),  # booleans mixed with numbers count as 0/1, as numpy infers them
        ("[1.5, true]", [1.5, 1.0]),
        ("[1, true, false]", [1.0, 1.0, 0.0]),
        (f"[{2**63 - 1}]", [float(2**63 - 1)]),
        (f"[{2**63}]", [float(2**63)]),  # uint64
        (f"[{-(2**63)}]", [float(-(2**63))]),
        ("[1e308, 1e308]", [1e308, 1e308]),  # finite values whose sum overflows
        ("[1.7e308, 1.7e308, -1.7e308]", [1.7e308, 1.7e308, -1.7e308]),
        ("[0.0, -0.0, 5e-324]", [0.0, -0.0, 5e-324]),
    ],
)
def test_number_arrays_accepted(raw_json: str, expected: list[float]) -> None:
    e = decoder().decode_line(input_line(raw_json))
    assert e.vector.dtype == np.float64 and e.vector.tolist() == expected


@pytest.mark.parametrize(
    "raw_json, reason",
    [
        ("[true, false]", reasons.INVALID_INPUT),  # all booleans: not numbers
        ("[false]", reasons.INVALID_INPUT),
        (f"[{SECRET}, {2**64}]", reasons.INVALID_INPUT),  # integers beyond 64 bits
        (f"[{SECRET}, {-(2**63) - 1}]", reasons.INVALID_INPUT),
        (f"[{SECRET}, {BIG}]", reasons.INVALID_INPUT),
        (f"[{BIG}, {SECRET}]", reasons.INVALID_INPUT),
        (f"[{SECRET}, {10**400}]", reasons.INVALID_INPUT),  # too large even for a float: never a crash
        (f"[{10**400}, {SECRET}]", reasons.INVALID_INPUT),
        (f"[{SECRET}, NaN, 2]", reasons.NON_FINITE),  # NaN in the middle
        (f"[{SECRET}, 1, -Infinity]", reasons.NON_FINITE),
        ("[Infinity, -Infinity]", reasons.NON_FINITE),  # their sum is NaN
        ("[1e308, 1e308, NaN]", reasons.NON_FINITE),  # the sum overflows and a NaN hides behind it
        (f"[{SECRET}, null]", reasons.INVALID_INPUT),  # null is not NaN
        (f"[NaN, null, {SECRET}]", reasons.INVALID_INPUT),
        (f'[{SECRET}, "1"]', reasons.INVALID_INPUT),
        (f"[{SECRET}, {{}}]", reasons.INVALID_INPUT),
        (f"[[{SECRET}, 2]]", reasons.INVALID_INPUT),  # nested, regular
        (f"[[{SECRET}], [2, 3]]", reasons.INVALID_INPUT),  # nested, ragged
        (f"[{SECRET}, [2]]", reasons.INVALID_INPUT),
        ("[[]]", reasons.INVALID_INPUT),
        ("[]", reasons.INVALID_INPUT),
    ],
)
def test_number_arrays_rejected(raw_json: str, reason: str) -> None:
    with pytest.raises(Rejected) as err:
        decoder().decode_line(input_line(raw_json))
    assert err.value.reason == reason
    assert "987654" not in err.value.message and str(BIG)[:8] not in err.value.message


def reference_numbers(raw: list) -> np.ndarray | str:
    """The plain definition of a valid number array: the float64 array, or the rejection reason."""
    if not raw:
        return reasons.INVALID_INPUT
    try:
        arr = np.asarray(raw)
    except (ValueError, TypeError, OverflowError):
        return reasons.INVALID_INPUT
    if arr.ndim != 1 or arr.dtype.kind not in "iuf":
        return reasons.INVALID_INPUT
    arr = arr.astype(np.float64)
    return arr if np.isfinite(arr).all() else reasons.NON_FINITE


def test_number_arrays_agree_with_the_plain_definition() -> None:
    rng = np.random.default_rng(7)
    specials = [True, False, None, "1", [1], {}, 2**63, 2**64, -(2**63) - 1, BIG, 10**400, float("nan"), float("inf"), -float("inf"), 1e308, -1e308, -0.0]
    d = decoder()
    for i in range(3000):
        n = int(rng.choice([1, 2, 3, 10, 64]))
        raw: list = rng.integers(0, 17, n).tolist() if i % 2 else rng.random(n).tolist()
        for _ in range(int(rng.integers(0, 3))):  # a few special values at random places
            raw[int(rng.integers(0, n))] = specials[int(rng.integers(0, len(specials)))]
        assert_decodes_as(d, {"client": "k", "model": f"m{i}", "input": raw}, "vector", reference_numbers(raw))


def assert_decodes_as(d: Decoder, obj: dict, field: str, expected: np.ndarray | str) -> None:
    """The decoder makes ``obj`` into an event whose ``field`` is ``expected`` byte for byte, or rejects it for reason ``expected``."""
    try:
        got: np.ndarray | str = getattr(d.decode_line(json.dumps(obj).encode()), field)
    except Rejected as exc:
        got = exc.reason
    if isinstance(expected, str):
        assert got == expected, obj
    else:
        assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.tobytes() == expected.tobytes(), obj


def reference_probabilities(raw: list) -> np.ndarray | str:
    """The plain definition of a valid probability output: the normalized array, or the rejection reason."""
    arr = reference_numbers(raw)
    if isinstance(arr, str):
        return reasons.INVALID_OUTPUT if arr == reasons.INVALID_INPUT else arr
    if arr.shape[0] < 2:
        return reasons.INVALID_OUTPUT
    total = float(sum(raw))
    if arr.min() < -1e-6 or arr.max() > 1 + 1e-6 or abs(total - 1.0) > 1e-2:
        return reasons.NOT_PROBABILITIES
    return np.clip(arr, 0.0, None) / total


def test_probability_outputs_agree_with_the_plain_definition() -> None:
    rng = np.random.default_rng(8)
    specials = [True, False, None, "0.5", [0.5], 2**63, 2**64, BIG, 10**400, float("nan"), float("inf"), -float("inf"), 1e308, -1e-7, -0.0, 0, 1]
    d = decoder()
    for i in range(3000):
        k = int(rng.choice([1, 2, 3, 10]))
        raw: list = (rng.dirichlet(np.ones(k)) if i % 3 else rng.random(k)).tolist()
        for _ in range(int(rng.integers(0, 3))):
            raw[int(rng.integers(0, k))] = specials[int(rng.integers(0, len(specials)))]
        assert_decodes_as(d, {"client": "k", "model": f"m{i}", "input": [1], "output": raw}, "probs", reference_probabilities(raw))


@pytest.mark.parametrize(
    "raw_json, expected",
    [
        ("[0.25, 0.25, 0.5]", [0.25, 0.25, 0.5]),
        ("[0.3, 0.695]", [0.3 / (0.3 + 0.695), 0.695 / (0.3 + 0.695)]),  # normalized by the sum
        ("[0, 1]", [0.0, 1.0]),
        ("[true, 0.0]", [1.0, 0.0]),
        ("[-0.0, 1.0]", [0.0, 1.0]),  # clipped to +0.0
        ("[-1e-7, 1.0]", [0.0, 1.0 / (1.0 - 1e-7)]),  # a tolerated negative is clipped to 0
    ],
)
def test_probability_outputs_normalized(raw_json: str, expected: list[float]) -> None:
    e = decoder().decode_line(b'{"client": "k", "input": [1], "output": ' + raw_json.encode() + b"}")
    assert e.probs.tolist() == expected and not np.signbit(e.probs).any()


@pytest.mark.parametrize(
    "raw_json, reason, logits",
    [
        ("[0.5, NaN]", reasons.NON_FINITE, False),  # non-finite before not-probabilities
        ("[NaN]", reasons.NON_FINITE, False),  # ... and before too-few-classes
        ("[0.5, Infinity]", reasons.NON_FINITE, True),
        ("[false, true]", reasons.INVALID_OUTPUT, False),
        (f"[{2**64}, 0.5]", reasons.INVALID_OUTPUT, False),
        ('[0.5, "0.5"]', reasons.INVALID_OUTPUT, False),
        ("[[0.5, 0.5]]", reasons.INVALID_OUTPUT, False),
        ("[1e308, 1e308]", reasons.NOT_PROBABILITIES, False),  # finite, but no probabilities
    ],
)
def test_output_arrays_rejected(raw_json: str, reason: str, logits: bool) -> None:
    d = decoder(models={"default": {"output": "logits"}}) if logits else decoder()
    with pytest.raises(Rejected) as err:
        d.decode_line(b'{"client": "k", "input": [1], "output": ' + raw_json.encode() + b"}")
    assert err.value.reason == reason


def test_logits_may_be_huge_but_finite() -> None:
    d = decoder(models={"default": {"output": "logits"}})
    assert d.decode_line(b'{"client": "k", "input": [1], "output": [1e308, 1e308]}').probs.tolist() == [0.5, 0.5]


@pytest.mark.parametrize("ts", ["NaN", "Infinity", "-1.0", "4e10", "true", '"1.5"'])
def test_implausible_timestamps_rejected(ts: str) -> None:
    with pytest.raises(Rejected) as err:
        decoder().decode_line(b'{"client": "k", "ts": ' + ts.encode() + b', "input": [1]}')
    assert err.value.reason == reasons.INVALID_TIMESTAMP


@pytest.mark.parametrize("ts, expected", [("0.0", 0.0), ("32503680000.0", 32503680000.0), ("0", 0.0)])
def test_timestamp_bounds_accepted(ts: str, expected: float) -> None:
    assert decoder().decode_line(b'{"client": "k", "ts": ' + ts.encode() + b', "input": [1]}').ts == expected
