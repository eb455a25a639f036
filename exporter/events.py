"""The one event type, and the decoder that turns a raw log line or pushed object into it.

Every source (tailed files, HTTP push, replay) goes through :class:`Decoder`, so validation
and rejection reasons are the same everywhere. Error messages describe *what* is wrong
(a length, a type, a field name) and never echo model inputs, which may be sensitive.

Every field is attacker-controlled, so every value is checked before it is used in
arithmetic or stored: a hostile value is a specific rejection of its one event, never an
exception (no huge integer reaches ``float()``, no out-of-range date reaches a
conversion), and nothing about the decoder changes before an event is accepted.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo

import numpy as np

from exporter import jsonparse, reasons
from exporter.config import ModelConfig, Settings
from exporter.images import ImageError, decode_image
from exporter.names import MAX_CLIENT_LENGTH, MAX_LABEL_LENGTH, MAX_MODEL_LENGTH, is_valid_name

if TYPE_CHECKING:
    from exporter.runtime import ModelAdmission

Modality = Literal["tabular", "image", "text"]

MAX_TIMESTAMP = 32503680000.0  # year 3000
MAX_TIMESTAMP_STRING = 64  # an RFC 3339 time has at most 35 characters; longer strings are not parsed
# Input values beyond +-1e15 are rejected (out_of_range). Their squares stay below 1e30,
# so sums of squares over 1e8 terms stay below 1e38, inside even float32's range (3.4e38):
# no variance, distance or Gram product a detector computes can overflow. Integers that
# large are also past float64's exact range (2**53 = 9.0e15) anyway.
MAX_INPUT_MAGNITUDE = 1e15
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
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
    config does not give them, and rejects later events of another length. With an
    ``admission`` (the pipeline's, :class:`~exporter.runtime.ModelAdmission`), events
    of a model it refuses are rejected before anything is learned, and a new model is
    admitted by its first valid event.
    """

    def __init__(self, settings: Settings, admission: "ModelAdmission | None" = None) -> None:
        self._fields = f = settings.fields
        # The field paths are fixed per decoder; when none is dotted (the default), plain
        # dict.get replaces a _lookup call per field on every event.
        self._paths = (f.client, f.model, f.ts, f.input, f.output)
        self._flat = not any("." in path for path in self._paths)
        self._models = settings.models
        self._default_model = settings.default_model
        self._zone = ZoneInfo(settings.default_timezone) if settings.default_timezone else None
        self._max_image_pixels = settings.limits.max_image_pixels
        self._max_input_values = settings.limits.max_input_values
        self._max_classes = settings.limits.max_classes
        self._admission = admission
        self._max_ahead = settings.limits.max_future_seconds
        self.learned_input_dims: dict[str, int] = {}
        self.learned_num_classes: dict[str, int] = {}
        self.learned_modalities: dict[str, str] = {}
        self._settled: set[str] = set()  # models whose modality, input length and class count are known

    # -- entry points -------------------------------------------------------
    def learned(self) -> dict[str, dict[str, int | str]]:
        """What was learned about each model, for snapshots."""
        return {"input_dims": dict(self.learned_input_dims), "num_classes": dict(self.learned_num_classes), "modalities": dict(self.learned_modalities)}

    def restore(self, learned: dict[str, dict[str, int | str]]) -> None:
        """Take what :meth:`learned` saved; models whose names are no longer valid are left out."""

        def valid(part: str) -> dict[str, Any]:
            return {k: v for k, v in learned.get(part, {}).items() if is_valid_name(k, MAX_MODEL_LENGTH)}

        # A snapshot written under larger limits does not size models beyond today's.
        self.learned_input_dims.update({k: int(v) for k, v in valid("input_dims").items() if 0 < int(v) <= self._max_input_values})
        self.learned_num_classes.update({k: int(v) for k, v in valid("num_classes").items() if 1 < int(v) <= self._max_classes})
        self.learned_modalities.update({k: str(v) for k, v in valid("modalities").items()})

    def decode_line(self, line: bytes | str, now: float | None = None, clock: float | None = None) -> Event:
        """Decode one JSON-lines record (see :meth:`decode_object`)."""
        try:
            obj = jsonparse.loads(line)
        except ValueError as exc:  # UnicodeDecodeError included
            raise Rejected(reasons.MALFORMED_JSON, f"not valid JSON ({type(exc).__name__})") from None
        return self.decode_object(obj, now, clock)

    def decode_object(self, obj: Any, now: float | None = None, clock: float | None = None) -> Event:
        """Decode one already-parsed JSON value.

        ``now``: the time of an event without one. ``clock``: the exporter's clock (in replay
        and calibrate, the moment reading began); an event stamped more than
        ``limits.max_future_seconds`` after it is rejected. ``None`` checks nothing.
        """
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
        # Names reach labels, logs and alerts: printable text only. This is
        # exporter.names.is_valid_name, inlined on the hot path (a call costs as much as the check).
        if not (
            type(client) is str and len(client) <= MAX_CLIENT_LENGTH and client.isprintable() and "\ufffd" not in client
            and not (client[:2] == "__" and client[-2:] == "__")
        ):
            raise Rejected(
                reasons.INVALID_CLIENT,
                f"field '{f.client}' must be a string of at most {MAX_CLIENT_LENGTH} printable characters, without U+FFFD and not __reserved__",
            )
        if model is None:
            model = self._default_model
        if not (
            type(model) is str and 0 < len(model) <= MAX_MODEL_LENGTH and model.isprintable() and "\ufffd" not in model
            and not (model[:2] == "__" and model[-2:] == "__")
        ):
            raise Rejected(
                reasons.INVALID_MODEL,
                f"field '{f.model}' must be a non-empty string of at most {MAX_MODEL_LENGTH} printable characters, without U+FFFD and not __reserved__",
            )
        # A model refused by the admission is rejected before anything is learned from it.
        admission = self._admission
        fresh = admission is not None and model not in admission.admitted
        if fresh:
            refused = admission.refusal(model)  # type: ignore[union-attr]
            if refused is not None:
                raise Rejected(*refused)
        # The common timestamp (a plausible float) needs no call.
        ts = raw_ts if type(raw_ts) is float and 0.0 <= raw_ts <= MAX_TIMESTAMP else self._timestamp(raw_ts, now)
        if clock is not None and ts > clock + self._max_ahead:
            # Event time drives what expires (the links index, groups' edges): one event far in
            # the future would wipe it. Before admission, so that such an event admits nothing.
            raise Rejected(reasons.FUTURE_TIMESTAMP, f"timestamp is more than {self._max_ahead:g} s after the exporter's clock")
        mcfg = self._models.get(model) or _NO_CONFIG
        # A model's modality is configured, or guessed from its first event and then held to.
        modality = mcfg.modality or self.learned_modalities.get(model)
        event = self._input(client, model, ts, mcfg, modality, raw_input)
        self._output(event, mcfg, raw_output)
        if fresh:  # the event is valid: its model takes its place now
            admission.admit(model)  # type: ignore[union-attr]
        if model not in self._settled:
            self._learn(event, mcfg)
        return event

    # -- fields -------------------------------------------------------------
    def _timestamp(self, raw: Any, now: float | None) -> float:
        if type(raw) is float and 0.0 <= raw <= MAX_TIMESTAMP:  # NaN fails the test
            return raw
        if raw is None:
            return time.time() if now is None else now
        kind = type(raw)  # exact types: a bool is not a number here
        if kind is int or kind is float:
            # Compared as they are: float() of a 400-digit integer would raise.
            if not 0 <= raw <= MAX_TIMESTAMP:
                raise Rejected(reasons.INVALID_TIMESTAMP, "timestamp is not a plausible Unix epoch in seconds")
            return float(raw)
        if kind is not str:
            raise Rejected(reasons.INVALID_TIMESTAMP, f"timestamp must be a number or an RFC 3339 string, got {kind.__name__}")
        if len(raw) > MAX_TIMESTAMP_STRING:
            raise Rejected(reasons.INVALID_TIMESTAMP, "timestamp string is not RFC 3339")
        try:
            parsed = datetime.fromisoformat(raw.strip().replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise Rejected(reasons.INVALID_TIMESTAMP, "timestamp string is not RFC 3339") from None
        if parsed.tzinfo is None:
            if self._zone is None:
                raise Rejected(reasons.INVALID_TIMESTAMP, "timestamp has no time zone and no default_timezone is configured")
            parsed = parsed.replace(tzinfo=self._zone)
        try:
            # Year 1 at +23:59 or year 9999 at -23:59 leave datetime's range in this conversion.
            ts = parsed.timestamp()
        except (OverflowError, ValueError):
            ts = -1.0
        if not 0.0 <= ts <= MAX_TIMESTAMP:
            raise Rejected(reasons.INVALID_TIMESTAMP, "timestamp is not a plausible Unix epoch in seconds")
        return ts

    def _input(self, client: str, model: str, ts: float, mcfg: ModelConfig, modality: str | None, raw: Any) -> Event:
        if raw is None:
            raise Rejected(reasons.MISSING_INPUT, f"missing input field '{self._fields.input}'")
        # Arrays first: they are the common case, and list, str and dict exclude each other.
        if isinstance(raw, list):
            if modality == "text":
                raise Rejected(reasons.INVALID_INPUT, f"model '{model}' is text; got an array input")
            vec = _input_numbers(raw)
            expected = mcfg.input_dim or self.learned_input_dims.get(model)
            if expected is not None and vec.shape[0] != expected:
                raise Rejected(reasons.WRONG_DIMENSION, f"input has {vec.shape[0]} values; model '{model}' expects {expected}")
            if expected is None and vec.shape[0] > self._max_input_values:  # its length would be learned, and sized for
                raise Rejected(
                    reasons.TOO_MANY_VALUES, f"input has {vec.shape[0]} values, more than limits.max_input_values; configure the model's input_dim"
                )
            kind: Modality = "image" if modality == "image" else "tabular"
            event = Event(client, model, ts, kind, vector=vec)
            if kind == "image":
                event.image = _pixels_from_vector(vec, mcfg.image_shape)
            return event
        if isinstance(raw, str):
            if modality not in (None, "text"):
                raise Rejected(reasons.INVALID_INPUT, f"model '{model}' is {modality}; got a string input")
            if not raw.isascii() and not _encodable(raw):
                raise Rejected(reasons.INVALID_INPUT, "text input holds a lone surrogate (not valid Unicode)")
            return Event(client, model, ts, "text", text=raw)
        if isinstance(raw, dict):
            if "image_b64" not in raw:
                raise Rejected(reasons.INVALID_INPUT, "an object input must have an 'image_b64' key")
            if modality not in (None, "image"):
                raise Rejected(reasons.INVALID_INPUT, f"model '{model}' is {modality}; got an image input")
            try:
                pixels = decode_image(raw["image_b64"], self._max_image_pixels)
            except ImageError as exc:
                raise Rejected(reasons.IMAGE_DECODE_ERROR, str(exc)) from None
            return Event(client, model, ts, "image", image=pixels)
        raise Rejected(reasons.INVALID_INPUT, f"input must be an array of numbers, a string or an image object, got {type(raw).__name__}")

    def _output(self, event: Event, mcfg: ModelConfig, raw: Any) -> None:
        if raw is None:
            return
        if isinstance(raw, dict):
            if "label" not in raw:
                raise Rejected(reasons.INVALID_OUTPUT, "an object output must have a 'label' key")
            label = raw["label"]
            if type(label) is int and _INT64_MIN <= label <= _INT64_MAX:
                label = str(label)
            if not is_valid_name(label, MAX_LABEL_LENGTH):
                raise Rejected(
                    reasons.INVALID_OUTPUT, f"output label must be a 64-bit integer or a string of at most {MAX_LABEL_LENGTH} printable characters, without U+FFFD and not __reserved__"
                )
            score = raw.get("score")
            if score is not None:
                kind = type(score)  # exact types: a bool is not a number here
                if kind is not int and kind is not float:
                    raise Rejected(reasons.INVALID_OUTPUT, "output score must be a number")
                if kind is float and not math.isfinite(score):
                    raise Rejected(reasons.NON_FINITE, "output score is NaN or infinite")
                if not 0 <= score <= 1:  # compared as it is: float() of a 400-digit integer would raise
                    raise Rejected(reasons.NOT_PROBABILITIES, "output score must lie in [0, 1]")
                event.label_score = float(score)
            event.label = label
            return
        if not isinstance(raw, list):
            raise Rejected(reasons.INVALID_OUTPUT, f"output must be an array of probabilities or a label object, got {type(raw).__name__}")
        values = _number_array(raw, "output", reasons.INVALID_OUTPUT)
        # One Python sum is both the total and, when finite, the proof that every value is
        # finite (NaN and infinity propagate; values are JSON numbers within 64 bits here).
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
        if expected is None and values.shape[0] > self._max_classes:
            raise Rejected(reasons.TOO_MANY_VALUES, f"output has {values.shape[0]} classes, more than limits.max_classes; configure the model's num_classes")
        if mcfg.output == "logits":
            shifted = np.exp(values - values.max())
            event.probs = shifted / shifted.sum()
            return
        # Python's builtins beat numpy's reductions on the few classes models usually have.
        lowest = min(raw)
        if lowest < -1e-6 or max(raw) > 1 + 1e-6 or abs(total - 1.0) > PROBABILITY_TOLERANCE:
            # The message says what is wrong, not the values: a sum is derived from the output.
            raise Rejected(
                reasons.NOT_PROBABILITIES,
                f"output values must lie in [0, 1] and sum to 1 (within {PROBABILITY_TOLERANCE}); set output: logits for raw scores",
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


def _input_numbers(raw: list[Any]) -> np.ndarray:
    """A flat float64 array of finite values within +-MAX_INPUT_MAGNITUDE from a JSON array of numbers.

    Reasons, in this order: invalid_input (not a flat array of numbers, see
    :func:`_number_array`), non_finite (NaN, infinity), out_of_range (a value beyond
    +-MAX_INPUT_MAGNITUDE, integers of any size included).

    The common case is proved valid by one C call: ``math.hypot`` accepts only numbers
    (JSON gives int, float, bool or str, None, list, dict, which it refuses), is at least
    their largest magnitude, is NaN or infinite when a value is, and never overflows for
    finite values. So a result within the bound proves every value a finite number within
    it, and the array is built without numpy's type inference (``np.fromiter``: 1.4 us
    instead of 2.0 for 64 integers). Everything else, including arrays whose norm exceeds
    the bound with every value within it, takes the exact path, which gives the reason.
    """
    try:
        small = math.hypot(*raw) <= MAX_INPUT_MAGNITUDE
    except (OverflowError, ValueError, TypeError):
        small = False
    # An array of booleans only is not numbers (the exact path rejects it); one starting
    # with a number is, booleans counting as 0 and 1, as numpy's inference has it.
    if small and raw and type(raw[0]) is not bool:
        return np.fromiter(raw, dtype=np.float64, count=len(raw))
    arr = _number_array(raw, "input", reasons.INVALID_INPUT, reasons.OUT_OF_RANGE)
    values = arr if arr.dtype.kind == "f" else arr.astype(np.float64)
    if not np.isfinite(values).all():
        raise Rejected(reasons.NON_FINITE, "input array holds NaN or infinity")
    if np.abs(values).max() > MAX_INPUT_MAGNITUDE:
        raise Rejected(reasons.OUT_OF_RANGE, f"input array holds a value beyond +-{MAX_INPUT_MAGNITUDE:g}")
    return values


def _number_array(raw: list[Any], what: str, reason: str, huge: str | None = None) -> np.ndarray:
    """A flat numeric array from a JSON array of numbers; strings, nulls, nesting are rejected.

    Accepted is exactly what numpy's type inference makes a 1-D integer or float array of:
    numbers, and booleans mixed with numbers. An all-boolean array is rejected with
    ``reason``, and so are integers outside numpy's 64-bit ranges, which it keeps as
    Python objects (with ``huge`` instead, if given, when every value is a number). A
    float array is float64 already (JSON numbers are Python floats); values are not
    checked for finiteness here.
    """
    if not raw:
        raise Rejected(reason, f"{what} array is empty")
    try:
        arr = np.asarray(raw)  # numpy's type inference tells numbers from anything else in one pass
    except (ValueError, TypeError, OverflowError):
        arr = None
    if arr is None or arr.ndim != 1 or arr.dtype.kind not in "iuf":
        if huge is not None and all(type(v) is int or type(v) is float for v in raw):
            raise Rejected(huge, f"{what} array holds an integer beyond the 64-bit range")
        raise Rejected(reason, f"{what} array must be a flat array of numbers")
    return arr


def _encodable(text: str) -> bool:
    """Whether ``text`` is valid Unicode (no lone surrogate), i.e. encodes as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
