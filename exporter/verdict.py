"""The sticky verdict: once the calibrated verdict flags a client, the client stays flagged.

The fusion (:mod:`exporter.fusion`) judges every event, and its verdict follows the
client's latest queries, so it can flicker: flagged at one query, clear at the next.
What the exporter reports as the client's verdict (``ClientState.suspicious``, the
gauge ``monitaur_client_suspicious``, the alert) is sticky instead. The first event the
fusion flags opens a :class:`FlagRecord` (when, at which query, by which detectors and
how far over their thresholds), and the client stays flagged until one of:

- an operator releases it (:meth:`Verdicts.release`, :meth:`exporter.pipeline.Pipeline.release`);
- ``verdict.hold_seconds`` (default 24 h) pass without the fusion flagging it again, the
  client being inactive or clean all that time: the flag *lapses*;
- it is evicted from the client store. Its flag then survives in the bounded
  :class:`RecentlyFlagged` record (kept in snapshots), and is restored if the client comes
  back within the hold.

Released and lapsed clients start afresh: their detector and fusion state is restarted,
so the history that flagged them does not flag them again at once (a latching detector
such as ``prada`` would). Their counters and lifetime first-flag indexes (the replay
report's ``first_flagged_query``) are kept. A lapsed client also keeps its links to other
clients, and so its group (:mod:`exporter.groups`): they expire by their own TTL.

Everything here runs under the pipeline's lock; reads go through :class:`exporter.view.ClientView`.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from exporter.logutil import RateLimitedLog, printable

if TYPE_CHECKING:
    from exporter.detectors import Batch
    from exporter.fusion import Judgement
    from exporter.metrics import Metrics
    from exporter.state import ClientState, ClientStore

log = logging.getLogger("monitaur.verdict")

RELEASED = "released"  # an operator released the client
HOLD_EXPIRED = "hold_expired"  # the hold passed without a new flag
CLEAR_CAUSES = (RELEASED, HOLD_EXPIRED)  # label values of monitaur_flags_cleared_total{cause}
_SWEEP_EVERY = 60.0  # seconds between sweeps of every flagged client for lapsed holds (at most)


@dataclass(slots=True)
class FlagRecord:
    """One flag of a client, from the verdict's first flag until it is cleared.

    Times are the pipeline's clock: wall time in ``run``, event time in ``replay``.
    ``detectors``: the fusion inputs that flagged at the first flag, each with its value
    over its calibrated threshold (1.0 = at the threshold), strongest first.
    ``group``: the linked group of coordinated clients the client belonged to at the
    flag, where the grouping stage gives one (None otherwise). ``cleared_at`` and
    ``cleared`` (a cause of :data:`CLEAR_CAUSES`) are set when the flag is cleared: the
    record is then kept as the client's history, and the client is no longer flagged.
    """

    first_at: float
    last_at: float
    first_query: int  # the client's query number at the first flag (1-based, over its life)
    last_query: int  # ... at the last event the fusion flagged
    model: str  # the model of the first flagged event
    detectors: dict[str, float] = field(default_factory=dict)
    group: str | None = None
    cleared_at: float | None = None
    cleared: str | None = None

    @property
    def open(self) -> bool:
        """Whether the flag holds: the client is flagged."""
        return self.cleared_at is None

    @property
    def strongest(self) -> str | None:
        """The detector with the largest value over its threshold at the flag (calibrated evidence)."""
        return next(iter(self.detectors), None)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for snapshots and reports (a non-finite ratio, from a threshold of 0, as None)."""
        return {
            "first_at": self.first_at,
            "last_at": self.last_at,
            "first_query": self.first_query,
            "last_query": self.last_query,
            "model": self.model,
            "detectors": {k: (round(v, 6) if math.isfinite(v) else None) for k, v in self.detectors.items()},
            "group": self.group,
            "cleared_at": self.cleared_at,
            "cleared": self.cleared,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "FlagRecord":
        return cls(
            first_at=float(raw["first_at"]),
            last_at=float(raw["last_at"]),
            first_query=int(raw["first_query"]),
            last_query=int(raw["last_query"]),
            model=str(raw["model"]),
            detectors={str(k): (float(v) if v is not None else math.inf) for k, v in raw.get("detectors", {}).items()},
            group=None if raw.get("group") is None else str(raw["group"]),
            cleared_at=None if raw.get("cleared_at") is None else float(raw["cleared_at"]),
            cleared=None if raw.get("cleared") is None else str(raw["cleared"]),
        )

    def copy(self) -> "FlagRecord":
        return replace(self, detectors=dict(self.detectors))


@dataclass(frozen=True, slots=True)
class Release:
    """An operator's release of a client: who, why, when, and the flag released."""

    at: float
    who: str
    reason: str
    flag: FlagRecord

    def as_dict(self) -> dict[str, Any]:
        return {"at": self.at, "who": self.who, "reason": self.reason, "flag": self.flag.as_dict()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Release":
        return cls(float(raw["at"]), str(raw["who"]), str(raw["reason"]), FlagRecord.from_dict(raw["flag"]))


@dataclass(frozen=True, slots=True)
class RecentFlag:
    """What is kept of a flagged client once it is evicted: its id, its flag, when and why it left."""

    client_id: str
    flag: FlagRecord
    evicted_at: float
    reason: str  # the eviction reason (exporter.state.EVICTION_REASONS)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.client_id, "flag": self.flag.as_dict(), "evicted_at": self.evicted_at, "reason": self.reason}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RecentFlag":
        return cls(str(raw["id"]), FlagRecord.from_dict(raw["flag"]), float(raw["evicted_at"]), str(raw["reason"]))


class RecentlyFlagged:
    """The flagged clients evicted most recently, at most ``limit`` (the oldest evictions drop out first).

    A few hundred bytes each; kept in snapshots. An entry leaves when the client comes
    back (its flag goes back to it, or lapses), when an operator releases it, or when
    ``limit`` newer evictions push it out.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._entries: OrderedDict[str, RecentFlag] = OrderedDict()  # least recently evicted first

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._entries

    def add(self, entry: RecentFlag) -> None:
        self._entries.pop(entry.client_id, None)
        self._entries[entry.client_id] = entry
        while len(self._entries) > self.limit:
            self._entries.popitem(last=False)

    def pop(self, client_id: str) -> RecentFlag | None:
        return self._entries.pop(client_id, None)

    def get(self, client_id: str) -> RecentFlag | None:
        return self._entries.get(client_id)

    def entries(self) -> list[RecentFlag]:
        """Every entry, least recently evicted first, as copies."""
        return [replace(e, flag=e.flag.copy()) for e in self._entries.values()]

    def open_flags(self) -> list[tuple[str, float]]:
        """(client id, time of its last flag) of every entry whose flag is open, least recently evicted first; no copies."""
        return [(e.client_id, e.flag.last_at) for e in self._entries.values() if e.flag.open]

    def state(self) -> list[dict[str, Any]]:
        return [e.as_dict() for e in self._entries.values()]

    def load(self, raw: list[dict[str, Any]]) -> None:
        """Entries of a snapshot, added after (older than) any already here; the bound applies."""
        current = list(self._entries.values())
        self._entries.clear()
        for entry in [RecentFlag.from_dict(r) for r in raw] + current:
            self.add(entry)


class Verdicts:
    """The sticky verdict of every tracked client: flags, holds, releases and evictions.

    ``forget(client_id, groups)`` drops what detectors keep about a client outside its own
    state (shared indexes), and its links in the groups if ``groups``; it is called when a
    client's detector state is restarted: with ``groups`` on release, without when a flag lapses.
    """

    def __init__(
        self,
        hold_seconds: float,
        recent: RecentlyFlagged,
        store: "ClientStore",
        metrics: "Metrics",
        forget: Callable[[str, bool], None],
        event_time: bool = False,
    ) -> None:
        self.hold_seconds = hold_seconds
        self.recent = recent
        self.store = store
        self.metrics = metrics
        self._forget = forget
        self.event_time = event_time
        self.now = -math.inf  # the latest time seen (for evictions, which come without one)
        # Bumped whenever a flag opens or clears, or the recently-flagged record changes: a
        # reader (the reaction's decision table) rebuilds what it derives from flags only then.
        self.version = 0
        self._next_sweep = -math.inf
        self._log = RateLimitedLog(log)
        metrics.recently_flagged_limit.set(recent.limit)

    # -- per batch -----------------------------------------------------------
    def returning(self, client_id: str) -> RecentFlag | None:
        """The remembered flag of an evicted client that is back, taken out of the record.

        Called before the store makes room for the client (which may evict, and so add
        to the record): the returning client's entry cannot be pushed out by that."""
        if client_id in self.store:
            return None
        entry = self.recent.pop(client_id)
        if entry is not None:
            self._recent_changed()
        return entry

    def arrive(self, client: "ClientState", now: float, returning: RecentFlag | None = None) -> None:
        """Before a client's batch is judged: a client back from eviction gets its flag back
        (``returning``, unless the hold has passed since); a lapsed flag is cleared."""
        self.now = max(self.now, now)
        if returning is not None and returning.flag.open and now - returning.flag.last_at < self.hold_seconds:
            client.flag = returning.flag
            self.store.refile(client.client_id)
            log.info("client %s is back and still flagged (first flagged at its query %d)", client.client_id, returning.flag.first_query)
        elif client.flag is not None and client.flag.open and now - client.flag.last_at >= self.hold_seconds:
            self._clear(client, HOLD_EXPIRED, now)

    def record(self, client: "ClientState", judged: "Judgement", batch: "Batch", before: int, now: float) -> bool:
        """Fold the fusion's verdict on a batch into the client's state; True if it opened a flag.

        ``before``: the client's query count before the batch; ``now``: the batch's time.
        """
        sig = judged.signals
        judged_at = np.flatnonzero(~np.isnan(sig.values))
        if judged_at.size == 0:
            return False
        last = judged_at[-1]
        client.score = float(sig.values[last])
        client.flagged_now = bool(sig.flagged[last])
        hits = np.flatnonzero(sig.flagged)
        if hits.size == 0:
            return False
        first, latest = int(hits[0]), int(hits[-1])
        if client.first_flagged_query is None:
            client.first_flagged_query = before + first + 1
            client.first_flagged_at = self._time(batch, first, now)
        if client.suspicious:
            assert client.flag is not None
            client.flag.last_at = max(client.flag.last_at, self._time(batch, latest, now))
            client.flag.last_query = before + latest + 1
            return False
        client.flag = FlagRecord(
            first_at=self._time(batch, first, now),
            last_at=self._time(batch, latest, now),
            first_query=before + first + 1,
            last_query=before + latest + 1,
            model=batch.model,
            detectors=judged.over_threshold(first),
        )
        self.version += 1
        evidence = ", ".join(f"{name} {ratio:.2f}x" for name, ratio in client.flag.detectors.items()) or "the fused risk"
        # One line per flag: a flag opens once per client and hold (the old per-flicker lines are gone).
        log.info("client %s flagged by %s at its query %d (value / threshold)", client.client_id, evidence, client.flag.first_query)
        return True

    def _time(self, batch: "Batch", i: int, now: float) -> float:
        return float(batch.events[i].ts) if self.event_time else now

    # -- outside batches -----------------------------------------------------
    def sweep(self, now: float, force: bool = False) -> int:
        """Clear the flags whose hold has passed (at most once a minute unless ``force``); return how many."""
        self.now = max(self.now, now)
        if not force and now < self._next_sweep:
            return 0
        self._next_sweep = now + min(_SWEEP_EVERY, self.hold_seconds / 10)
        due = [c for c in self.store.flagged() if c.flag is not None and now - c.flag.last_at >= self.hold_seconds]
        for client in due:
            self._clear(client, HOLD_EXPIRED, now)
        return len(due)

    def release(self, client_id: str, who: str, reason: str, now: float) -> FlagRecord | None:
        """Clear a client's flag on an operator's word and restart its detector state.

        Works for a tracked client and for one in the recently-flagged record. Returns the
        flag released, or None if the client is not flagged (nothing changes then).
        """
        self.now = max(self.now, now)
        client = self.store.get(client_id)
        if client is not None and client.suspicious:
            assert client.flag is not None
            self._clear(client, RELEASED, now, Release(now, who, reason, client.flag.copy()))
            return client.flag.copy()
        entry = self.recent.pop(client_id)
        if entry is None:
            return None
        self._recent_changed()
        self.metrics.flags_cleared.labels(RELEASED).inc()
        log.info("client %s (evicted) released by %s: %s", client_id, printable(who), printable(reason))
        return entry.flag.copy()

    def evicted(self, client: "ClientState", reason: str) -> None:
        """Keep a flagged client's flag in the recently-flagged record as it is evicted."""
        if client.flag is None or not client.flag.open:
            return
        self.recent.add(RecentFlag(client.client_id, client.flag.copy(), self.now if math.isfinite(self.now) else client.last_seen, reason))
        self._recent_changed()

    def restored(self) -> None:
        """After a snapshot restore: the record's gauge."""
        self._recent_changed()

    # -- helpers -------------------------------------------------------------
    def _clear(self, client: "ClientState", cause: str, now: float, release: Release | None = None) -> None:
        flag = client.flag
        assert flag is not None
        flag.cleared_at, flag.cleared = now, cause
        self.version += 1
        if release is not None:
            client.released = release
        restart(client, lambda client_id: self._forget(client_id, cause != HOLD_EXPIRED))
        self.store.refile(client.client_id)
        self.metrics.flags_cleared.labels(cause).inc()
        if release is not None:
            log.info("client %s released by %s: %s (flagged since its query %d)", client.client_id, printable(release.who), printable(release.reason), flag.first_query)
        else:
            self._log.log(logging.INFO, cause, "client %s: flag lapsed, not flagged again for %.0f s (flagged since its query %d)",
                          client.client_id, self.hold_seconds, flag.first_query)

    def _recent_changed(self) -> None:
        self.version += 1
        self.metrics.recently_flagged.set(len(self.recent))


def restart(client: "ClientState", forget: Callable[[str], None]) -> None:
    """Restart a client's detection: detector and fusion state, scores, risk and live verdict.

    Counters, first-flag indexes and the flag history stay (they describe the past)."""
    client.detector_state.clear()
    client.fusion_state.clear()
    client.scores.clear()
    client.current.clear()
    client.score = 0.0
    client.flagged_now = False
    forget(client.client_id)
