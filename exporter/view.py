"""A read-only view of client state, for scrapes, the landing page and the HTTP APIs.

Readers (the metrics collector, the HTTP server) get this view instead of the pipeline's
lock, store and runtimes: every read takes the lock, and what leaves the view is either
computed under it or a copy, so no reader can change state or see it half-updated.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Iterable, TypeVar

from exporter.logutil import RateLimitedLog

if TYPE_CHECKING:
    from exporter.groups import GroupSummary
    from exporter.runtime import Runtimes
    from exporter.state import ClientState, ClientStore
    from exporter.verdict import FlagRecord, RecentFlag, RecentlyFlagged, Release

log = logging.getLogger("monitaur.view")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ClientSummary:
    """What the landing page, a client's page and the clients API show of a client.

    ``score``: the current fused risk; ``suspicious``: the sticky verdict; ``flag``: its
    record (a copy) while flagged, or its last flag once cleared; ``detectors_on``: the
    detectors flagging it now; ``released``: the operator's last release. Per detector:
    ``scores`` (its last value) and ``first_flagged`` (the client's query at its first flag).
    """

    client_id: str
    score: float
    suspicious: bool
    detectors_on: tuple[str, ...]
    queries: int
    flag: "FlagRecord | None" = None
    released: "Release | None" = None
    queries_by_model: dict[str, int] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    first_flagged: dict[str, int] = field(default_factory=dict)
    first_flagged_query: int | None = None
    last_seen: float | None = None


def summary(c: "ClientState") -> ClientSummary:
    """A client's summary (under the lock: it copies what it keeps)."""
    return ClientSummary(c.client_id, c.score, c.suspicious, tuple(n for n, on in c.current.items() if on), c.total,
                         c.flag.copy() if c.flag is not None else None, c.released, dict(c.queries), dict(c.scores),
                         dict(c.first_flagged), c.first_flagged_query, c.last_seen)


class ClientView:
    """Read-only access to the tracked clients, their flags and their cross-client evidence."""

    def __init__(self, lock: threading.RLock, store: "ClientStore", runtimes: "Runtimes", recent: "RecentlyFlagged | None" = None,
                 groups: "Callable[[str | None], list[GroupSummary]] | None" = None) -> None:
        self._lock = lock
        self._store = store
        self._runtimes = runtimes
        self._recent = recent
        self._groups = groups or (lambda only: [])  # every group (None), or only one
        self._errors = RateLimitedLog(log, interval=60.0)

    def read(self, fn: Callable[[Iterable["ClientState"]], T]) -> T:
        """``fn(clients)`` under the lock; ``fn`` must only read, and return no live state."""
        with self._lock:
            return fn(self._store.values())

    def tracked(self) -> int:
        with self._lock:
            return len(self._store)

    def flagged(self, limit: int) -> list[ClientSummary]:
        """The flagged clients, the most recently flagged first, at most ``limit``."""
        with self._lock:
            found = sorted(self._store.flagged(), key=lambda c: c.flag.first_at if c.flag is not None else 0.0, reverse=True)[:limit]
            return [summary(c) for c in found]

    def client(self, client_id: str) -> ClientSummary | None:
        """One tracked client's summary, with its flag record while it is flagged; None if not tracked."""
        with self._lock:
            c = self._store.get(client_id)
            return summary(c) if c is not None else None

    def flagged_ids(self) -> tuple[list[str], list[tuple[str, float]]]:
        """The ids of flagged clients: the tracked ones, and the evicted ones whose flag is
        open with the time of its last flag (the hold counts from there). Ids only, cheap."""
        with self._lock:
            tracked = [c.client_id for c in self._store.flagged()]
            recent = self._recent.open_flags() if self._recent is not None else []
            return tracked, recent

    def recently_flagged_one(self, client_id: str) -> "RecentFlag | None":
        """An evicted flagged client's entry in the recently-flagged record (a copy), if it is there."""
        if self._recent is None:
            return None
        with self._lock:
            entry = self._recent.get(client_id)
            return replace(entry, flag=entry.flag.copy()) if entry is not None else None

    def recently_flagged(self) -> list["RecentFlag"]:
        """Flagged clients that were evicted (id, flag record, when and why), least recently evicted first; copies."""
        if self._recent is None:
            return []
        with self._lock:
            return self._recent.entries()

    def peer_matches(self, client_id: str) -> tuple[int, dict[str, int]]:
        """Cross-client evidence for a client, summed over models and detectors."""
        total, peers = 0, {}
        with self._lock:
            for _, rt in self._runtimes:
                for det in rt.detectors:
                    n, p = det.peer_matches(client_id)
                    total += n
                    for other, k in p.items():
                        peers[other] = peers.get(other, 0) + k
        return total, peers

    def client_values(self, client: "ClientState") -> list[tuple[str, str, float]]:
        """(metric, model, value) of the detectors' per-client statistics (``Detector.client_metrics``).

        A detector that fails here is logged (rate-limited) and left out; the scrape goes on.
        """
        out: list[tuple[str, str, float]] = []
        with self._lock:
            for model, per in client.detector_state.items():
                rt = self._runtimes.get(model)
                for det in rt.detectors if rt is not None else ():
                    state = per.get(det.name)
                    if not det.client_metrics or state is None:
                        continue
                    try:
                        values = det.client_values(state)
                    except Exception as exc:
                        self._errors.log(logging.ERROR, f"{det.name}:client_values", "detector %s failed to report client statistics: %s", det.name, type(exc).__name__)
                        continue
                    out += [(name, model, float(v)) for name, v in values.items() if math.isfinite(v)]
        return out

    # -- groups of linked clients (exporter.groups) --------------------------------------
    def groups(self) -> list["GroupSummary"]:
        """Every group of linked clients, flagged first, then by score (copies)."""
        with self._lock:
            return self._groups(None)

    def group(self, group_id: str) -> "GroupSummary | None":
        """One group with its members and their link strength; None if there is no such group (any more)."""
        with self._lock:
            return next(iter(self._groups(group_id)), None)
