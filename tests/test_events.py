"""Decoding: every input/output shape of the event contract, and every rejection reason."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageFile

from exporter import reasons
from exporter.config import Settings
from exporter.events import Decoder, Rejected
from exporter.names import is_valid_name

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
        ("[1e15, -1e15]", [1e15, -1e15]),  # the bound itself
        (f"[{10**15}, {-(10**15)}]", [1e15, -1e15]),
        ("[" + ", ".join(["9e14"] * 100) + "]", [9e14] * 100),  # a norm beyond the bound, every value within it
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
        (f"[{SECRET}, {2**64}]", reasons.OUT_OF_RANGE),  # integers beyond 64 bits
        (f"[{SECRET}, {-(2**63) - 1}]", reasons.OUT_OF_RANGE),
        (f"[{SECRET}, {BIG}]", reasons.OUT_OF_RANGE),
        (f"[{BIG}, {SECRET}]", reasons.OUT_OF_RANGE),
        (f"[{SECRET}, {10**400}]", reasons.OUT_OF_RANGE),  # too large even for a float: never a crash
        (f"[{10**400}, {SECRET}]", reasons.OUT_OF_RANGE),
        (f"[{10**400}, NaN]", reasons.OUT_OF_RANGE),
        (f"[{2**63 - 1}]", reasons.OUT_OF_RANGE),  # 64-bit integers beyond 1e15
        (f"[{2**63}]", reasons.OUT_OF_RANGE),
        ("[1e308, 1e308]", reasons.OUT_OF_RANGE),  # finite values whose squares overflow
        (f"[{SECRET}, -1.0000001e15]", reasons.OUT_OF_RANGE),
        ("[" + ", ".join(["9e14"] * 100) + ", 2e15]", reasons.OUT_OF_RANGE),
        (f"[{SECRET}, NaN, 2]", reasons.NON_FINITE),  # NaN in the middle
        (f"[{SECRET}, 1, -Infinity]", reasons.NON_FINITE),
        ("[Infinity, -Infinity]", reasons.NON_FINITE),  # their sum is NaN
        ("[1e308, 1e308, NaN]", reasons.NON_FINITE),  # non-finite before out of range
        ("[1e300, Infinity]", reasons.NON_FINITE),
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


def reference_numbers(raw: list, bounded: bool = True) -> np.ndarray | str:
    """The plain definition of a valid number array: the float64 array, or the rejection reason.

    ``bounded``: the rules of inputs (integers beyond 64 bits and values beyond 1e15 are
    out_of_range); else those of outputs (no bound; any non-array is invalid).
    """
    if not raw:
        return reasons.INVALID_INPUT
    try:
        arr = np.asarray(raw)
    except (ValueError, TypeError, OverflowError):
        arr = None
    if arr is None or arr.ndim != 1 or arr.dtype.kind not in "iuf":
        numbers = all(type(v) in (int, float) for v in raw)
        return reasons.OUT_OF_RANGE if bounded and numbers else reasons.INVALID_INPUT
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        return reasons.NON_FINITE
    return reasons.OUT_OF_RANGE if bounded and np.abs(arr).max() > 1e15 else arr


def test_number_arrays_agree_with_the_plain_definition() -> None:
    rng = np.random.default_rng(7)
    specials = [True, False, None, "1", [1], {}, 2**63, 2**64, -(2**63) - 1, BIG, 10**400, float("nan"), float("inf"), -float("inf"), 1e308, -1e308, -0.0,
                1e15, -1e15, 1.0000001e15, 10**15, 10**15 + 1]
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
    arr = reference_numbers(raw, bounded=False)
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


# -- hostile values: each a specific rejection, never an exception (issue: poison pills) -----


@pytest.mark.parametrize(
    "ts",
    [
        "1" * 400,  # float() of it would raise OverflowError
        "-" + "1" * 400,
        '"0001-01-01T00:00:00+23:59"',  # leaves datetime's range when converted to UTC
        '"9999-12-31T23:59:59-23:59"',
        '"0001-01-01T00:00:00Z"',
        '"9999-12-31T23:59:59Z"',
        '"1969-12-31T23:59:59Z"',
        '"' + "2025-11-25T19:00:00Z" + " " * 100 + '"',  # longer than any RFC 3339 time
        "1e400",
        "-0.5",
        "null1",
    ],
)
def test_hostile_timestamps_are_invalid_timestamp(ts: str) -> None:
    line = b'{"client": "k", "ts": ' + ts.encode() + b', "input": [1]}'
    with pytest.raises(Rejected) as err:
        decoder(default_timezone="UTC").decode_line(line)
    assert err.value.reason in (reasons.INVALID_TIMESTAMP, reasons.MALFORMED_JSON)
    assert err.value.reason == (reasons.MALFORMED_JSON if ts == "null1" else reasons.INVALID_TIMESTAMP)


@pytest.mark.parametrize(
    "output, reason",
    [
        ('{"label": "a", "score": ' + "1" * 400 + "}", reasons.NOT_PROBABILITIES),
        ('{"label": "a", "score": -' + "1" * 400 + "}", reasons.NOT_PROBABILITIES),
        ('{"label": "a", "score": true}', reasons.INVALID_OUTPUT),
        ('{"label": "a", "score": NaN}', reasons.NON_FINITE),
        ('{"label": "a", "score": [0.5]}', reasons.INVALID_OUTPUT),
        ('{"label": ' + "9" * 400 + "}", reasons.INVALID_OUTPUT),  # an integer label beyond 64 bits
        ('{"label": true}', reasons.INVALID_OUTPUT),
        ('{"label": null}', reasons.INVALID_OUTPUT),
        ('{"label": ""}', reasons.INVALID_OUTPUT),
        ('{"label": "' + "x" * 300 + '"}', reasons.INVALID_OUTPUT),
        ('{"label": "a\\nb"}', reasons.INVALID_OUTPUT),
        ('{"label": "\\ud800"}', reasons.INVALID_OUTPUT),
    ],
)
def test_hostile_label_outputs(output: str, reason: str) -> None:
    with pytest.raises(Rejected) as err:
        decoder().decode_line(b'{"client": "k", "input": "text", "output": ' + output.encode() + b"}")
    assert err.value.reason == reason


def test_label_outputs_accepted() -> None:
    d = decoder()
    assert d.decode_line(b'{"client": "k", "input": "t", "output": {"label": -9223372036854775808, "score": 1}}').label == "-9223372036854775808"
    e = d.decode_line('{"client": "k", "input": "t", "output": {"label": "São Paulo", "score": 0}}'.encode())
    assert (e.label, e.label_score) == ("São Paulo", 0.0)


# Characters that make a name unsafe wherever it is shown (exporter.names).
UNSAFE_CHARACTERS = {
    "lone high surrogate": "\\ud800",
    "lone low surrogate": "\\udfff",
    "newline": "\\n",
    "carriage return": "\\r",
    "tab": "\\t",
    "NUL": "\\u0000",
    "escape (terminal)": "\\u001b[31m",
    "DEL": "\\u007f",
    "C1 NEL": "\\u0085",
    "C1 CSI": "\\u009b",
    "line separator": "\\u2028",
    "paragraph separator": "\\u2029",
    "right-to-left override": "\\u202e",
    "left-to-right isolate": "\\u2066",
    "zero-width space": "\\u200b",
    "zero-width joiner": "\\u200d",
    "byte-order mark": "\\ufeff",
    "no-break space": "\\u00a0",
    "private use": "\\ue000",
    "unassigned": "\\u0378",
    "replacement character": "\\ufffd",
}


@pytest.mark.parametrize("what", UNSAFE_CHARACTERS)
@pytest.mark.parametrize("field, reason", [("client", reasons.INVALID_CLIENT), ("model", reasons.INVALID_MODEL)])
def test_unsafe_characters_in_names_are_rejected(what: str, field: str, reason: str) -> None:
    obj = {"client": "k", "model": "m", "input": [1]}
    line = json.dumps(obj).replace(f'"{field}": "', f'"{field}": "x{UNSAFE_CHARACTERS[what]}').encode()
    with pytest.raises(Rejected) as err:
        decoder().decode_line(line)
    assert err.value.reason == reason


@pytest.mark.parametrize("name", ["__other__", "__x__", "__"])
@pytest.mark.parametrize("field, reason", [("client", reasons.INVALID_CLIENT), ("model", reasons.INVALID_MODEL)])
def test_names_of_the_exporters_own_label_values_are_rejected(name: str, field: str, reason: str) -> None:
    """``__other__`` is the aggregate of the clients outside the top N, which the alert rules
    exclude: a client of that name would never be paged. The whole ``__name__`` form is reserved."""
    obj = {"client": "k", "model": "m", "input": [1], field: name}
    with pytest.raises(Rejected) as err:
        decoder().decode_line(json.dumps(obj).encode())
    assert err.value.reason == reason
    assert not is_valid_name(name)


@pytest.mark.parametrize("name", ["_other_", "__other", "other__", "a__b__c", "_"])
def test_names_with_underscores_outside_the_reserved_form_are_accepted(name: str) -> None:
    e = decoder().decode_line(json.dumps({"client": name, "model": name, "input": [1]}).encode())
    assert (e.client, e.model) == (name, name) and is_valid_name(name)


@pytest.mark.parametrize("name", ["key 17", "müller@example.com", "客户-7", "ключ", "a" * 256, "émoji-🙂", "<b>&amp;</b>", "%s%n{}"])
def test_printable_names_are_accepted(name: str) -> None:
    e = decoder().decode_line(json.dumps({"client": name, "model": name[:128], "input": [1]}).encode())
    assert (e.client, e.model) == (name, name[:128])


def test_text_input_must_be_valid_unicode() -> None:
    d = decoder()
    assert d.decode_line('{"client": "k", "input": "line one\\nline two\\u2028 é"}'.encode()).text == "line one\nline two\u2028 é"
    with pytest.raises(Rejected) as err:
        d.decode_line(b'{"client": "k", "model": "t2", "input": "ab\\udc00cd"}')
    assert err.value.reason == reasons.INVALID_INPUT


def test_not_probabilities_message_does_not_echo_a_value_derived_from_the_output() -> None:
    with pytest.raises(Rejected) as err:
        decoder().decode_line(b'{"client": "k", "input": [1], "output": [0.123456, 0.7]}')
    assert err.value.reason == reasons.NOT_PROBABILITIES
    assert "0.8235" not in err.value.message and "0.82" not in err.value.message


def test_a_rejected_event_teaches_the_decoder_nothing() -> None:
    d = decoder()
    for line in [
        b'{"client": "k", "model": "m", "ts": ' + b"1" * 400 + b', "input": [1, 2, 3], "output": [0.5, 0.5]}',
        b'{"client": "k", "model": "m", "input": [1, 2, 3], "output": {"label": "a", "score": ' + b"1" * 400 + b"}}",
        b'{"client": "k", "model": "m", "input": [1, 2, 1e16], "output": [0.5, 0.5]}',
        b'{"client": "\\u2028", "model": "m", "input": [1, 2, 3], "output": [0.5, 0.5]}',
    ]:
        with pytest.raises(Rejected):
            d.decode_line(line)
    assert d.learned() == {"input_dims": {}, "num_classes": {}, "modalities": {}}


def test_restore_drops_learned_models_with_invalid_names() -> None:
    d = decoder()
    d.restore({"input_dims": {"ok": 3, "bad\ud800": 4, "bad\n": 5}, "num_classes": {"ok": 2, "\u202e": 2}, "modalities": {"ok": "tabular", "": "text"}})
    assert d.learned() == {"input_dims": {"ok": 3}, "num_classes": {"ok": 2}, "modalities": {"ok": "tabular"}}


def test_image_pixel_limit_is_read_from_the_header_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 4096 x 4096 PNG of zeros (the issue's image bomb) is refused without being decoded."""
    big = png_b64(np.zeros((4096, 4096), dtype=np.uint8))
    assert len(big) < 100_000
    decoded: list[object] = []
    real_load = ImageFile.ImageFile.load  # what decodes the pixels of a PNG or JPEG
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    with pytest.raises(Rejected) as err:
        decoder().decode_object({"client": "k", "input": {"image_b64": big}})
    assert err.value.reason == reasons.IMAGE_DECODE_ERROR and "4096x4096" in err.value.message
    assert decoded == []
    # The limit is a config key; within it, the image decodes.
    small = png_b64(np.zeros((64, 32), dtype=np.uint8))
    with pytest.raises(Rejected):
        decoder(limits={"max_image_pixels": 64 * 32 - 1}).decode_object({"client": "k", "input": {"image_b64": small}})
    assert decoder(limits={"max_image_pixels": 64 * 32}).decode_object({"client": "k", "input": {"image_b64": small}}).image.shape == (64, 32, 3)
    assert decoded  # and then it was decoded


@pytest.mark.parametrize(
    "data",
    [
        b"GIF89a\x01\x00\x01\x00\x00\x00\x00;",  # another format: never handed to its parser
        b"BM" + b"\x00" * 60,
        b"\x89PNG\r\n\x1a\n",  # a PNG signature and nothing else
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x02\x00\x00\x00\x90\x91h6",  # a header, no pixels
        b"\xff\xd8\xff\xe0" + b"\x00" * 100,  # a JPEG start and garbage
        b"",
    ],
)
def test_images_that_are_not_images(data: bytes) -> None:
    with pytest.raises(Rejected) as err:
        decoder().decode_object({"client": "k", "input": {"image_b64": base64.b64encode(data).decode()}})
    assert err.value.reason == reasons.IMAGE_DECODE_ERROR


def test_an_unconfigured_model_is_not_sized_by_a_hostile_first_event() -> None:
    """A model learns its input length and class count from its first event: past the limits,
    that event is refused (too_many_values) and teaches nothing; a configured model is trusted."""
    d = decoder(limits={"max_input_values": 100, "max_classes": 20})
    long_input = json.dumps({"client": "k", "model": "m", "input": [0.5] * 101, "output": [0.5, 0.5]})
    many_classes = json.dumps({"client": "k", "model": "m", "input": [0.5] * 100, "output": [1 / 21] * 21})
    for line in (long_input, many_classes):
        with pytest.raises(Rejected) as info:
            d.decode_line(line)
        assert info.value.reason == reasons.TOO_MANY_VALUES and "0.5" not in info.value.message
    assert d.learned()["input_dims"] == {} and d.learned()["num_classes"] == {}
    assert d.decode_line(json.dumps({"client": "k", "model": "m", "input": [0.5] * 100, "output": [0.05] * 20})).vector.shape == (100,)
    configured = decoder(limits={"max_input_values": 100}, models={"big": {"input_dim": 500}})
    assert configured.decode_line(json.dumps({"client": "k", "model": "big", "input": [0.5] * 500})).vector.shape == (500,)
    # a snapshot taken under larger limits does not size models past today's
    d2 = decoder(limits={"max_input_values": 100, "max_classes": 20})
    d2.restore({"input_dims": {"a": 100, "b": 101}, "num_classes": {"a": 20, "b": 21}, "modalities": {}})
    assert d2.learned()["input_dims"] == {"a": 100} and d2.learned()["num_classes"] == {"a": 20}
