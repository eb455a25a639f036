"""What detectors share: ring buffers, windowed shares, deterministic reservoirs and scatter-back.

Detector state must be snapshot-able and bounded, so history lives in preallocated
arrays inside the state dict, never in growing Python lists. A *ring* is a fixed
``buf`` plus an insertion counter (``count``, a 0-d int64 array): item ``i`` (0-based,
ever) lives in slot ``i % len(buf)``. The functions here read and write whole batches at
once, and give a batch the same results as its events one at a time.
"""

from __future__ import annotations

import numpy as np

from exporter.detectors.base import Signals, State
from exporter.hashing import splitmix64, splitmix64_int

_U64 = np.uint64


# -- rings ----------------------------------------------------------------------------
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


def share_signals(
    buf: np.ndarray, count: np.ndarray, hits: np.ndarray, judged: np.ndarray | None, n: int, min_events: int, flag_ratio: float
) -> Signals | None:
    """The windowed-share verdict most detectors give: push the judged events' ``hits``.

    ``buf``/``count`` are the ring and its 0-d counter in the client's state (advanced
    here); ``hits`` holds one flag per judged event, in order; ``judged`` their positions
    in the batch of ``n`` events (None: every event). Returns the batch's signals (NaN
    where not judged), or None when nothing was judged.
    """
    if hits.shape[0] == 0:
        return None
    c = int(count)
    values, flagged = window_shares(buf, c, hits, min_events, flag_ratio)
    count[...] = c + hits.shape[0]
    return scatter(n, judged, values, flagged)


def scatter(n: int, judged: np.ndarray | list[int] | None, values: np.ndarray, flagged: np.ndarray) -> Signals:
    """Signals for a batch of ``n`` events from the values of its judged events only.

    ``judged`` gives the positions of ``values``/``flagged`` in the batch (None: all of
    them, in order); the other events get NaN ("not judged") and no flag.
    """
    if judged is None or len(judged) == n:
        return Signals(np.asarray(values, dtype=np.float64), np.asarray(flagged, dtype=bool))
    out = Signals.constant(n, np.nan, False)
    out.values[judged] = values
    out.flagged[judged] = flagged
    return out


# -- deterministic reservoirs -------------------------------------------------------------
def reservoir_slots(index: np.ndarray, capacity: int, salt: int) -> np.ndarray:
    """Reservoir slot of the stream items numbered ``index`` (0-based), or -1 for "not kept".

    Algorithm R with a counter-based hash instead of a random generator: item ``j`` takes
    slot ``j`` while the reservoir fills, then slot ``r = h(j) mod (j + 1)`` when
    ``r < capacity``. Every item ever offered is in the reservoir with probability
    ``capacity / (items offered)``, and the decision depends only on ``j`` and the
    ``salt`` (which decorrelates independent reservoirs), so it is the same however the
    stream is batched and in every process.
    """
    j = np.asarray(index, dtype=np.int64)
    out = np.full(j.shape, -1, dtype=np.int64)
    if capacity <= 0 or j.size == 0:
        return out
    filling = j < capacity
    out[filling] = j[filling]
    later = ~filling
    if later.any():
        jl = j[later].astype(np.uint64)
        r = (splitmix64(jl ^ _U64(salt)) % (jl + _U64(1))).astype(np.int64)
        out[later] = np.where(r < capacity, r, -1)
    return out


def reservoir_slot(index: int, capacity: int, salt: int) -> int:
    """:func:`reservoir_slots` of one item, without numpy (for per-event Python loops)."""
    if index < capacity:
        return index
    r = splitmix64_int(index ^ salt) % (index + 1)
    return r if r < capacity else -1


# -- feature scaling ------------------------------------------------------------------
class Standardizer:
    """A model's feature standardization that holds still while its online statistics drift.

    Detectors that store standardized vectors (or quantize them) need the same mapping
    for a query today and for its near-duplicate tomorrow. The model's
    :class:`~exporter.stats.FeatureStats` are updated by every batch until a calibration
    profile freezes them, so this keeps a snapshot (mean, 1 / std): frozen statistics
    are used as they are; online ones are snapshotted when first used and again when
    their event count reaches each of :attr:`STEPS`, then never again. It is shared
    state of the model (see :meth:`state` / :meth:`load`), so a restart keeps it.
    """

    STEPS = (256, 1024, 4096, 16384)

    __slots__ = ("mean", "inv", "count", "_source")

    def __init__(self) -> None:
        self.mean: np.ndarray | None = None
        self.inv: np.ndarray | None = None
        self.count = -1  # the statistics' event count at the snapshot (-1: none)
        self._source: object | None = None  # the frozen std array the snapshot came from

    def apply(self, stats: object | None, x: np.ndarray) -> np.ndarray:
        """``x`` (m, d) standardized with the current snapshot, as a new float64 array (a copy
        of ``x`` when there are no statistics of its length)."""
        if stats is None or getattr(stats, "dim", None) != x.shape[1]:
            return np.array(x, dtype=np.float64)
        self._refresh(stats)
        return (x - self.mean) * self.inv

    def _refresh(self, stats: object) -> None:
        count = int(stats.count)  # type: ignore[attr-defined]
        if stats.frozen:  # type: ignore[attr-defined]
            std = stats.std  # type: ignore[attr-defined]
            if self._source is not std:
                self._take(stats, count)
                self._source = std
            return
        self._source = None
        if self.mean is None or self.mean.shape[0] != stats.dim or any(self.count < step <= count for step in self.STEPS):  # type: ignore[attr-defined]
            self._take(stats, count)

    def _take(self, stats: object, count: int) -> None:
        self.mean = np.array(stats.mean, dtype=np.float64)  # type: ignore[attr-defined]
        self.inv = 1.0 / np.asarray(stats.std, dtype=np.float64)  # type: ignore[attr-defined]
        self.count = count

    def state(self) -> State:
        if self.mean is None or self.inv is None:
            return {"std_count": np.asarray(-1, dtype=np.int64)}
        return {"std_mean": self.mean.copy(), "std_inv": self.inv.copy(), "std_count": np.asarray(self.count, dtype=np.int64)}

    def load(self, state: State, dim: int | None) -> None:
        count = int(np.asarray(state.get("std_count", -1)))
        if count < 0 or "std_mean" not in state:
            return
        mean = np.asarray(state["std_mean"], dtype=np.float64)
        inv = np.asarray(state["std_inv"], dtype=np.float64)
        if mean.ndim != 1 or inv.shape != mean.shape or (dim is not None and mean.shape[0] != dim):
            raise ValueError("standardization snapshot does not fit the model's input length")
        self.mean, self.inv, self.count, self._source = mean.copy(), inv.copy(), count, None
