"""Operators' overrides of the verdict: manual blocks and releases, each with who and why.

A **block** by hand makes the decision endpoint block a client (flagged or not) until it
ends (``reaction.block_seconds`` after it was made, or never) or until a release. A
**release** clears the client's flag (:meth:`exporter.pipeline.Pipeline.release`, which
also restarts its detector state) and ends its manual block.

Overrides act on a list of clients, so that a linked group (issue 10) can be blocked or
released as one: each record then names the ``group`` it was made for.

What is kept, in ``state.dir/overrides.json``, written atomically before an override is
answered (so an answered override survives a crash): the manual blocks in force, and the
last :data:`LOG_LIMIT` overrides. A release is also in the pipeline's next snapshot; the
record lets a restart apply it again if that snapshot was not written before a crash
(:meth:`Overrides.releases`, matched to the flag it cleared by the flag's first time).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from exporter.atomic import atomic_write_bytes
from exporter.names import is_valid_name

log = logging.getLogger("monitaur.overrides")

BLOCK = "block"
RELEASE = "release"
ACTIONS = (BLOCK, RELEASE)  # label values of monitaur_overrides_total{action}
LOG_LIMIT = 1000  # overrides kept in the log (the blocks in force are kept whatever their age)
MAX_REASON = 500  # characters of an operator's reason
FILE = "overrides.json"
FORMAT = 1


class OverrideError(Exception):
    """An override that cannot be made; ``reason`` is a fixed word for programs."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Override:
    """One override: what, on which client, when, by whom (an API token's name) and why.

    ``until``: when a block ends (None: until released). ``flag_first_at``: for a release,
    the first time of the flag it cleared (None if the client had only a manual block).
    ``group``: the linked group the override was made for, if any.
    """

    action: str
    client: str
    at: float
    who: str
    reason: str
    until: float | None = None
    flag_first_at: float | None = None
    group: str | None = None

    def active(self, now: float) -> bool:
        """Whether a block is in force at ``now``."""
        return self.action == BLOCK and (self.until is None or now < self.until)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Override":
        def opt(key: str) -> float | None:
            v = raw.get(key)
            return None if v is None else float(v)

        action, client = str(raw["action"]), str(raw["client"])
        if action not in ACTIONS or not is_valid_name(client):
            raise ValueError("not an override record")
        group = raw.get("group")
        return cls(action, client, float(raw["at"]), str(raw["who"]), str(raw["reason"]), opt("until"), opt("flag_first_at"),
                   None if group is None else str(group))


def check_reason(value: Any) -> str:
    """An operator's reason: a non-empty string of at most :data:`MAX_REASON` characters (kept as given, escaped where shown)."""
    if not isinstance(value, str) or not value.strip():
        raise OverrideError("reason_required", 'a non-empty "reason" (a string) is required')
    if len(value) > MAX_REASON:
        raise OverrideError("reason_too_long", f'"reason" is longer than {MAX_REASON} characters')
    return value


class Overrides:
    """The manual blocks in force and the log of overrides; thread-safe; saved on every change.

    ``version`` is bumped on every change, so that the decision table is rebuilt only then.
    Blocks that have ended are dropped when the next override is saved.
    """

    def __init__(self, path: Path | None, max_blocks: int, log_limit: int = LOG_LIMIT) -> None:
        self.path = path
        self.max_blocks = max_blocks
        self._blocks: dict[str, Override] = {}
        self._log: deque[Override] = deque(maxlen=log_limit)
        self._latest: dict[tuple[str, str], Override] = {}  # (client, action) -> its latest record in the log
        self._lock = threading.Lock()
        self.version = 0

    # -- persistence -------------------------------------------------------------
    def load(self) -> None:
        """Read the saved overrides (none if there is no file); a file that cannot be read is set aside."""
        if self.path is None or not self.path.exists():
            return
        try:
            doc = json.loads(self.path.read_bytes())
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise ValueError(f"unknown format {doc.get('format') if isinstance(doc, dict) else None!r}")
            blocks = [Override.from_dict(r) for r in doc.get("blocks", [])]
            entries = [Override.from_dict(r) for r in doc.get("log", [])]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.error("cannot read overrides %s (%s); starting without them and keeping the file as %s", self.path, type(exc).__name__, aside)
            try:
                self.path.rename(aside)
            except OSError:
                pass
            return
        with self._lock:
            self._blocks = {b.client: b for b in blocks if b.action == BLOCK}
            for e in entries:
                self._append(e)
            self.version += 1
        log.info("loaded %d manual blocks and %d override records from %s", len(self._blocks), len(entries), self.path)

    def _append(self, entry: Override) -> None:
        """Log ``entry`` (under the lock); the oldest record drops out of a full log."""
        if self._log.maxlen is not None and len(self._log) >= self._log.maxlen:
            if not self._log:
                return  # a log that keeps nothing
            gone = self._log[0]
            if self._latest.get((gone.client, gone.action)) is gone:
                del self._latest[(gone.client, gone.action)]
        self._log.append(entry)
        self._latest[(entry.client, entry.action)] = entry

    def _save(self, now: float) -> bool:
        """Write the overrides (under the lock); whether it worked. Ended blocks are dropped first."""
        self._blocks = {c: b for c, b in self._blocks.items() if b.active(now)}
        if self.path is None:
            return True
        doc = {"format": FORMAT, "saved_at": now, "blocks": [b.as_dict() for b in self._blocks.values()],
               "log": [e.as_dict() for e in self._log]}
        try:
            atomic_write_bytes(self.path, json.dumps(doc).encode() + b"\n")
        except OSError as exc:
            log.error("cannot save overrides %s: %s; they hold until the exporter stops", self.path, exc)
            return False
        return True

    # -- overrides -----------------------------------------------------------------
    def block(self, clients: Sequence[str], who: str, reason: str, now: float, until: float | None,
              group: str | None = None) -> tuple[list[Override], bool]:
        """Block ``clients`` by hand until ``until`` (None: until released); (records, saved).

        A client already blocked gets the new block (its end and reason) in place of the
        old. Raises :class:`OverrideError` (``too_many_blocks``) beyond ``max_blocks``.
        """
        with self._lock:
            live = sum(1 for b in self._blocks.values() if b.active(now))
            new = len({c for c in clients if c not in self._blocks or not self._blocks[c].active(now)})
            if live + new > self.max_blocks:
                raise OverrideError("too_many_blocks", f"{live} manual blocks are in force; reaction.max_manual_blocks is {self.max_blocks}")
            records = [Override(BLOCK, c, now, who, reason, until=until, group=group) for c in clients]
            for r in records:
                self._blocks[r.client] = r
                self._append(r)
            self.version += 1
            return records, self._save(now)

    def release(self, released: Iterable[tuple[str, float | None]], who: str, reason: str, now: float,
                group: str | None = None) -> tuple[list[Override], bool]:
        """Record releases: ``(client, first time of the flag cleared, or None)``; end their manual blocks. (records, saved)."""
        with self._lock:
            records = [Override(RELEASE, c, now, who, reason, flag_first_at=first, group=group) for c, first in released]
            for r in records:
                self._blocks.pop(r.client, None)
                self._append(r)
            self.version += 1
            return records, self._save(now)

    # -- reads -------------------------------------------------------------------------
    def block_of(self, client: str, now: float) -> Override | None:
        """The client's manual block in force at ``now``, if any."""
        with self._lock:
            b = self._blocks.get(client)
        return b if b is not None and b.active(now) else None

    def blocks(self, now: float) -> dict[str, Override]:
        """Every manual block in force at ``now``, by client."""
        with self._lock:
            return {c: b for c, b in self._blocks.items() if b.active(now)}

    def last(self, client: str, action: str) -> Override | None:
        """The client's latest override of ``action`` in the log, if any."""
        with self._lock:
            return self._latest.get((client, action))

    def releases(self) -> list[Override]:
        """The releases in the log that cleared a flag, oldest first (to apply again after a restart)."""
        with self._lock:
            return [e for e in self._log if e.action == RELEASE and e.flag_first_at is not None]


def block_until(now: float, seconds: float | None) -> float | None:
    """When a manual block made at ``now`` ends (``reaction.block_seconds``; None: until released)."""
    return None if seconds is None or not math.isfinite(seconds) else now + seconds
