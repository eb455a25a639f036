"""Logging helpers: rate limiting, so a flood of bad input cannot flood the log, and
escaping, so that no text a client controls can forge a log line.

Escaping is done once, for every record, by :class:`EscapingFilter` on the handler the
CLI installs (:func:`escaping_handler`): every record that reaches the log is escaped
whatever logger or call site made it, so a new log call cannot forget it.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def escape(text: str) -> str:
    """``text`` with every non-printable character as a Python escape (``\\n``, ``\\x1b``, ``\\u2028``, ``\\ud800``).

    Non-printable is ``not str.isprintable()``: C0 and C1 controls, DEL, line and
    paragraph separators, format characters (bidi overrides), lone surrogates. Printable
    text is returned as it is, at the cost of one C call.
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def printable(text: str, limit: int = 200) -> str:
    """Operator-given text for a log line: escaped (as every record is again by the log handler), length bounded."""
    return escape(text[:limit]) + ("..." if len(text) > limit else "")


def _escape_block(text: str) -> str:
    """A traceback or stack: each line escaped and indented, so that none can pass for a record of its own."""
    return "\n".join("    " + escape(line) for line in text.split("\n"))


class EscapingFilter(logging.Filter):
    """Escapes each record once: the formatted message on one line, tracebacks line by line.

    Installed on a handler, it sees the records of every logger that reach it. A record
    is marked when escaped, so several handlers with the filter do not escape it twice.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "monitaur_escaped", False):
            return True
        record.monitaur_escaped = True
        try:
            message = record.getMessage()
        except Exception as exc:  # a broken format string must not break the caller
            message = f"unformattable log message {record.msg!r} ({type(exc).__name__})"
        record.msg, record.args = escape(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = _escape_block(record.exc_text)
        if record.stack_info:
            record.stack_info = _escape_block(record.stack_info)
        return True


def escaping_handler(stream: TextIO | None = None) -> logging.Handler:
    """The exporter's log handler: ``LOG_FORMAT`` lines on ``stream`` (stderr), every record escaped."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(EscapingFilter())
    return handler


class RateLimitedLog:
    """Logs the first message per key, then at most one per ``interval`` seconds, with a count of those suppressed."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0, max_keys: int = 1000) -> None:
        self.logger = logger
        self.interval = interval
        self.max_keys = max_keys
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        if len(self._last) >= self.max_keys and key not in self._last:
            self._last.clear()
            self._suppressed.clear()
        suppressed = self._suppressed.pop(key, 0)
        self._last[key] = now
        if suppressed:
            msg += " (%d similar messages suppressed)"
            args = (*args, suppressed)
        self.logger.log(level, msg, *args)
