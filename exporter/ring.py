"""Fixed-capacity ring buffers kept as plain numpy arrays inside a detector's state.

Detector state must be snapshot-able and bounded, so history lives in preallocated
arrays (``buf``) with an insertion counter (``count``), never in growing Python lists.
A ring is a fixed ``buf`` plus an insertion counter: item ``i`` (0-based, ever) lives in
slot ``i % len(buf)``. The functions here read and write whole batches at once.
"""

from __future__ import annotations

import numpy as np

State = dict[str, np.ndarray]


def new_ring(capacity: int, item_shape: tuple[int, ...] = (), dtype: np.dtype | type = np.float32) -> State:
    """Return the arrays of an empty ring of ``capacity`` items of ``item_shape``."""
    if capacity < 1:
        raise ValueError("ring capacity must be at least 1")
    return {"buf": np.zeros((capacity, *item_shape), dtype=dtype), "count": np.zeros((), dtype=np.int64)}


def ring_in_order(buf: np.ndarray, count: int) -> np.ndarray:
    """The ring's stored items, oldest first (a copy once the ring has wrapped)."""
    w = buf.shape[0]
    if count <= w:
        return buf[:count]
    s = count % w
    return np.concatenate((buf[s:], buf[:s]))


def ring_write(buf: np.ndarray, count: int, items: np.ndarray) -> None:
    """Store ``items`` as the ring's next entries (only the last ``len(buf)`` can survive)."""
    w = buf.shape[0]
    j = items.shape[0]
    if j == 0 or w == 0:
        return
    if j == 1:
        buf[count % w] = items[0]
        return
    k = min(j, w)
    buf[(count + np.arange(j - k, j)) % w] = items[j - k :]


def window_shares(buf: np.ndarray, count: int, flags: np.ndarray, min_events: int, flag_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Push boolean ``flags`` into the ring ``buf`` holding ``count`` items so far.

    Returns, for each new flag, the share of set flags in the window right after it was
    pushed, ``set / max(n, min_events)`` with ``n`` items in the window, and whether that
    reached ``flag_ratio`` with ``n >= min_events``. One cumulative sum over the old
    window contents followed by the new flags gives every window's count at once (a
    single flag is counted directly; the counts are integers, so both ways agree
    exactly). The caller advances the counter by ``len(flags)``.
    """
    w = buf.shape[0]
    j = flags.shape[0]
    if j == 1:
        slot = count % w
        hits = int(np.count_nonzero(buf)) + int(flags[0]) - (int(buf[slot]) if count >= w else 0)
        buf[slot] = flags[0]
        n1 = min(count + 1, w)
        value = min(hits / max(n1, min_events), 1.0)
        return np.array([value]), np.array([n1 >= min_events and value >= flag_ratio])
    old = ring_in_order(buf, count)
    cs = np.zeros(old.shape[0] + j + 1, dtype=np.int64)
    np.cumsum(np.concatenate((old, flags)), dtype=np.int64, out=cs[1:])
    t = np.arange(1, j + 1)
    end = old.shape[0] + t
    n = np.minimum(count + t, w)
    hits_arr = cs[end] - cs[end - n]
    values = np.minimum(hits_arr / np.maximum(n, min_events), 1.0)
    flagged = (n >= min_events) & (values >= flag_ratio)
    ring_write(buf, count, flags)
    return values, flagged
