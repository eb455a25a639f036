"""A corpus of hostile event lines, each with the reason it must be rejected for.

Every kind is one JSON-lines record (no raw newline inside, at most 1 MiB) that a
client of the watched API could make the service log. The settings the corpus assumes
are :data:`SETTINGS`: model ``digits`` (tabular, 64 features, 10 classes), ``img``
(images) and ``txt`` (text), and no room for other models. Strings a client controls carry :data:`MARKER`, a forged
log line, and inputs carry :data:`SECRET`: neither may ever appear in the exporter's
log. Used by ``tests/test_hostile_input.py`` (files, push, decoder).
"""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from exporter import reasons as r

MARKER = "2031-01-01 00:00:00,000 ERROR monitaur.app: FORGED"
SECRET = 987654.321  # a recognisable "sensitive" input value
SETTINGS: dict[str, Any] = {
    "models": {
        "digits": {"modality": "tabular", "input_dim": 64, "num_classes": 10},
        "img": {"modality": "image"},
        "txt": {"modality": "text"},
    },
    # digits, img, txt and default_model fill every place: no name met in traffic is admitted
    "model_admission": {"pattern": "tenant-[0-9]+", "max_models": 4},
}


@dataclass(frozen=True)
class Hostile:
    """One kind of hostile line and the reason it must be rejected for."""

    kind: str
    line: bytes
    reason: str


def _x(n: int = 64) -> list[float]:
    return [SECRET] + [1.0] * (n - 1)


def _probs(k: int = 10) -> list[float]:
    return [1.0 / k] * k


def _event(**override: Any) -> dict[str, Any]:
    """A valid digits event with some fields replaced (a value of ``...`` removes the field)."""
    obj: dict[str, Any] = {"ts": 1764097200.5, "client": "mallory", "model": "digits", "input": _x(), "output": _probs()}
    obj.update(override)
    return {k: v for k, v in obj.items() if v is not ...}


def _line(**override: Any) -> bytes:
    return json.dumps(_event(**override)).encode()


def _raw(field: str, raw_json: str, **override: Any) -> bytes:
    """An event line whose ``field`` holds ``raw_json`` verbatim (for what json.dumps cannot write)."""
    obj = _event(**override)
    obj[field] = "@@RAW@@"
    return json.dumps(obj).replace('"@@RAW@@"', raw_json).encode()


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` RGB pixels in its header and holds almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _jpeg_scan_bomb() -> bytes:
    """A progressive 1024 x 1024 JPEG whose one 12-byte AC scan repeats ~58,000 times (7.8 s to decode before scans were capped)."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((1024, 1024), dtype=np.uint8)).save(buf, format="JPEG", progressive=True, quality=50)
    data = buf.getvalue()
    scans = [data[m.start() : data.index(b"\xff", m.start() + 2)] for m in re.finditer(b"\xff\xda", data)]
    smallest = min(scans, key=len)
    return data[:-2] + smallest * (680_000 // len(smallest)) + b"\xff\xd9"


def _image(data: bytes | str, model: str = "img") -> bytes:
    b64 = data if isinstance(data, str) else base64.b64encode(data).decode()
    return _line(model=model, input={"image_b64": b64}, output=...)


def corpus() -> list[Hostile]:
    """Every kind, in a fixed order; kinds are unique."""
    m = MARKER
    valid = _line()
    kinds: list[tuple[str, bytes, str]] = [
        # -- poison pills of the issue: numbers and dates that overflow on conversion
        ("ts: a 400-digit integer", _raw("ts", "1" * 400), r.INVALID_TIMESTAMP),
        ("ts: a negative 400-digit integer", _raw("ts", "-" + "1" * 400), r.INVALID_TIMESTAMP),
        ("ts: year 1 at +23:59", _line(ts="0001-01-01T00:00:00+23:59"), r.INVALID_TIMESTAMP),
        ("ts: year 9999 at -23:59", _line(ts="9999-12-31T23:59:59-23:59"), r.INVALID_TIMESTAMP),
        ("label score: a 400-digit integer", _raw("output", '{"label": "cat", "score": ' + "1" * 400 + "}"), r.NOT_PROBABILITIES),
        ("label score: a negative 400-digit integer", _raw("output", '{"label": "cat", "score": -' + "1" * 400 + "}"), r.NOT_PROBABILITIES),
        # -- other timestamps
        ("ts: 1e400 (infinite once parsed)", _raw("ts", "1e400"), r.INVALID_TIMESTAMP),
        ("ts: NaN", _raw("ts", "NaN"), r.INVALID_TIMESTAMP),
        ("ts: -Infinity", _raw("ts", "-Infinity"), r.INVALID_TIMESTAMP),
        ("ts: negative", _line(ts=-1.5), r.INVALID_TIMESTAMP),
        ("ts: after year 3000", _line(ts=4e10), r.INVALID_TIMESTAMP),
        ("ts: a boolean", _line(ts=True), r.INVALID_TIMESTAMP),
        ("ts: year 2999, far after the exporter's clock", _line(ts=32503679999.0), r.FUTURE_TIMESTAMP),
        ("ts: an object", _line(ts={"$date": 1}), r.INVALID_TIMESTAMP),
        ("ts: an array", _line(ts=[1764097200]), r.INVALID_TIMESTAMP),
        ("ts: not a date", _line(ts=f"yesterday {m}"), r.INVALID_TIMESTAMP),
        ("ts: no time zone", _line(ts="2025-11-25T19:00:00"), r.INVALID_TIMESTAMP),
        ("ts: February 30", _line(ts="2025-02-30T00:00:00Z"), r.INVALID_TIMESTAMP),
        ("ts: year 1", _line(ts="0001-01-01T00:00:00Z"), r.INVALID_TIMESTAMP),
        ("ts: a 100 kB string", _line(ts="2025-11-25T19:00:00Z" + " " * 100_000), r.INVALID_TIMESTAMP),
        ("ts: offset beyond a day", _line(ts="2025-11-25T19:00:00+24:00"), r.INVALID_TIMESTAMP),
        # -- client ids: unsafe characters, planted log lines, wrong types, giant ids
        ("client: a lone high surrogate", _line(client="\ud800x"), r.INVALID_CLIENT),
        ("client: a lone low surrogate", _line(client="x\udfff"), r.INVALID_CLIENT),
        ("client: newline and a forged log line", _line(client=f"mallory\n{m}"), r.INVALID_CLIENT),
        ("client: carriage return and a forged log line", _line(client=f"mallory\r{m}"), r.INVALID_CLIENT),
        ("client: CRLF and a forged log line", _line(client=f"mallory\r\n{m}"), r.INVALID_CLIENT),
        ("client: NUL", _line(client="mallory\x00admin"), r.INVALID_CLIENT),
        ("client: terminal escape", _line(client="mallory\x1b[2J\x1b[31m"), r.INVALID_CLIENT),
        ("client: DEL", _line(client="mallory\x7f"), r.INVALID_CLIENT),
        ("client: C1 next line (U+0085)", _line(client=f"mallory\u0085{m}"), r.INVALID_CLIENT),
        ("client: C1 CSI (U+009B)", _line(client="mallory\u009b31m"), r.INVALID_CLIENT),
        ("client: line separator (U+2028)", _line(client=f"mallory\u2028{m}"), r.INVALID_CLIENT),
        ("client: paragraph separator (U+2029)", _line(client=f"mallory\u2029{m}"), r.INVALID_CLIENT),
        ("client: right-to-left override", _line(client="mallory\u202eyrollam"), r.INVALID_CLIENT),
        ("client: zero-width space", _line(client="mal\u200blory"), r.INVALID_CLIENT),
        ("client: byte-order mark inside", _line(client="\ufeffmallory"), r.INVALID_CLIENT),
        ("client: no-break space", _line(client="mallory\u00a0"), r.INVALID_CLIENT),
        ("client: tab", _line(client="mallory\tadmin"), r.INVALID_CLIENT),
        ("client: private-use character", _line(client="mallory\ue000"), r.INVALID_CLIENT),
        ("client: the replacement character (U+FFFD)", _line(client="mal\ufffdlory"), r.INVALID_CLIENT),
        ("client: the exporter's aggregate __other__", _line(client="__other__"), r.INVALID_CLIENT),
        ("client: a __reserved__ name", _line(client="__admin__"), r.INVALID_CLIENT),
        ("client: 257 characters", _line(client="k" * 257), r.INVALID_CLIENT),
        ("client: 500,000 characters", _line(client="k" * 500_000), r.INVALID_CLIENT),
        ("client: an integer", _line(client=17), r.INVALID_CLIENT),
        ("client: a 400-digit integer", _raw("client", "9" * 400), r.INVALID_CLIENT),
        ("client: a boolean", _line(client=True), r.INVALID_CLIENT),
        ("client: an array", _line(client=["mallory", m]), r.INVALID_CLIENT),
        ("client: an object", _line(client={"id": m}), r.INVALID_CLIENT),
        ("client: NaN", _raw("client", "NaN"), r.INVALID_CLIENT),
        ("client: null", _line(client=None), r.MISSING_CLIENT),
        ("client: empty", _line(client=""), r.MISSING_CLIENT),
        ("client: absent", _line(client=...), r.MISSING_CLIENT),
        ("client: duplicate key, the last one bad", valid.replace(b'"client": "mallory"', b'"client": "mallory", "client": "x\\n' + m.encode() + b'"'), r.INVALID_CLIENT),
        # -- model names
        ("model: a lone surrogate", _line(model="digits\udc00"), r.INVALID_MODEL),
        ("model: newline and a forged log line", _line(model=f"digits\n{m}"), r.INVALID_MODEL),
        ("model: line separator", _line(model=f"digits\u2028{m}"), r.INVALID_MODEL),
        ("model: right-to-left override", _line(model="\u202estigid"), r.INVALID_MODEL),
        ("model: terminal escape", _line(model="digits\x1b]0;title\x07"), r.INVALID_MODEL),
        ("model: the replacement character (U+FFFD)", _line(model="digits\ufffd"), r.INVALID_MODEL),
        ("model: a __reserved__ name", _line(model="__other__"), r.INVALID_MODEL),
        ("model: 129 characters", _line(model="m" * 129), r.INVALID_MODEL),
        ("model: empty", _line(model=""), r.INVALID_MODEL),
        ("model: an integer", _line(model=3), r.INVALID_MODEL),
        ("model: an array", _line(model=["digits"]), r.INVALID_MODEL),
        ("model: a name outside model_admission", _line(model="mallory-model"), r.MODEL_NOT_ALLOWED),
        ("model: 128 characters, not admitted", _line(model="m" * 128), r.MODEL_NOT_ALLOWED),
        ("model: an admitted pattern past max_models", _line(model="tenant-1"), r.TOO_MANY_MODELS),
        # -- not JSON, or not UTF-8 JSON
        ("truncated in the middle", valid[: len(valid) // 2], r.MALFORMED_JSON),
        ("truncated inside a string", b'{"client": "mallo', r.MALFORMED_JSON),
        ("trailing garbage", valid + b" x", r.MALFORMED_JSON),
        ("two objects on one line", valid + valid, r.MALFORMED_JSON),
        ("UTF-8 byte-order mark", b"\xef\xbb\xbf" + valid, r.MALFORMED_JSON),
        ("UTF-16-LE with BOM", valid.decode().encode("utf-16"), r.MALFORMED_JSON),
        ("UTF-16-BE without BOM", valid.decode().encode("utf-16-be"), r.MALFORMED_JSON),
        ("UTF-32", valid.decode().encode("utf-32"), r.MALFORMED_JSON),
        ("invalid UTF-8 byte in a string", valid.replace(b"mallory", b"mall\xffry"), r.MALFORMED_JSON),
        ("overlong UTF-8 encoding", valid.replace(b"mallory", b"mall\xc0\xafry"), r.MALFORMED_JSON),
        ("a surrogate encoded in UTF-8", valid.replace(b"mallory", b"mall\xed\xa0\x80ry"), r.MALFORMED_JSON),
        ("a raw NUL byte", valid.replace(b", ", b",\x00 ", 1), r.MALFORMED_JSON),
        ("a raw control character in a string", valid.replace(b"mallory", b"mall\x01ry"), r.MALFORMED_JSON),
        ("a raw form feed in a string", valid.replace(b"mallory", b"mall\x0cry"), r.MALFORMED_JSON),
        ("nested 100,000 deep", b'{"client": "mallory", "input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", r.MALFORMED_JSON),
        ("nested objects 5,000 deep", b'{"a": ' * 5000 + b"1" + b"}" * 5000, r.MALFORMED_JSON),
        ("single quotes", valid.replace(b'"', b"'"), r.MALFORMED_JSON),
        ("a comment", b"/* " + m.encode() + b" */ " + valid, r.MALFORMED_JSON),
        ("unquoted keys", b"{client: 1}", r.MALFORMED_JSON),
        ("a 5,000-digit integer", _raw("ts", "1" * 5000), r.MALFORMED_JSON),  # beyond Python's int parsing limit
        ("only NUL bytes", b"\x00" * 64, r.MALFORMED_JSON),
        ("only a BOM", b"\xef\xbb\xbf", r.MALFORMED_JSON),
        # -- JSON, but not an object
        ("null", b"null", r.NOT_AN_OBJECT),
        ("an array of events", b"[" + valid + b"]", r.NOT_AN_OBJECT),
        ("a string", json.dumps(m).encode(), r.NOT_AN_OBJECT),
        ("a number", b"42", r.NOT_AN_OBJECT),
        ("true", b"true", r.NOT_AN_OBJECT),
        ("an empty object", b"{}", r.MISSING_CLIENT),
        # -- inputs
        ("input: absent", _line(input=...), r.MISSING_INPUT),
        ("input: null", _line(input=None), r.MISSING_INPUT),
        ("input: a number", _line(input=SECRET), r.INVALID_INPUT),
        ("input: a boolean", _line(input=True), r.INVALID_INPUT),
        ("input: nested arrays", _line(input=[_x(32), _x(32)]), r.INVALID_INPUT),
        ("input: a null inside", _line(input=_x(63) + [None]), r.INVALID_INPUT),
        ("input: a string inside", _line(input=_x(63) + ["1"]), r.INVALID_INPUT),
        ("input: an object inside", _line(input=_x(63) + [{}]), r.INVALID_INPUT),
        ("input: only booleans", _line(input=[True] * 64), r.INVALID_INPUT),
        ("input: empty", _line(input=[]), r.INVALID_INPUT),
        ("input: text to a tabular model", _line(input=f"hello {m}"), r.INVALID_INPUT),
        ("input: an object without image_b64", _line(input={"pixels": _x()}), r.INVALID_INPUT),
        ("input: an image to a tabular model", _line(input={"image_b64": base64.b64encode(_png(np.zeros((8, 8, 3), np.uint8))).decode()}), r.INVALID_INPUT),
        ("input: text with a lone surrogate", _line(model="txt", input="ab\udc00cd", output=...), r.INVALID_INPUT),
        ("input: an array to a text model", _line(model="txt", input=_x(), output=...), r.INVALID_INPUT),
        ("input: NaN", _raw("input", json.dumps(_x(63))[:-1] + ", NaN]"), r.NON_FINITE),
        ("input: Infinity", _raw("input", "[Infinity" + ", 1.0" * 63 + "]"), r.NON_FINITE),
        ("input: -Infinity", _raw("input", "[-Infinity" + ", 1.0" * 63 + "]"), r.NON_FINITE),
        ("input: 1e400", _raw("input", "[1e400" + ", 1.0" * 63 + "]"), r.NON_FINITE),
        ("input: a 400-digit integer", _raw("input", "[" + "7" * 400 + ", 1.0" * 63 + "]"), r.OUT_OF_RANGE),
        ("input: 2**64", _raw("input", f"[{2**64}" + ", 1" * 63 + "]"), r.OUT_OF_RANGE),
        ("input: 2**63 - 1", _raw("input", f"[{2**63 - 1}" + ", 1" * 63 + "]"), r.OUT_OF_RANGE),
        ("input: 1e300 (squares overflow)", _line(input=[1e300] + _x(63)), r.OUT_OF_RANGE),
        ("input: -1e16", _line(input=_x(63) + [-1e16]), r.OUT_OF_RANGE),
        ("input: 63 values", _line(input=_x(63)), r.WRONG_DIMENSION),
        ("input: 100,000 values", _line(input=[1.0] * 100_000), r.WRONG_DIMENSION),
        ("input: 5,000 values for a model of unknown length", _line(model="img", input=[1.0] * 5000, output=...), r.TOO_MANY_VALUES),
        # -- outputs
        ("output: NaN", _raw("output", "[NaN" + ", 0.1" * 9 + "]"), r.NON_FINITE),
        ("output: Infinity", _raw("output", "[Infinity" + ", 0.1" * 9 + "]"), r.NON_FINITE),
        ("output: summing to 2", _line(output=[0.2] * 10), r.NOT_PROBABILITIES),
        ("output: negative", _line(output=[-0.5, 1.5] + [0.0] * 8), r.NOT_PROBABILITIES),
        ("output: above 1", _line(output=[1e300, 0.0] + [0.0] * 8), r.NOT_PROBABILITIES),
        ("output: a string", _line(output=m), r.INVALID_OUTPUT),
        ("output: a number", _line(output=0.9), r.INVALID_OUTPUT),
        ("output: one class", _line(output=[1.0]), r.INVALID_OUTPUT),
        ("output: nested", _line(output=[_probs(5), _probs(5)]), r.INVALID_OUTPUT),
        ("output: booleans", _line(output=[True, False] * 5), r.INVALID_OUTPUT),
        ("output: 2**64", _raw("output", f"[{2**64}" + ", 0" * 9 + "]"), r.INVALID_OUTPUT),
        ("output: a 400-digit integer", _raw("output", "[" + "1" * 400 + ", 0" * 9 + "]"), r.INVALID_OUTPUT),
        ("output: 3 classes", _line(output=[0.2, 0.3, 0.5]), r.WRONG_DIMENSION),
        ("output: 5,000 classes for a model of unknown class count", _line(model="txt", input="hello", output=[1 / 5000] * 5000), r.TOO_MANY_VALUES),
        ("label: no label key", _line(output={"score": 0.5}), r.INVALID_OUTPUT),
        ("label: a boolean", _line(output={"label": True}), r.INVALID_OUTPUT),
        ("label: a 400-digit integer", _raw("output", '{"label": ' + "9" * 400 + "}"), r.INVALID_OUTPUT),
        ("label: newline and a forged log line", _line(output={"label": f"cat\n{m}"}), r.INVALID_OUTPUT),
        ("label: a lone surrogate", _line(output={"label": "cat\ud800"}), r.INVALID_OUTPUT),
        ("label: 100,000 characters", _line(output={"label": "c" * 100_000}), r.INVALID_OUTPUT),
        ("label: an object", _line(output={"label": {"name": "cat"}}), r.INVALID_OUTPUT),
        ("label score: 2", _line(output={"label": "cat", "score": 2}), r.NOT_PROBABILITIES),
        ("label score: NaN", _raw("output", '{"label": "cat", "score": NaN}'), r.NON_FINITE),
        ("label score: a string", _line(output={"label": "cat", "score": "0.5"}), r.INVALID_OUTPUT),
        ("label score: a boolean", _line(output={"label": "cat", "score": True}), r.INVALID_OUTPUT),
        # -- images that are not images, or too large
        ("image: the issue's 4096 x 4096 PNG of zeros", _image(_png(np.zeros((4096, 4096), np.uint8))), r.IMAGE_DECODE_ERROR),
        ("image: a header claiming 65535 x 65535", _image(_png_header(65535, 65535)), r.IMAGE_DECODE_ERROR),
        ("image: a header claiming 1 x 2,000,000", _image(_png_header(1, 2_000_000)), r.IMAGE_DECODE_ERROR),
        ("image: a 1024 x 1024 header with no pixel data", _image(_png_header(1024, 1024)), r.IMAGE_DECODE_ERROR),
        ("image: a progressive JPEG with 56,000 scans", _image(_jpeg_scan_bomb()), r.IMAGE_DECODE_ERROR),
        ("image: a GIF", _image(b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x00\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"), r.IMAGE_DECODE_ERROR),
        ("image: a BMP header", _image(b"BM" + b"\x00" * 60), r.IMAGE_DECODE_ERROR),
        ("image: a PNG signature only", _image(b"\x89PNG\r\n\x1a\n"), r.IMAGE_DECODE_ERROR),
        ("image: a PNG with a broken CRC", _image(_png(np.zeros((8, 8, 3), np.uint8))[:29] + b"\x00\x00\x00\x00" + _png(np.zeros((8, 8, 3), np.uint8))[33:]), r.IMAGE_DECODE_ERROR),
        ("image: a truncated PNG", _image(_png(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3))[:100]), r.IMAGE_DECODE_ERROR),
        ("image: a JPEG start and garbage", _image(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4), r.IMAGE_DECODE_ERROR),
        ("image: text", _image(m.encode()), r.IMAGE_DECODE_ERROR),
        ("image: empty", _image(""), r.IMAGE_DECODE_ERROR),
        ("image: not base64", _image(f"%%% {m} %%%"), r.IMAGE_DECODE_ERROR),
        ("image: a data URL", _image("data:image/png;base64," + base64.b64encode(_png(np.zeros((8, 8, 3), np.uint8))).decode()), r.IMAGE_DECODE_ERROR),
        ("image: image_b64 is a number", _line(model="img", input={"image_b64": 12345}, output=...), r.IMAGE_DECODE_ERROR),
        ("image: image_b64 is null", _line(model="img", input={"image_b64": None}, output=...), r.IMAGE_DECODE_ERROR),
        ("image: to a text model", _image(_png(np.zeros((8, 8, 3), np.uint8)), model="txt"), r.INVALID_INPUT),
    ]
    out = [Hostile(kind, line, reason) for kind, line, reason in kinds]
    assert len({h.kind for h in out}) == len(out), "kinds must be unique"
    return out
