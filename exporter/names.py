"""Which client-controlled names (client ids, model names, labels) the exporter accepts.

A name ends up in Prometheus labels, log lines, Alertmanager messages and HTML pages,
so it must be valid text that cannot break any of them. The rule is Python's
``str.isprintable()``: no character of the Unicode categories

- Cc (C0 and C1 controls, DEL: newlines and terminal escapes that forge log lines),
- Cs (lone surrogates: not encodable as UTF-8, they break every scrape of /metrics),
- Zl, Zp (U+2028, U+2029: line breaks to some log viewers and JavaScript),
- Cf (format characters: bidi overrides such as U+202E and zero-width characters,
  which make one id look like another on a dashboard),
- Co, Cn (private use and unassigned code points),
- Zs other than the ASCII space (no-break and other spaces that look like a space).

A name that breaks the rule is rejected (``invalid_client``, ``invalid_model``), never
rewritten: a rewritten id could collide with another client's. The check is one C call,
and an ASCII id costs tens of nanoseconds.
"""

from __future__ import annotations

from typing import Any

MAX_CLIENT_LENGTH = 256
MAX_MODEL_LENGTH = 128
MAX_LABEL_LENGTH = 256


def is_valid_name(value: Any, max_length: int = MAX_CLIENT_LENGTH) -> bool:
    """Whether ``value`` is a non-empty ``str`` of at most ``max_length`` printable characters."""
    return type(value) is str and 0 < len(value) <= max_length and value.isprintable()
