"""k-nearest-neighbour distance to a client's own history (Chen, Carlini & Wagner 2019; SEAT 2021)."""

from __future__ import annotations

import bisect
import functools
import math
from typing import ClassVar

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from exporter.detectors.base import (
    Batch,
    ClientMetric,
    Detector,
    DetectorParams,
    ModelContext,
    Reference,
    Signals,
    State,
    WindowedParams,
    min_threshold_field,
)
from exporter.detectors.kit import Scaling, reservoir_slots, share_signals, vector_rows

_U64 = np.uint64
RESERVOIR_SALT = 0x6B6E6E2D72657376  # "knn-resv": decorrelates the reservoir hash from other users of splitmix64


_NEVER = np.iinfo(np.int64).max
_REPEAT_SQ = 1e-9  # squared embedded distance below which two queries are the same input (rounding of identical vectors)
_CHUNK_ROWS = 256  # a batch is judged in chunks of about this many rows (see KnnDetector._chunk)
_PLAN_ITEMS = 512  # stream items per cached block of reservoir decisions (see _reservoir_block)


@functools.lru_cache(maxsize=4096)
def _reservoir_block(block: int, capacity: int, salt: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    """The stream items of block ``block`` (the ``_PLAN_ITEMS`` numbers from ``block *
    _PLAN_ITEMS``) that the reservoir keeps, and their slots, from :func:`reservoir_slots`.

    The decisions depend on the item number only, so they are hashed once per process and
    shared by every client (a block past the filling phase keeps few items). The items come
    as a list too, for :func:`bisect.bisect_left`; the arrays are read-only.
    """
    items = np.arange(block * _PLAN_ITEMS, (block + 1) * _PLAN_ITEMS, dtype=np.int64)
    slots = reservoir_slots(items, capacity, salt)
    kept = np.flatnonzero(slots >= 0)
    items, slots = items[kept], slots[kept]
    items.flags.writeable = False
    slots.flags.writeable = False
    return items.tolist(), items, slots


def _reservoir_takers(n0: int, m: int, capacity: int, salt: int = RESERVOIR_SALT) -> tuple[np.ndarray, np.ndarray]:
    """The reservoir slots taken by the stream items ``n0 .. n0 + m - 1``, and the offsets
    (item number - ``n0``) of the items taking them, in arrival order (a slot may repeat):
    the decisions of :func:`reservoir_slots`. The arrays may be shared: not to be written.
    """
    if capacity <= 0:
        none = np.zeros(0, dtype=np.int64)
        return none, none
    if n0 + m <= capacity:  # still filling: item j takes slot j
        offsets = np.arange(m, dtype=np.int64)
        return offsets + n0, offsets
    first, last = n0 // _PLAN_ITEMS, (n0 + m - 1) // _PLAN_ITEMS
    if first == last:
        listed, items, slots = _reservoir_block(first, capacity, salt)
    else:
        blocks = [_reservoir_block(b, capacity, salt) for b in range(first, last + 1)]
        listed = [j for block in blocks for j in block[0]]
        items, slots = np.concatenate([block[1] for block in blocks]), np.concatenate([block[2] for block in blocks])
    lo, hi = bisect.bisect_left(listed, n0), bisect.bisect_left(listed, n0 + m)
    return slots[lo:hi], items[lo:hi] - n0


def _next_takers(taken: np.ndarray, taker: np.ndarray, n0: int, m: int, recent: int, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """For the reservoir takers of a chunk whose copy could be seen within it, the next
    taker of their slot.

    ``taken``/``taker``: the slots taken by the chunk's rows ``taker`` (queries ``n0 +
    taker``, from :func:`_reservoir_takers`, arrival order). The copy of row o is seen by
    the rows from ``o + recent + 1`` (once o has left the FIFO) up to and including the
    next row taking its slot, so only takers before row ``m - recent - 1`` matter. Returns
    those takers' rows and the rows of their slots' next takers (m for none).
    """
    early = int(np.searchsorted(taker, m - recent - 1))
    if early == 0:
        return taker[:0], taker[:0]
    if n0 + early <= capacity:  # the early takers are still filling the reservoir: distinct slots
        nxt = np.full(capacity, m, dtype=np.int64)  # per slot: its first later taker
        np.minimum.at(nxt, taken[early:], taker[early:])
        return taker[:early], nxt[taken[:early]]
    order = np.argsort(taken, kind="stable")  # by slot, then arrival
    grouped = taken[order]
    after = np.full(taken.shape[0], m, dtype=np.int64)
    same = np.flatnonzero(grouped[1:] == grouped[:-1])  # order[same] is taken again by order[same + 1]
    after[order[same]] = taker[order[same + 1]]
    return taker[:early], after[:early]


def _ring_pieces(start: int, n: int, size: int, base: int = 0) -> list[tuple[slice, slice]]:
    """Where ``n`` consecutive items go in a ring of ``size`` slots (numbered from
    ``base``) from slot ``start``: (ring slots, item positions) for each of the one or two
    contiguous pieces."""
    first = min(n, size - start)
    pieces = [(slice(base + start, base + start + first), slice(0, first))]
    if first < n:
        pieces.append((slice(base, base + n - first), slice(first, n)))
    return pieces


class KnnParams(WindowedParams):
    """Parameters of :class:`KnnDetector`."""

    k: int = Field(8, ge=1, le=1000, description="Neighbours averaged: a query's score is its mean distance to its k nearest previous queries of the same client.")
    recent: int = Field(64, ge=1, le=100_000, description="The client's last queries kept in full (a FIFO ring).")
    reservoir: int = Field(
        64,
        ge=0,
        le=100_000,
        description="Queries kept from the client's whole older past (uniform reservoir sample of the queries that left the FIFO), so a flood of unrelated queries cannot flush the history.",
    )
    projection_dim: int = Field(
        32,
        ge=1,
        le=4096,
        description="Inputs with more standardized features than this are reduced to this many by a fixed seeded Gaussian random projection (distances are preserved in expectation).",
    )
    projection_seed: int = Field(20190425, ge=0, description="Seed of the random projection; the same seed gives the same projection in every process.")
    distance_threshold: float = Field(
        0.25,
        gt=0.0,
        description=(
            "A query is 'close' when its k-NN mean distance is below this. Distances are RMS per "
            "standardized feature (Euclidean distance / sqrt(number of input features)), so 0.25 "
            "means 'within about a quarter of a standard deviation per feature'; natural "
            "digits-like traffic has k-NN means above 0.35, adversarial search below 0.1. A "
            "calibration reference (fit) replaces it with a low percentile of benign k-NN distances."
        ),
    )
    pair_threshold: float = Field(
        0.1,
        gt=0.0,
        description="SEAT: two queries of a client are a similar pair when their distance (same units as distance_threshold) is below this; pairs are counted cumulatively.",
    )
    window: int = Field(100, ge=1, le=100_000, description="How many of the client's last judged queries the share of close queries is taken over.")
    min_events: int = Field(20, ge=1, description="Judged queries needed in the window before the client can be flagged (<= window).")
    threshold: float = Field(
        0.9,
        ge=0.0,
        le=1.0,
        description="Flag when at least this share of the window's judged queries was close to the client's history. Calibration overwrites it per model.",
    )
    min_threshold: float = min_threshold_field(0.5)
    fit_percentile: float = Field(
        1.0,
        gt=0.0,
        lt=100.0,
        description="fit(): the percentile of benign k-NN mean distances taken as distance_threshold (Chen et al. use 0.1; 1 is steadier with a few thousand reference rows).",
    )

    @field_validator("recent")
    @classmethod
    def _fifo_holds_k(cls, value: int, info: ValidationInfo) -> int:
        k = info.data.get("k")
        if k is not None and value < k:
            raise ValueError(f"must be at least k ({k}), so every judged query has k neighbours to compare with")
        return value


class KnnDetector(Detector):
    """Flags a client when most of its queries lie very close to its own earlier queries.

    What it catches: query-based adversarial search (HopSkipJump, Boundary, SimBA, NES,
    Square) — hundreds of tiny perturbations around one input — and any synthesis that
    walks in steps much smaller than natural variation. This is the stateful detection
    of Chen, Carlini & Wagner (2019): the mean distance of a query to its k nearest
    previous queries of the same account is far below what natural traffic produces.
    SEAT's count of similar pairs is kept beside it.

    How: input vectors are standardized (the model's feature scaling; nothing is judged
    before the model has one), projected to
    ``projection_dim`` dimensions by a fixed Gaussian random projection when wider, and
    stored as float32. The history of a client is the union of two disjoint parts: the
    last ``recent`` queries (FIFO), and a reservoir of ``reservoir`` queries sampled
    uniformly from the client's past (Algorithm R at arrival, driven by a hash of the
    query's number, see :func:`reservoir_slots`; a reservoir copy is seen once the query
    has left the FIFO). A flood of unrelated queries therefore pushes the attack out of
    the FIFO but not out of the reservoir: after n queries an early query is still held
    with probability ``reservoir / n``. For every query (judged once the client has
    at least k earlier ones) the mean of its k smallest distances to the history —
    earlier queries of the same batch included — is taken, divided by
    ``sqrt(input features)``; the query is close when that is below
    ``distance_threshold``. The score is the share of close queries among the last
    ``window`` judged ones, ``close / max(n, min_events)``, so a new client's score ramps
    up; the client is flagged when ``n >= min_events`` and the score is at least
    ``threshold``. SEAT's statistic, the cumulative number of similar pairs (a query and a
    visible history entry closer than ``pair_threshold``), is kept in state ``pairs``
    (see :func:`similar_pairs`); it does not drive the flag.

    ``fit`` learns the distance threshold from benign reference vectors: the reference is
    cut into consecutive chunks of ``recent + reservoir`` rows (simulated clients), every
    row with at least k earlier rows in its chunk gets its k-NN mean distance, and the
    ``fit_percentile`` percentile becomes the threshold.

    What it misses: attacks whose queries are far from each other — uniform random
    queries, natural-data extraction (Knockoff, ActiveThief) — and JbDA as PRADA
    evaluates it: steps of 0.1 of the feature range on every feature are as large as
    natural variation on digits-like data, and its 100 seed families do not fit a
    128-query history (``prada`` catches it). Also an attacker who moves the search
    across many accounts (Sybils; the shared ``fingerprint`` index is for that). Interleaving natural queries dilutes the share but not each attack query's
    closeness: at 1:1 the share stays near one half. Benign clients that resubmit the
    same input (retries) look close too; calibration of ``threshold`` accounts for them.

    Batching: the result does not depend on how a client's events are batched (history
    entries carry the range of query numbers that see them, so every query of a batch
    is judged against exactly the history it would have seen alone), except for
    floating-point rounding of the distance products (matrix products of other shapes),
    which can only flip a comparison that is an exact tie.

    Not judged (NaN, or None for a whole batch): events without an input vector, and the
    first k queries of a client.

    Cost per batch of m events with history H = recent + reservoir and projected
    dimension p: one (m, d) x (d, p) projection, then per chunk of at most 256 rows (or
    ``recent``, if larger) one (m, p) x (p, at most H + m) product (the chunk against the
    FIFO, itself and the reservoir rows some of its queries see; a new client's first
    chunk against itself only, as a symmetric product) and a partition of each row's
    candidates: the ``recent`` queries before it, read off the distances as a strided
    band without a mask, and the reservoir rows some query of the chunk sees (masked only
    where a query does not see them). The reservoir decisions are vectorized, and hashed
    once per process in blocks of item numbers shared by every client. At the default
    sizes the fixed cost of a chunk (some 60 numpy calls) is about half of the total, so
    an event costs less in a large batch than alone.
    State per client: ``(recent + reservoir) * (4 p + 24) + window + 24`` bytes (float32
    vectors, their squared norms and visibility range, one bool per window slot, three
    counters); with the defaults and 64 features (p = 32): 19,580 bytes.
    """

    name: ClassVar[str] = "knn"
    Params: ClassVar[type[DetectorParams]] = KnnParams
    threshold_param: ClassVar[str | None] = "threshold"
    default_enabled: ClassVar[bool] = True
    client_metrics: ClassVar[tuple[ClientMetric, ...]] = (
        ClientMetric(
            "monitaur_client_similar_pairs",
            "counter",
            "SEAT: pairs of the client's queries closer than detectors.knn.pair_threshold (each query with its visible history).",
        ),
    )
    params: KnnParams

    def __init__(self, params: DetectorParams, context: ModelContext) -> None:
        super().__init__(params, context)
        d = context.input_dim
        self._dim = d
        p = self.params
        self._proj: np.ndarray | None = None
        if d is not None and d > p.projection_dim:
            rng = np.random.default_rng([p.projection_seed, d, p.projection_dim])
            self._proj = rng.standard_normal((d, p.projection_dim)) / math.sqrt(p.projection_dim)
        self._pdim = 0 if d is None else (p.projection_dim if self._proj is not None else d)
        self._scale = 1.0 / math.sqrt(d) if d else 1.0  # distances are reported per sqrt(feature)
        self._pair_sq = (p.pair_threshold * (math.sqrt(d) if d else 1.0)) ** 2  # in unscaled squared units
        self._distance_threshold = float(p.distance_threshold)
        # Rows judged together: about _CHUNK_ROWS (a multiple of recent), so the fixed cost
        # of a chunk (some sixty numpy calls) is shared by many events while its (m, m)
        # part of the product stays small.
        self._chunk = p.recent * max(1, _CHUNK_ROWS // p.recent)
        self._rows = np.arange(self._chunk)[:, None]  # a chunk's row numbers, as a column
        # chunk True, chunk False, chunk True: its sliding windows (one step per row) are
        # the triangular masks of _first_chunk and _later_chunk
        self._steps = np.repeat(np.array([True, False, True]), self._chunk)

    # -- state -------------------------------------------------------------------
    def init_state(self) -> State:
        p, q = self.params, self._pdim
        rows = p.reservoir + p.recent
        return {
            # rows [0, reservoir) are the reservoir, [reservoir, reservoir + recent) the FIFO
            "hist": np.zeros((rows, q), dtype=np.float32),
            "hist_sq": np.zeros(rows, dtype=np.float64),  # squared norms of the rows
            # a row is visible to the client's query number t when from <= t < until
            "hist_from": np.full(rows, _NEVER, dtype=np.int64),
            "hist_until": np.full(rows, _NEVER, dtype=np.int64),
            "seen": np.zeros((), dtype=np.int64),  # queries with a vector so far
            "close_buf": np.zeros(p.window, dtype=np.bool_),
            "close_count": np.zeros((), dtype=np.int64),
            "pairs": np.zeros((), dtype=np.int64),
        }

    def embed(self, x: np.ndarray, scaling: Scaling | None = None) -> np.ndarray | None:
        """(m, d) raw vectors -> (m, p) float32 standardized (and projected) vectors.

        ``scaling`` defaults to the model's; None when there is none of the vectors' length.
        """
        scaling = scaling or self.context.scaling
        if scaling is None or scaling.dim != x.shape[1]:
            return None
        z = scaling.apply(x)
        if self._proj is not None:
            z = z @ self._proj
        return z.astype(np.float32)

    # -- detection ---------------------------------------------------------------
    def update(self, state: State, batch: Batch) -> Signals | None:
        if self._dim is None:
            return None
        idx, x = vector_rows(batch, self._dim)
        if x is None:
            return None
        p = self.params
        y = self.embed(x)
        if y is None:
            return None
        step = self._chunk
        if y.shape[0] <= step:
            dists = self._knn(state, y)
        else:
            dists = np.concatenate([self._knn(state, y[i : i + step]) for i in range(0, y.shape[0], step)])
        judged = ~np.isnan(dists)
        close = dists[judged] < self._distance_threshold
        return share_signals(state["close_buf"], state["close_count"], close, idx[judged], len(batch), p.min_events, p.threshold)

    def _knn(self, state: State, y: np.ndarray) -> np.ndarray:
        """Judge ``y`` (a chunk of m rows) against the history, then fold it in.

        Returns each row's k-NN mean distance, NaN for rows with fewer than k earlier queries.

        A query sees the ``recent`` queries before it (FIFO or chunk) and the reservoir rows
        whose visibility range holds it: the rows held at the start of the chunk, and the
        copies of the chunk's own queries the reservoir keeps (seen once they have left the
        FIFO, in chunks longer than ``recent``). :meth:`_first_chunk` and
        :meth:`_later_chunk` lay those distances out per row, +inf where not seen.
        """
        p = self.params
        R, S, k = p.recent, p.reservoir, p.k
        m = y.shape[0]
        n0 = int(state["seen"])
        hist, hist_sq, hist_from, hist_until = state["hist"], state["hist_sq"], state["hist_from"], state["hist_until"]
        # Reservoir decisions of the new queries (Algorithm R at arrival), and the next
        # taker of the slots of those whose copy may be seen within the chunk.
        taken, taker = _reservoir_takers(n0, m, S)
        early, after = _next_takers(taken, taker, n0, m, R, S)
        yq = y.astype(np.float64)
        ysq = np.einsum("ij,ij->i", yq, yq)
        if n0 == 0:  # nothing held yet
            work, r0 = self._first_chunk(yq, ysq, early, after)
        else:
            work, r0 = self._later_chunk(state, y, yq, ysq, taken, taker, early, after)
        state["pairs"][...] = int(state["pairs"]) + int(np.count_nonzero(work < self._pair_sq))
        # A query that repeats an earlier one exactly is repetition's business, not a
        # small step: it is not judged here (a canary re-sending a fixed set, a retry).
        repeat = (work <= _REPEAT_SQ).any(axis=1)
        out = np.empty(m)
        first = min(max(0, k - n0), m)  # rows before this have fewer than k earlier queries
        out[:first] = np.nan
        if first < m:
            if first < r0:  # rows before r0 see nothing past the first R columns
                work[first:r0, :R].partition(k - 1, axis=1)
            if r0 < m:
                work[max(first, r0) :].partition(k - 1, axis=1)
            near = np.sort(work[first:, :k], axis=1)  # a fixed summation order, whatever the batch
            np.maximum(near, 0.0, out=near)
            np.sqrt(near, out=near)
            dist = near.sum(axis=1)
            np.multiply(dist, self._scale / k, out=out[first:])
        out[repeat] = np.nan
        # Fold the chunk in: its last R queries into the FIFO, then the reservoir's takers
        # (the last query taking a slot wins).
        tail = max(0, m - R)
        frm = np.arange(n0 + tail + 1, n0 + m + 1, dtype=np.int64)  # a query is seen from its number + 1
        until = frm + R
        for slots, rows in _ring_pieces((n0 + tail) % R, m - tail, R, S):
            hist[slots] = y[tail:][rows]
            hist_sq[slots] = ysq[tail:][rows]
            hist_from[slots] = frm[rows]
            hist_until[slots] = until[rows]
        if taken.size:
            rs, ri = taken, taker
            if taken.size > 1 and n0 + m > S:  # hashed slots may repeat
                last = np.full(S, -1, dtype=np.int64)
                np.maximum.at(last, taken, taker)
                rs = np.flatnonzero(last >= 0)
                ri = last[rs]
            hist[rs] = y[ri]
            hist_sq[rs] = ysq[ri]
            hist_from[rs] = ri + (n0 + R + 1)  # seen through the reservoir once it has left the FIFO
            hist_until[rs] = _NEVER
        state["seen"][...] = n0 + m
        return out

    def _first_chunk(self, yq: np.ndarray, ysq: np.ndarray, early: np.ndarray, after: np.ndarray) -> tuple[np.ndarray, int]:
        """A new client's first chunk: its (m, m) distances, +inf where not seen, and the
        number of rows that only see the first ``recent`` columns.

        Chunk row o is seen by the rows after it, up to o + recent through the FIFO, and
        on up to the next taker of its slot through its reservoir copy if it has one
        (rows ``early`` have their slot's next taker in ``after``, see
        :func:`_next_takers`): rows ``o < i < hi[o]``.
        """
        R, m = self.params.recent, yq.shape[0]
        d2 = yq @ yq.T  # a symmetric product: half the work
        d2 *= -2.0  # exact: scaling by 2 does not round
        d2 += ysq
        d2 += ysq[:, None]
        # the window of _steps starting at 2 chunk - i is True from column i on
        np.copyto(d2, np.inf, where=np.ndarray((m, m), dtype=np.bool_, buffer=self._steps, offset=2 * self._chunk, strides=(-1, 1)))
        if m > R + 1:  # as hi[o] > o + R, only rows > R can be past it, for columns o < m - R - 1
            e = m - R - 1
            hi = self._rows[:e, 0] + (R + 1)
            hi[early] = np.maximum(hi[early], after + 1)
            np.copyto(d2[R + 1 :, :e], np.inf, where=self._rows[R + 1 : m] >= hi)
        return d2, min(R, m)

    def _later_chunk(
        self, state: State, y: np.ndarray, yq: np.ndarray, ysq: np.ndarray, taken: np.ndarray, taker: np.ndarray, early: np.ndarray, after: np.ndarray
    ) -> tuple[np.ndarray, int]:
        """A chunk of a client with a history: per row, its distances to the ``recent``
        queries before it, then to the reservoir rows seen by every row of the chunk, then
        to those seen by some, +inf where not seen; and the number of rows that see no
        reservoir row (only the first ``recent`` columns matter for them).

        Query ``n0 + i`` sees the ``recent`` queries before it, wherever they are (FIFO or
        chunk): with the FIFO taken oldest first and the chunk after it, those are the
        entries ``[i - pad, i - pad + recent)`` of row i of the distances (``pad``
        never-filled FIFO slots first), copied out as a strided band without a mask. The
        reservoir rows are those held (seen while from <= query number < until; an occupant
        replaced by the chunk's query j, the slots ``taken`` by rows ``taker``, is seen up to
        and including j) and the copies of the chunk's rows kept by the reservoir (see
        :func:`_next_takers` for ``early`` and ``after``).
        """
        R, S = self.params.recent, self.params.reservoir
        m = y.shape[0]
        n0 = int(state["seen"])
        hist, hist_sq, hist_from, hist_until = state["hist"], state["hist_sq"], state["hist_from"], state["hist_until"]
        # The reservoir rows by the chunk's rows lo <= i < hi that see them.
        until = hist_until[:S]
        if taken.size:
            until = until.copy()
            np.minimum.at(until, taken, taker + (n0 + 1))  # the first taker of a slot decides
        lo, hi = hist_from[:S] - n0, until - n0
        by_all = (lo <= 0) & (hi >= m)
        full = np.flatnonzero(by_all)  # seen by every row
        part = np.flatnonzero((lo < m) & (hi > 0) & ~by_all)  # by some
        # a copy of chunk row o is seen by the rows after o + R up to the next taker of its slot
        seen = np.flatnonzero(after > early + R)
        own = early[seen]
        lo, hi = np.concatenate((lo[part], own + (R + 1))), np.concatenate((hi[part], after[seen] + 1))
        hf, hp = full.size, lo.size
        # The FIFO's queries n0 - nf .. n0 - 1, oldest first: slot S + q % R holds query q.
        nf = min(n0, R)
        pad = R - nf  # FIFO slots never filled (a young client)
        fifo = [slots for slots, _ in _ring_pieces((n0 - nf) % R, nf, R, S)]
        # d2 columns: the FIFO, the chunk, the reservoir rows seen by all, then by some
        cand = np.concatenate([hist[slots] for slots in fifo] + [y, hist[full], hist[part]], dtype=np.float64)
        width = cand.shape[0]
        flat = np.empty(pad + m * (width + 1))  # d2 with pad entries before it and m after
        d2 = flat[pad : pad + m * width].reshape(m, width)
        np.matmul(yq * -2.0, cand.T, out=d2)  # exactly -2 (y . c): scaling by 2 does not round
        d2 += np.concatenate([hist_sq[slots] for slots in fifo] + [ysq, hist_sq[full], hist_sq[part]])
        d2 += ysq[:, None]
        work = np.empty((m, R + hf + hp))
        # Row i of flat viewed with rows width + 1 apart starts at d2[i, i - pad]; its first
        # pad - i entries (the previous row's, or spare ones) stand for never-filled slots.
        step = flat.strides[0]
        work[:, :R] = np.ndarray((m, R), dtype=flat.dtype, buffer=flat, strides=((width + 1) * step, step))
        if pad:
            # the window of _steps starting at chunk - pad + i is True for its first pad - i entries
            young = np.ndarray((min(m, pad), pad), dtype=np.bool_, buffer=self._steps, offset=self._chunk - pad, strides=(1, 1))
            np.copyto(work[: young.shape[0], :pad], np.inf, where=young)
        c = nf + m  # the first reservoir column of d2
        work[:, R : R + hf] = d2[:, c : c + hf]
        r0 = 0 if hf else m  # rows before r0 see no reservoir row
        if hp:
            p0 = min(max(int(lo.min()), 0), m)  # rows before p0 see none of those seen by some
            some = work[:, R + hf :]
            some[:p0] = np.inf
            some = some[p0:]
            some[:, : part.size] = d2[p0:, c + hf :]
            if own.size:  # a copy of a chunk row: the same vector as its chunk column
                some[:, part.size :] = d2[p0:, own + nf]
            i = self._rows[p0:m]
            np.copyto(some, np.inf, where=(lo > i) | (hi <= i))
            r0 = min(r0, p0)
        return work, r0

    # -- calibration -------------------------------------------------------------
    def fit(self, reference: Reference) -> State | None:
        x = reference.vectors
        p = self.params
        if x is None or x.ndim != 2 or self._dim is None or x.shape[1] != self._dim:
            return None
        # Exact repeats (a popular input sent by many clients) say nothing about how close
        # distinct natural inputs are: the distance scale is learned from distinct rows.
        _, first = np.unique(np.asarray(x), axis=0, return_index=True)
        embedded = self.embed(np.asarray(x)[np.sort(first)], reference.scaling)
        if embedded is None:
            return None
        y = embedded.astype(np.float64)
        chunk = p.recent + p.reservoir
        found: list[np.ndarray] = []
        for start in range(0, y.shape[0], chunk):
            block = y[start : start + chunk]
            n = block.shape[0]
            if n <= p.k:
                continue
            sq = np.einsum("ij,ij->i", block, block)
            d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (block @ block.T), 0.0)
            dist = np.sqrt(d2) * self._scale
            dist[np.triu_indices(n)] = np.inf  # only earlier rows of the chunk
            rows = dist[p.k :]
            found.append(np.sort(rows, axis=1)[:, : p.k].mean(axis=1))
        if not found:
            return None
        values = np.concatenate(found)
        threshold = float(np.percentile(values, p.fit_percentile))
        if not threshold > 0.0:  # rows that are all near-identical: nothing to learn a scale from
            return None
        return {"distance_threshold": np.asarray(threshold, dtype=np.float64)}

    def load_reference(self, reference: State) -> None:
        value = float(np.asarray(reference["distance_threshold"]))
        if not math.isfinite(value) or value <= 0.0:
            raise ValueError(f"knn reference distance_threshold must be a positive number, got {value}")
        self._distance_threshold = value

    @property
    def distance_threshold(self) -> float:
        """The closeness threshold in use (the parameter, or the calibrated one)."""
        return self._distance_threshold

    def client_values(self, state: State) -> dict[str, float]:
        return {"monitaur_client_similar_pairs": float(similar_pairs(state))}


def similar_pairs(state: State) -> int:
    """SEAT's statistic for a client: pairs of its queries closer than ``pair_threshold`` so far
    (each query paired with the history entries visible to it)."""
    return int(state["pairs"])


def history_items(state: State, recent: int) -> tuple[np.ndarray, np.ndarray]:
    """The query numbers (0-based, per client) held in the reservoir and in the FIFO, for inspection."""
    reservoir_rows = state["hist_from"].shape[0] - recent
    res_from = state["hist_from"][:reservoir_rows]
    fifo_from = state["hist_from"][reservoir_rows:]
    res = np.sort(res_from[res_from != _NEVER] - (recent + 1))
    fifo = np.sort(fifo_from[fifo_from != _NEVER] - 1)
    return res, fifo
