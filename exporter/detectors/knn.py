"""k-nearest-neighbour distance to a client's own history (Chen, Carlini & Wagner 2019; SEAT 2021)."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from exporter.detectors.base import (
    Batch,
    Detector,
    DetectorParams,
    ModelContext,
    Reference,
    Signals,
    State,
    WindowedParams,
)
from exporter.ring import window_shares

_U64 = np.uint64
_RESERVOIR_SALT = 0x6B6E6E2D72657376  # "knn-resv": decorrelates the reservoir hash from other users of splitmix64


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer over a uint64 array (wrapping arithmetic): stable in every process."""
    z = np.asarray(x, dtype=np.uint64) + _U64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


_NEVER = np.iinfo(np.int64).max
_MASK64 = (1 << 64) - 1


def _splitmix64_int(x: int) -> int:
    """:func:`splitmix64` of one Python int (cheaper than numpy for a handful of values)."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _reservoir_slot(j: int, capacity: int, salt: int = _RESERVOIR_SALT) -> int:
    """:func:`reservoir_slots` of one item number."""
    if j < capacity:
        return j
    r = _splitmix64_int(j ^ salt) % (j + 1)
    return r if r < capacity else -1


def reservoir_slots(index: np.ndarray, capacity: int, salt: int = _RESERVOIR_SALT) -> np.ndarray:
    """Reservoir slot of the stream items numbered ``index`` (0-based), or -1 for "not kept".

    Algorithm R with a counter-based hash instead of a random generator: item ``j`` takes
    slot ``j`` while the reservoir fills, then slot ``r = h(j) mod (j + 1)`` when
    ``r < capacity``. Every item ever offered is in the reservoir with probability
    ``capacity / (items offered)``, and the decision depends only on ``j`` (and the
    salt), so it is the same however the stream is batched and in every process.
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
        0.5,
        ge=0.0,
        le=1.0,
        description="Flag when at least this share of the window's judged queries was close to the client's history. Calibration overwrites it per model.",
    )
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

    How: input vectors are standardized (the model's :class:`FeatureStats`), projected to
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

    Cost per batch of m events (chunks of at most ``recent``) with history
    H = recent + reservoir and projected dimension p: one (m, d) x (d, p) projection and
    one (m, p) x (p, H + m) product, a partition of the (m, H + m) distances, and a
    Python loop over the events for the reservoir decisions only (scalar work).
    State per client: ``(recent + reservoir) * (4 p + 24) + window + 24`` bytes (float32
    vectors, their squared norms and visibility range, one bool per window slot, three
    counters); with the defaults and 64 features (p = 32): 19,580 bytes.
    """

    name: ClassVar[str] = "knn"
    Params: ClassVar[type[DetectorParams]] = KnnParams
    threshold_param: ClassVar[str | None] = "threshold"
    default_enabled: ClassVar[bool] = True
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
        self._standardizer = Standardizer()

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

    def embed(self, x: np.ndarray, stats: object | None = None) -> np.ndarray:
        """(m, d) raw vectors -> (m, p) float32 standardized (and projected) vectors.

        ``stats`` (a reference's frozen statistics, for :meth:`fit`) is applied as is;
        without it, the model's statistics through the stable :class:`Standardizer`.
        """
        z = np.asarray(x, dtype=np.float64)
        if stats is not None:
            if getattr(stats, "dim", None) == z.shape[1]:
                z = stats.standardize(z)  # type: ignore[attr-defined]
        else:
            z = self._standardizer.apply(self.context.stats, z)
        if self._proj is not None:
            z = z @ self._proj
        return z.astype(np.float32)

    # -- detection ---------------------------------------------------------------
    def update(self, state: State, batch: Batch) -> Signals | None:
        if self._dim is None:
            return None
        idx, x = _vector_rows(batch, self._dim)
        if x is None:
            return None
        p = self.params
        y = self.embed(x)
        step = p.recent  # a chunk never outlives the FIFO, so batch rows are only seen through it
        if y.shape[0] <= step:
            dists = self._knn(state, y)
        else:
            dists = np.concatenate([self._knn(state, y[i : i + step]) for i in range(0, y.shape[0], step)])
        judged = ~np.isnan(dists)
        if not judged.any():
            return None
        close = dists[judged] < self._distance_threshold
        count = int(state["close_count"])
        v, f = window_shares(state["close_buf"], count, close, p.min_events, p.threshold)
        state["close_count"][...] = count + close.shape[0]
        if judged.all() and idx.shape[0] == len(batch):
            return Signals(v, f)
        out = Signals.constant(len(batch), np.nan, False)
        pos = idx[judged]
        out.values[pos] = v
        out.flagged[pos] = f
        return out

    def _knn(self, state: State, y: np.ndarray) -> np.ndarray:
        """Judge ``y`` (m <= recent rows) against the history, then fold it in.

        Returns each row's k-NN mean distance, NaN for rows with fewer than k earlier queries.
        """
        p = self.params
        R, S, k = p.recent, p.reservoir, p.k
        m = y.shape[0]
        n0 = int(state["seen"])
        t = np.arange(n0, n0 + m, dtype=np.int64)
        hist, hist_sq, hist_from, hist_until = state["hist"], state["hist_sq"], state["hist_from"], state["hist_until"]
        # Reservoir decisions of the new queries (Algorithm R at arrival); an occupant
        # replaced by query j is seen by the queries up to and including j.
        first_taker: dict[int, int] = {}
        last_taker: dict[int, int] = {}
        for j in range(n0, n0 + m):
            s = _reservoir_slot(j, S)
            if s >= 0:
                first_taker.setdefault(s, j)
                last_taker[s] = j - n0
        until = hist_until
        if first_taker:
            until = hist_until.copy()
            for s, j in first_taker.items():
                if until[s] > j + 1:
                    until[s] = j + 1
        yq = y.astype(np.float64)
        ysq = np.einsum("ij,ij->i", yq, yq)
        cand = np.concatenate((hist, y)).astype(np.float64)
        d2 = np.concatenate((hist_sq, ysq)) - 2.0 * (yq @ cand.T)
        d2 += ysq[:, None]
        # a history row (or an earlier query of the batch) is seen by query t when from <= t < until
        tc = t[:, None]
        d2[(np.concatenate((hist_from, t + 1)) > tc) | (np.concatenate((until, t + (R + 1))) <= tc)] = np.inf
        state["pairs"][...] = int(state["pairs"]) + int(np.count_nonzero(d2 < self._pair_sq))
        out = np.full(m, np.nan)
        first = max(0, k - n0)  # rows before this have fewer than k earlier queries
        if first < m:
            near = np.partition(d2[first:] if first else d2, k - 1, axis=1)[:, :k]
            near.sort(axis=1)  # a fixed summation order, whatever the batch
            np.maximum(near, 0.0, out=near)
            out[first:] = np.sqrt(near).sum(axis=1) * (self._scale / k)
        # Fold the batch in: FIFO rows, then reservoir rows (the last query taking a slot wins).
        fifo = S + (t % R)
        hist[fifo] = y
        hist_sq[fifo] = ysq
        hist_from[fifo] = t + 1
        hist_until[fifo] = t + (R + 1)
        if last_taker:
            rs = np.fromiter(last_taker.keys(), dtype=np.int64, count=len(last_taker))
            ri = np.fromiter(last_taker.values(), dtype=np.int64, count=len(last_taker))
            hist[rs] = y[ri]
            hist_sq[rs] = ysq[ri]
            hist_from[rs] = t[ri] + (R + 1)  # seen through the reservoir once it has left the FIFO
            hist_until[rs] = _NEVER
        state["seen"][...] = n0 + m
        return out

    # -- calibration -------------------------------------------------------------
    def fit(self, reference: Reference) -> State | None:
        x = reference.vectors
        p = self.params
        if x is None or x.ndim != 2 or self._dim is None or x.shape[1] != self._dim:
            return None
        y = self.embed(x, reference.stats).astype(np.float64)
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
        return {"distance_threshold": np.asarray(float(np.percentile(values, p.fit_percentile)), dtype=np.float64)}

    def shared_state(self) -> State | None:
        return self._standardizer.state()

    def load_shared_state(self, state: State) -> None:
        self._standardizer.load(state, self._dim)

    def load_reference(self, reference: State) -> None:
        value = float(np.asarray(reference["distance_threshold"]))
        if not math.isfinite(value) or value <= 0.0:
            raise ValueError(f"knn reference distance_threshold must be a positive number, got {value}")
        self._distance_threshold = value

    @property
    def distance_threshold(self) -> float:
        """The closeness threshold in use (the parameter, or the calibrated one)."""
        return self._distance_threshold


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


def _vector_rows(batch: Batch, dim: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Positions of the batch's events that carry a ``dim``-long vector, and those vectors stacked."""
    events = batch.events
    if all(e.vector is not None for e in events):
        x = batch.vectors
        if x is None or x.ndim != 2 or x.shape[1] != dim:
            return np.zeros(0, dtype=np.int64), None
        return np.arange(len(events)), x
    idx = [i for i, e in enumerate(events) if e.vector is not None and e.vector.shape == (dim,)]
    if not idx:
        return np.zeros(0, dtype=np.int64), None
    return np.asarray(idx, dtype=np.int64), np.stack([events[i].vector for i in idx])
