"""Bounded per-client state: an LRU of clients with an idle TTL, which evicts flagged clients last.

Each client keeps its counters, its verdict (the sticky flag of :mod:`exporter.verdict`,
and the fusion's verdict on its latest event) and, per model and detector, the
detector's explicit state. The store never holds more than ``max_clients`` clients, and
clients idle for longer than the TTL are swept as new events arrive. Beyond the bound,
the least recently seen client that is *not flagged* is evicted first: an attacker who
floods fresh client ids pushes out unflagged clients only, never the flagged ones, which
leave by the TTL, or when every tracked client is flagged.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

from exporter.detectors.base import State

if TYPE_CHECKING:
    from exporter.verdict import FlagRecord, Release


@dataclass(slots=True)
class ClientState:
    """Everything known about one client."""

    client_id: str
    last_seen: float
    total: int = 0
    queries: dict[str, int] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    current: dict[str, bool] = field(default_factory=dict)
    flags: dict[str, int] = field(default_factory=dict)
    first_flagged: dict[str, int] = field(default_factory=dict)
    first_flagged_query: int | None = None  # the verdict's first flag over the client's life (1-based query index)
    first_flagged_at: float | None = None  # ... and its time (the pipeline's clock)
    flag: "FlagRecord | None" = None  # the latest flag (exporter.verdict): open while the client is flagged, then kept as history
    released: "Release | None" = None  # the operator's last release of the client, if any
    flagged_now: bool = False  # the fusion's verdict after the client's last judged event (it may flicker)
    score: float = 0.0  # the fused risk after the client's last judged event
    detector_state: dict[str, dict[str, State]] = field(default_factory=dict)  # model -> detector -> state
    fusion_state: dict[str, State] = field(default_factory=dict)  # model -> the fusion stage's state

    @property
    def suspicious(self) -> bool:
        """The client's verdict: flagged, and staying so until released, lapsed or evicted."""
        return self.flag is not None and self.flag.open


EVICTION_REASONS = ("lru", "lru_flagged", "ttl")  # label values of monitaur_client_evictions_total{reason}


class ClientStore:
    """LRU + idle-TTL map of client id -> :class:`ClientState`, flagged clients evicted last.

    Two LRU orders, each least recently seen first: clients whose verdict is not flagged,
    and flagged clients (``ClientState.suspicious``). Beyond ``max_clients``, the first
    of the unflagged order is evicted (reason ``lru``); a flagged client only when every
    tracked client is flagged (``lru_flagged``). The TTL applies to both (``ttl``). Each
    operation costs O(1) per client touched or evicted, never a scan.

    A client is filed by its verdict, which changes while its batch is judged, after
    :meth:`touch`. So the client touched last is filed again at the store's next
    operation, before any eviction is decided; code that changes a verdict otherwise
    calls :meth:`refile`.
    """

    def __init__(self, max_clients: int, idle_ttl: float, on_evict: Callable[[ClientState, str], None] | None = None) -> None:
        self.max_clients = max_clients
        self.idle_ttl = idle_ttl
        self.on_evict = on_evict
        self._clients: dict[str, ClientState] = {}
        self._calm: OrderedDict[str, ClientState] = OrderedDict()  # not flagged, least recently seen first
        self._flagged: OrderedDict[str, ClientState] = OrderedDict()
        self._last: ClientState | None = None  # the client touched last: its verdict may have changed since

    def __len__(self) -> int:
        return len(self._clients)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._clients

    def __getitem__(self, client_id: str) -> ClientState:
        return self._clients[client_id]

    def get(self, client_id: str) -> ClientState | None:
        return self._clients.get(client_id)

    def values(self) -> Iterator[ClientState]:
        """Every client, in eviction order: the unflagged, then the flagged, each least recently seen first."""
        self._settle()
        return iter([*self._calm.values(), *self._flagged.values()])

    def flagged(self) -> list[ClientState]:
        """The flagged clients, least recently seen first (a copy of the list)."""
        self._settle()
        return list(self._flagged.values())

    def touch(self, client_id: str, now: float) -> ClientState:
        """Return the client's state, creating it; mark it most recently seen at ``now``."""
        self.expire(now)
        state = self._clients.get(client_id)
        if state is None:
            while len(self._clients) >= self.max_clients:
                self._evict_lru()
            state = self._clients[client_id] = self._calm[client_id] = ClientState(client_id, now)
        else:
            self.refile(client_id)
            (self._flagged if state.suspicious else self._calm).move_to_end(client_id)
            state.last_seen = max(state.last_seen, now)
        self._last = state
        return state

    def refile(self, client_id: str) -> None:
        """File a client by its current verdict (``suspicious``); moved, it counts as most recently seen."""
        state = self._clients.get(client_id)
        if state is None:
            return
        src, dst = (self._calm, self._flagged) if state.suspicious else (self._flagged, self._calm)
        if client_id in src:
            del src[client_id]
            dst[client_id] = state

    def expire(self, now: float) -> int:
        """Evict clients idle for longer than the TTL; return how many."""
        self._settle()
        n = 0
        cutoff = now - self.idle_ttl
        for order in (self._calm, self._flagged):
            while order:
                oldest = next(iter(order.values()))
                if oldest.last_seen >= cutoff:
                    break
                self._evict(oldest.client_id, "ttl")
                n += 1
        return n

    def put(self, state: ClientState) -> None:
        """Insert a restored client (a snapshot lists clients in :meth:`values` order)."""
        self._settle()
        self._clients[state.client_id] = state
        (self._flagged if state.suspicious else self._calm)[state.client_id] = state
        while len(self._clients) > self.max_clients:
            self._evict_lru()

    def _settle(self) -> None:
        """File the client touched last by the verdict its batch gave it (it stays the most recent)."""
        last = self._last
        if last is not None:
            self._last = None
            self.refile(last.client_id)

    def _evict_lru(self) -> None:
        self._settle()
        if self._calm:
            self._evict(next(iter(self._calm)), "lru")
        else:
            self._evict(next(iter(self._flagged)), "lru_flagged")

    def _evict(self, client_id: str, reason: str) -> None:
        state = self._clients.pop(client_id)
        self._calm.pop(client_id, None)
        self._flagged.pop(client_id, None)
        if self.on_evict is not None:
            self.on_evict(state, reason)
