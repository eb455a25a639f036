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
