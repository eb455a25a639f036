"""What detectors share: ring buffers, windowed shares, deterministic reservoirs and scatter-back.

Detector state must be snapshot-able and bounded, so history lives in preallocated
arrays inside the state dict, never in growing Python lists. A *ring* is a fixed
``buf`` plus an insertion counter (``count``, a 0-d int64 array): item ``i`` (0-based,
ever) lives in slot ``i % len(buf)``. The functions here read and write whole batches at
once, and give a batch the same results as its events one at a time.
"""

from __future__ import annotations

import numpy as np

from exporter.detectors.base import Batch, Reference, Signals, State
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


_BYTE_SUM = np.uint64(0x0101010101010101)


def count_true(mask: np.ndarray) -> np.ndarray:
    """``np.count_nonzero(mask, axis=-1)`` for a boolean array, eight booleans at a time.

    Eight booleans are read as one 64-bit word whose bytes are 0 or 1; multiplying by
    0x0101...01 adds them up in the top byte. The last ``n % 8`` are counted as usual.
    (``links`` counts over every candidate of every query: the per-element count was the
    largest part of its cheap test.)
    """
    mask = np.ascontiguousarray(mask, dtype=np.bool_)
    n = mask.shape[-1]
    whole = n - n % 8
    if whole == 0:
        return np.count_nonzero(mask, axis=-1)
    words = mask[..., :whole] if whole < n else mask
    sums = (np.ascontiguousarray(words).view(np.uint64) * _BYTE_SUM) >> np.uint64(56)
    out = sums.sum(axis=-1, dtype=np.int64)
    if whole < n:
        out += np.count_nonzero(mask[..., whole:], axis=-1)
    return out


def vector_rows(batch: Batch, dim: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Positions of the batch's events that carry a ``dim``-long vector, and those vectors stacked.

    Events without one (a text, an image, no input) are left out, so a mixed batch is
    judged as its events one at a time would be, not dropped whole.
    """
    x = batch.vectors  # cached by the batch; not None only when every event carries one of one length
    if x is not None and x.shape[1] == dim:
        return np.arange(x.shape[0]), x
    idx = [i for i, e in enumerate(batch.events) if e.vector is not None and e.vector.shape == (dim,)]
    if not idx:
        return np.zeros(0, dtype=np.int64), None
    return np.asarray(idx, dtype=np.int64), np.stack([batch.events[i].vector for i in idx])


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
def winsorize(x: np.ndarray, trim: float) -> np.ndarray:
    """``x`` (n, d) with each column clipped to its ``trim`` and ``1 - trim`` sample quantiles, as float64.

    The robust first step of every fit on data an attacker may have contributed to: a
    few extreme rows (every feature at 1e300) cannot move a mean, a spread or a
    covariance fitted afterwards by more than the quantiles allow.
    """
    x = np.asarray(x, dtype=np.float64)
    lo, hi = np.quantile(x, [trim, 1.0 - trim], axis=0)
    return np.clip(x, lo, hi)


class Scaling:
    """A model's feature scaling: a centre and a spread per feature, fixed once made.

    Detectors compare inputs "in standard deviations", so they need a scale per feature.
    It is learned from benign data (a calibration profile, or the model's live baseline)
    with a *winsorized* mean and standard deviation: each feature is clipped to its
    ``trim`` and ``1 - trim`` sample quantiles first, so that a few extreme inputs (an
    attacker sending every feature at 1e300) cannot move the scale that every other
    client is judged on, while sparse features (pixels that are rarely lit) keep their
    spread, which a median/MAD estimate would set to zero. A feature without spread gets
    1, so it neither vanishes nor explodes. :meth:`apply` clips standardized values to
    +-``Z_MAX`` so that later squares and sums stay finite for any finite input.

    A scaling is immutable: a new one replaces it (``ModelContext.scaling``), and
    detectors that derive data from it check identity to know when to redo that.
    """

    Z_MAX = 1e6
    MIN_SPREAD = 1e-6
    TRIM = 0.005

    __slots__ = ("center", "spread", "inv")

    def __init__(self, center: np.ndarray, spread: np.ndarray) -> None:
        center = np.array(center, dtype=np.float64)
        spread = np.array(spread, dtype=np.float64)
        if center.ndim != 1 or spread.shape != center.shape:
            raise ValueError("a scaling needs a centre and a spread of one length")
        if not (np.isfinite(center).all() and np.isfinite(spread).all() and (spread > 0).all()):
            raise ValueError("a scaling needs finite centres and positive finite spreads")
        center.flags.writeable = False
        spread.flags.writeable = False
        self.center = center
        self.spread = spread
        self.inv = 1.0 / spread

    @property
    def dim(self) -> int:
        return int(self.center.shape[0])

    @classmethod
    def fit(cls, x: np.ndarray, trim: float = TRIM) -> "Scaling":
        """Winsorized mean and standard deviation of the rows of ``x`` (n, d), n >= 1."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError("a scaling is fitted on a non-empty (n, d) array")
        w = winsorize(x, trim)
        center = w.mean(axis=0)
        spread = w.std(axis=0, ddof=1) if x.shape[0] > 1 else np.zeros(x.shape[1])
        spread = np.where(spread > cls.MIN_SPREAD, spread, 1.0)
        return cls(center, spread)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``x`` (m, d) standardized, as a new float64 array, clipped to +-``Z_MAX``."""
        z = (np.asarray(x, dtype=np.float64) - self.center) * self.inv
        return np.clip(z, -self.Z_MAX, self.Z_MAX, out=z)

    def state(self) -> State:
        return {"center": self.center.copy(), "spread": self.spread.copy()}

    @classmethod
    def from_state(cls, state: State, dim: int | None = None) -> "Scaling":
        """The scaling saved by :meth:`state`; ValueError if it does not fit ``dim`` features."""
        out = cls(np.asarray(state["center"]), np.asarray(state["spread"]))
        if dim is not None and out.dim != dim:
            raise ValueError(f"the feature scaling has {out.dim} features; the model has {dim}")
        return out


UNIFORM_FACTOR = 2.0  # features whose full extents lie within this factor of the median extent share one scale


def feature_spans(reference: "Reference", dim: int | None) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """The range benign inputs span per feature, for detectors that measure steps in range units.

    Returns ``(x, span, uniform)``: the reference's vectors as float64; per feature, the
    0.1-99.9 % quantile range (0: a feature that never moves); and whether the features
    share one box (pixels: 80 % of the moving features' full extents within
    :data:`UNIFORM_FACTOR` of the median extent), in which case every moving feature gets
    the median extent, since rarely lit pixels have narrow quantile ranges. None when the
    reference has no usable vectors of length ``dim`` or no feature moves.
    """
    x = reference.vectors
    if x is None or x.ndim != 2 or x.shape[0] < 2 or dim is None or x.shape[1] != dim:
        return None
    x = np.asarray(x, dtype=np.float64)
    lo, hi = np.quantile(x, [0.001, 0.999], axis=0)
    span = hi - lo
    moving = span > 0
    if not moving.any():
        return None
    extent = (x.max(axis=0) - x.min(axis=0))[moving]
    median = float(np.median(extent))
    uniform = bool(((extent >= median / UNIFORM_FACTOR) & (extent <= median * UNIFORM_FACTOR)).mean() >= 0.8)
    if uniform:
        span = np.where(moving, median, 0.0)
    return x, span, uniform
