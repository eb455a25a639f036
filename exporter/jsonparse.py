"""JSON parsing for the hot path: the standard library's result, at orjson's speed.

Python's ``json.loads`` is the reference: it is what every source accepted before, and
it reads what Python model services write with ``json.dumps`` (``NaN``, ``Infinity``),
so that such values are rejected as non-finite rather than as malformed JSON. orjson
parses a typical event line about 4x faster (2.5 µs instead of 10.7 for 64 features)
and returns the same objects for standard JSON, with two exceptions, both handed to
``json.loads`` instead:

- what orjson refuses (``NaN``, ``Infinity``, numbers beyond the float range, lone
  surrogate escapes, a UTF-8 byte-order mark, UTF-16/32 input);
- integers beyond 64 bits, which orjson turns into floats where ``json`` keeps them
  exact: any line holding a run of 19 or more digits goes to ``json`` (a cheap byte
  scan; legitimate lines almost never have such runs, and those that do are merely
  parsed more slowly).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

_DIGITS_AS_ZERO = bytes(0x30 if 0x30 <= b <= 0x39 else b for b in range(256))
_LONG_NUMBER = b"0" * 19  # 10**18 is the largest power of ten below 2**63


def loads(data: bytes | str) -> Any:
    """Parse one JSON document exactly as ``json.loads`` would.

    Raises ``ValueError`` (``json.JSONDecodeError``, or ``UnicodeDecodeError`` for bytes
    that are not valid text) for anything ``json.loads`` rejects, and also for nesting
    too deep for it, which ``json.loads`` reports as a ``RecursionError``.
    """
    if type(data) is bytes and _LONG_NUMBER not in data.translate(_DIGITS_AS_ZERO):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # the reference decides, and words the error
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
