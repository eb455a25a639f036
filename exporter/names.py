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

Two more refusals:

- U+FFFD, the replacement character. Prometheus's PromQL lexer reads it inside a string
  literal as a decoding error, so every alert template that queries by such a label
  (``printf %q ... | query``) fails to render: a client could blank its own pages. It is
  also what decoders put in place of bytes that were not text.
- Names that begin and end with two underscores (``__other__``): the exporter's own label
  values. A client called ``__other__`` would share its series with the aggregate of the
  unflagged clients, and the alert rules, which exclude the aggregate, would never page it.

A name that breaks the rule is rejected (``invalid_client``, ``invalid_model``), never
rewritten: a rewritten id could collide with another client's. The checks are a few C
calls, and an ASCII id costs tens of nanoseconds.
"""

from __future__ import annotations

from typing import Any

MAX_CLIENT_LENGTH = 256
MAX_MODEL_LENGTH = 128
MAX_LABEL_LENGTH = 256


def is_valid_name(value: Any, max_length: int = MAX_CLIENT_LENGTH) -> bool:
    """Whether ``value`` is a non-empty ``str`` of at most ``max_length`` printable characters,
    without U+FFFD, and not in the reserved ``__name__`` form."""
    return (
        type(value) is str and 0 < len(value) <= max_length and value.isprintable() and "\ufffd" not in value
        and not (value[:2] == "__" and value[-2:] == "__")
    )
