"""Fixed-capacity ring buffers kept as plain numpy arrays inside a detector's state.

Detector state must be snapshot-able and bounded, so history lives in preallocated
arrays (``buf``) with an insertion counter (``count``), never in growing Python lists.
"""

from __future__ import annotations

import numpy as np

State = dict[str, np.ndarray]


def new_ring(capacity: int, item_shape: tuple[int, ...] = (), dtype: np.dtype | type = np.float32) -> State:
    """Return the arrays of an empty ring of ``capacity`` items of ``item_shape``."""
    if capacity < 1:
        raise ValueError("ring capacity must be at least 1")
    return {"buf": np.zeros((capacity, *item_shape), dtype=dtype), "count": np.zeros((), dtype=np.int64)}


class Ring:
    """A view over ring arrays held in a state dict; it owns no data of its own."""

    __slots__ = ("buf", "_count")

    def __init__(self, arrays: State) -> None:
        self.buf = arrays["buf"]
        self._count = arrays["count"]

    @property
    def capacity(self) -> int:
        return int(self.buf.shape[0])

    @property
    def total(self) -> int:
        """Items ever pushed (not capped by capacity)."""
        return int(self._count)

    def __len__(self) -> int:
        return min(int(self._count), self.buf.shape[0])

    def push(self, item: object) -> object:
        """Store ``item``; return the item it overwrote, or None while the ring is filling."""
        n = int(self._count)
        i = n % self.buf.shape[0]
        evicted = self.buf[i].copy() if n >= self.buf.shape[0] else None
        self.buf[i] = item
        self._count[...] = n + 1
        return evicted

    def values(self) -> np.ndarray:
        """The stored items, in storage order (not insertion order); a view, not a copy."""
        return self.buf[: len(self)]
