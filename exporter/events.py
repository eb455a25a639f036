"""The one event type, and the decoder that turns a raw log line or pushed object into it.

Every source (tailed files, HTTP push, replay) goes through :class:`Decoder`, so validation
and rejection reasons are the same everywhere. Error messages describe *what* is wrong
(a length, a type, a field name) and never echo model inputs, which may be sensitive.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal
from zoneinfo import ZoneInfo

import numpy as np
from PIL import Image, UnidentifiedImageError

from exporter import jsonparse, reasons
from exporter.config import ModelConfig, Settings

Modality = Literal["tabular", "image", "text"]

MAX_CLIENT_LENGTH = 256
MAX_MODEL_LENGTH = 128
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_TIMESTAMP = 32503680000.0  # year 3000
PROBABILITY_TOLERANCE = 1e-2


@dataclass(slots=True)
class Event:
    """A decoded, validated prediction event.

    Exactly one of ``vector``, ``text`` and ``image`` is set, by ``modality``.
    ``probs`` is set for probability outputs (already softmaxed and normalized);
    ``label``/``label_score`` for label-only APIs.
    """

    client: str
    model: str
    ts: float
    modality: Modality
    vector: np.ndarray | None = None
    text: str | None = None
    image: np.ndarray | None = None
    probs: np.ndarray | None = None
    label: str | None = None
    label_score: float | None = None
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def confidence(self) -> float | None:
        """The top-1 probability, or the label score of a label-only API."""
        if self.probs is not None:
            return float(self.probs.max())
        return self.label_score

    @property
    def predicted_class(self) -> int | str | None:
        """The arg-max class index, or the label of a label-only API."""
        if self.probs is not None:
            return int(self.probs.argmax())
        return self.label


_NO_CONFIG = ModelConfig()


class Rejected(Exception):
    """An input that cannot become an :class:`Event`; ``reason`` is one of :mod:`exporter.reasons`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _lookup(obj: dict[str, Any], dotted: str) -> Any:
    if "." not in dotted:
        return obj.get(dotted)
    cur: Any = obj
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


class Decoder:
    """Decodes events per the configured field mapping and model settings.

    It learns a model's input and output lengths from its first valid event when the
    config does not give them, and rejects later events of another length.
    """

    def __init__(self, settings: Settings) -> None:
        self._fields = f = settings.fields
        # The field paths are fixed per decoder; when none is dotted (the default), plain
        # dict.get replaces a _lookup call per field on every event.
        self._paths = (f.client, f.model, f.ts, f.input, f.output)
        self._flat = not any("." in path for path in self._paths)
        self._models = settings.models
        self._default_model = settings.default_model
        self._zone = ZoneInfo(settings.default_timezone) if settings.default_timezone else None
        self.learned_input_dims: dict[str, int] = {}
        self.learned_num_classes: dict[str, int] = {}
        self.learned_modalities: dict[str, str] = {}
        self._settled: set[str] = set()  # models whose modality, input length and class count are known

    # -- entry points -------------------------------------------------------
    def learned(self) -> dict[str, dict[str, int | str]]:
        """What was learned about each model, for snapshots."""
        return {"input_dims": dict(self.learned_input_dims), "num_classes": dict(self.learned_num_classes), "modalities": dict(self.learned_modalities)}

    def restore(self, learned: dict[str, dict[str, int | str]]) -> None:
        self.learned_input_dims.update({k: int(v) for k, v in learned.get("input_dims", {}).items()})
        self.learned_num_classes.update({k: int(v) for k, v in learned.get("num_classes", {}).items()})
        self.learned_modalities.update({k: str(v) for k, v in learned.get("modalities", {}).items()})

    def decode_line(self, line: bytes | str, now: float | None = None) -> Event:
        """Decode one JSON-lines record."""
        try:
            obj = jsonparse.loads(line)
        except ValueError as exc:  # UnicodeDecodeError included
            raise Rejected(reasons.MALFORMED_JSON, f"not valid JSON ({type(exc).__name__})") from None
        return self.decode_object(obj, now)

    def decode_object(self, obj: Any, now: float | None = None) -> Event:
        """Decode one already-parsed JSON value."""
        if not isinstance(obj, dict):
            raise Rejected(reasons.NOT_AN_OBJECT, f"expected a JSON object, got {type(obj).__name__}")
        f = self._fields
        # Fetching every field up front is safe: lookups have no side effects and cannot raise.
        if self._flat:
            client, model, raw_ts, raw_input, raw_output = map(obj.get, self._paths)
        else:
            client, model, raw_ts, raw_input, raw_output = (_lookup(obj, path) for path in self._paths)
        if client is None or client == "":
            raise Rejected(reasons.MISSING_CLIENT, f"missing client field '{f.client}'")
        if not isinstance(client, str) or len(client) > MAX_CLIENT_LENGTH:
            raise Rejected(reasons.INVALID_CLIENT, f"field '{f.client}' must be a string of at most {MAX_CLIENT_LENGTH} characters")
        if model is None:
            model = self._default_model
        if not isinstance(model, str) or not model or len(model) > MAX_MODEL_LENGTH:
            raise Rejected(reasons.INVALID_MODEL, f"field '{f.model}' must be a non-empty string of at most {MAX_MODEL_LENGTH} characters")
        # The common timestamp (a plausible float) needs no call.
        ts = raw_ts if type(raw_ts) is float and 0.0 <= raw_ts <= MAX_TIMESTAMP else self._timestamp(raw_ts, now)
        mcfg = self._models.get(model) or _NO_CONFIG
        # A model's modality is configured, or guessed from its first event and then held to.
        modality = mcfg.modality or self.learned_modalities.get(model)
        event = self._input(client, model, ts, mcfg, modality, raw_input)
        self._output(event, mcfg, raw_output)
        if model not in self._settled:
            self._learn(event, mcfg)
        return event

    # -- fields -------------------------------------------------------------
    def _timestamp(self, raw: Any, now: float | None) -> float:
        if type(raw) is float and 0.0 <= raw <= MAX_TIMESTAMP:  # NaN fails the test
            return raw
        if raw is None:
            return time.time() if now is None else now
        if isinstance(raw, bool):
            raise Rejected(reasons.INVALID_TIMESTAMP, "timestamp must be a number or an RFC 3339 string")
        if isinstance(raw, (int, float)):
            ts = float(raw)
        elif isinstance(raw, str):
            try:
                parsed = datetime.fromisoformat(raw.strip().replace("Z", "+00:00").replace("z", "+00:00"))
            except ValueError:
                raise Rejected(reasons.INVALID_TIMESTAMP, "timestamp string is not RFC 3339") from None
            if parsed.tzinfo is None:
                if self._zone is None:
                    raise Rejected(reasons.INVALID_TIMESTAMP, "timestamp has no time zone and no default_timezone is configured")
                parsed = parsed.replace(tzinfo=self._zone)
            ts = parsed.astimezone(timezone.utc).timestamp()
        else:
            raise Rejected(reasons.INVALID_TIMESTAMP, f"timestamp must be a number or an RFC 3339 string, got {type(raw).__name__}")
        if not math.isfinite(ts) or ts < 0 or ts > MAX_TIMESTAMP:
            raise Rejected(reasons.INVALID_TIMESTAMP, "timestamp is not a plausible Unix epoch in seconds")
        return ts

    def _input(self, client: str, model: str, ts: float, mcfg: ModelConfig, modality: str | None, raw: Any) -> Event:
        if raw is None:
            raise Rejected(reasons.MISSING_INPUT, f"missing input field '{self._fields.input}'")
        # Arrays first: they are the common case, and list, str and dict exclude each other.
        if isinstance(raw, list):
            if modality == "text":
                raise Rejected(reasons.INVALID_INPUT, f"model '{model}' is text; got an array input")
            vec = _numbers(raw, "input", reasons.INVALID_INPUT)
            expected = mcfg.input_dim or self.learned_input_dims.get(model)
            if expected is not None and vec.shape[0] != expected:
                raise Rejected(reasons.WRONG_DIMENSION, f"input has {vec.shape[0]} values; model '{model}' expects {expected}")
            kind: Modality = "image" if modality == "image" else "tabular"
            event = Event(client, model, ts, kind, vector=vec)
            if kind == "image":
                event.image = _pixels_from_vector(vec, mcfg.image_shape)
            return event
        if isinstance(raw, str):
            if modality not in (None, "text"):
                raise Rejected(reasons.INVALID_INPUT, f"model '{model}' is {modality}; got a string input")
            return Event(client, model, ts, "text", text=raw)
        if isinstance(raw, dict):
            if "image_b64" not in raw:
                raise Rejected(reasons.INVALID_INPUT, "an object input must have an 'image_b64' key")
            if modality not in (None, "image"):
                raise Rejected(reasons.INVALID_INPUT, f"model '{model}' is {modality}; got an image input")
            return Event(client, model, ts, "image", image=_decode_image(raw["image_b64"]))
        raise Rejected(reasons.INVALID_INPUT, f"input must be an array of numbers, a string or an image object, got {type(raw).__name__}")

    def _output(self, event: Event, mcfg: ModelConfig, raw: Any) -> None:
        if raw is None:
            return
        if isinstance(raw, dict):
            if "label" not in raw:
                raise Rejected(reasons.INVALID_OUTPUT, "an object output must have a 'label' key")
            label = raw["label"]
            if isinstance(label, bool) or not isinstance(label, (str, int)):
                raise Rejected(reasons.INVALID_OUTPUT, "output label must be a string or an integer")
            event.label = str(label)
            score = raw.get("score")
            if score is not None:
                if isinstance(score, bool) or not isinstance(score, (int, float)):
                    raise Rejected(reasons.INVALID_OUTPUT, "output score must be a number")
                if not math.isfinite(score):
                    raise Rejected(reasons.NON_FINITE, "output score is NaN or infinite")
                if not 0.0 <= score <= 1.0:
                    raise Rejected(reasons.NOT_PROBABILITIES, "output score must lie in [0, 1]")
                event.label_score = float(score)
            return
        if not isinstance(raw, list):
            raise Rejected(reasons.INVALID_OUTPUT, f"output must be an array of probabilities or a label object, got {type(raw).__name__}")
        values = _number_array(raw, "output", reasons.INVALID_OUTPUT)
        # One Python sum is both the total and, when finite, the proof that every value is
        # (see _all_finite; fsum is not needed: these are JSON numbers, never numpy scalars).
        total = float(sum(raw))
        if not math.isfinite(total) and not np.isfinite(values).all():
            raise Rejected(reasons.NON_FINITE, "output array holds NaN or infinity")
        if values.dtype.kind != "f":
            values = values.astype(np.float64)
        if values.shape[0] < 2:
            raise Rejected(reasons.INVALID_OUTPUT, "output must have at least 2 classes")
        expected = mcfg.num_classes or self.learned_num_classes.get(event.model)
        if expected is not None and values.shape[0] != expected:
            raise Rejected(reasons.WRONG_DIMENSION, f"output has {values.shape[0]} classes; model '{event.model}' expects {expected}")
        if mcfg.output == "logits":
            shifted = np.exp(values - values.max())
            event.probs = shifted / shifted.sum()
            return
        # Python's builtins beat numpy's reductions on the few classes models usually have.
        lowest = min(raw)
        if lowest < -1e-6 or max(raw) > 1 + 1e-6 or abs(total - 1.0) > PROBABILITY_TOLERANCE:
            raise Rejected(
                reasons.NOT_PROBABILITIES,
                f"output values must lie in [0, 1] and sum to 1 (sum is {total:.4g}); set output: logits for raw scores",
            )
        # Clipping at 0 changes nothing when every value is positive, and np.clip costs more
        # than the division; zeros (-0.0 becomes 0.0) and tolerated negatives still go through it.
        # values is this event's own new array: divided in place.
        probs = values if lowest > 0 else np.clip(values, 0.0, None)
        probs /= total
        event.probs = probs

    def _learn(self, event: Event, mcfg: ModelConfig) -> None:
        """Record what a model's first event shows; later events never overwrite it."""
        model = event.model
        if model not in self.learned_modalities:
            self.learned_modalities[model] = event.modality
        if event.vector is not None and mcfg.input_dim is None and model not in self.learned_input_dims:
            self.learned_input_dims[model] = int(event.vector.shape[0])
        if event.probs is not None and mcfg.num_classes is None and model not in self.learned_num_classes:
            self.learned_num_classes[model] = int(event.probs.shape[0])
        if (mcfg.input_dim or model in self.learned_input_dims) and (mcfg.num_classes or model in self.learned_num_classes):
            self._settled.add(model)  # nothing left to learn: later events skip this call


def _numbers(raw: list[Any], what: str, reason: str) -> np.ndarray:
    """A flat float64 array of finite values from a JSON array of numbers (:func:`_number_array`).

    Integer arrays need no finiteness check; float arrays get :func:`_all_finite`, which
    only skips work when the answer is certain.
    """
    arr = _number_array(raw, what, reason)
    if arr.dtype.kind == "f" and not _all_finite(raw, arr):
        raise Rejected(reasons.NON_FINITE, f"{what} array holds NaN or infinity")
    return arr if arr.dtype.kind == "f" else arr.astype(np.float64)  # integers of at most 64 bits are finite as float64 too


def _number_array(raw: list[Any], what: str, reason: str) -> np.ndarray:
    """A flat numeric array from a JSON array of numbers; strings, nulls, nesting are rejected.

    Accepted is exactly what numpy's type inference makes a 1-D integer or float array of:
    numbers, and booleans mixed with numbers. An all-boolean array is rejected, and so are
    integers outside numpy's 64-bit ranges, which it keeps as Python objects. A float
    array is float64 already (JSON numbers are Python floats); values are not checked
    for finiteness here.
    """
    if not raw:
        raise Rejected(reason, f"{what} array is empty")
    try:
        arr = np.asarray(raw)  # numpy's type inference tells numbers from anything else in one pass
    except (ValueError, TypeError, OverflowError):
        raise Rejected(reason, f"{what} array must be a flat array of numbers") from None
    if arr.ndim != 1 or arr.dtype.kind not in "iuf":
        raise Rejected(reason, f"{what} array must be a flat array of numbers")
    return arr


def _all_finite(raw: list[Any], arr: np.ndarray) -> bool:
    """Whether every value is finite; ``arr`` is ``raw`` as a float array.

    ``math.fsum`` over the list costs a fraction of ``np.isfinite(arr).all()`` on short
    arrays, and a NaN or infinity makes it return a non-finite value or raise, so a finite
    sum proves every value finite. It also raises when huge finite values overflow the
    sum; those rare arrays get the exact per-element check, so they are still accepted.
    ``fsum`` rather than ``sum`` because it converts each value to a float and so never
    runs numpy scalar arithmetic, which could warn, on values that are numpy scalars.
    """
    try:
        if math.isfinite(math.fsum(raw)):
            return True
    except (OverflowError, ValueError, TypeError):
        pass
    return bool(np.isfinite(arr).all())


def _decode_image(b64: Any) -> np.ndarray:
    if not isinstance(b64, str):
        raise Rejected(reasons.IMAGE_DECODE_ERROR, "image_b64 must be a base64 string")
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise Rejected(reasons.IMAGE_DECODE_ERROR, "image_b64 is not valid base64") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in ("PNG", "JPEG"):
                raise Rejected(reasons.IMAGE_DECODE_ERROR, f"image format {img.format} is not PNG or JPEG")
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise Rejected(reasons.IMAGE_DECODE_ERROR, f"image of {img.width}x{img.height} pixels exceeds the limit")
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Rejected:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise Rejected(reasons.IMAGE_DECODE_ERROR, f"image does not decode ({type(exc).__name__})") from None


def _pixels_from_vector(vec: np.ndarray, shape: tuple[int, ...] | None) -> np.ndarray | None:
    """Flattened pixels as a 2-D/3-D array when the model config gives the image shape."""
    if shape is None:
        return None
    if int(np.prod(shape)) != vec.shape[0]:
        raise Rejected(reasons.WRONG_DIMENSION, f"input has {vec.shape[0]} values; image_shape needs {int(np.prod(shape))}")
    return vec.reshape(shape)


def dumps(event: Event) -> str:
    """Serialize an event back to the default JSON-lines schema (used by tests and tools)."""
    obj: dict[str, Any] = {"ts": event.ts, "client": event.client, "model": event.model}
    if event.text is not None:
        obj["input"] = event.text
    elif event.vector is not None:
        obj["input"] = event.vector.tolist()
    if event.probs is not None:
        obj["output"] = event.probs.tolist()
    elif event.label is not None:
        obj["output"] = {"label": event.label} | ({"score": event.label_score} if event.label_score is not None else {})
    return json.dumps(obj)
