"""Bounded per-client state: an LRU of clients with an idle TTL.

Each client keeps its counters, its current verdict and, per model and detector, the
detector's explicit state. The store never holds more than ``max_clients`` clients: the
least recently seen one is evicted first, and clients idle for longer than the TTL are
swept as new events arrive.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterator

from exporter.detectors.base import State


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
    first_flagged_query: int | None = None  # the verdict's first flag (1-based query index)
    suspicious: bool = False  # the verdict after the client's last event
    score: float = 0.0  # the fused risk after the client's last judged event
    detector_state: dict[str, dict[str, State]] = field(default_factory=dict)  # model -> detector -> state
    fusion_state: dict[str, State] = field(default_factory=dict)  # model -> the fusion stage's state


class ClientStore:
    """LRU + idle-TTL map of client id -> :class:`ClientState`."""

    def __init__(self, max_clients: int, idle_ttl: float, on_evict: Callable[[ClientState, str], None] | None = None) -> None:
        self.max_clients = max_clients
        self.idle_ttl = idle_ttl
        self.on_evict = on_evict
        self._clients: OrderedDict[str, ClientState] = OrderedDict()

    def __len__(self) -> int:
        return len(self._clients)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._clients

    def __getitem__(self, client_id: str) -> ClientState:
        return self._clients[client_id]

    def get(self, client_id: str) -> ClientState | None:
        return self._clients.get(client_id)

    def values(self) -> Iterator[ClientState]:
        return iter(list(self._clients.values()))

    def touch(self, client_id: str, now: float) -> ClientState:
        """Return the client's state, creating it; mark it most recently seen at ``now``."""
        self.expire(now)
        state = self._clients.get(client_id)
        if state is None:
            while len(self._clients) >= self.max_clients:
                self._evict(next(iter(self._clients)), "lru")
            state = self._clients[client_id] = ClientState(client_id, now)
        else:
            self._clients.move_to_end(client_id)
            state.last_seen = max(state.last_seen, now)
        return state

    def expire(self, now: float) -> int:
        """Evict clients idle for longer than the TTL; return how many."""
        n = 0
        cutoff = now - self.idle_ttl
        while self._clients:
            oldest = next(iter(self._clients.values()))
            if oldest.last_seen >= cutoff:
                break
            self._evict(oldest.client_id, "ttl")
            n += 1
        return n

    def put(self, state: ClientState) -> None:
        """Insert a restored client (snapshot order is LRU order)."""
        self._clients[state.client_id] = state
        while len(self._clients) > self.max_clients:
            self._evict(next(iter(self._clients)), "lru")

    def _evict(self, client_id: str, reason: str) -> None:
        state = self._clients.pop(client_id)
        if self.on_evict is not None:
            self.on_evict(state, reason)
